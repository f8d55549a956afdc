"""int8 weight-only quantization of a loaded model, for CPU and edge inference (`--quantize int8`).

Every 2-D weight (the attention and MLP kernels, the output head, and the embedding table) becomes an
Int8Kernel (model/transformer.py): int8 values and a float32 scale per output channel, absmax/127, symmetric.
A kernel [in, out] is scaled per column, the embedding table [V, D] per row: its rows are the output channels of
a tied head, and a token's embedding is its row times one number. Norms and biases stay as they are. The model
computes in its own dtype (model.dtype, float32 or bfloat16), converting each int8 kernel inside its matmul.
"""

from __future__ import annotations

import dataclasses
import functools
import operator

import jax
import jax.numpy as jnp
from flax import nnx

from bigmodel_cli import parallel
from bigmodel_cli.config import ModelConfig
from bigmodel_cli.errors import UserError
from bigmodel_cli.model import layout, lora
from bigmodel_cli.model.params import LoadedModel
from bigmodel_cli.model.transformer import Int8Kernel, Transformer

MODES = ("int8",)  # what --quantize accepts
EMBEDDING = "embed_tokens"  # the one 2-D weight scaled per row: its rows are the output channels of a tied head


def apply(loaded: LoadedModel, mode: str | None) -> LoadedModel:
    """The model quantized as --quantize asks (None or "": unchanged)."""
    check(mode)
    return int8(loaded) if mode == "int8" else loaded


def check(mode: str | None) -> None:
    """Refuse a --quantize value other than the modes bigmodel implements, before any model is loaded."""
    if mode and mode not in MODES:
        raise UserError(f"--quantize {mode!r} is not supported: use --quantize int8 (weight-only, per-channel scales)")


def int8(loaded: LoadedModel) -> LoadedModel:
    """The same model with int8 weights and per-output-channel float32 scales; LoRA adapters are merged first."""
    params = loaded.params if loaded.lora is None else lora.fold(loaded.params, loaded.lora)
    # Per layer: an int8 kernel's scales are per output channel of one [in, out] matrix (decoding compiles fast
    # either way).
    model_cfg = dataclasses.replace(loaded.model_cfg, scan_layers=False)
    params = layout.unstack(params)
    graphdef, like = abstract_int8_params(model_cfg, loaded.mesh)

    def convert(path, target):
        name = tuple(entry.key for entry in path)
        value = functools.reduce(operator.getitem, name, params)
        if not _is_int8(target):  # norms and biases stay as they are
            return value
        # One jitted call per weight keeps the float temporaries of the conversion small.
        shardings = (target["q"].sharding, target["scale"].sharding)
        q, scale = _quantize(value, reduce_axis=1 if name[-1] == EMBEDDING else 0, out_shardings=shardings)
        return {"q": q, "scale": scale}

    quantized = jax.tree_util.tree_map_with_path(convert, like, is_leaf=_is_int8)
    return dataclasses.replace(loaded, model_cfg=model_cfg, graphdef=graphdef, params=quantized, lora=None)


def _is_int8(node) -> bool:
    return isinstance(node, dict) and set(node) == {"q", "scale"}


@functools.partial(jax.jit, static_argnames=("reduce_axis", "out_shardings"))
def _quantize(weight, *, reduce_axis, out_shardings):
    """(int8 values, float32 scale) of one weight, one scale per entry of the axis not reduced."""
    w = weight.astype(jnp.float32)
    absmax = jnp.max(jnp.abs(w), axis=reduce_axis, keepdims=True)
    scale = jnp.where(absmax > 0, absmax / 127.0, 1.0)  # an all-zero channel keeps scale 1 (and q 0)
    q = jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8)
    q = jax.lax.with_sharding_constraint(q, out_shardings[0])
    return q, jax.lax.with_sharding_constraint(scale, out_shardings[1])


def abstract_int8_params(model_cfg: ModelConfig, mesh) -> tuple[nnx.GraphDef, dict]:
    """Graph and shape/dtype/sharding tree of the int8 model, without allocating it."""
    abstract = nnx.eval_shape(lambda: _int8_model(model_cfg))
    graphdef, state = nnx.split(abstract)
    shardings = parallel.param_shardings(state, mesh)
    shapes = nnx.to_pure_dict(state)
    return graphdef, jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def _int8_model(model_cfg: ModelConfig) -> Transformer:
    """The Transformer with each 2-D nnx.Param swapped for an Int8Kernel of the same shape and logical axes."""
    model = Transformer(model_cfg, rngs=lora.ShapesOnly())  # built under eval_shape: shapes only
    for _, module in list(nnx.iter_modules(model)):
        for name, param in list(vars(module).items()):
            if not isinstance(param, nnx.Param) or param.ndim != 2:
                continue
            channel = 0 if name == EMBEDDING else 1  # the axis that keeps one scale per entry
            axes = param.get_metadata().get("logical_axes") or (None, None)
            scale_shape = tuple(n if i == channel else 1 for i, n in enumerate(param.shape))
            scale_axes = tuple(a if i == channel else None for i, a in enumerate(axes))
            q = nnx.Param(jnp.zeros(param.shape, jnp.int8), logical_axes=axes)
            setattr(module, name, Int8Kernel(q, nnx.Param(jnp.ones(scale_shape, jnp.float32), logical_axes=scale_axes)))
    return model


def weight_bytes(params) -> int:
    """Bytes held by a parameter tree (int8 values, their scales, and everything left unquantized)."""
    return sum(leaf.nbytes for leaf in jax.tree.leaves(params))
