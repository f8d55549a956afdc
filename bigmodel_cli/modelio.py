"""Open any model path (a run directory, one of its checkpoints, an export, hf:DIR) as a LoadedModel."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import jax
from jax.sharding import Mesh

from bigmodel_cli import config as config_lib
from bigmodel_cli import hf, native, parallel, rundir, storage
from bigmodel_cli.config import Config, MeshConfig
from bigmodel_cli.errors import UserError
from bigmodel_cli.finetune_config import FinetuneConfig
from bigmodel_cli.model import lora
from bigmodel_cli.model.params import LoadedModel, abstract_params, with_adapters
from bigmodel_cli.tasks import taskinfo
from bigmodel_cli.train.checkpoint import Checkpoints

HF_PREFIX = "hf:"  # hf:DIR names a local Hugging Face Llama directory (see bigmodel_cli/hf.py)


def locate(path: Path) -> tuple[str, Path, int | None]:
    """(kind, home, step): kind is 'export', 'run' or 'hf' (hf:DIR); step None = latest checkpoint."""
    if str(path).startswith(HF_PREFIX):
        home = Path(str(path)[len(HF_PREFIX) :])
        if not home.is_dir():
            raise UserError(
                f"{home} is not a directory: hf:DIR takes a local Hugging Face model directory "
                "(bigmodel downloads nothing: fetch it first, e.g. with `hf download`)"
            )
        return "hf", home, None
    path = storage.path(path)  # a gs:// run or export stays an epath.Path
    if not path.exists():
        raise UserError(f"model {path} not found: pass a run directory, a checkpoint or an export")
    if native.is_export(path):
        return "export", path, None
    if (path / rundir.CONFIG_FILE).is_file() and (path / rundir.CHECKPOINTS_DIR).is_dir():
        return "run", path, None
    if path.parent.name == rundir.CHECKPOINTS_DIR and path.name.isdigit():
        return "run", path.parent.parent, int(path.name)
    raise UserError(
        f"{path} is not a run directory, checkpoint or export: pass e.g. runs/NAME, runs/NAME/checkpoints/STEP "
        "or an export directory"
    )


def load(path: Path, mesh: Mesh | None = None) -> LoadedModel:
    """Load parameters for evaluation, generation or export (no optimizer state), laid out on mesh (by default
    one over every device, with the default rules)."""
    kind, home, step = locate(path)
    mesh = mesh if mesh is not None else parallel.make_mesh(MeshConfig())
    if kind == "export":
        return native.load(home, mesh)
    if kind == "hf":
        return hf.load(home, mesh)
    if taskinfo.read(home) is not None:  # finetuning runs record their task (and their model) beside the config
        return _load_finetune_run(home, step, mesh)
    cfg: Config = config_lib.load_config(home / rundir.CONFIG_FILE, base_dir=home)
    ckpt = Checkpoints(home / rundir.CHECKPOINTS_DIR, read_only=True)
    try:
        if step is None and ckpt.latest_step() is None:
            raise UserError(f"{home} has no checkpoint yet: train it first (bigmodel pretrain ...)")
        graphdef, like = abstract_params(cfg.model, mesh)
        # A step the user named is that checkpoint or an error; otherwise the newest good one.
        step, params, _ = ckpt.restore_params(like, warn, step)
    finally:
        ckpt.close()
    return LoadedModel(
        cfg.model, graphdef, params, mesh, home, step, cfg.data.seq_len or cfg.model.max_seq_len, cfg.data.path
    )


def warn(message: str) -> None:
    """A one-line warning on stderr from the first process: stdout may carry the command's result."""
    if jax.process_index() == 0:
        print(f"warning: {message}", file=sys.stderr, flush=True)


def plain(loaded: LoadedModel) -> LoadedModel:
    """The same model without adapters (merged), as export and further finetuning want it."""
    if loaded.lora is None:
        return loaded
    graphdef, _ = abstract_params(loaded.model_cfg, loaded.mesh)
    return dataclasses.replace(loaded, graphdef=graphdef, params=lora.fold(loaded.params, loaded.lora), lora=None)


def _load_finetune_run(home: Path, step: int | None, mesh) -> LoadedModel:
    """A finetuning run's model: its saved weights, or the base model plus its saved LoRA adapters."""
    cfg: FinetuneConfig = config_lib.load_config(home / rundir.CONFIG_FILE, cls=FinetuneConfig, base_dir=home)
    model_cfg = config_lib.build_config(
        {"model": json.loads((home / rundir.MODEL_FILE).read_text())}, {}, Config, home
    ).model
    ckpt = Checkpoints(home / rundir.CHECKPOINTS_DIR, read_only=True)
    try:
        if step is None and ckpt.latest_step() is None:
            raise UserError(f"{home} has no checkpoint yet: run bigmodel finetune first")
        if cfg.lora.rank:
            base = load(storage.path(cfg.finetune.init_from), mesh)
            graphdef, like = lora.abstract_adapters(with_adapters(model_cfg, cfg.lora), mesh)
            step, adapters, _ = ckpt.restore_params(like, warn, step)
            params = lora.merge_params(lora.fold(base.params, base.lora), adapters)
        else:
            graphdef, like = abstract_params(model_cfg, mesh)
            step, params, _ = ckpt.restore_params(like, warn, step)
    finally:
        ckpt.close()
    seq_len = cfg.data.seq_len or model_cfg.max_seq_len
    return LoadedModel(
        model_cfg, graphdef, params, mesh, home, step, seq_len, "", lora=cfg.lora if cfg.lora.rank else None
    )
