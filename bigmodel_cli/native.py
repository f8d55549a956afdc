"""bigmodel's own export format: model.safetensors (parameters by name) and config.json (the model config, the
step, the sequence length and the data it was trained on), with the tokenizer and any task.json beside them."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import numpy as np

from bigmodel_cli import config as config_lib
from bigmodel_cli import storage
from bigmodel_cli.config import Config, ModelConfig
from bigmodel_cli.errors import UserError
from bigmodel_cli.model import layout
from bigmodel_cli.model.params import LoadedModel, abstract_params
from bigmodel_cli.tasks import taskinfo

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
FORMAT = "bigmodel-export-v1"


def is_export(path: Path) -> bool:
    """Whether `path` holds an export in this format (both of its files)."""
    path = storage.path(path)
    return (path / CONFIG).is_file() and (path / WEIGHTS).is_file()


def read_config(home: Path) -> tuple[dict, ModelConfig]:
    """The export's config.json, and the model config in it."""
    info = json.loads((home / CONFIG).read_text())
    if info.get("format") != FORMAT:
        raise UserError(f"{home / CONFIG} is not a bigmodel export (format {info.get('format')!r})")
    return info, config_lib.build_config({"model": info["model"]}, {}, Config, home, where=str(home / CONFIG)).model


def load(home: Path, mesh) -> LoadedModel:
    """The export in `home`, laid out on mesh."""
    from safetensors.numpy import load, load_file

    info, model_cfg = read_config(home)
    graphdef, like = abstract_params(model_cfg, mesh)
    # safetensors opens local files only: a bucket's weights are read into memory
    tensors = load((home / WEIGHTS).read_bytes()) if storage.is_url(home) else load_file(home / WEIGHTS)

    def take(name, spec):
        if name not in tensors or tensors[name].shape != spec.shape:
            raise UserError(f"{home / WEIGHTS}: tensor {name} missing or of the wrong shape; re-export")
        return tensors[name].astype(spec.dtype)

    params = layout.load(like, take)  # per-layer tensors, stacked when model.scan_layers
    return LoadedModel(
        model_cfg,
        graphdef,
        params,
        mesh,
        home,
        int(info.get("step", 0)),
        int(info.get("seq_len", model_cfg.max_seq_len)),
        info.get("data_path", ""),
    )


def write(loaded: LoadedModel, staging: Path) -> None:
    """Safetensors weights, config.json, the tokenizer and any task.json of a plain (adapter-free) model."""
    from safetensors.numpy import save_file

    flat = layout.named(loaded.params)  # per-layer names in either layout
    save_file({name: np.asarray(jax.device_get(v)) for name, v in flat.items()}, staging / WEIGHTS)
    info = {
        "format": FORMAT,
        "model": dataclasses.asdict(loaded.model_cfg),
        "step": loaded.step,
        "seq_len": loaded.seq_len,
        "data_path": loaded.data_path,
    }
    (staging / CONFIG).write_text(json.dumps(info, indent=2) + "\n")
    if loaded.tokenizer_files is not None:
        loaded.tokenizer_files.copy_to(staging)
    taskinfo.copy(loaded.home, staging)
