"""`bigmodel plan`: compile the train step for a recipe's mesh without training, and report its cost."""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path

import jax
import numpy as np

from bigmodel_cli import modelio, parallel
from bigmodel_cli.config import Config
from bigmodel_cli.data.preprocess import load_manifest
from bigmodel_cli.errors import UserError
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


def run(cfg: Config, memory_budget_gb: float = 0.0) -> dict:
    """Lower and compile the train step; returns sizes, FLOPs, per-device memory and the parameter table."""
    cfg, note = _with_vocab(cfg)
    mesh = parallel.make_mesh(cfg.mesh)
    seq_len = cfg.data.seq_len or cfg.model.max_seq_len
    graphdef, params = modelio.abstract_params(cfg.model, mesh)
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
    per_device = {
        "params": _tree_bytes(params),
        "optimizer": _tree_bytes(opt_state),
        "activations_and_temporaries": int(getattr(memory, "temp_size_in_bytes", 0)),
    }
    per_device["total"] = sum(per_device.values())
    table = [
        {
            "name": modelio.param_name(path),
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
    if memory_budget_gb and per_device["total"] > memory_budget_gb * 2**30:
        raise UserError(
            f"the recipe needs {per_device['total'] / 2**30:.2f} GiB per device (params "
            f"{per_device['params'] / 2**30:.2f}, optimizer {per_device['optimizer'] / 2**30:.2f}, activations "
            f"{per_device['activations_and_temporaries'] / 2**30:.2f}) but the budget is {memory_budget_gb} GiB: "
            "add devices to mesh.fsdp, lower train.batch_size, raise train.grad_accum or set train.remat"
        )
    return result
