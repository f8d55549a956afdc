"""The Llama-style decoder: embeddings, RMSNorm, RoPE, grouped-query attention, SwiGLU MLP.

The families of bigmodel_cli/model/families.py are switches read here: q/k/v biases (Qwen2), q/k RMSNorms
(Qwen3), a sliding attention window (Mistral), and RoPE scaling (linear, llama3, yarn) for any of them.

Dimension letters in shape comments: B batch, T time, D model width, H query heads, K key/value heads,
E head dim, F MLP hidden, V vocabulary. Parameter names mirror Hugging Face Llama so that export is a
rename plus a transpose of each kernel (we store [in, out], torch stores [out, in]).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from bigmodel_cli.config import ModelConfig
from bigmodel_cli.errors import UserError
from bigmodel_cli.model.attention import (
    attention_chunks,
    attention_probs,
    causal_attention,
    fused_attention,
    uses_chunked_attention,
)
from bigmodel_cli.model.layout import stack_modules
from bigmodel_cli.model.lora import LoraConfig, adapter, attach, input_dropout
from bigmodel_cli.model.matmul import DECODING, dense, matmul
from bigmodel_cli.model.rope import apply_rope, rope_tables
from bigmodel_cli.parallel import constrain


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str, ...], std: float, dtype) -> nnx.Param:
    return nnx.Param(std * jax.random.normal(rngs.params(), shape, dtype), logical_axes=axes)


class Int8Kernel(nnx.Module):
    """A weight stored as int8 `q` with a float32 `scale` per output channel (absmax/127), made by
    model/quantize.py: the weight is q * scale, scale [1, out] for a kernel [in, out], [V, 1] for the embedding
    table (whose rows are the tied head's output channels)."""

    def __init__(self, q: nnx.Param, scale: nnx.Param):
        self.q, self.scale = q, scale


def _weight(param) -> tuple[jax.Array, jax.Array | None]:
    """(values, scale per output channel or None) of an nnx.Param or an Int8Kernel."""
    if isinstance(param, Int8Kernel):
        return param.q[...], param.scale[...].reshape(-1)
    return param[...], None


def _rows(table: jax.Array, tokens: jax.Array, decoding: bool) -> jax.Array:
    """table[tokens]. Decoding gathers a 16-bit float table as 16-bit integers: XLA:CPU gathers floats in float32,
    converting the whole table, and hoists that conversion out of the decoding loop, holding a float32 copy of
    the table throughout (integers carry no gradient, hence decoding only)."""
    if not decoding or table.dtype.itemsize != 2 or not jnp.issubdtype(table.dtype, jnp.floating):
        return jnp.take(table, tokens, axis=0)
    bits = jnp.take(jax.lax.bitcast_convert_type(table, jnp.uint16), tokens, axis=0)
    return jax.lax.bitcast_convert_type(bits, table.dtype)


class Projections(nnx.Module):
    """Base for modules made of [in, out] kernels, each optionally with a LoRA adapter beside it (see lora.py)."""

    def _add(self, rngs, name, shape, axes, cfg: ModelConfig, lora: LoraConfig | None, bias: bool = False):
        pd = jnp.dtype(cfg.param_dtype)
        setattr(self, name, _param(rngs, shape, axes, cfg.init_std, pd))
        if bias:  # `name`_bias [out]: a frozen base weight under LoRA, like the kernel beside it
            setattr(self, f"{name}_bias", nnx.Param(jnp.zeros(shape[-1:], pd), logical_axes=axes[-1:]))
        attach(self, rngs, name, shape, axes, pd, lora)

    def project(self, name: str, x: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
        y = matmul(x, *_weight(getattr(self, name)))
        if hasattr(self, f"{name}_bias"):
            y = y + getattr(self, f"{name}_bias")[...].astype(x.dtype)
        low_rank = adapter(self, name, x.dtype)
        if low_rank is not None:
            a, b = low_rank
            y = y + self.lora_scale * dense(dense(input_dropout(self, name, x, dropout_key), a), b)
        return y


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, dtype):
        self.weight = nnx.Param(jnp.ones((dim,), dtype), logical_axes=("norm",))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (normed * self.weight[...].astype(jnp.float32)).astype(x.dtype)


class Attention(Projections):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, lora: LoraConfig | None = None):
        d, h, k, e = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.dims_per_head
        self._add(rngs, "q_proj", (d, h * e), ("embed", "heads"), cfg, lora, bias=cfg.qkv_bias)
        self._add(rngs, "k_proj", (d, k * e), ("embed", "kv_heads"), cfg, lora, bias=cfg.qkv_bias)
        self._add(rngs, "v_proj", (d, k * e), ("embed", "kv_heads"), cfg, lora, bias=cfg.qkv_bias)
        self._add(rngs, "o_proj", (h * e, d), ("heads", "embed"), cfg, lora)
        if cfg.qk_norm:  # Qwen3: one RMSNorm [E] shared by every head, before RoPE
            self.q_norm = RMSNorm(e, cfg.norm_eps, jnp.dtype(cfg.param_dtype))
            self.k_norm = RMSNorm(e, cfg.norm_eps, jnp.dtype(cfg.param_dtype))
        self.cfg = cfg

    def __call__(
        self,
        x: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        segment_ids: jax.Array | None = None,
        cache: dict | None = None,
        cache_pos: jax.Array | None = None,
        dropout_key=None,
        inspect: bool = False,
    ):
        """Causal self-attention; with a KV cache, x's keys/values are written at cache_pos [B] first. With inspect,
        one explicit softmax over all keys, whose probabilities [B,H,T,T] are sown as "attention_probs"."""
        cfg, dt = self.cfg, x.dtype
        b, t, _ = x.shape
        q = self.project("q_proj", x, dropout_key).reshape(b, t, cfg.n_heads, cfg.dims_per_head)  # [B,T,H,E]
        k = self.project("k_proj", x, dropout_key).reshape(b, t, cfg.kv_heads, cfg.dims_per_head)  # [B,T,K,E]
        v = self.project("v_proj", x, dropout_key).reshape(b, t, cfg.kv_heads, cfg.dims_per_head)  # [B,T,K,E]
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        window = cfg.sliding_window  # 0: every earlier token; else the last `window` ones, the query's own included
        if inspect:  # query head h = kv head h // G, as k and v are repeated for grouped-query attention
            probs = []
            out = causal_attention(q, k, v, 1, segment_ids, window, probs)
            self.sow(nnx.Intermediate, "attention_probs", probs[0].reshape(b, cfg.n_heads, t, t))
            new_cache = None
        elif cache is None and uses_chunked_attention(cfg):
            out = causal_attention(
                q, k, v, attention_chunks(cfg, t), segment_ids, window, one_row_kernel=cfg.scan_layers
            )
            new_cache = None
        elif cache is None:
            mask = None
            if segment_ids is not None:  # packed documents: a token sees only its own document
                mask = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]  # [B,1,T,T]
            out = fused_attention(q, k, v, mask, window, cfg.attention)
            new_cache = None
        else:
            write = jax.vmap(lambda buf, new, pos: jax.lax.dynamic_update_slice(buf, new, (pos, 0, 0)))
            keys = write(cache["k"], k.astype(cache["k"].dtype), cache_pos)  # [B,S,K,E]
            values = write(cache["v"], v.astype(cache["v"].dtype), cache_pos)  # [B,S,K,E]
            query_pos = cache_pos[:, None, None] + jnp.arange(t)[None, :, None]  # [B,T,1]
            key_pos = jnp.arange(keys.shape[1])[None, None, :]  # [1,1,S]
            visible = key_pos <= query_pos  # [B,T,S]
            if window:
                visible = visible & (key_pos > query_pos - window)
            # The cache's own layout, query heads grouped by the key/value head they share: jax.nn's attention
            # would compute the same, at twice the tracing time of this whole branch.
            grouped = q.reshape(b, t, cfg.kv_heads, -1, cfg.dims_per_head)  # [B,T,K,G,E]
            probs = attention_probs(grouped, keys.astype(dt), visible[:, None, None], "btkge,bske->bkgts")
            out = jnp.einsum("bkgts,bske->btkge", probs.astype(dt), values.astype(dt))  # [B,T,K,G,E]
            new_cache = {"k": keys, "v": values}
        out = self.project("o_proj", out.reshape(b, t, -1), dropout_key)  # [B,T,D]
        return out, new_cache


class MLP(Projections):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, lora: LoraConfig | None = None):
        d, f = cfg.d_model, cfg.d_ff
        self._add(rngs, "gate_proj", (d, f), ("embed", "mlp"), cfg, lora)
        self._add(rngs, "up_proj", (d, f), ("embed", "mlp"), cfg, lora)
        self._add(rngs, "down_proj", (f, d), ("mlp", "embed"), cfg, lora)

    def __call__(self, x: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
        gate = self.project("gate_proj", x, dropout_key)  # [B,T,F]
        up = self.project("up_proj", x, dropout_key)  # [B,T,F]
        return self.project("down_proj", jax.nn.silu(gate) * up, dropout_key)  # [B,T,D]


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, lora: LoraConfig | None = None):
        pd = jnp.dtype(cfg.param_dtype)
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps, pd)
        self.self_attn = Attention(cfg, rngs=rngs, lora=lora)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps, pd)
        self.mlp = MLP(cfg, rngs=rngs, lora=lora)

    def __call__(self, x, cos, sin, segment_ids=None, cache=None, cache_pos=None, dropout_key=None, inspect=False):
        keys = (
            (None, None)
            if dropout_key is None
            else (jax.random.fold_in(dropout_key, 0), jax.random.fold_in(dropout_key, 1))
        )
        attn, new_cache = self.self_attn(
            self.input_layernorm(x), cos, sin, segment_ids, cache, cache_pos, keys[0], inspect=inspect
        )
        x = x + attn
        x = x + self.mlp(self.post_attention_layernorm(x), keys[1])
        if inspect:
            self.sow(nnx.Intermediate, "residual", x)
        return constrain(x, ("batch", "length", None)), new_cache


HEAD_SLICES = 16  # output-head slices converted one at a time when parameters and compute differ in dtype

_REMAT_POLICIES = {
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    "full": jax.checkpoint_policies.nothing_saveable,
}


class Transformer(nnx.Module):
    """Decoder-only Transformer returning logits [B, T, V] in float32."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, remat: str = "none", lora: LoraConfig | None = None):
        if cfg.vocab_size <= 0:
            raise UserError("model.vocab_size is 0: preprocess data first (its manifest sets it) or --set it")
        pd = jnp.dtype(cfg.param_dtype)
        self.embed_tokens = _param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), cfg.init_std, pd)
        blocks = [Block(cfg, rngs=rngs, lora=lora) for _ in range(cfg.n_layers)]
        # model.scan_layers: one Block whose weights are all the layers' stacked [L, ...], scanned over in _forward
        self.layers = stack_modules(blocks) if cfg.scan_layers else nnx.List(blocks)
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps, pd)
        if not cfg.tie_embeddings:
            self.lm_head = _param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), cfg.init_std, pd)
        self.cfg = cfg
        self.remat = remat

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        dropout_key: jax.Array | None = None,
    ) -> jax.Array:
        """Logits [B,T,V] for tokens [B,T]; positions/segment_ids [B,T] describe packed documents."""
        logits, _ = self._forward(tokens, positions, segment_ids, None, None, dropout_key)
        return logits

    def decode(
        self, tokens: jax.Array, cache: list[dict] | dict, cache_pos: jax.Array, last: jax.Array | None = None
    ) -> tuple[jax.Array, list[dict] | dict]:
        """Logits for tokens [B,T] placed at positions cache_pos[b] + t, reading and extending the KV cache
        (as init_cache makes it: a list of per-layer dicts, or one stacked dict with scan_layers).

        With last [B], only position last[b] of each row gets logits ([B,1,V]): a prefill needs the final
        prompt token's alone, and the output head is the largest matmul of a short prompt."""
        positions = cache_pos[:, None] + jnp.arange(tokens.shape[1])  # [B,T]
        token = DECODING.set(True)
        try:
            return self._forward(tokens, positions, None, cache, cache_pos, last=last)
        finally:
            DECODING.reset(token)

    def inspect(self, tokens: jax.Array) -> tuple[jax.Array, list[jax.Array], list[jax.Array]]:
        """Logits [B,T,V] for tokens [B,T], and per layer its attention probabilities [B,H,T,T] and the residual
        stream after it [B,T,D] (`bigmodel inspect`): the sown values of one forward pass, captured."""
        forward = nnx.capture(
            lambda model: model._forward(tokens, None, None, None, None, inspect=True)[0], nnx.Intermediate
        )
        logits, sown = forward(self)
        if self.cfg.scan_layers:  # one stacked value [L, ...] per sown name: split into layers
            stacked = sown["stacked_layers"][0]
            layers = [jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(self.cfg.n_layers)]
        else:
            layers = [sown["layers"][i] for i in range(self.cfg.n_layers)]
        probs = [layer["self_attn"]["attention_probs"][0] for layer in layers]
        return logits, probs, [layer["residual"][0] for layer in layers]

    def init_cache(self, batch: int, length: int) -> list[dict] | dict:
        """An empty KV cache: per layer, keys and values [B, S, K, E] in the compute dtype; with scan_layers, one
        dict of keys and values stacked [L, B, S, K, E], scanned over with the weights."""
        cfg = self.cfg
        shape = (batch, length, cfg.kv_heads, cfg.dims_per_head)
        if cfg.scan_layers:
            zeros = jnp.zeros((cfg.n_layers, *shape), jnp.dtype(cfg.dtype))
            return {"k": zeros, "v": zeros}
        zeros = jnp.zeros(shape, jnp.dtype(cfg.dtype))
        return [{"k": zeros, "v": zeros} for _ in range(cfg.n_layers)]

    def _forward(self, tokens, positions, segment_ids, cache, cache_pos, dropout_key=None, inspect=False, last=None):
        cfg = self.cfg
        dt = jnp.dtype(cfg.dtype)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)  # [B,T]
        table, row_scale = _weight(self.embed_tokens)  # [V,D], and [V] when int8
        x = _rows(table, tokens, decoding=cache is not None).astype(dt)  # [B,T,D]
        if row_scale is not None:
            x = x * jnp.take(row_scale, tokens)[..., None].astype(dt)
        x = constrain(x, ("batch", "length", None))
        cos, sin = rope_tables(positions, cfg)
        if cfg.scan_layers:
            x, new_cache = self._scan(x, cos, sin, segment_ids, cache, cache_pos, dropout_key, inspect)
        else:
            new_cache = []
            for i, block in enumerate(self.layers):
                layer_cache = None if cache is None else cache[i]
                key = None if dropout_key is None else jax.random.fold_in(dropout_key, i)
                if self.remat == "none" or cache is not None or inspect:
                    x, layer_cache = block(x, cos, sin, segment_ids, layer_cache, cache_pos, key, inspect)
                else:
                    x, layer_cache = nnx.remat(
                        lambda blk, h, k: blk(h, cos, sin, segment_ids, dropout_key=k),
                        policy=_REMAT_POLICIES[self.remat],
                    )(block, x, key)
                new_cache.append(layer_cache)
        if last is not None:
            x = jnp.take_along_axis(x, last[:, None, None], axis=1)  # [B,1,D]
        return self.logits(x), (new_cache if cache is not None else None)

    def _scan(self, x, cos, sin, segment_ids, cache, cache_pos, dropout_key, inspect):
        """The stacked layers applied in turn by one jax.lax.scan: the step compiles one layer, whatever the
        depth. Each iteration takes its layer's weights, cache [B,S,K,E] and dropout key from the stacked ones."""
        graphdef, weights = nnx.split(self.layers)
        layer_ids = jnp.arange(self.cfg.n_layers)
        keys = None if dropout_key is None else jax.vmap(lambda i: jax.random.fold_in(dropout_key, i))(layer_ids)

        def body(h, layer):
            block = nnx.merge(graphdef, layer["weights"])
            args = (h, cos, sin, segment_ids, layer["cache"], cache_pos, layer["key"], inspect)
            if not inspect:
                h, new_cache = block(*args)
                return h, (new_cache, None)
            (h, new_cache), sown = nnx.capture(block, nnx.Intermediate)(*args)
            return h, (new_cache, nnx.to_pure_dict(sown))

        if self.remat != "none" and cache is None and not inspect:  # the policy decides inside each iteration
            body = jax.checkpoint(body, policy=_REMAT_POLICIES[self.remat], prevent_cse=False)
        x, (new_cache, sown) = jax.lax.scan(body, x, {"weights": weights, "cache": cache, "key": keys})
        if inspect:  # the layers' sown values, stacked [L, ...], for Transformer.inspect
            self.sow(nnx.Intermediate, "stacked_layers", sown)
        return x, new_cache

    def logits(self, x: jax.Array) -> jax.Array:
        """Logits [B,T,V] in float32 of a residual stream x [B,T,D], through the final norm and the output head."""
        cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
        table, row_scale = _weight(self.embed_tokens)  # [V,D], and [V] when int8
        x = self.norm(x)
        head, head_scale = (table.T, row_scale) if cfg.tie_embeddings else _weight(self.lm_head)  # [D,V], [V]
        if head.dtype == dt:
            logits = dense(x, head)
        else:  # a whole float32 copy of a bfloat16 or int8 head is inference's largest buffer: a slice at a time
            parts = jnp.array_split(head, HEAD_SLICES, axis=1)
            scales = [None] * HEAD_SLICES if head_scale is None else jnp.array_split(head_scale, HEAD_SLICES)
            outs = []
            for part, scale in zip(parts, scales, strict=True):
                if outs:  # each slice waits for the one before: one converted slice alive at a time
                    x, _ = jax.lax.optimization_barrier((x, outs[-1]))
                outs.append(matmul(x, part, scale))
            logits = jnp.concatenate(outs, axis=-1)
        return logits.astype(jnp.float32)  # [B,T,V]
