"""config.json <-> ModelConfig for the Hugging Face families bigmodel implements (see bigmodel_cli/model/families.py).

One row of FAMILIES says how a family is spelled in config.json: its class, the defaults its transformers config
class falls back on when a field is absent, and how it states a sliding window. config.json is parsed as JSON:
nothing here imports transformers or runs code from a model directory.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bigmodel_cli import storage
from bigmodel_cli.config import ModelConfig
from bigmodel_cli.errors import UserError

MAX_IMPORT_SEQ_LEN = 4096  # cap on the context taken from max_position_embeddings (generation pads to it)


@dataclass(frozen=True)
class HfFamily:
    hf_class: str  # architectures[0] in config.json; model_type is our architecture name
    max_positions: int  # the config class's max_position_embeddings when config.json has none
    head_dim: int = 0  # the config class's head_dim when config.json has none; 0 = hidden_size / heads
    bias_fields: tuple[str, ...] = ()  # boolean fields that would add biases we do not implement
    window: str = ""  # how a sliding window is stated: "mistral" (sliding_window), "qwen" (use_sliding_window)


FAMILIES = {
    "llama": HfFamily("LlamaForCausalLM", 2048, bias_fields=("attention_bias", "mlp_bias")),
    "mistral": HfFamily("MistralForCausalLM", 131072, window="mistral"),
    "qwen2": HfFamily("Qwen2ForCausalLM", 32768, window="qwen"),  # q/k/v biases always, o_proj none
    "qwen3": HfFamily("Qwen3ForCausalLM", 32768, head_dim=128, bias_fields=("attention_bias",), window="qwen"),
}
MISTRAL_WINDOW = 4096  # MistralConfig's sliding_window when config.json has none
SUPPORTED = ", ".join(f.hf_class for f in FAMILIES.values())


# ----------------------------------------------------------------------------------------------------------
# ModelConfig -> config.json
# ----------------------------------------------------------------------------------------------------------


def hf_config(cfg: ModelConfig, max_positions: int, dtype: str, token_ids: dict[str, int | None]) -> dict:
    """config.json for transformers' class of cfg.architecture (field names as transformers 5 writes them)."""
    family = FAMILIES[cfg.architecture]
    rope = {"rope_type": cfg.rope_type, "rope_theta": cfg.rope_theta, **_rope_fields(cfg)}
    config = {
        "architectures": [family.hf_class],
        "model_type": cfg.architecture,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.dims_per_head,
        "hidden_act": "silu",
        "max_position_embeddings": max_positions,
        "rms_norm_eps": cfg.norm_eps,
        # transformers 5 reads rope_parameters (or rope_scaling when set); 4.x reads rope_theta and rope_scaling.
        "rope_theta": cfg.rope_theta,
        "rope_parameters": rope,
        "rope_scaling": None if cfg.rope_type == "default" else {k: v for k, v in rope.items() if k != "rope_theta"},
        **dict.fromkeys(family.bias_fields, False),
        "attention_dropout": 0.0,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "use_cache": True,
        **token_ids,
        "dtype": dtype,  # transformers 5
        "torch_dtype": dtype,  # transformers 4
    }
    if family.window == "mistral":
        config["sliding_window"] = cfg.sliding_window or None
    if family.window == "qwen":  # every layer full: no layer from max_window_layers on slides
        config.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layers)
        config["layer_types"] = ["full_attention"] * cfg.n_layers
    return config


def _rope_fields(cfg: ModelConfig) -> dict[str, Any]:
    """The rope_parameters entries of cfg.rope_type beyond rope_type and rope_theta."""
    if cfg.rope_type == "default":
        return {}
    fields: dict[str, Any] = {"factor": cfg.rope_factor}
    if cfg.rope_type in ("llama3", "yarn"):
        fields["original_max_position_embeddings"] = cfg.rope_original_max_positions
    if cfg.rope_type == "llama3":
        fields.update(low_freq_factor=cfg.rope_low_freq_factor, high_freq_factor=cfg.rope_high_freq_factor)
    if cfg.rope_type == "yarn":
        fields.update(beta_fast=cfg.rope_beta_fast, beta_slow=cfg.rope_beta_slow)
        if cfg.rope_attention_factor:
            fields["attention_factor"] = cfg.rope_attention_factor
        if not cfg.rope_truncate:  # transformers 4 knows no truncate: written only when it differs
            fields["truncate"] = False
    return fields


# ----------------------------------------------------------------------------------------------------------
# config.json -> ModelConfig
# ----------------------------------------------------------------------------------------------------------


def read_config(home: Path) -> tuple[ModelConfig, int]:
    """(model config, sequence length) from a supported family's config.json, refusing what we do not implement."""
    where = home / "config.json"
    cfg = storage.read_json_object(where)
    if cfg is None:
        raise UserError(f"{where} not found: hf:DIR needs a Hugging Face model directory with config.json")

    def refuse(field: str, why: str) -> UserError:
        return UserError(f"{where}: {field}={json.dumps(cfg.get(field))} is not supported: {why}")

    architectures = cfg.get("architectures") or []
    by_class = {f.hf_class: name for name, f in FAMILIES.items()}
    if not isinstance(architectures, list) or len(architectures) != 1 or architectures[0] not in by_class:
        raise refuse("architectures", f"bigmodel loads {SUPPORTED}")
    architecture = by_class[architectures[0]]
    family = FAMILIES[architecture]
    if cfg.get("model_type") != architecture:
        raise refuse("model_type", f"expected {architecture!r} for {architectures[0]}")
    if cfg.get("quantization_config"):
        raise refuse("quantization_config", "load the unquantized weights")
    if cfg.get("hidden_act", "silu") != "silu":
        raise refuse("hidden_act", "our MLP is SwiGLU (silu)")
    for field in family.bias_fields:
        if cfg.get(field, False):
            raise refuse(field, f"{family.hf_class} has no biases in bigmodel (Qwen2's q/k/v biases are the only ones)")
    missing = [
        f
        for f in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        if not isinstance(cfg.get(f), int)
    ]
    if missing:
        raise UserError(f"{where}: {missing[0]} is missing or not an integer")
    optional = ("num_key_value_heads", "head_dim", "max_position_embeddings")
    wrong = [
        f for f in optional if cfg.get(f) is not None and (not isinstance(cfg[f], int) or isinstance(cfg[f], bool))
    ]
    if wrong:
        raise UserError(
            f"{where}: {wrong[0]}={json.dumps(cfg[wrong[0]])} is not an integer: restore the model's own file"
        )
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or family.head_dim or cfg["hidden_size"] // heads
    max_positions = int(cfg.get("max_position_embeddings") or family.max_positions)
    seq_len = min(max_positions, MAX_IMPORT_SEQ_LEN)
    try:
        model_cfg = ModelConfig(
            architecture=architecture,
            vocab_size=cfg["vocab_size"],
            d_model=cfg["hidden_size"],
            n_layers=cfg["num_hidden_layers"],
            n_heads=heads,
            n_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=0 if head_dim * heads == cfg["hidden_size"] else head_dim,
            qkv_bias=architecture == "qwen2",
            qk_norm=architecture == "qwen3",
            d_ff=cfg["intermediate_size"],
            max_seq_len=seq_len,
            sliding_window=_sliding_window(cfg, family, refuse),
            **_read_rope(cfg, max_positions, refuse),
            norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),  # the config classes' default, not ours
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            init_std=float(cfg.get("initializer_range", 0.02)),
        )
    except UserError as err:  # the refusals above name the file already; ModelConfig's own checks do not
        message = str(err)
        raise UserError(message if message.startswith(f"{where}: ") else f"{where}: {message}") from None
    return model_cfg, seq_len


def _sliding_window(cfg: dict, family: HfFamily, refuse) -> int:
    """The window every layer attends within (0 = none), as the family's modeling code reads config.json."""
    if family.window == "mistral":  # one window for every layer; null turns it off
        window = cfg.get("sliding_window", MISTRAL_WINDOW)
        if window is not None and (not isinstance(window, int) or window <= 0):
            raise refuse("sliding_window", "give a positive integer or null")
        return window or 0
    if family.window == "qwen" and cfg.get("use_sliding_window") and cfg.get("sliding_window", 4096) is not None:
        layers = cfg.get("layer_types") or [
            "sliding_attention" if i >= cfg.get("max_window_layers", 28) else "full_attention"
            for i in range(cfg["num_hidden_layers"])
        ]
        if "sliding_attention" in layers:
            raise refuse("use_sliding_window", "bigmodel gives Qwen models full attention in every layer")
    return 0


def _read_rope(cfg: dict, max_positions: int, refuse) -> dict[str, Any]:
    """ModelConfig's rope_* fields from rope_scaling (transformers 4, and 5 prefers it) or rope_parameters (5)."""
    field = "rope_scaling" if cfg.get("rope_scaling") else "rope_parameters"
    rope = cfg.get(field) or {}
    if not isinstance(rope, dict) or any(isinstance(v, dict) for v in rope.values()):
        raise refuse(field, "give one RoPE for all layers (a flat object)")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)) != 1.0:
        raise refuse(field, "RoPE must rotate the whole head (partial_rotary_factor 1)")
    out: dict[str, Any] = {
        "rope_type": rope_type,
        "rope_theta": float(rope.get("rope_theta", cfg.get("rope_theta", 1e4))),
    }
    if rope_type == "default":
        return out
    if rope_type not in ("linear", "llama3", "yarn"):
        raise refuse(field, "bigmodel implements rope_type default, linear, llama3 and yarn")
    needed = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor"), "yarn": ()}
    lacking = [key for key in needed[rope_type] if not isinstance(rope.get(key), int | float)]
    if lacking:
        raise refuse(field, f"rope_type {rope_type} needs a number in {lacking[0]}")
    # transformers prefers a top-level original_max_position_embeddings (Phi-3 style), then max_position_embeddings.
    original = cfg.get("original_max_position_embeddings") or rope.get("original_max_position_embeddings")
    original = int(original or max_positions)
    factor = float(rope.get("factor") or max_positions / original)
    out["rope_factor"] = factor
    if rope_type == "llama3":
        out.update(rope_original_max_positions=original, rope_low_freq_factor=float(rope["low_freq_factor"]))
        out["rope_high_freq_factor"] = float(rope["high_freq_factor"])
    if rope_type == "yarn":
        attention_factor = rope.get("attention_factor")
        mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
        if attention_factor is None and mscale and mscale_all_dim and factor > 1:  # DeepSeek's ratio of two
            attention_factor = (0.1 * mscale * math.log(factor) + 1) / (0.1 * mscale_all_dim * math.log(factor) + 1)
        out.update(
            rope_original_max_positions=original,
            rope_beta_fast=float(rope.get("beta_fast") or 32),
            rope_beta_slow=float(rope.get("beta_slow") or 1),
            rope_attention_factor=float(attention_factor or 0.0),
            rope_truncate=bool(rope.get("truncate", True)),
        )
    return out
