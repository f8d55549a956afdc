"""`bigmodel export`: a model -> a new self-contained directory in one of three formats.

bigmodel: safetensors + our config (reloadable by every bigmodel command); hf: a transformers Llama
directory; stablehlo: the forward pass serialised with jax.export, weights as arguments.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import jax

from bigmodel_cli import modelio
from bigmodel_cli.errors import UserError

FORMATS = ("bigmodel", "hf", "stablehlo")
DTYPES = ("float32", "bfloat16")


def run(
    model: Path,
    out: Path,
    format: str = "bigmodel",
    dtype: str | None = None,
    max_shard_bytes: int | None = None,
) -> Path:
    """Export the model at `model` (run dir, checkpoint, export or hf:DIR) into the new directory `out`."""
    check_options(format, dtype)
    return export(modelio.load(model), out, format, dtype, max_shard_bytes)


def check_options(format: str, dtype: str | None) -> None:
    """Refuse a bad --format or --dtype before loading anything."""
    if format not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}; got {format!r}")
    if dtype and dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")


def export(
    loaded: modelio.LoadedModel,
    out: Path,
    format: str = "bigmodel",
    dtype: str | None = None,
    max_shard_bytes: int | None = None,
) -> Path:
    """Write `loaded` to `out` in `format`, with parameters cast to `dtype` (None: as they are)."""
    check_options(format, dtype)
    if max_shard_bytes is not None and format != "hf":
        raise UserError("--max-shard-bytes applies to --format hf only")
    loaded = modelio.plain(loaded)  # LoRA adapters are merged into the weights
    if dtype:
        loaded = _cast(loaded, dtype)
    if format == "bigmodel":
        return modelio.export(loaded, out)
    if format == "hf":
        from bigmodel_cli import hf

        limit = hf.DEFAULT_MAX_SHARD_BYTES if max_shard_bytes is None else max_shard_bytes
        return _into_new_dir(out, lambda d: hf.write(loaded, d, max_shard_bytes=limit))
    from bigmodel_cli import stablehlo

    return _into_new_dir(out, lambda d: stablehlo.write(loaded, d))


def _cast(loaded: modelio.LoadedModel, dtype: str) -> modelio.LoadedModel:
    """The same model with parameters stored in `dtype` (the config says so too, so reloads agree)."""
    params = jax.tree.map(lambda x: x.astype(dtype), loaded.params)
    model_cfg = dataclasses.replace(loaded.model_cfg, param_dtype=dtype)
    return dataclasses.replace(loaded, params=params, model_cfg=model_cfg)


def _into_new_dir(out: Path, write: Callable[[Path], None]) -> Path:
    """Run write(staging) on a fresh sibling directory, then rename it to `out`: no half-written exports."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"export directory {out} already exists and is not empty: choose a new --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write(staging)
        if out.exists():
            out.rmdir()
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out
