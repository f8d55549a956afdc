"""A decoder's size and training cost from its config alone: parameter counts and FLOPs per token, for plan,
MFU and the benchmarks (no model is built)."""

from __future__ import annotations

from bigmodel_cli.config import ModelConfig


def count_params(cfg: ModelConfig) -> tuple[int, int]:
    """(all parameters, parameters outside the embedding table) without building the model."""
    d, e, f, v = cfg.d_model, cfg.dims_per_head, cfg.d_ff, cfg.vocab_size
    per_layer = d * e * (2 * cfg.n_heads + 2 * cfg.kv_heads) + 3 * d * f + 2 * d
    per_layer += (cfg.n_heads + 2 * cfg.kv_heads) * e * cfg.qkv_bias + 2 * e * cfg.qk_norm
    body = cfg.n_layers * per_layer + d + (0 if cfg.tie_embeddings else d * v)
    return body + v * d, body


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 per non-embedding weight plus causal attention's 12*L*T*D (PaLM's count),
    with T the keys a query sees (at most the sliding window)."""
    _, non_embedding = count_params(cfg)
    context = min(seq_len, cfg.sliding_window or seq_len)
    return 6.0 * non_embedding + 12.0 * cfg.n_layers * context * cfg.n_heads * cfg.dims_per_head


def train_flops_per_token(cfg: ModelConfig, seq_len: int, adapter_params: int | None = None) -> float:
    """flops_per_token of the training that runs: with LoRA (adapter_params trainable, every weight of cfg
    frozen), a frozen weight gets no weight gradient, 2 FLOPs fewer, and each adapter weight costs 6."""
    if adapter_params is None:
        return flops_per_token(cfg, seq_len)
    _, non_embedding = count_params(cfg)
    return flops_per_token(cfg, seq_len) - 2 * non_embedding + 6 * adapter_params
