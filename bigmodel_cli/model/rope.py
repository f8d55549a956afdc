"""Rotary position embeddings (RoPE) in the rotate-half form of Hugging Face Llama, with the scalings of
transformers' modeling_rope_utils (linear, llama3, yarn): the tables the decoder in transformer.py rotates its
queries and keys by."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from bigmodel_cli.config import ModelConfig


def rope_frequencies(cfg: ModelConfig) -> tuple[jax.Array, float]:
    """(inverse frequencies [E/2], scale of cos/sin) of RoPE with cfg.rope_type's scaling, as transformers'
    modeling_rope_utils computes them: linear divides every frequency by the factor; llama3 divides only the
    low frequencies and blends a middle band; yarn blends per dimension by rotations over the original context
    and scales cos/sin (attention sharpens as the context stretches)."""
    e, base, factor = cfg.dims_per_head, cfg.rope_theta, cfg.rope_factor
    inv_freq = 1.0 / base ** (jnp.arange(0, e, 2, dtype=jnp.float32) / e)  # [E/2]
    if cfg.rope_type == "linear":
        return inv_freq / factor, 1.0
    if cfg.rope_type == "llama3":
        original, low, high = cfg.rope_original_max_positions, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = jnp.where(wavelen > original / low, inv_freq / factor, inv_freq)
        smooth = (original / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        middle = (wavelen >= original / high) & (wavelen <= original / low)
        return jnp.where(middle, blended, scaled), 1.0
    if cfg.rope_type == "yarn":

        def dim_turning(rotations: float) -> float:  # the dimension whose wavelength fits `rotations` times
            return e * math.log(cfg.rope_original_max_positions / (rotations * 2 * math.pi)) / (2 * math.log(base))

        lo, hi = dim_turning(cfg.rope_beta_fast), dim_turning(cfg.rope_beta_slow)
        if cfg.rope_truncate:
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, e - 1)
        ramp = jnp.clip((jnp.arange(e // 2, dtype=jnp.float32) - lo) / ((hi - lo) or 0.001), 0, 1)
        inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)  # fast dims keep theirs, slow ones scale
        scale = cfg.rope_attention_factor or (0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0)
        return inv_freq, scale
    return inv_freq, 1.0


def rope_tables(positions: jax.Array, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """cos/sin of shape [B, T, E/2] for the rotate-half RoPE used by Hugging Face Llama."""
    inv_freq, scale = rope_frequencies(cfg)  # [E/2]
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, E/2]
    return jnp.cos(angles) * scale, jnp.sin(angles) * scale


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate pairs (i, i + E/2) of every head: x [B, T, N, E], cos/sin [B, T, E/2]."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1).astype(x.dtype)
