"""Recipes: TOML sections mapped one to one onto frozen dataclasses, with `--set` overrides."""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bigmodel_cli import storage
from bigmodel_cli.data.mixture import resolve_mixture
from bigmodel_cli.errors import UserError
from bigmodel_cli.model import families


def _path_field(default: str = "", doc: str = "") -> Any:
    """A string field holding a path that resolves relative to the recipe file."""
    return field(default=default, metadata={"path": True, "doc": doc})


@dataclass(frozen=True)
class ModelConfig:
    preset: str = ""  # named size from PRESETS; explicit keys in [model] override its fields
    architecture: str = "llama"  # the Hugging Face family: llama, mistral, qwen2 or qwen3 (export writes it)
    vocab_size: int = 0  # 0 = take it from the data's manifest
    d_model: int = 256  # width of the residual stream
    n_layers: int = 4  # number of Transformer blocks
    n_heads: int = 4  # query heads
    n_kv_heads: int = 0  # key/value heads for grouped-query attention; 0 = n_heads
    head_dim: int = 0  # 0 = d_model // n_heads
    qkv_bias: bool = False  # biases on the q/k/v projections (qwen2)
    qk_norm: bool = False  # RMSNorm over each head of q and k before RoPE (qwen3)
    d_ff: int = 1024  # hidden width of the SwiGLU MLP
    max_seq_len: int = 256  # longest sequence the model is trained and evaluated on
    sliding_window: int = 0  # a token attends to this many most recent tokens, itself included (mistral); 0 = all
    rope_theta: float = 10000.0  # RoPE base frequency
    rope_type: str = "default"  # RoPE frequency scaling: default (none), linear, llama3 or yarn
    rope_factor: float = 1.0  # linear, llama3, yarn: how many times longer than pretraining the context gets
    rope_original_max_positions: int = 0  # llama3, yarn: the context length of pretraining
    rope_low_freq_factor: float = 1.0  # llama3: wavelengths over original/this are divided by rope_factor
    rope_high_freq_factor: float = 4.0  # llama3: wavelengths under original/this stay; between, they blend
    rope_beta_fast: float = 32.0  # yarn: dimensions turning more often than this in the original context keep theirs
    rope_beta_slow: float = 1.0  # yarn: dimensions turning less often than this are divided by rope_factor
    rope_attention_factor: float = 0.0  # yarn: scale of cos and sin; 0 = 0.1 * ln(rope_factor) + 1
    rope_truncate: bool = True  # yarn: round the blended band of dimensions out to whole dimensions
    norm_eps: float = 1e-5  # RMSNorm epsilon
    tie_embeddings: bool = False  # reuse the token embedding as the output head
    dtype: str = "float32"  # compute dtype: float32 or bfloat16 (bf16 pays off on GPU/TPU, not CPU)
    param_dtype: str = "float32"  # storage dtype of parameters and optimizer state
    attention: str = "auto"  # auto (chunked on CPU; cuDNN on a GPU where it applies, else XLA), chunked, xla, cudnn
    attention_chunks: int = 0  # query chunks of the chunked attention; 0 = one per 64 queries, at most 8
    init_std: float = 0.02  # std of the normal initialiser of every matrix
    scan_layers: bool = False  # stack the layers' weights, scan over them: compile time flat in depth (1b, 7b: on)

    def __post_init__(self) -> None:
        for name in ("d_model", "n_layers", "n_heads", "d_ff", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise UserError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.n_heads % self.kv_heads:
            raise UserError(f"model.n_heads ({self.n_heads}) must be a multiple of model.n_kv_heads ({self.kv_heads})")
        if self.head_dim == 0 and self.d_model % self.n_heads:
            raise UserError(f"model.d_model ({self.d_model}) must divide by model.n_heads ({self.n_heads})")
        if self.dims_per_head % 2:
            raise UserError(f"the head dimension must be even for RoPE, got {self.dims_per_head}")
        _check_choice("model.dtype", self.dtype, ("float32", "bfloat16"))
        _check_choice("model.param_dtype", self.param_dtype, ("float32", "bfloat16"))
        _check_choice("model.attention", self.attention, ("auto", "chunked", "xla", "cudnn"))
        if self.attention_chunks < 0:
            raise UserError(f"model.attention_chunks must be 0 (automatic) or positive, got {self.attention_chunks}")
        families.check(self)  # the family switches and the RoPE fields

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def dims_per_head(self) -> int:
        return self.head_dim or self.d_model // self.n_heads


# Sizes follow the usual Llama-family shapes; vocab_size stays 0 so that it comes from the data.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=512, max_seq_len=128),
    "35m": dict(d_model=512, n_layers=8, n_heads=8, n_kv_heads=8, d_ff=1536, max_seq_len=512),
    "125m": dict(d_model=768, n_layers=12, n_heads=12, n_kv_heads=4, d_ff=2048, max_seq_len=2048),
    "1b": dict(
        d_model=2048,
        n_layers=16,
        n_heads=32,
        n_kv_heads=8,
        d_ff=8192,
        max_seq_len=2048,
        rope_theta=500000.0,
        scan_layers=True,
    ),
    "7b": dict(d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, d_ff=11008, max_seq_len=4096, scan_layers=True),
}


@dataclass(frozen=True)
class DataConfig:
    path: str = _path_field(doc="a `bigmodel preprocess` output directory")  # preprocess output directory
    mixture: str = field(default="", metadata={"mixture": True})  # instead of path: "dirA:0.7,dirB:0.3"
    synthetic: bool = False  # train on seeded random tokens instead of data.path (benchmarks)
    seq_len: int = 0  # tokens per training sequence; 0 = model.max_seq_len

    def __post_init__(self) -> None:
        if self.seq_len < 0:
            raise UserError(f"data.seq_len must be >= 0, got {self.seq_len}")
        if self.mixture and self.path:
            raise UserError("set data.path or data.mixture, not both")


OPTIMIZERS = ("adamw", "muon")


@dataclass(frozen=True)
class OptimConfig:
    name: str = "adamw"  # adamw, or muon: the decoder layers' matrices orthogonalized (Muon), the rest Nesterov AdamW
    lr: float = 3e-4  # peak learning rate (Muon's updates are scaled to AdamW's size, so one lr serves both)
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio
    warmup_steps: int = 100  # linear warmup from 0 to lr
    b1: float = 0.9  # AdamW beta1
    b2: float = 0.95  # AdamW beta2
    eps: float = 1e-8  # AdamW epsilon
    weight_decay: float = 0.1  # decoupled weight decay on matrices, not norms or embeddings (muon: layers only)
    grad_clip: float = 1.0  # global-norm clipping threshold; 0 = off

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise UserError(f"optim.name must be one of {', '.join(OPTIMIZERS)}, got {self.name!r}")
        if not self.lr > 0:
            raise UserError(f"optim.lr must be positive, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise UserError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        for name in ("warmup_steps", "weight_decay", "grad_clip", "eps"):
            if getattr(self, name) < 0:
                raise UserError(f"optim.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("b1", "b2"):
            if not 0 <= getattr(self, name) < 1:
                raise UserError(f"optim.{name} must be in [0, 1), got {getattr(self, name)}")


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000  # optimizer updates in the whole run
    batch_size: int = 8  # sequences per update (global, over all devices and micro-batches)
    grad_accum: int = 1  # micro-batches per update; batch_size must divide by it
    seed: int = 0  # seeds the initial parameters and the data order
    log_every: int = 10  # steps between lines in metrics.jsonl
    eval_every: int = 200  # steps between validation losses; 0 = only at the end
    eval_batches: int = 20  # validation batches per evaluation (fewer if the split is smaller)
    remat: str = "none"  # activation recomputation in the backward pass: none, dots or full
    on_nonfinite: str = "stop"  # a NaN/inf loss or gradient: stop (keeping the last good checkpoint) or skip
    inject_nonfinite_at: int = 0  # testing aid: make the loss of this step NaN; 0 = never
    wandb_project: str = ""  # also log to this Weights & Biases project (needs `pip install wandb`); "" = off
    profile_steps: str = ""  # "A:B": a jax.profiler trace of steps A to B-1 (B excluded) in RUN/profile; "" = off

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "log_every", "eval_batches"):
            if getattr(self, name) <= 0:
                raise UserError(f"train.{name} must be positive, got {getattr(self, name)}")
        if self.eval_every < 0:
            raise UserError(f"train.eval_every must be >= 0, got {self.eval_every}")
        if self.batch_size % self.grad_accum:
            raise UserError(f"train.batch_size ({self.batch_size}) must divide by train.grad_accum ({self.grad_accum})")
        _check_choice("train.remat", self.remat, ("none", "dots", "full"))
        _check_choice("train.on_nonfinite", self.on_nonfinite, ("stop", "skip"))
        self.profile_range()  # refuses a malformed range now, before the run directory is touched

    def profile_range(self) -> range | None:
        """The steps (counted from 1) that train.profile_steps traces; None when it is off."""
        if not self.profile_steps:
            return None
        first, _, end = self.profile_steps.partition(":")
        try:
            steps = range(int(first), int(end))
        except ValueError:
            steps = range(0)
        if not (1 <= steps.start < steps.stop <= self.steps):
            raise UserError(
                f"--profile-steps / train.profile_steps must be A:B with 1 <= A < B <= train.steps ({self.steps}), "
                f"tracing steps A to B-1, e.g. 2:4; got {self.profile_steps!r}"
            )
        return steps


@dataclass(frozen=True)
class MeshConfig:
    data: int = -1  # data-parallel axis size; -1 = all devices left over by the other axes
    fsdp: int = 1  # parameter-sharding (ZeRO-3 style) axis size
    tensor: int = 1  # tensor-parallel (Megatron style) axis size
    rules: str = ""  # overrides of the logical-axis rules, e.g. "embed=, vocab=tensor, batch=data+fsdp"

    def __post_init__(self) -> None:
        sizes = (self.data, self.fsdp, self.tensor)
        if any(s == 0 or s < -1 for s in sizes) or sizes.count(-1) > 1:
            raise UserError(f"mesh sizes must be positive, with at most one -1; got {sizes}")


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = 500  # steps between checkpoints (one is also written at the end)
    keep: int = 3  # how many of the most recent checkpoints to keep
    async_save: bool = True  # write checkpoints in the background while training goes on

    def __post_init__(self) -> None:
        if self.every <= 0 or self.keep <= 0:
            raise UserError(f"checkpoint.every and checkpoint.keep must be positive, got {self.every}, {self.keep}")


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UserError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def _closest(name: str, options: list[str]) -> str:
    match = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    initials = "".join(part[:1] for part in name.split("_"))  # learning_rate -> lr
    match = match or [o for o in options if o == initials]
    return f" (did you mean {match[0]!r}?)" if match else f" (valid: {', '.join(options)})"


def _field_type(section_cls: type, name: str) -> type:
    hint = typing.get_type_hints(section_cls)[name]
    if isinstance(hint, types.UnionType):  # e.g. `str | None`: take the first concrete type
        hint = typing.get_args(hint)[0]
    return hint


def _coerce(where: str, value: Any, kind: type) -> Any:
    """Check a TOML value (or parse a --set string) against the dataclass field's type."""
    if isinstance(value, str) and kind is not str:
        text = value.strip()
        if not text.isascii():  # int() and float() also read other scripts' digits: full-width "１２" would be 12
            raise UserError(f"{where} must be {kind.__name__} in ASCII characters, got {value!r}")
        try:
            if kind is bool:
                if text.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                return text.lower() in ("true", "1")
            value = kind(text)
        except ValueError:
            raise UserError(f"{where} must be {kind.__name__}, got {value!r}") from None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise UserError(f"{where} must be {kind.__name__}, got {value!r} ({type(value).__name__})")
    if kind is float and not math.isfinite(value):  # no field has a use for inf or nan: they surface after compiling
        raise UserError(f"{where} must be a finite number, got {value!r}")
    if kind is str and not _is_utf8(value):
        raise UserError(f"{where} is not valid UTF-8 text ({value!r}): config.toml could not hold it")
    return value


def _is_utf8(text: str) -> bool:
    """False for the surrogate escapes Python makes of command-line bytes that are not UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _section_classes(cls: type) -> dict[str, type]:
    return {f.name: _field_type(cls, f.name) for f in dataclasses.fields(cls)}


def parse_overrides(overrides: list[str]) -> dict[str, dict[str, str]]:
    """Turn ['optim.lr=1e-3', ...] into {'optim': {'lr': '1e-3'}}."""
    out: dict[str, dict[str, str]] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not name:
            raise UserError(f"--set {item!r} is not of the form section.key=value (e.g. optim.lr=1e-3)")
        out.setdefault(section, {})[name] = value
    return out


def load_config(
    recipe: Path | None,
    overrides: list[str] | None = None,
    cls: type = Config,
    base_dir: Path | None = None,
    values: dict[str, dict[str, Any]] | None = None,
) -> Any:
    """Read a recipe (or the defaults when None), apply a command's own flags as typed `values`
    ({"finetune": {"train_file": Path(...)}}), then `--set` overrides, and validate everything."""
    raw: dict[str, Any] = {}
    recipe_dir = Path.cwd()
    if recipe is not None:
        recipe = storage.path(recipe)  # a gs:// run's config.toml too
        if not recipe.is_file():
            raise UserError(f"recipe {recipe} not found: pass the path of a .toml recipe (see recipes/)")
        try:
            raw = tomllib.loads(recipe.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
            raise UserError(f"recipe {recipe} is not valid TOML: {err}") from None
        if base_dir is None:  # (a bucket's path has no resolve())
            recipe_dir = recipe.resolve().parent
    if base_dir is not None:
        recipe_dir = base_dir
    where = str(recipe) if recipe is not None else "config"
    return build_config(raw, parse_overrides(overrides or []), cls, recipe_dir, where, values=values)


def build_config(
    raw: dict[str, Any],
    overrides: dict[str, dict[str, str]],
    cls: type,
    recipe_dir: Path,
    where: str = "config",
    values: dict[str, dict[str, Any]] | None = None,
) -> Any:
    """Make the nested frozen config from raw TOML sections, typed `values`, then string overrides."""
    sections = _section_classes(cls)
    values = values or {}
    for name in list(raw) + list(values) + list(overrides):
        if name not in sections:
            raise UserError(f"{where}: unknown section [{name}]{_closest(name, list(sections))}")
    built = {}
    for name, section_cls in sections.items():
        section = raw.get(name, {})
        if not isinstance(section, dict):
            raise UserError(f"{where}: [{name}] must be a table of keys")
        # Typed values are checked, and their paths resolved, as --set ones are; a --set of the same key wins.
        given = {**values.get(name, {}), **overrides.get(name, {})}
        built[name] = _build_section(name, section_cls, section, given, recipe_dir, where)
    return cls(**built)


def _build_section(
    name: str, section_cls: type, values: dict[str, Any], overrides: dict[str, Any], recipe_dir: Path, where: str
) -> Any:
    fields = {f.name: f for f in dataclasses.fields(section_cls)}
    for key in list(values) + list(overrides):
        if key not in fields:
            raise UserError(f"{where}: unknown key {name}.{key}{_closest(key, list(fields))}")
    merged: dict[str, Any] = {}
    for key, value in values.items():
        merged[key] = _coerce(f"{where}: {name}.{key}", value, _field_type(section_cls, key))
        if fields[key].metadata.get("path"):
            merged[key] = _resolve_path(f"{where}: {name}.{key}", merged[key], recipe_dir)
        if fields[key].metadata.get("mixture") and merged[key]:
            merged[key] = resolve_mixture(merged[key], recipe_dir)
    for key, value in overrides.items():
        value = os.fspath(value) if isinstance(value, os.PathLike) else value
        merged[key] = _coerce(f"--set {name}.{key}", value, _field_type(section_cls, key))
        if fields[key].metadata.get("path"):
            merged[key] = _resolve_path(f"--set {name}.{key}", merged[key], Path.cwd())  # typed here: relative to cwd
        if fields[key].metadata.get("mixture") and merged[key]:
            merged[key] = resolve_mixture(merged[key], Path.cwd())
    if section_cls is ModelConfig and merged.get("preset"):
        preset = merged["preset"]
        if preset not in PRESETS:
            raise UserError(f"model.preset {preset!r} is unknown{_closest(preset, list(PRESETS))}")
        merged = {**PRESETS[preset], **merged}
    return section_cls(**merged)


def _resolve_path(where: str, value: str, base: Path) -> str:
    """Absolute form of a path value; URLs (gs://...) and hf:ORG/NAME stay as they are, hf:DIR keeps its prefix."""
    if "\0" in value:  # the one character no path can hold; os calls would fail with a bare ValueError
        raise UserError(f"{where} contains a NUL character, which no path can hold: {value!r}")
    if not value:
        return value
    if storage.is_url(value):
        storage.check_client(value, where)
        return value
    if value.startswith("hf:"):  # a directory that exists wins; anything else stays as written (a Hub id, ORG/NAME)
        local = base / value[3:]
        return "hf:" + str(local.resolve()) if local.exists() else value
    return str((base / value).resolve())


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain nested dicts, in field order."""
    return dataclasses.asdict(cfg)


def dumps(cfg: Any) -> str:
    """Serialise a nested config to TOML (scalars only, which is all our sections hold)."""
    lines = ["# Fully resolved config, written by bigmodel. Rerun with: bigmodel <stage> config.toml"]
    for section, values in to_dict(cfg).items():
        lines.append(f"\n[{section}]")
        for key, value in values.items():
            lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


# TOML's short escapes; every other control character needs \uXXXX inside a basic string.
_TOML_ESCAPES = {"\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r", '"': '\\"', "\\": "\\\\"}


def _toml_char(char: str) -> str:
    return f"\\u{ord(char):04X}" if char < " " or char == "\x7f" else char


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + "".join(_TOML_ESCAPES.get(c) or _toml_char(c) for c in value) + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} to TOML")


def diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Keys (section.key) whose values differ between two config dicts."""
    keys = []
    for section in sorted(set(old) | set(new)):
        a, b = old.get(section, {}), new.get(section, {})
        keys += [
            f"{section}.{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)
        ]
    return keys
