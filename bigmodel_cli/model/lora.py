"""LoRA: low-rank adapters beside the model's projection kernels, and every operation on them.

An adapter of the [in, out] kernel `name` is the pair `name_lora_a` [in, R] and `name_lora_b` [R, out] next to
it in the same module; the adapted projection is x @ W + scale * (x @ A) @ B. The model only calls `attach`
while it builds a kernel and adds the adapter's output in its forward pass (`adapter`, `input_dropout`).
Everything else lives here: which projections can be adapted, the config, creating adapters in their
shardings, splitting a parameter tree into adapters and base, merging the two back, and folding adapters
into the kernels for export.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bigmodel_cli import parallel
from bigmodel_cli.config import _closest
from bigmodel_cli.errors import UserError

# The projections an adapter can sit beside; a name's position also seeds its dropout mask.
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GROUPS = {"attention": TARGETS[:4], "mlp": TARGETS[4:], "all": TARGETS}
_MARK = "_lora_"  # in the name of every adapter parameter, never in a base one

# A function that builds the model with adapters, e.g. functools.partial(Transformer, model_cfg, lora=lora).
Build = Callable[..., nnx.Module]


class ShapesOnly:
    """What a model's constructors ask of nnx.Rngs, when only shapes are wanted (under nnx.eval_shape): one
    fixed key. nnx.Rngs counts its draws in a Variable, and under tracing each count update makes flax ask the
    tracer for a sharding, whose error message walks the whole trace so far: 0.7 s of a 24-layer model's
    abstract parameters went there."""

    def params(self) -> jax.Array:
        return jax.random.key(0)


@dataclass(frozen=True)
class LoraConfig:
    rank: int = 0  # rank of the low-rank adapters; 0 = full finetuning (the default)
    alpha: float = 16.0  # adapter output is scaled by alpha / rank
    dropout: float = 0.0  # dropout on the adapter's input during training
    targets: str = "attention"  # projections to adapt: attention, mlp, all, or names like "q_proj,v_proj"

    def __post_init__(self) -> None:
        if self.rank < 0 or not 0 <= self.dropout < 1:
            raise UserError(f"lora.rank must be >= 0 and lora.dropout in [0, 1); got {self.rank}, {self.dropout}")
        for name in self.target_names:
            if name not in TARGETS:
                raise UserError(f"lora.targets: unknown projection {name!r}{_closest(name, list(TARGETS))}")

    @property
    def target_names(self) -> tuple[str, ...]:
        names: list[str] = []
        for part in (p.strip() for p in self.targets.split(",") if p.strip()):
            names += GROUPS.get(part, (part,))
        return tuple(dict.fromkeys(names))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank if self.rank else 0.0


# --- Inside the model: create and apply one adapter --------------------------------------------------------


def attach(module: nnx.Module, rngs: nnx.Rngs, name: str, shape: tuple[int, int], axes: tuple, dtype, lora) -> None:
    """Give `module`'s kernel `name` of `shape` [in, out] an adapter pair when the LoraConfig targets it."""
    if lora is None or not lora.rank or name not in lora.target_names:
        return
    d_in, d_out = shape
    # A starts random and B at zero, so the adapted model starts exactly as the base model.
    a = jax.random.normal(rngs.params(), (d_in, lora.rank), dtype) / lora.rank**0.5
    setattr(module, f"{name}_lora_a", nnx.Param(a, logical_axes=(axes[0], None)))
    setattr(module, f"{name}_lora_b", nnx.Param(jnp.zeros((lora.rank, d_out), dtype), logical_axes=(None, axes[1])))
    module.lora_scale, module.lora_dropout = lora.scale, lora.dropout


def adapter(module: nnx.Module, name: str, dtype) -> tuple[jax.Array, jax.Array] | None:
    """(A [in, R], B [R, out]) of kernel `name` in `dtype`, or None when it has no adapter."""
    if not hasattr(module, f"{name}_lora_a"):
        return None
    return getattr(module, f"{name}_lora_a")[...].astype(dtype), getattr(module, f"{name}_lora_b")[...].astype(dtype)


def input_dropout(module: nnx.Module, name: str, x: jax.Array, key: jax.Array | None) -> jax.Array:
    """The adapter's input: x with dropout when training (a key is given), x itself otherwise."""
    rate = module.lora_dropout
    if key is None or rate <= 0:
        return x
    keep = jax.random.bernoulli(jax.random.fold_in(key, TARGETS.index(name)), 1 - rate, x.shape)
    return jnp.where(keep, x / (1 - rate), 0)


# --- Parameter trees: pure dicts as nnx.to_pure_dict gives them --------------------------------------------


def split(params: dict) -> tuple[dict, dict]:
    """(adapters, base) parts of a params dict."""

    def pick(tree: dict, want: bool) -> dict:
        out = {}
        for key, value in tree.items():
            if isinstance(value, dict):
                sub = pick(value, want)
                if sub:
                    out[key] = sub
            elif (_MARK in str(key)) == want:
                out[key] = value
        return out

    return pick(params, True), pick(params, False)


def merge_params(frozen: Any, trainable: Any) -> Any:
    """One params dict from the frozen (base) and trainable (e.g. LoRA) parts; either may be empty."""
    if not frozen:
        return trainable
    if not isinstance(frozen, dict):
        return frozen
    out = dict(frozen)
    for key, value in trainable.items():
        out[key] = merge_params(frozen.get(key), value) if key in frozen else value
    return out


def fold(params: dict, lora: LoraConfig | None) -> dict:
    """The parameters with any adapters folded in: W + (alpha / rank) * A @ B, adapters dropped."""
    if lora is None:
        return params
    scale = lora.scale

    def fold_tree(tree: dict) -> dict:
        out = {}
        for key, value in tree.items():
            if isinstance(value, dict):
                out[key] = fold_tree(value)
            elif _MARK not in str(key):
                a, b = tree.get(f"{key}_lora_a"), tree.get(f"{key}_lora_b")
                out[key] = value if a is None else (value + scale * (a @ b)).astype(value.dtype)
        return out

    return jax.jit(fold_tree)(params)


# --- Adapters for a model: abstract (shapes and shardings), fresh, counted ---------------------------------


def abstract_adapters(build: Build, mesh) -> tuple[nnx.GraphDef, dict]:
    """Graph of the model with adapters, and the adapters' shape/dtype/sharding tree, without allocating."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: build(rngs=ShapesOnly())))
    shardings, _ = split(parallel.param_shardings(state, mesh))
    shapes, _ = split(nnx.to_pure_dict(state))
    like = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
    return graphdef, like


def init_adapters(build: Build, mesh, seed: int) -> tuple[nnx.GraphDef, dict]:
    """(graphdef, adapters): freshly initialised adapter weights, created in their shardings."""
    graphdef, like = abstract_adapters(build, mesh)

    def make():  # the whole model is traced for its random stream; jit drops the base weights unused
        return split(nnx.to_pure_dict(nnx.state(build(rngs=nnx.Rngs(seed)))))[0]

    with parallel.activate(mesh):
        adapters = jax.jit(make, out_shardings=jax.tree.map(lambda s: s.sharding, like))()
    return graphdef, adapters


def trainable_count(build: Build) -> int:
    """How many adapter weights the model built by `build` trains."""
    adapters, _ = split(nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: build(rngs=ShapesOnly())))))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(adapters))
