"""What one device holds to train: parameters, optimizer state and activations, in bytes.

Training estimates it before compiling and refuses a run that clearly cannot fit; `plan` compiles the step
and reports the same table with XLA's own figure for the activations.
"""

from __future__ import annotations

import math

import jax
import numpy as np

from bigmodel_cli import parallel
from bigmodel_cli.config import ModelConfig
from bigmodel_cli.errors import UserError
from bigmodel_cli.utils import device_memory


def tree_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded arrays, abstract (ShapeDtypeStruct) or real."""
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
        "params": tree_bytes(params),
        "optimizer": tree_bytes(optimizer),
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


def check_fits(cfg, mesh, state: dict, seq_len: int) -> None:
    """Refuse in one line a run whose state and activations cannot fit a device, as `plan` would (estimated)."""
    limit = device_memory()
    if limit is None:
        return
    micro = cfg.train.batch_size // cfg.train.grad_accum // parallel.data_parallel_size(mesh)
    activations = activation_bytes(cfg.model, micro, seq_len, cfg.train.remat, mesh.shape["tensor"])
    per_device = memory_per_device((state["params"], state.get("frozen")), state["opt_state"], activations)
    refuse_unless_fits(per_device, *limit, what=f"train.batch_size={cfg.train.batch_size} needs at least")
