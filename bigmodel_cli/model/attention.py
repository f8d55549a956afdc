"""Causal self-attention: over query blocks with a hand-written backward pass that keeps XLA:CPU fast, or
through jax.nn's fused kernels on accelerators.

Shapes as in transformer.py: B batch, T time, H query heads, K key/value heads, G = H // K, E head dim.
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp

from bigmodel_cli.config import ModelConfig
from bigmodel_cli.errors import UserError


def causal_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    chunks: int,
    segment_ids=None,
    window: int = 0,
    probs_out=None,
    one_row_kernel: bool = False,
) -> jax.Array:
    """Causal attention over q [B,T,H,E] and k, v [B,T,K,E] -> [B,T,H,E], in `chunks` blocks of queries.

    Block i attends only to keys up to its own end, so the masked upper triangle is mostly never computed
    (with 8 blocks, 56% of the full score matrix), and the hand-written backward keeps every matmul in a
    layout XLA:CPU runs fast. One layer of the 35M config (B8 T512 H8 E64), forward and backward on 2 CPU
    cores: 159 ms through jax.nn.dot_product_attention, 93 ms here, 106 ms for torch's fused kernel.
    With a sliding window (window > 0: query t sees keys t-window+1..t), a block also starts at the first key
    its earliest query sees, so the cost grows with T*window instead of T*T.
    A list `probs_out` (forward only) receives each block's attention probabilities [B,K,G,t,s].
    one_row_kernel (for layers under a scan) takes the blocks' query rows at run-time offsets (_query_rows)."""
    b, t, h, e = q.shape
    kv = k.shape[2]
    # [B,K,G,T,E]: query heads grouped under the key/value head they share (GQA), time next to the head dim.
    q = q.reshape(b, t, kv, h // kv, e).transpose(0, 2, 3, 1, 4)
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B,K,T,E]
    bounds = [round(i * t / chunks) for i in range(chunks + 1)]
    # (first query, end, first key) of each block: keys left of its first key are outside every query's window
    blocks = tuple((lo, hi, max(0, lo - window + 1) if window else 0) for lo, hi in itertools.pairwise(bounds))
    if probs_out is None:
        out = _blocked_attention(blocks, window, one_row_kernel, q, k, v, segment_ids)
    else:
        out, (*_, probs, _) = _blocked_attention_fwd(blocks, window, one_row_kernel, q, k, v, segment_ids)
        probs_out.extend(probs)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, e)


def attention_probs(q, k, visible, layout="bkgte,bkse->bkgts"):
    return _softmax(jnp.einsum(layout, q * q.shape[-1] ** -0.5, k), visible)


def _softmax(scores, visible):
    scores = jnp.where(visible, scores.astype(jnp.float32), -1e30)
    scores = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
    return scores / jnp.sum(scores, axis=-1, keepdims=True)  # [B,K,G,t,s] in float32


def _visible(block: tuple[int, int, int], window: int, segment_ids) -> jax.Array:
    """Which keys of the block each of its queries sees: [t,s], or [B,1,1,t,s] with segment_ids. Left unbroadcast
    over batch and heads, it is folded into the softmax's kernel instead of being a tensor of its own."""
    lo, hi, start = block
    query_pos, key_pos = jnp.arange(lo, hi)[:, None], jnp.arange(start, hi)[None, :]
    visible = key_pos <= query_pos  # [t, s] causal within the block
    if window:
        visible = visible & (key_pos > query_pos - window)
    if segment_ids is not None:
        visible = (visible & (segment_ids[:, lo:hi, None] == segment_ids[:, None, start:hi]))[:, None, None]
    return visible


def _query_rows(blocks, one_row_kernel: bool) -> list:
    """For each block, a function taking its queries' rows [..., lo:hi, :] of a [B,K,G,T,*] array.

    With one_row_kernel, at a run-time offset: XLA:CPU then compiles one slicing kernel for all blocks of one
    length where constant offsets make one per block (20-30 ms of LLVM time each; scanned 1b, 32 layers: 276 ->
    263 kernels, XLA compile 3.2-3.4 -> 2.8 s). For the scanned layers' one body only: 32 unrolled layers' worth
    of run-time offsets make XLA's passes over the whole step 1.5 s slower than the kernels save."""
    if not one_row_kernel:
        return [lambda x, lo=lo, hi=hi: x[:, :, :, lo:hi] for lo, hi, _ in blocks]
    firsts = jax.lax.optimization_barrier(jnp.asarray([lo for lo, _, _ in blocks], jnp.int32))  # not folded
    return [
        functools.partial(lambda x, i, n: jax.lax.dynamic_slice_in_dim(x, firsts[i], n, axis=3), i=i, n=hi - lo)
        for i, (lo, hi, _) in enumerate(blocks)
    ]


# One custom VJP over all the blocks, not one per block: its residuals are the whole q, k, v and output plus each
# block's probabilities, where per-block VJPs saved every block's own slices of q, k, v and output (k and v
# several times over, one prefix per block). Under model.scan_layers each residual is one more stacked [L, ...]
# buffer written in the forward loop and read back in the backward one: 40 of them for 8 blocks, most of a 1b
# model's compile time on CPU, against 12 here.
@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _blocked_attention(blocks, window, one_row_kernel, q, k, v, segment_ids):
    return _blocked_attention_fwd(blocks, window, one_row_kernel, q, k, v, segment_ids)[0]


def _blocked_attention_fwd(blocks, window, one_row_kernel, q, k, v, segment_ids):
    """q [B,K,G,T,E], k, v [B,K,T,E] -> out [B,K,G,T,E], and the residuals of the backward."""
    q = q * q.shape[-1] ** -0.5  # scaled once for all blocks: one kernel fewer per block
    rows = _query_rows(blocks, one_row_kernel)
    outs, probs = [], []
    for (lo, hi, start), row in zip(blocks, rows, strict=True):
        visible = _visible((lo, hi, start), window, segment_ids)
        block_probs = _softmax(jnp.einsum("bkgte,bkse->bkgts", row(q), k[:, :, start:hi]), visible)
        outs.append(jnp.einsum("bkgts,bkse->bkgte", block_probs.astype(v.dtype), v[:, :, start:hi]))
        probs.append(block_probs)
    out = jnp.concatenate(outs, axis=3)  # [B,K,G,T,E]
    return out, (q, k, v, tuple(probs), out)


def _blocked_attention_bwd(blocks, window, one_row_kernel, residuals, d_out):
    q, k, v, probs, out = residuals  # q scaled
    t = q.shape[3]
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)  # rowsum(P*dP)
    d_qs, d_k, d_v = [], 0, 0
    for (_, hi, start), block_probs, row in zip(blocks, probs, _query_rows(blocks, one_row_kernel), strict=True):
        block_q, block_k, block_v, block_d_out = row(q), k[:, :, start:hi], v[:, :, start:hi], row(d_out)
        d_probs = jnp.einsum("bkgte,bkse->bkgts", block_d_out, block_v).astype(jnp.float32)
        d_scores = (block_probs * (d_probs - row(delta))).astype(q.dtype)
        # The contractions over queries: transposed copies behind a barrier stay plain batched matmuls (see dense).
        probs_t, d_scores_t = jax.lax.optimization_barrier(
            (jnp.swapaxes(block_probs.astype(v.dtype), -1, -2), jnp.swapaxes(d_scores, -1, -2))
        )
        d_qs.append(jnp.einsum("bkgts,bkse->bkgte", d_scores, block_k))
        keys = [(0, 0), (0, 0), (start, t - hi), (0, 0)]  # this block's keys, placed among all T
        d_k = d_k + jnp.pad(jnp.einsum("bkgst,bkgte->bkse", d_scores_t, block_q), keys)
        d_v = d_v + jnp.pad(jnp.einsum("bkgst,bkgte->bkse", probs_t, block_d_out), keys)
    d_q = jnp.concatenate(d_qs, axis=3) * q.shape[-1] ** -0.5
    return d_q, d_k.astype(k.dtype), d_v.astype(v.dtype), None


_blocked_attention.defvjp(_blocked_attention_fwd, _blocked_attention_bwd)


def attention_chunks(cfg: ModelConfig, seq_len: int) -> int:
    """How many query blocks the chunked attention uses for sequences of seq_len."""
    chunks = cfg.attention_chunks or min(8, seq_len // 64)
    if cfg.sliding_window and not cfg.attention_chunks:  # blocks about a window long skip the keys left of it
        chunks = max(chunks, min(16, -(-seq_len // cfg.sliding_window)))
    return max(1, min(chunks, seq_len))


def _runnable(implementation: str) -> str:
    """The implementation to use on this machine: a model trained with "cudnn" on a GPU runs wherever it is
    loaded as "auto" would there (a recipe asking for "cudnn" without a GPU is refused: check_backend)."""
    return "auto" if implementation == "cudnn" and jax.default_backend() != "gpu" else implementation


def uses_chunked_attention(cfg: ModelConfig) -> bool:
    implementation = _runnable(cfg.attention)
    return implementation == "chunked" or (implementation == "auto" and jax.default_backend() == "cpu")


def check_backend(cfg: ModelConfig) -> None:
    """Refuses a recipe's attention implementation that this machine cannot run, before a run writes anything."""
    if cfg.attention != "cudnn":
        return
    if (backend := jax.default_backend()) != "gpu":
        raise UserError(
            f'model.attention = "cudnn" needs an NVIDIA GPU and this machine runs on {backend}: '
            'use "auto" (cuDNN on a GPU, the best kernel elsewhere)'
        )
    if cfg.dtype != "bfloat16":  # cuDNN's fused attention takes half precision only
        raise UserError(
            f'model.attention = "cudnn" needs model.dtype = "bfloat16", not {cfg.dtype}: set it, or use "auto"'
        )


def fused_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask, window: int, implementation: str) -> jax.Array:
    """Causal attention through jax.nn.dot_product_attention ("auto", "xla" or "cudnn").

    "auto" takes cuDNN's fused kernel on a GPU wherever it accepts the call (bfloat16 or float16, its head
    sizes), else XLA's, which holds every [B,H,T,T] score in memory. On one H200, the 1b preset's train step
    (B4 T2048 bf16) ran at 44-51% MFU through cuDNN against 16-26% through XLA, which also ran out of
    memory at B8 (docs/benchmarks.md, GPU); jax's own None still means XLA."""
    attend = functools.partial(
        jax.nn.dot_product_attention,
        q,
        k,
        v,
        mask=mask,
        is_causal=True,
        local_window_size=(window - 1, 0) if window else None,  # keys t-(window-1)..t
    )
    implementation = _runnable(implementation)
    if implementation != "auto":
        return attend(implementation=implementation)
    if jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16):
        try:
            return attend(implementation="cudnn")
        except (ValueError, NotImplementedError, RuntimeError):  # a shape, mask or cuDNN version it refuses
            pass
    return attend(implementation="xla")
