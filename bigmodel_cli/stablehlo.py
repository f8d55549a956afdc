"""StableHLO export: the model's functions serialised with jax.export, weights as arguments.

Two functions: forward (tokens -> logits) and decode (tokens, cache positions, KV cache -> logits, new KV
cache), which serves generation: one call on the prompt with an empty cache (prefill), then one call per new
token. A serving process needs jax, numpy and safetensors, not bigmodel: it deserialises a .jax_export file,
loads weights.safetensors, and calls the function with the weights in manifest order followed by its inputs.
Batch, length and cache length are symbolic, so one artifact serves every shape. Weights are arguments rather
than constants, so the artifact stays small and the weights stay swappable (e.g. for a finetune).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bigmodel_cli.errors import UserError
from bigmodel_cli.model import layout
from bigmodel_cli.model.params import LoadedModel, abstract_params

FORMAT = "bigmodel-stablehlo-v1"
FUNCTION = "forward.jax_export"  # jax.export serialisation (flatbuffer holding StableHLO bytecode)
DECODE = "decode.jax_export"  # prefill and per-token decoding against an explicit KV cache
MLIR = "forward.mlir"  # the same module as StableHLO text, for tools outside JAX; not needed to serve
WEIGHTS = "weights.safetensors"
MANIFEST = "manifest.json"
# Lower for every platform a serving process may run on; the caller's platform picks its lowering.
PLATFORMS = ("cpu", "cuda", "tpu")


def write(loaded: LoadedModel, directory: Path, platforms: tuple[str, ...] = PLATFORMS) -> None:
    """Write forward.jax_export, forward.mlir, weights.safetensors, manifest.json (and the tokenizer's files)."""
    from safetensors.numpy import save_file

    # Per layer in either layout: the artifact's weights and KV cache are the unrolled model's.
    params = layout.unstack(jax.device_get(loaded.params))
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    names = [layout.param_name(path) for path, _ in flat]
    weights = [np.asarray(value) for _, value in flat]
    # The XLA attention lowers on every platform; "auto" would pick an implementation for this machine only.
    cfg = dataclasses.replace(loaded.model_cfg, attention="xla", scan_layers=False)
    graphdef, like = abstract_params(cfg, loaded.mesh)
    param_tree = jax.tree_util.tree_structure(params)
    if param_tree != jax.tree_util.tree_structure(like):
        raise UserError(
            "the parameters are not a plain bigmodel Transformer's (LoRA adapters?): export the merged model"
        )

    def forward(*args):
        *params, tokens = args  # weights in manifest order, then tokens [B, T] int32
        return nnx.merge(graphdef, jax.tree_util.tree_unflatten(param_tree, params))(tokens)  # [B,T,V] f32

    batch, length = jax.export.symbolic_shape("batch, length")
    specs = [jax.ShapeDtypeStruct(w.shape, w.dtype) for w in weights]
    exported = jax.export.export(jax.jit(forward), platforms=platforms)(
        *specs, jax.ShapeDtypeStruct((batch, length), jnp.int32)
    )
    (directory / FUNCTION).write_bytes(exported.serialize())

    def decode(*args):
        # weights, then tokens [B,T], cache_pos [B] (where tokens[:, 0] goes), then per layer keys, values
        params, (tokens, cache_pos, *flat_cache) = args[: len(specs)], args[len(specs) :]
        model = nnx.merge(graphdef, jax.tree_util.tree_unflatten(param_tree, params))
        cache = [{"k": k, "v": v} for k, v in zip(flat_cache[::2], flat_cache[1::2], strict=True)]
        logits, cache = model.decode(tokens, cache, cache_pos)
        return logits, *[layer[name] for layer in cache for name in ("k", "v")]

    # Its own symbols: a constraint may only name dimensions of the function's arguments.
    batch, length, cache_len = jax.export.symbolic_shape(
        "batch, length, cache_length", constraints=["cache_length >= length"]
    )
    cache_shape = (batch, cache_len, cfg.kv_heads, cfg.dims_per_head)
    cache_dtype = jnp.dtype(cfg.dtype)
    exported_decode = jax.export.export(jax.jit(decode), platforms=platforms)(
        *specs,
        jax.ShapeDtypeStruct((batch, length), jnp.int32),
        jax.ShapeDtypeStruct((batch,), jnp.int32),
        *[jax.ShapeDtypeStruct(cache_shape, cache_dtype)] * (2 * cfg.n_layers),
    )
    (directory / DECODE).write_bytes(exported_decode.serialize())
    (directory / MLIR).write_text(exported.mlir_module())
    save_file(dict(zip(names, weights, strict=True)), directory / WEIGHTS)
    tokenizer = None  # the main file's name (tokenizer.model or tokenizer.json); its config files lie beside it
    if loaded.tokenizer_files is not None:
        loaded.tokenizer_files.copy_to(directory)
        tokenizer = loaded.tokenizer_files.main_name
    manifest = {
        "format": FORMAT,
        "function": FUNCTION,
        "mlir": MLIR,
        "weights": WEIGHTS,
        "tokenizer": tokenizer,
        "platforms": list(exported.platforms),
        "call": (
            "f = jax.export.deserialize(open(function, 'rb').read()); "
            "logits = f.call(*[weights[p['name']] for p in params], tokens)"
        ),
        "inputs": [{"name": "tokens", "shape": ["batch", "length"], "dtype": "int32"}],
        "outputs": [{"name": "logits", "shape": ["batch", "length", cfg.vocab_size], "dtype": "float32"}],
        "decode": {
            "function": DECODE,
            "call": (
                "logits, *cache = f.call(*weights, tokens, cache_pos, *cache); prefill: cache of zeros and "
                "cache_pos 0; then each new token [B,1] with cache_pos = tokens so far"
            ),
            "inputs": [
                {"name": "tokens", "shape": ["batch", "length"], "dtype": "int32"},
                {"name": "cache_pos", "shape": ["batch"], "dtype": "int32"},
            ],
            # Per layer, keys then values; length + cache_pos must not exceed cache_length.
            "cache": {
                "layers": cfg.n_layers,
                "order": ["k", "v"],
                "shape": ["batch", "cache_length", cfg.kv_heads, cfg.dims_per_head],
                "dtype": cache_dtype.name,
            },
            "outputs": [
                {"name": "logits", "shape": ["batch", "length", cfg.vocab_size], "dtype": "float32"},
                {"name": "cache", "shape": "as the cache inputs"},
            ],
        },
        "params": [
            {"name": n, "shape": list(w.shape), "dtype": str(w.dtype)} for n, w in zip(names, weights, strict=True)
        ],
        # RoPE works at any length, but quality beyond the trained length is not known.
        "trained_length": loaded.seq_len,
        "model": dataclasses.asdict(loaded.model_cfg),
        "step": loaded.step,
        "jax_version": jax.__version__,
        "calling_convention_version": exported.calling_convention_version,
    }
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
