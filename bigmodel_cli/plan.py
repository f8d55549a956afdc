"""`bigmodel plan`: compile the train step for a recipe's mesh without training, and report its cost."""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path

import jax
import numpy as np

from bigmodel_cli import parallel
from bigmodel_cli.config import Config, ModelConfig
from bigmodel_cli.data.manifest import load_manifest
from bigmodel_cli.errors import UserError
from bigmodel_cli.model.params import abstract_params, param_name
from bigmodel_cli.model.transformer import count_params, flops_per_token
from bigmodel_cli.train import optim
from bigmodel_cli.train.step import train_step

DEFAULT_VOCAB = 32000  # assumed when neither the recipe nor existing data fixes the vocabulary


def _with_vocab(cfg: Config) -> tuple[Config, str]:
    if cfg.model.vocab_size:
        return cfg, ""
    vocab, note = DEFAULT_VOCAB, f"model.vocab_size not set and no data at data.path: assuming {DEFAULT_VOCAB}"
    if cfg.data.path and Path(cfg.data.path, "manifest.json").is_file():
        vocab, note = load_manifest(Path(cfg.data.path))["tokenizer"]["vocab_size"], ""
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab)), note


def _tree_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded abstract arrays."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shard = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += math.prod(shard) * np.dtype(leaf.dtype).itemsize
    return total


def activation_bytes(model: ModelConfig, micro_batch: int, seq_len: int, remat: str = "none", tensor: int = 1) -> int:
    """A lower bound on the activations one device keeps for the backward pass: training checks it before
    compiling (plan compiles, and reads XLA's own figure).

    micro_batch is the device's rows of one micro-batch. Counted are only the tensors each layer must keep: its
    input and the MLP's input (B, T, D), q/k/v and the attention output, the causal half of the attention
    weights (B, H, T, T/2), the MLP's gate, up and product (B, T, F); then the logits (B, T, V) in float32.
    XLA's temporaries come on top, so a recipe over this cannot fit, while one under it may still not.
    """
    q = model.n_heads * model.dims_per_head
    kv = 2 * model.kv_heads * model.dims_per_head
    dots = 2 * model.d_model + q + kv + q + 2 * model.d_ff + model.n_heads * seq_len // 2  # matmul outputs
    kept = {"none": dots + model.d_ff, "dots": dots, "full": model.d_model}[remat]  # per token and layer
    if remat == "full":  # the layer being recomputed holds all of its activations at once
        kept += (dots + model.d_ff) / model.n_layers
    itemsize = 2 if model.dtype == "bfloat16" else 4
    per_token = model.n_layers * kept * itemsize + model.vocab_size * 4
    return int(micro_batch * seq_len * per_token / tensor)  # tensor parallelism splits heads, MLP and vocab


def memory_per_device(params, optimizer, activations: int) -> dict[str, int]:
    """Bytes one device holds: parameters, optimizer state (sharded trees, abstract or real), activations."""
    per_device = {
        "params": _tree_bytes(params),
        "optimizer": _tree_bytes(optimizer),
        "activations_and_temporaries": int(activations),
    }
    per_device["total"] = sum(per_device.values())
    return per_device


def refuse_unless_fits(
    per_device: dict[str, int], limit: float, limit_text: str, what: str = "the recipe needs"
) -> None:
    """A one-line UserError when per_device (memory_per_device) exceeds limit bytes; limit_text says why."""
    if per_device["total"] <= limit:
        return
    gib = {key: value / 2**30 for key, value in per_device.items()}
    raise UserError(
        f"{what} {gib['total']:.2f} GiB per device (params {gib['params']:.2f}, optimizer "
        f"{gib['optimizer']:.2f}, activations {gib['activations_and_temporaries']:.2f}) but {limit_text}: "
        "add devices to mesh.fsdp, lower train.batch_size, raise train.grad_accum or set train.remat"
    )


def run(cfg: Config, memory_budget_gb: float = 0.0) -> dict:
    """Lower and compile the train step; returns sizes, FLOPs, per-device memory and the parameter table."""
    cfg, note = _with_vocab(cfg)
    mesh = parallel.make_mesh(cfg.mesh)
    seq_len = cfg.data.seq_len or cfg.model.max_seq_len
    graphdef, params = abstract_params(cfg.model, mesh)
    tx = optim.make_optimizer(cfg.optim, cfg.train.steps)
    with parallel.activate(mesh):
        init = jax.jit(tx.init).lower(params).compile()
    opt_state = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
        jax.eval_shape(tx.init, params),
        init.output_shardings,
    )
    replicated = parallel.replicated(mesh)
    state = {"step": jax.ShapeDtypeStruct((), np.int32, sharding=replicated), "params": params, "opt_state": opt_state}
    batch_sharding = parallel.batch_sharding(mesh)
    shape = (cfg.train.batch_size, seq_len)
    batch = {
        "inputs": jax.ShapeDtypeStruct(shape, np.int32, sharding=batch_sharding),
        "targets": jax.ShapeDtypeStruct(shape, np.int32, sharding=batch_sharding),
        "weights": jax.ShapeDtypeStruct(shape, np.float32, sharding=batch_sharding),
    }
    shardings = jax.tree.map(lambda x: x.sharding, state)
    step = jax.jit(
        functools.partial(train_step, graphdef, tx, cfg.train.grad_accum),
        in_shardings=(shardings, batch_sharding),
        out_shardings=(shardings, replicated),
        donate_argnums=(0,),
    )
    with parallel.activate(mesh):
        compiled = step.lower(state, batch).compile()
    memory = compiled.memory_analysis()
    n_params, _ = count_params(cfg.model)
    per_device = memory_per_device(params, opt_state, getattr(memory, "temp_size_in_bytes", 0))
    table = [
        {
            "name": param_name(path),
            "shape": list(leaf.shape),
            "dtype": str(leaf.dtype),
            "sharding": str(leaf.sharding.spec),
        }
        for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
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
