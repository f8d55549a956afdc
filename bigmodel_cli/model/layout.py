"""The two layouts of the decoder layers' weights (model.scan_layers), and every conversion between them.

Unrolled: params["layers"] = {0: {...}, 1: {...}, ...}, one subtree per layer.
Stacked:  params["layers"] = {...}, one subtree whose arrays carry a leading layer axis [L, ...].

Any tree that mirrors the parameters (Adam's moments in the optimizer state, LoRA adapters, abstract shapes)
holds the same "layers" entry, and the functions here convert all of them, leaving other leaves (step counts)
alone. Outside the model, names are per layer in both layouts (`named`, `load`): HF, GGUF and native exports
see the same tensors whichever layout trained them, and a checkpoint restores into either (`relayout`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bigmodel_cli import parallel

LAYERS = "layers"  # the params entry holding the decoder layers, and the logical name of the stacked axis


def param_name(path: tuple) -> str:
    """'layers.0.self_attn.q_proj' for a params-dict path: the key used in safetensors files."""
    return ".".join(str(getattr(k, "key", k)) for k in path)


def stack_modules(modules: list[nnx.Module]) -> nnx.Module:
    """One module like modules[0] whose every variable holds all the modules' values stacked on a new leading
    axis, named LAYERS for sharding (each module drew its own initial values: the same weights as unrolled)."""
    graphdef, _ = nnx.split(modules[0])

    def stack_variables(*variables: nnx.Variable) -> nnx.Variable:
        axes = variables[0].get_metadata().get("logical_axes")
        value = jnp.stack([v[...] for v in variables])  # [L, ...]
        return variables[0].replace(value, **({"logical_axes": (LAYERS, *axes)} if axes else {}))

    states = [nnx.split(module)[1] for module in modules]
    return nnx.merge(graphdef, jax.tree.map(stack_variables, *states, is_leaf=lambda x: isinstance(x, nnx.Variable)))


def _holds_layers(node: Any) -> bool:
    return isinstance(node, dict) and LAYERS in node


def _unrolled(layers: dict) -> bool:
    return all(isinstance(key, int) for key in layers)


def is_stacked(tree: Any) -> bool:
    """Whether the params-like subtrees of `tree` hold stacked layers."""
    found: list[bool] = []

    def look(node):
        if _holds_layers(node) and node[LAYERS]:
            found.append(not _unrolled(node[LAYERS]))
        return node

    jax.tree.map(look, tree, is_leaf=_holds_layers)
    return any(found)


def _stack_leaves(*leaves):
    first = leaves[0]
    if isinstance(first, jax.ShapeDtypeStruct):
        sharding = None if first.sharding is None else parallel.layer_sharding(first.sharding, stacked=True)
        return jax.ShapeDtypeStruct((len(leaves), *first.shape), first.dtype, sharding=sharding)
    return np.stack(leaves) if isinstance(first, np.ndarray) else jnp.stack(leaves)


def _layer_leaf(leaf, i: int):
    if isinstance(leaf, jax.ShapeDtypeStruct):
        sharding = None if leaf.sharding is None else parallel.layer_sharding(leaf.sharding, stacked=False)
        return jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype, sharding=sharding)
    return leaf[i]


def _convert(tree: Any, stacked: bool) -> Any:
    def one(node):
        if not _holds_layers(node) or not node[LAYERS] or _unrolled(node[LAYERS]) != stacked:
            return node  # not a params-like subtree, or already in the wanted layout
        layers = node[LAYERS]
        if stacked:
            new = jax.tree.map(_stack_leaves, *[layers[i] for i in range(len(layers))])
        else:
            n = jax.tree.leaves(layers)[0].shape[0]
            new = {i: jax.tree.map(lambda leaf, i=i: _layer_leaf(leaf, i), layers) for i in range(n)}
        return {**node, LAYERS: new}

    return jax.tree.map(one, tree, is_leaf=_holds_layers)


def stack(tree: Any) -> Any:
    """`tree` (arrays or ShapeDtypeStructs) in the stacked layout."""
    return _convert(tree, stacked=True)


def unstack(tree: Any) -> Any:
    """`tree` (arrays or ShapeDtypeStructs) in the unrolled layout."""
    return _convert(tree, stacked=False)


def other_layout(like: Any) -> Any:
    """The abstract tree `like` (ShapeDtypeStructs with shardings) in the other layout."""
    return unstack(like) if is_stacked(like) else stack(like)


def relayout(tree: Any, like: Any) -> Any:
    """`tree`'s arrays moved into the layout and shardings of the abstract tree `like`."""
    convert = stack if is_stacked(like) else unstack
    shardings = jax.tree.map(lambda s: s.sharding, like)
    with parallel.activate(jax.tree.leaves(shardings)[0].mesh):
        return jax.jit(convert, out_shardings=shardings)(tree)


def named(params: Any) -> dict[str, Any]:
    """{per-layer name: array or ShapeDtypeStruct} of params in either layout; stacked arrays are sliced on
    the host (what every export reads), so that no second copy of the weights is made on the devices."""

    def host(leaf):
        return np.asarray(jax.device_get(leaf)) if isinstance(leaf, jax.Array) else leaf

    if is_stacked(params):
        params = unstack({**params, LAYERS: jax.tree.map(host, params[LAYERS])})
    return {param_name(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}


def load(like: Any, fetch: Callable[[str, jax.ShapeDtypeStruct], np.ndarray]) -> Any:
    """Params in the layout and shardings of the abstract `like`, from fetch(per-layer name, its shape and dtype)
    -> a host array; a stacked weight is assembled on the host from its layers, then placed once."""

    def one(path, spec):
        stacked = getattr(path[0], "key", None) == LAYERS and not isinstance(getattr(path[1], "key", 0), int)
        if not stacked:
            return jax.device_put(fetch(param_name(path), spec), spec.sharding)
        layer = jax.ShapeDtypeStruct(spec.shape[1:], spec.dtype)
        rest = param_name(path[1:])
        arrays = [fetch(f"{LAYERS}.{i}.{rest}", layer) for i in range(spec.shape[0])]
        return jax.device_put(np.stack(arrays), spec.sharding)

    return jax.tree_util.tree_map_with_path(one, like)
