"""`bigmodel plan`: compile the train step for a recipe's mesh without training, and report its cost."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from bigmodel_cli import parallel, storage
from bigmodel_cli.config import Config
from bigmodel_cli.data.manifest import MANIFEST_FILE, load_manifest
from bigmodel_cli.model.params import param_name
from bigmodel_cli.model.transformer import count_params, flops_per_token
from bigmodel_cli.train.memory import memory_per_device, refuse_unless_fits
from bigmodel_cli.train.state import jit_train_step, make_state

DEFAULT_VOCAB = 32000  # assumed when neither the recipe nor existing data fixes the vocabulary


def _with_vocab(cfg: Config) -> tuple[Config, str]:
    if cfg.model.vocab_size:
        return cfg, ""
    vocab, note = DEFAULT_VOCAB, f"model.vocab_size not set and no data at data.path: assuming {DEFAULT_VOCAB}"
    if cfg.data.path and (storage.path(cfg.data.path) / MANIFEST_FILE).is_file():
        vocab, note = load_manifest(storage.path(cfg.data.path))["tokenizer"]["vocab_size"], ""
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab)), note


def run(cfg: Config, memory_budget_gb: float = 0.0) -> dict:
    """Lower and compile the train step; returns sizes, FLOPs, per-device memory and the parameter table."""
    cfg, note = _with_vocab(cfg)
    mesh = parallel.make_mesh(cfg.mesh)
    seq_len = cfg.data.seq_len or cfg.model.max_seq_len
    graphdef, tx, state = make_state(cfg, mesh, abstract=True)
    batch_sharding = parallel.batch_sharding(mesh)
    shape = (cfg.train.batch_size, seq_len)
    batch = {
        "inputs": jax.ShapeDtypeStruct(shape, np.int32, sharding=batch_sharding),
        "targets": jax.ShapeDtypeStruct(shape, np.int32, sharding=batch_sharding),
        "weights": jax.ShapeDtypeStruct(shape, np.float32, sharding=batch_sharding),
    }
    step = jit_train_step(graphdef, tx, cfg.train.grad_accum, state, mesh)
    with parallel.activate(mesh):
        compiled = step.lower(state, batch).compile()
    memory = compiled.memory_analysis()
    n_params, _ = count_params(cfg.model)
    per_device = memory_per_device(state["params"], state["opt_state"], getattr(memory, "temp_size_in_bytes", 0))
    table = [
        {
            "name": param_name(path),
            "shape": list(leaf.shape),
            "dtype": str(leaf.dtype),
            "sharding": str(leaf.sharding.spec),
        }
        for path, leaf in jax.tree_util.tree_flatten_with_path(state["params"])[0]
    ]
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    result = {
        "params": n_params,
        "mesh": dict(mesh.shape),
        "devices": jax.device_count(),
        "tokens_per_step": cfg.train.batch_size * seq_len,
        "model_flops_per_step": flops_per_token(cfg.model, seq_len) * cfg.train.batch_size * seq_len,
        "xla_flops_per_step_per_device": float((cost or {}).get("flops", float("nan"))),
        "bytes_per_device": per_device,
        "parameters": table,
        "note": note,
    }
    if memory_budget_gb:
        refuse_unless_fits(per_device, memory_budget_gb * 2**30, f"the budget is {memory_budget_gb} GiB")
    return result


def render(result: dict, console) -> None:
    """Print run()'s result for people on a rich Console: sizes, memory per device, FLOPs, the parameter table."""
    from rich.table import Table

    if result["note"]:
        console.print(f"note: {result['note']}")
    gib = {k: f"{v / 2**30:.3f} GiB" for k, v in result["bytes_per_device"].items()}
    console.print(f"parameters: {result['params']:,} | mesh {result['mesh']} on {result['devices']} devices")
    console.print(
        f"per device: params {gib['params']}, optimizer {gib['optimizer']}, "
        f"activations+temporaries {gib['activations_and_temporaries']}, total {gib['total']}"
    )
    console.print(
        f"FLOPs per step: model {result['model_flops_per_step']:.3e} "
        f"(XLA, per device: {result['xla_flops_per_step_per_device']:.3e}), "
        f"{result['tokens_per_step']:,} tokens per step"
    )
    table = Table("parameter", "shape", "dtype", "sharding")
    for row in result["parameters"]:
        table.add_row(row["name"], "x".join(map(str, row["shape"])), row["dtype"], row["sharding"])
    console.print(table)
