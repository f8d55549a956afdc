"""The Llama-style decoder: embeddings, RMSNorm, RoPE, grouped-query attention, SwiGLU MLP.

Dimension letters in shape comments: B batch, T time, D model width, H query heads, K key/value heads,
E head dim, F MLP hidden, V vocabulary. Parameter names mirror Hugging Face Llama so that export is a
rename plus a transpose of each kernel (we store [in, out], torch stores [out, in]).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from bigmodel_cli.config import ModelConfig
from bigmodel_cli.parallel import constrain


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str, ...], std: float, dtype) -> nnx.Param:
    return nnx.Param(std * jax.random.normal(rngs.params(), shape, dtype), logical_axes=axes)


@jax.custom_vjp
def dense(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """x @ kernel over the last axis of x, with a backward pass that keeps XLA:CPU on its fast matmuls."""
    return x @ kernel


def _dense_fwd(x, kernel):
    return x @ kernel, (x, kernel)


def _dense_bwd(residuals, g):
    x, kernel = residuals
    x2 = x.reshape(-1, x.shape[-1])  # [N, in]
    g2 = g.reshape(-1, g.shape[-1])  # [N, out]
    # Left alone, XLA:CPU computes dW as a dot contracting dim 0 of both operands, which misses the fast
    # matmul path (~6x slower); an explicit transpose that it may not fold back keeps dW a plain matmul.
    x2_t = jax.lax.optimization_barrier(x2.T)  # [in, N]
    return g @ kernel.T, (x2_t @ g2).astype(kernel.dtype)


dense.defvjp(_dense_fwd, _dense_bwd)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, dtype):
        self.weight = nnx.Param(jnp.ones((dim,), dtype), logical_axes=("norm",))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (normed * self.weight[...].astype(jnp.float32)).astype(x.dtype)


def rope_tables(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos/sin of shape [B, T, E/2] for the rotate-half RoPE used by Hugging Face Llama."""
    inv_freq = 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)  # [E/2]
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, E/2]
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate pairs (i, i + E/2) of every head: x [B, T, N, E], cos/sin [B, T, E/2]."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1).astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, h, k, e = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.dims_per_head
        pd, std = jnp.dtype(cfg.param_dtype), cfg.init_std
        self.q_proj = _param(rngs, (d, h * e), ("embed", "heads"), std, pd)
        self.k_proj = _param(rngs, (d, k * e), ("embed", "kv_heads"), std, pd)
        self.v_proj = _param(rngs, (d, k * e), ("embed", "kv_heads"), std, pd)
        self.o_proj = _param(rngs, (h * e, d), ("heads", "embed"), std, pd)
        self.cfg = cfg

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, segment_ids: jax.Array | None = None,
                 cache: dict | None = None, cache_pos: jax.Array | None = None):
        """Causal self-attention; with a KV cache, x's keys/values are written at cache_pos [B] first."""
        cfg, dt = self.cfg, x.dtype
        b, t, _ = x.shape
        q = dense(x, self.q_proj[...].astype(dt)).reshape(b, t, cfg.n_heads, cfg.dims_per_head)  # [B,T,H,E]
        k = dense(x, self.k_proj[...].astype(dt)).reshape(b, t, cfg.kv_heads, cfg.dims_per_head)  # [B,T,K,E]
        v = dense(x, self.v_proj[...].astype(dt)).reshape(b, t, cfg.kv_heads, cfg.dims_per_head)  # [B,T,K,E]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        implementation = None if cfg.attention == "auto" else cfg.attention
        if cache is None:
            mask = None
            if segment_ids is not None:  # packed documents: a token sees only its own document
                mask = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]  # [B,1,T,T]
            out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, implementation=implementation)
            new_cache = None
        else:
            write = jax.vmap(lambda buf, new, pos: jax.lax.dynamic_update_slice(buf, new, (pos, 0, 0)))
            keys = write(cache["k"], k.astype(cache["k"].dtype), cache_pos)  # [B,S,K,E]
            values = write(cache["v"], v.astype(cache["v"].dtype), cache_pos)  # [B,S,K,E]
            query_pos = cache_pos[:, None] + jnp.arange(t)  # [B,T]
            visible = jnp.arange(keys.shape[1])[None, None, :] <= query_pos[:, :, None]  # [B,T,S]
            out = jax.nn.dot_product_attention(q, keys.astype(dt), values.astype(dt), mask=visible[:, None])
            new_cache = {"k": keys, "v": values}
        out = dense(out.reshape(b, t, -1), self.o_proj[...].astype(dt))  # [B,T,D]
        return out, new_cache


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, f = cfg.d_model, cfg.d_ff
        pd, std = jnp.dtype(cfg.param_dtype), cfg.init_std
        self.gate_proj = _param(rngs, (d, f), ("embed", "mlp"), std, pd)
        self.up_proj = _param(rngs, (d, f), ("embed", "mlp"), std, pd)
        self.down_proj = _param(rngs, (f, d), ("mlp", "embed"), std, pd)

    def __call__(self, x: jax.Array) -> jax.Array:
        dt = x.dtype
        gate = dense(x, self.gate_proj[...].astype(dt))  # [B,T,F]
        up = dense(x, self.up_proj[...].astype(dt))  # [B,T,F]
        return dense(jax.nn.silu(gate) * up, self.down_proj[...].astype(dt))  # [B,T,D]


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        pd = jnp.dtype(cfg.param_dtype)
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps, pd)
        self.self_attn = Attention(cfg, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps, pd)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x, cos, sin, segment_ids=None, cache=None, cache_pos=None):
        attn, new_cache = self.self_attn(self.input_layernorm(x), cos, sin, segment_ids, cache, cache_pos)
        x = x + attn
        x = x + self.mlp(self.post_attention_layernorm(x))
        return constrain(x, ("batch", "length", None)), new_cache


_REMAT_POLICIES = {
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    "full": jax.checkpoint_policies.nothing_saveable,
}


class Transformer(nnx.Module):
    """Decoder-only Transformer returning logits [B, T, V] in float32."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, remat: str = "none"):
        if cfg.vocab_size <= 0:
            raise ValueError("model.vocab_size must be set (it normally comes from the data's manifest)")
        pd = jnp.dtype(cfg.param_dtype)
        self.embed_tokens = _param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), cfg.init_std, pd)
        self.layers = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.n_layers)])
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps, pd)
        if not cfg.tie_embeddings:
            self.lm_head = _param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), cfg.init_std, pd)
        self.cfg = cfg
        self.remat = remat

    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None) -> jax.Array:
        """Logits [B,T,V] for tokens [B,T]; positions/segment_ids [B,T] describe packed documents."""
        logits, _ = self._forward(tokens, positions, segment_ids, None, None)
        return logits

    def decode(self, tokens: jax.Array, cache: list[dict], cache_pos: jax.Array) -> tuple[jax.Array, list[dict]]:
        """Logits for tokens [B,T] placed at positions cache_pos[b] + t, reading and extending the KV cache."""
        positions = cache_pos[:, None] + jnp.arange(tokens.shape[1])  # [B,T]
        return self._forward(tokens, positions, None, cache, cache_pos)

    def init_cache(self, batch: int, length: int) -> list[dict]:
        """An empty KV cache: per layer, keys and values [B, S, K, E] in the compute dtype."""
        cfg = self.cfg
        shape = (batch, length, cfg.kv_heads, cfg.dims_per_head)
        zeros = jnp.zeros(shape, jnp.dtype(cfg.dtype))
        return [{"k": zeros, "v": zeros} for _ in range(cfg.n_layers)]

    def _forward(self, tokens, positions, segment_ids, cache, cache_pos):
        cfg = self.cfg
        dt = jnp.dtype(cfg.dtype)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)  # [B,T]
        x = jnp.take(self.embed_tokens[...], tokens, axis=0).astype(dt)  # [B,T,D]
        x = constrain(x, ("batch", "length", None))
        cos, sin = rope_tables(positions, cfg.dims_per_head, cfg.rope_theta)
        new_cache = []
        for i, block in enumerate(self.layers):
            layer_cache = None if cache is None else cache[i]
            if self.remat == "none" or cache is not None:
                x, layer_cache = block(x, cos, sin, segment_ids, layer_cache, cache_pos)
            else:
                x, layer_cache = nnx.remat(
                    lambda blk, h: blk(h, cos, sin, segment_ids), policy=_REMAT_POLICIES[self.remat]
                )(block, x)
            new_cache.append(layer_cache)
        x = self.norm(x)
        head = self.embed_tokens[...].T if cfg.tie_embeddings else self.lm_head[...]  # [D,V]
        logits = dense(x, head.astype(dt)).astype(jnp.float32)  # [B,T,V]
        return logits, (new_cache if cache is not None else None)


def count_params(cfg: ModelConfig) -> tuple[int, int]:
    """(all parameters, parameters outside the embedding table) without building the model."""
    d, e, f, v = cfg.d_model, cfg.dims_per_head, cfg.d_ff, cfg.vocab_size
    per_layer = d * e * (2 * cfg.n_heads + 2 * cfg.kv_heads) + 3 * d * f + 2 * d
    body = cfg.n_layers * per_layer + d + (0 if cfg.tie_embeddings else d * v)
    return body + v * d, body


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 per non-embedding weight plus causal attention's 12*L*T*D (PaLM's count)."""
    _, non_embedding = count_params(cfg)
    return 6.0 * non_embedding + 12.0 * cfg.n_layers * seq_len * cfg.n_heads * cfg.dims_per_head
