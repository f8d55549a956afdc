"""The model families the one model file implements, as switches on the Llama blocks, and the RoPE variants.

A family is the Hugging Face architecture a model exports as (bigmodel_cli/hf_config.py spells each in config.json);
ModelConfig's switches must be that family's own, so that every model bigmodel trains can be written back.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from bigmodel_cli.errors import UserError


@dataclass(frozen=True)
class Family:
    qkv_bias: bool = False  # the q/k/v projections carry biases
    qk_norm: bool = False  # an RMSNorm over each head of q and k before RoPE
    sliding_window: bool = False  # attention may be limited to the most recent tokens


FAMILIES = {
    "llama": Family(),
    "mistral": Family(sliding_window=True),
    "qwen2": Family(qkv_bias=True),
    "qwen3": Family(qk_norm=True),
}
_SWITCHES = {"qkv_bias": "biases on q/k/v", "qk_norm": "RMSNorms on q and k"}

# RoPE variants (transformers' rope_type) and the model.rope_* fields each one reads.
_YARN = ("rope_beta_fast", "rope_beta_slow", "rope_attention_factor", "rope_truncate")
ROPE_FIELDS = {
    "default": (),
    "linear": ("rope_factor",),
    "llama3": ("rope_factor", "rope_original_max_positions", "rope_low_freq_factor", "rope_high_freq_factor"),
    "yarn": ("rope_factor", "rope_original_max_positions", *_YARN),
}


def check(cfg: Any) -> None:
    """Refuse (one line each) switches that do not fit cfg.architecture, and RoPE fields that do not fit rope_type."""
    if cfg.architecture not in FAMILIES:
        raise UserError(f"model.architecture must be one of {', '.join(FAMILIES)}; got {cfg.architecture!r}")
    family = FAMILIES[cfg.architecture]
    for name, what in _SWITCHES.items():
        if getattr(cfg, name) and not getattr(family, name):
            owner = next(a for a, f in FAMILIES.items() if getattr(f, name))
            raise UserError(f"model.{name}=true ({what}) needs model.architecture={owner}, not {cfg.architecture}")
        if getattr(family, name) and not getattr(cfg, name):
            raise UserError(f"model.architecture={cfg.architecture} has {what}: set model.{name}=true")
    if cfg.sliding_window < 0:
        raise UserError(f"model.sliding_window must be 0 (none) or positive, got {cfg.sliding_window}")
    if cfg.sliding_window and not family.sliding_window:
        raise UserError(f"model.sliding_window needs model.architecture=mistral, not {cfg.architecture}")
    _check_rope(cfg)


def _check_rope(cfg: Any) -> None:
    if cfg.rope_type not in ROPE_FIELDS:
        raise UserError(f"model.rope_type must be one of {', '.join(ROPE_FIELDS)}; got {cfg.rope_type!r}")
    used = ROPE_FIELDS[cfg.rope_type]
    for f in dataclasses.fields(cfg):
        if f.name.startswith("rope_") and f.name not in (*used, "rope_type", "rope_theta"):
            if getattr(cfg, f.name) != f.default:
                raise UserError(f"model.{f.name} has no effect with model.rope_type={cfg.rope_type}: leave it out")
    if not (cfg.rope_theta > 0 and cfg.rope_factor > 0 and cfg.rope_attention_factor >= 0):
        raise UserError("model.rope_theta and model.rope_factor must be positive, model.rope_attention_factor >= 0")
    if "rope_original_max_positions" in used and cfg.rope_original_max_positions <= 0:
        raise UserError(f"model.rope_type={cfg.rope_type} needs model.rope_original_max_positions > 0")
    if cfg.rope_type == "llama3" and not cfg.rope_high_freq_factor > cfg.rope_low_freq_factor:
        raise UserError("model.rope_high_freq_factor must be greater than model.rope_low_freq_factor")
