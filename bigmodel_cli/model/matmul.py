"""The decoder's matrix products: `dense`, whose backward pass keeps XLA:CPU on its fast matmuls, and `matmul`
for a stored kernel of any width (float32, bfloat16, int8 with per-channel scales), which decides when and how a
narrow kernel is converted. The model (transformer.py) calls these; while Transformer.decode traces, DECODING is
set, and the paths that hold for inference only apply."""

from __future__ import annotations

import contextvars

import jax
import jax.numpy as jnp

# Set while Transformer.decode traces: decoding is never differentiated, and a plain matmul traces several times
# faster than the custom_vjp below (a 24-layer model's decode step traces in about half the time).
DECODING = contextvars.ContextVar("decoding", default=False)


def dense(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """x @ kernel over the last axis of x, with a backward pass that keeps XLA:CPU on its fast matmuls."""
    return x @ kernel if DECODING.get() else _dense(x, kernel)


@jax.custom_vjp
def _dense(x: jax.Array, kernel: jax.Array) -> jax.Array:
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


_dense.defvjp(_dense_fwd, _dense_bwd)


def matmul(x: jax.Array, kernel: jax.Array, scale: jax.Array | None) -> jax.Array:
    """x @ kernel in x's dtype; an int8 kernel is converted for its matmul alone and `scale` multiplies the
    product's columns (the same as scaling the kernel's). A kernel narrower than x (int8, or bfloat16 under
    float32 compute) is tied to x by the barrier, so that XLA converts it only once x exists: otherwise it
    converts every kernel up front, or hoists the conversions out of the decoding loop, holding a float copy of
    all the weights at once. Decoding multiplies a bfloat16 kernel as it is stored (_split_matmul)."""
    if DECODING.get() and kernel.dtype == jnp.bfloat16 and x.dtype == jnp.float32:
        y = _split_matmul(x, kernel)
        return y if scale is None else y * scale
    if kernel.dtype.itemsize < x.dtype.itemsize:
        x, kernel = jax.lax.optimization_barrier((x, kernel))
    y = dense(x, kernel.astype(x.dtype))
    return y if scale is None else y * scale.astype(x.dtype)


def _split_matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """float32 x @ a bfloat16 kernel with no float32 copy of the kernel: x is split into two bfloat16 halves
    (16 of float32's 24 significand bits, a relative error near 3e-6) multiplied in one bfloat16 matmul that
    accumulates in float32. On an AVX-512 host with bfloat16 dot instructions this runs 4.4x (1 token) and 2.7x
    (16 tokens) faster than converting the kernel first (scripts/bench/bench_split_matmul.py)."""
    hi = x.astype(jnp.bfloat16)
    lo = (x - hi.astype(x.dtype)).astype(jnp.bfloat16)
    y = jnp.matmul(jnp.stack([hi, lo]), kernel, preferred_element_type=jnp.float32)
    return y[0] + y[1]
