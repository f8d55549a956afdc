"""`bigmodel export`: a model -> a new self-contained directory (or file) in one of four formats.

bigmodel: safetensors + our config (reloadable by every bigmodel command); hf: a transformers
directory of the model's family (Llama, Mistral, Qwen2, Qwen3); stablehlo: the forward pass serialised with
jax.export, weights as arguments; gguf: one file for llama.cpp and Ollama (bigmodel_cli/gguf_export.py).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax

from bigmodel_cli import atomic, gguf_export, hf, modelio, native
from bigmodel_cli.errors import UserError
from bigmodel_cli.model.params import LoadedModel

FORMATS = ("bigmodel", "hf", "stablehlo", "gguf")


def run(
    model: Path,
    out: Path,
    format: str = "bigmodel",
    dtype: str | None = None,
    max_shard_bytes: int | None = None,
    quant: str | None = None,
) -> Path:
    """Export the model at `model` (run dir, checkpoint, export or hf:DIR) into the new directory (gguf: file)
    `out`."""
    check_options(format, dtype, quant)
    return export(modelio.load(model), out, format, dtype, max_shard_bytes, quant)


def check_options(format: str, dtype: str | None, quant: str | None = None) -> None:
    """Refuse a bad --format, --dtype or --quant before loading anything."""
    if format not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}; got {format!r}")
    gguf_export.check_options(format, quant, dtype)
    if dtype and dtype not in hf.DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(hf.DTYPES)}; got {dtype!r}")


def export(
    loaded: LoadedModel,
    out: Path,
    format: str = "bigmodel",
    dtype: str | None = None,
    max_shard_bytes: int | None = None,
    quant: str | None = None,
) -> Path:
    """Write `loaded` to `out` in `format`, with parameters cast to `dtype` (None: as they are); gguf's weights
    in `quant` (default f16)."""
    check_options(format, dtype, quant)
    if max_shard_bytes is not None and format != "hf":
        raise UserError("--max-shard-bytes applies to --format hf only")
    loaded = modelio.plain(loaded)  # LoRA adapters are merged into the weights
    if format == "gguf":
        return gguf_export.write(loaded, out, quant or "f16")
    if dtype:
        loaded = _cast(loaded, dtype)
    if format == "bigmodel":
        with atomic.new_dir(out, "export directory") as staging:
            native.write(loaded, staging)
        return out
    if format == "hf":
        limit = hf.DEFAULT_MAX_SHARD_BYTES if max_shard_bytes is None else max_shard_bytes
        with atomic.new_dir(out, "export directory") as staging:
            hf.write(loaded, staging, max_shard_bytes=limit)
        return out
    from bigmodel_cli import stablehlo

    with atomic.new_dir(out, "export directory") as staging:
        stablehlo.write(loaded, staging)
    return out


def _cast(loaded: LoadedModel, dtype: str) -> LoadedModel:
    """The same model with parameters stored in `dtype` (the config says so too, so reloads agree)."""
    params = jax.tree.map(lambda x: x.astype(dtype), loaded.params)
    model_cfg = dataclasses.replace(loaded.model_cfg, param_dtype=dtype)
    return dataclasses.replace(loaded, params=params, model_cfg=model_cfg)
