"""Open any model path (a run directory, one of its checkpoints, an export, hf:DIR, hf:ORG/NAME) as a LoadedModel."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import jax
from jax.sharding import Mesh

from bigmodel_cli import config as config_lib
from bigmodel_cli import hf, native, parallel, rundir, storage
from bigmodel_cli.config import Config, MeshConfig, ModelConfig
from bigmodel_cli.errors import UserError
from bigmodel_cli.finetune_config import FinetuneConfig
from bigmodel_cli.model import lora
from bigmodel_cli.model.params import LoadedModel, abstract_params, with_adapters
from bigmodel_cli.tasks import taskinfo

HF_PREFIX = "hf:"  # hf:DIR names a local Hugging Face model directory; hf:ORG/NAME[@REVISION] a Hub model
# What bigmodel reads from a Hub model. Everything else stays on the Hub: pickle checkpoints (*.bin, *.pt), other
# formats (ONNX, GGUF), and second copies of the weights such as Mistral's consolidated.safetensors. Patterns
# without a leading * match top-level files only.
HUB_FILES = (
    "config.json",
    hf.GENERATION_CONFIG,
    hf.WEIGHTS,
    hf.WEIGHTS_INDEX,
    "model-*-of-*.safetensors",  # the shards transformers writes; an index naming others is followed below
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)


def locate(path: Path, config_only: bool = False) -> tuple[str, Path, int | None]:
    """(kind, home, step): kind is 'export', 'run' or 'hf' (hf:DIR or hf:ORG/NAME); step None = latest checkpoint.

    config_only: the caller reads a Hub model's config.json alone (plan), so a download fetches nothing else."""
    if str(path).startswith(HF_PREFIX):
        return "hf", _hf_home(str(path)[len(HF_PREFIX) :], config_only), None
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


def _hf_home(text: str, config_only: bool = False) -> Path:
    """The directory behind hf:TEXT: an existing local directory wins; otherwise a Hub id's snapshot in the cache."""
    local = Path(text)
    if local.is_dir():
        return local
    hub_id = _hub_id(text)
    if hub_id is None:
        raise UserError(
            f"{local} is not a directory: hf: takes a local Hugging Face model directory or a Hub id "
            "(hf:ORG/NAME or hf:ORG/NAME@REVISION)"
        )
    return _hub_snapshot(*hub_id, config_only)


def _hub_id(text: str) -> tuple[str, str | None] | None:
    """'ORG/NAME[@REVISION]' -> (repo id, revision or None); None when text is not shaped like a Hub model id."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    repo_id, at, revision = text.partition("@")
    if repo_id.count("/") != 1 or (at and not revision):
        return None
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        return None
    return repo_id, revision or None


def _hub_snapshot(repo_id: str, revision: str | None, config_only: bool = False) -> Path:
    """The cached snapshot of a Hub model at revision (default: main), fetching what bigmodel reads if the cache
    lacks it (with config_only, config.json alone). huggingface_hub decides where the cache is and whether it may
    go online (HF_HOME, HF_HUB_CACHE, HF_HUB_OFFLINE, HF_TOKEN), exactly as for transformers."""
    from huggingface_hub import constants, hf_hub_download, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    source = f"{HF_PREFIX}{repo_id}" + (f"@{revision}" if revision else "")
    cached = None
    try:  # a model that is in the cache is used as it is, without asking the Hub for a newer commit
        cached = Path(
            snapshot_download(repo_id, revision=revision, allow_patterns=list(HUB_FILES), local_files_only=True)
        )
    except LocalEntryNotFoundError:
        pass
    if cached is not None and not _missing_files(cached, config_only):
        return cached
    fix = f"run `hf download {repo_id}` where there is network, or point HF_HUB_CACHE at a cache that holds it"
    if constants.HF_HUB_OFFLINE:
        if cached is not None:  # a partial copy: hf.load says what it lacks (or refuses its pickles)
            return cached
        raise UserError(
            f"{source}: no local directory {repo_id}, and the Hub model is not in the cache "
            f"({constants.HF_HUB_CACHE}) while HF_HUB_OFFLINE is set: {fix}"
        )
    if jax.process_index() == 0:
        what = f"config.json of {source}" if config_only else source
        print(f"fetching {what} from the Hugging Face Hub into {constants.HF_HUB_CACHE}", file=sys.stderr)
    try:
        if config_only:
            return Path(hf_hub_download(repo_id, "config.json", revision=revision)).parent
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=list(HUB_FILES)))
        missing = _missing_files(folder)
        if missing and (folder / hf.WEIGHTS_INDEX).is_file():  # shards named other than model-*-of-*
            snapshot_download(repo_id, revision=folder.name, allow_patterns=missing)  # folder.name: the commit
        elif hf.WEIGHTS in missing and folder == cached:  # huggingface_hub falls back to the cache when offline
            raise UserError(
                f"{source}: the cached copy ({folder}) has no {hf.WEIGHTS}, and none came from the Hub: it has "
                f"none, or it could not be reached: {fix}"
            )
        elif hf.WEIGHTS in missing:
            raise UserError(
                f"{source} has no safetensors weights on the Hub, and bigmodel never loads pickle checkpoints "
                "(*.bin): pick a revision that has model.safetensors (a safetensors conversion, e.g. @refs/pr/N)"
            )
    except LocalEntryNotFoundError:  # no connection (or the Hub is down)
        if cached is not None:
            return cached
        raise UserError(
            f"{source}: no local directory {repo_id}, and the Hub model is neither in the cache "
            f"({constants.HF_HUB_CACHE}) nor reachable: {fix}"
        ) from None
    except GatedRepoError:
        raise UserError(
            f"{source} is gated: accept its terms on huggingface.co, then log in (`hf auth login` or HF_TOKEN)"
        ) from None
    except RepositoryNotFoundError:
        raise UserError(
            f"{source}: no local directory {repo_id} and no such model on the Hub (a private one needs "
            "`hf auth login` or HF_TOKEN)"
        ) from None
    except RevisionNotFoundError:
        raise UserError(
            f"{source}: the Hub model has no revision {revision!r} (a branch, tag or commit hash)"
        ) from None
    except (HfHubHTTPError, OSError) as err:  # the Hub's other answers; a cache we cannot write
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"{source}: could not fetch it into {constants.HF_HUB_CACHE}: {first_line}") from None
    return folder


def _missing_files(folder: Path, config_only: bool = False) -> list[str]:
    """Files a model directory needs for hf.load and does not have: config.json, and (unless config_only) the
    weights its index names."""
    missing = [] if (folder / "config.json").is_file() else ["config.json"]
    if config_only:
        return missing
    shards = hf.weight_map(folder)
    if shards is not None:
        return missing + sorted(s for s in set(shards.values()) if not (folder / s).is_file())
    return missing + ([] if (folder / hf.WEIGHTS).is_file() else [hf.WEIGHTS])


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
    ckpt = _checkpoints(home)
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


def _checkpoints(home: Path):
    """The run's checkpoints, read-only. Imported here: orbax costs a tenth of a second to import, which
    loading an export or an hf: directory (the first token of `generate`) need not pay."""
    from bigmodel_cli.train.checkpoint import Checkpoints

    return Checkpoints(home / rundir.CHECKPOINTS_DIR, read_only=True)


def model_config(path: Path) -> ModelConfig:
    """The config of the model at path, param_dtype included, from what it stores beside its weights: no weights
    are read, and a Hub model that is not in the cache fetches its config.json alone (for plan)."""
    kind, home, _ = locate(path, config_only=True)
    if kind == "hf":
        return hf.read_model_config(home)[0]
    if kind == "export":
        return native.read_config(home)[1]
    if taskinfo.read(home) is not None:  # a finetuning run: the model it started from (adapters merge into it)
        return _finetune_model_config(home)
    return config_lib.load_config(home / rundir.CONFIG_FILE, base_dir=home).model


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
    model_cfg = _finetune_model_config(home)
    ckpt = _checkpoints(home)
    try:
        if step is None and ckpt.latest_step() is None:
            raise UserError(f"{home} has no checkpoint yet: run bigmodel finetune first")
        if cfg.lora.rank:
            base = load(storage.path(cfg.finetune.init_from), mesh)
            graphdef, like = lora.abstract_adapters(with_adapters(model_cfg, cfg.lora), mesh)
            step, adapters, meta = ckpt.restore_params(like, warn, step)
            recorded = meta.get("fingerprints", {}).get("base")
            if recorded is not None and recorded != checkpoint_digest(base.params):
                raise UserError(
                    f"{cfg.finetune.init_from}, the base of the LoRA run {home}, changed since its adapters were "
                    "trained (its weights differ): restore it, or finetune the adapters anew"
                )
            params = lora.merge_params(lora.fold(base.params, base.lora), adapters)
        else:
            graphdef, like = abstract_params(model_cfg, mesh)
            step, params, meta = ckpt.restore_params(like, warn, step)
            recorded = meta.get("fingerprints", {}).get("base")
    finally:
        ckpt.close()
    seq_len = cfg.data.seq_len or model_cfg.max_seq_len
    return LoadedModel(
        model_cfg, graphdef, params, mesh, home, step, seq_len, "", cfg.lora if cfg.lora.rank else None, recorded
    )


def checkpoint_digest(params) -> str | None:
    """checkpoint.digest, imported here for the reason _checkpoints says."""
    from bigmodel_cli.train.checkpoint import digest

    return digest(params)


def _finetune_model_config(home: Path) -> ModelConfig:
    """The ModelConfig a finetuning run records (rundir.MODEL_FILE): that of the model it started from."""
    raw = {"model": json.loads((home / rundir.MODEL_FILE).read_text())}
    return config_lib.build_config(raw, {}, Config, home, where=str(home / rundir.MODEL_FILE)).model
