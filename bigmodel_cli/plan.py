"""`bigmodel plan`: compile the train step without training, and report its cost.

Two things can be planned: pretraining a recipe (its mesh, a fresh model of its size), and finetuning a model
(any model source, as `bigmodel finetune --init-from` would start from it: all weights training, or LoRA
adapters beside frozen ones). Either way the real train step is compiled for abstract arrays, so nothing is
allocated and no weights are read.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import jax
import numpy as np

from bigmodel_cli import config as config_lib
from bigmodel_cli import modelio, parallel, storage
from bigmodel_cli.config import Config
from bigmodel_cli.data.manifest import MANIFEST_FILE, load_manifest
from bigmodel_cli.errors import UserError
from bigmodel_cli.finetune_config import FinetuneConfig
from bigmodel_cli.model import lora as lora_lib
from bigmodel_cli.model.layout import param_name
from bigmodel_cli.model.params import abstract_params, with_adapters
from bigmodel_cli.model.sizing import flops_per_token, train_flops_per_token
from bigmodel_cli.train.loop import check_layout
from bigmodel_cli.train.memory import memory_per_device, refuse_unless_fits
from bigmodel_cli.train.state import Initial, jit_train_step, make_state
from bigmodel_cli.utils import DEFAULT_MFU, MEASURED_MFU, PEAK_FLOPS, chip_peak_flops, peak_row

CHINCHILLA_TOKENS_PER_PARAM = 20  # Hoffmann et al. 2022: compute-optimal tokens per (total) parameter
DEFAULT_VOCAB = 32000  # assumed when neither the recipe nor existing data fixes the vocabulary
# The --set keys that change what finetuning a model runs (None: the whole section); any other is refused, since
# it could not change the plan. train.remat is not among them: finetune builds its model without recomputation.
FINETUNE_SETTINGS: dict[str, tuple[str, ...] | None] = {
    "train": ("batch_size", "grad_accum"),
    "data": ("seq_len",),
    "lora": None,
    "mesh": None,
}


def _with_vocab(cfg: Config) -> tuple[Config, str]:
    if cfg.model.vocab_size:
        return cfg, ""
    vocab, note = DEFAULT_VOCAB, f"model.vocab_size not set and no data at data.path: assuming {DEFAULT_VOCAB}"
    if cfg.data.path and (storage.path(cfg.data.path) / MANIFEST_FILE).is_file():
        vocab, note = load_manifest(storage.path(cfg.data.path))["tokenizer"]["vocab_size"], ""
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab)), note


def run(cfg: Config, memory_budget_gb: float = 0.0) -> dict:
    """Plan pretraining a recipe: sizes, FLOPs, per-device memory and the parameter table of its train step."""
    cfg, note = _with_vocab(cfg)
    seq_len = cfg.data.seq_len or cfg.model.max_seq_len
    return _compile(cfg, seq_len, memory_budget_gb, note)


def finetune_config(overrides: list[str]) -> FinetuneConfig:
    """Finetuning's defaults with --set overrides, refusing a key that cannot change a plan."""
    cfg = config_lib.load_config(None, overrides, cls=FinetuneConfig)  # unknown keys: the closest known one
    for section, keys in config_lib.parse_overrides(overrides).items():
        for key in keys:
            allowed = FINETUNE_SETTINGS.get(section, ())
            if allowed is not None and key not in allowed:
                accepted = ", ".join(f"{s}.{k}" for s, names in FINETUNE_SETTINGS.items() for k in names or ("*",))
                raise UserError(
                    f"--set {section}.{key} does not change what finetuning a model runs: plan takes {accepted}"
                )
    return cfg


def run_finetune(source: Path, cfg: FinetuneConfig, memory_budget_gb: float = 0.0) -> dict:
    """Plan finetuning the model at source as `bigmodel finetune --init-from source` would run it, with LoRA
    adapters when lora.rank is set, from the model's config alone."""
    model_cfg = modelio.model_config(source)
    seq_len, note = cfg.data.seq_len or model_cfg.max_seq_len, ""
    if seq_len > model_cfg.max_seq_len:  # what finetune does with a longer data.seq_len
        note = f"data.seq_len {seq_len} exceeds the model's {model_cfg.max_seq_len} positions: finetune uses those"
        seq_len = model_cfg.max_seq_len
    loop_cfg = Config(
        model=model_cfg,
        data=dataclasses.replace(cfg.data, seq_len=seq_len),
        optim=cfg.optim,
        train=cfg.train,
        mesh=cfg.mesh,
        checkpoint=cfg.checkpoint,
    )
    lora = cfg.lora if cfg.lora.rank else None

    def initial(mesh):  # finetune's starting state, abstract: the model's weights train, or adapters beside them
        graphdef, params = abstract_params(model_cfg, mesh)
        if lora is None:
            return graphdef, params, None
        graphdef, adapters = lora_lib.abstract_adapters(with_adapters(model_cfg, lora), mesh)
        return graphdef, adapters, params

    dropout_seed = cfg.train.seed if lora is not None and lora.dropout > 0 else None
    result = _compile(loop_cfg, seq_len, memory_budget_gb, note, initial, dropout_seed)
    if lora is not None:
        per_token = train_flops_per_token(model_cfg, seq_len, result["trainable_params"])
        result["model_flops_per_step"] = per_token * result["tokens_per_step"]
    return result


def abstract_train_step(
    cfg: Config, seq_len: int, initial: Initial | None = None, dropout_seed: int | None = None
) -> tuple:
    """(jitted train step, abstract state, abstract batch, mesh): what plan compiles for cfg's mesh, from
    initial's abstract state (None: a fresh model)."""
    mesh = parallel.make_mesh(cfg.mesh)
    check_layout(cfg, mesh)  # a batch the mesh cannot split: one line, as training gives it
    graphdef, tx, state = make_state(cfg, mesh, initial, abstract=True)
    batch_sharding = parallel.batch_sharding(mesh)
    shape = (cfg.train.batch_size, seq_len)
    batch = {
        "inputs": jax.ShapeDtypeStruct(shape, np.int32, sharding=batch_sharding),
        "targets": jax.ShapeDtypeStruct(shape, np.int32, sharding=batch_sharding),
        "weights": jax.ShapeDtypeStruct(shape, np.float32, sharding=batch_sharding),
    }
    step = jit_train_step(graphdef, tx, cfg.train.grad_accum, state, mesh, dropout_seed=dropout_seed)
    return step, state, batch, mesh


def _compile(
    cfg: Config,
    seq_len: int,
    memory_budget_gb: float,
    note: str,
    initial: Initial | None = None,
    dropout_seed: int | None = None,
) -> dict:
    """Lower and compile abstract_train_step, with its memory, FLOPs and parameter table."""
    step, state, batch, mesh = abstract_train_step(cfg, seq_len, initial, dropout_seed)
    started = time.perf_counter()
    with parallel.activate(mesh):
        compiled = step.lower(state, batch).compile()
    compile_seconds = time.perf_counter() - started  # tracing included: what scan_layers keeps flat in depth
    memory = compiled.memory_analysis()
    weights = (state["params"], state.get("frozen"))  # what trains, and what joins it without training (LoRA)
    per_device = memory_per_device(weights, state["opt_state"], getattr(memory, "temp_size_in_bytes", 0))
    trainable = {param_name(path) for path, _ in jax.tree_util.tree_flatten_with_path(state["params"])[0]}
    table = [
        {
            "name": param_name(path),
            "shape": list(leaf.shape),
            "dtype": str(leaf.dtype),
            "sharding": str(leaf.sharding.spec),
            "trainable": param_name(path) in trainable,
        }
        for path, leaf in jax.tree_util.tree_flatten_with_path(lora_lib.merge_params(weights[1], weights[0]))[0]
    ]
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    result = {
        "params": sum(math.prod(row["shape"]) for row in table),
        "trainable_params": sum(math.prod(row["shape"]) for row in table if row["trainable"]),
        "mesh": dict(mesh.shape),
        "devices": jax.device_count(),
        "tokens_per_step": cfg.train.batch_size * seq_len,
        "dtype": cfg.model.dtype,
        "model_flops_per_step": flops_per_token(cfg.model, seq_len) * cfg.train.batch_size * seq_len,
        "xla_flops_per_step_per_device": float((cost or {}).get("flops", float("nan"))),
        "bytes_per_device": per_device,
        "parameters": table,
        "compile_seconds": round(compile_seconds, 2),
        "note": note,
    }
    if memory_budget_gb:
        refuse_unless_fits(per_device, memory_budget_gb * 2**30, f"the budget is {memory_budget_gb} GiB")
    return result


def check_cost_options(
    tokens: float | None, chip: str, chips: int | None, mfu: float | None, price_per_chip_hour: float | None
) -> None:
    """Refuse --chip, --chips, --mfu and --price-per-chip-hour values that could not cost a token budget."""
    given = {"--chip": chip, "--chips": chips, "--mfu": mfu, "--price-per-chip-hour": price_per_chip_hour}
    if tokens is None:
        for option, value in given.items():
            if value not in (None, ""):
                raise UserError(f"{option} only prices a token budget: add --tokens N (e.g. --tokens 2e10)")
        return
    if not (tokens > 0 and math.isfinite(tokens) and tokens == int(tokens)):
        raise UserError(f"--tokens {tokens:g}: give a whole number of training tokens, above 0 (e.g. 2e10)")
    if chips is not None and chips < 1:
        raise UserError(f"--chips {chips}: give at least 1 chip")
    if mfu is not None and not 0 < mfu <= 1:
        raise UserError(f"--mfu {mfu:g}: give a fraction of peak in (0, 1], e.g. 0.4")
    if price_per_chip_hour is not None and not price_per_chip_hour > 0:
        raise UserError(f"--price-per-chip-hour {price_per_chip_hour:g}: give a price above 0")
    chip_row(chip)  # an unknown chip, or none to be had, is refused before the compile


def chip_row(chip: str) -> str:
    """The PEAK_FLOPS row named chip (any case), else that of the local accelerator; refused when neither is one."""
    known = ", ".join(repr(name) for name in PEAK_FLOPS)
    if chip:
        row = {name.lower(): name for name in PEAK_FLOPS}.get(chip.lower())
        if row is None:
            raise UserError(f"--chip {chip!r} is not in the peak table: use one of {known}")
        return row
    device = jax.devices()[0]
    row = None if device.platform == "cpu" else peak_row(device.device_kind)
    if row is None:  # a CPU's measured matmul rate is no chip to rent: the question is about accelerators
        local = "a CPU has no peak in the table" if device.platform == "cpu" else f"{device.device_kind!r} has none"
        raise UserError(f"--tokens needs --chip NAME here ({local}): one of {known}")
    return row


def training_cost(
    result: dict,
    tokens: float,
    chip: str = "",
    chips: int | None = None,
    mfu: float | None = None,
    price_per_chip_hour: float | None = None,
    pretraining: bool = True,
) -> dict:
    """Wall time, chip-hours and dollars to train on `tokens` tokens with the planned step, at mfu of the chips'
    peak: time = model FLOPs per token x tokens / (chips x peak x MFU); plus the Chinchilla-optimal token count."""
    row = chip_row(chip)
    chips = chips or math.prod(result["mesh"].values())  # the recipe's mesh, as planned
    measured = MEASURED_MFU.get(row)
    source = "--mfu" if mfu else f"measured: {measured[1]}" if measured else "default"
    mfu = mfu or (measured[0] if measured else DEFAULT_MFU)
    peak = chip_peak_flops(row, result["dtype"])
    flops = result["model_flops_per_step"] / result["tokens_per_step"] * tokens
    seconds = flops / (chips * peak * mfu)
    chip_hours = seconds * chips / 3600
    return {
        "tokens": int(tokens),
        "training_flops": flops,
        "chip": row,
        "chips": chips,
        "peak_flops_per_chip": peak,
        "mfu": mfu,
        "mfu_source": source,
        "seconds": seconds,
        "chip_hours": chip_hours,
        "price_per_chip_hour": price_per_chip_hour,
        "dollars": chip_hours * price_per_chip_hour if price_per_chip_hour else None,
        # compute-optimal pretraining of this model's size; a finetune does not choose its tokens by it
        "chinchilla_tokens": CHINCHILLA_TOKENS_PER_PARAM * result["params"] if pretraining else None,
    }


def _duration(seconds: float) -> str:
    for unit, size in (("days", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.1f} s"


def _amount(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def render_cost(cost: dict, dtype: str, console) -> None:
    """Print training_cost()'s result: FLOPs, wall time, chip-hours, dollars, the Chinchilla reference."""
    dollars = cost["dollars"]
    price = f", ${_amount(dollars)} at ${cost['price_per_chip_hour']:g}/chip-hour" if dollars else ""
    console.print(
        f"training on {cost['tokens']:.3e} tokens: {cost['training_flops']:.3e} FLOPs on {cost['chips']} x "
        f"{cost['chip']} ({cost['peak_flops_per_chip'] / 1e12:g} TFLOP/s peak each in {dtype}) at MFU "
        f"{cost['mfu']:.0%} ({cost['mfu_source']}): {_duration(cost['seconds'])} wall, "
        f"{_amount(cost['chip_hours'])} chip-hours{price}"
    )
    if cost["chinchilla_tokens"]:
        console.print(
            f"Chinchilla-optimal for this size: {cost['chinchilla_tokens']:.3e} tokens "
            f"({CHINCHILLA_TOKENS_PER_PARAM} per parameter, embeddings included; Hoffmann et al. 2022)"
        )


def render(result: dict, console) -> None:
    """Print run()'s result for people on a rich Console: sizes, memory per device, FLOPs, the parameter table."""
    from rich.table import Table

    if result["note"]:
        console.print(f"note: {result['note']}")
    gib = {k: f"{v / 2**30:.3f} GiB" for k, v in result["bytes_per_device"].items()}
    params, trainable = result["params"], result["trainable_params"]
    console.print(
        f"parameters: {params:,} (trainable {trainable:,}: {100 * trainable / params:.2f}%) | "
        f"mesh {result['mesh']} on {result['devices']} devices"
    )
    console.print(
        f"per device: params {gib['params']}, optimizer {gib['optimizer']}, "
        f"activations+temporaries {gib['activations_and_temporaries']}, total {gib['total']}"
    )
    console.print(
        f"FLOPs per step: model {result['model_flops_per_step']:.3e} "
        f"(XLA, per device: {result['xla_flops_per_step_per_device']:.3e}), "
        f"{result['tokens_per_step']:,} tokens per step"
    )
    table = Table("parameter", "shape", "dtype", "sharding", "trains")
    for row in result["parameters"]:
        shape = "x".join(map(str, row["shape"]))
        table.add_row(row["name"], shape, row["dtype"], row["sharding"], "yes" if row["trainable"] else "no")
    console.print(table)
    if "cost" in result:
        render_cost(result["cost"], result["dtype"], console)
