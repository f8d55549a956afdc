"""The one pure train step shared by pretrain and finetune, and the evaluation step."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from bigmodel_cli.model.lora import merge_params

# A batch is a dict of [B, T] arrays: `inputs` (token ids), `targets` (next tokens) and `weights`
# (1.0 where the target counts towards the loss, 0.0 for padding and, in finetuning, prompt tokens);
# packed data adds `positions` and `segment_ids` so attention stays inside each document.
Batch = dict[str, jax.Array]

# A loss the step can train on: (graphdef, params, batch, dropout_key) -> (sum of the items' losses, items counted,
# {metric: sum over the items}). Sums, so that micro-batches add up exactly; an item is a token (language
# modelling) or a pair (preference tuning: train/preference.py). Metrics are reported as means over the items.
LossFn = Callable[..., tuple[jax.Array, jax.Array, dict[str, jax.Array]]]


@jax.custom_vjp
def weighted_cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> jax.Array:
    """sum(weights * -log softmax(logits)[targets]) over [B,T,V] logits: the loss numerator.

    A custom backward, (softmax - onehot) * weight, because autodiff's gather-transpose scatters into a
    zero [B,T,V] buffer first, a whole extra pass over the largest tensor of the step.
    """
    return _cross_entropy_fwd(logits, targets, weights)[0]


def _cross_entropy_fwd(logits, targets, weights):
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)  # [B,T]
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]  # [B,T]
    return jnp.sum((lse - picked) * weights), (logits, lse, targets, weights)


def _cross_entropy_bwd(residuals, g):
    logits, lse, targets, weights = residuals
    probs = jnp.exp(logits - lse[..., None])  # [B,T,V]
    onehot = jax.nn.one_hot(targets, logits.shape[-1], dtype=probs.dtype)
    grad = (probs - onehot) * (g * weights)[..., None]
    return grad, None, jnp.zeros_like(weights)


weighted_cross_entropy.defvjp(_cross_entropy_fwd, _cross_entropy_bwd)


def loss_sums(
    graphdef: nnx.GraphDef, params: Any, batch: Batch, dropout_key: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """(sum of token losses, number of counted tokens): sums, so micro-batches add up exactly."""
    model = nnx.merge(graphdef, params)
    logits = model(batch["inputs"], batch.get("positions"), batch.get("segment_ids"), dropout_key)  # [B,T,V]
    weights = batch["weights"].astype(jnp.float32)
    return weighted_cross_entropy(logits, batch["targets"], weights), jnp.sum(weights)


def token_loss(
    graphdef: nnx.GraphDef, params: Any, batch: Batch, dropout_key: jax.Array | None = None
) -> tuple[jax.Array, jax.Array, dict]:
    """The language-modelling loss as a LossFn: token-weighted cross-entropy, no extra metrics."""
    return *loss_sums(graphdef, params, batch, dropout_key), {}


def train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    grad_accum: int,
    state: dict,
    batch: Batch,
    inject_nonfinite_at: int = 0,
    dropout_seed: int | None = None,
    loss: LossFn = token_loss,
) -> tuple[dict, dict]:
    """One optimizer update; with grad_accum > 1 the batch is split into micro-batches.

    The loss is the token-weighted mean over all micro-batches (sum of token losses / counted tokens),
    not the mean of per-micro-batch means, so accumulation changes memory use and nothing else.
    A non-finite loss or gradient leaves the state as it was (metrics["finite"] tells the loop).
    Only state["params"] train; state["frozen"] (LoRA's base weights) joins them in the forward pass.
    `loss` is what is minimised (default: the token-weighted cross-entropy); its metrics join the step's.
    """
    params, frozen = state["params"], state.get("frozen")

    def loss_fn(trainable, micro_batch, micro_index):
        key = None
        if dropout_seed is not None:
            key = jax.random.fold_in(jax.random.fold_in(jax.random.key(dropout_seed), state["step"]), micro_index)
        total, count, sums = loss(graphdef, merge_params(frozen, trainable), micro_batch, key)
        return total, (count, sums)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    if grad_accum == 1:
        (loss_sum, (count, sums)), grad_sum = grad_fn(params, batch, 0)
    else:
        # Row r goes to micro-batch r % grad_accum: a reshape that leaves each device's rows in place.
        def split(x):
            return jnp.swapaxes(x.reshape(x.shape[0] // grad_accum, grad_accum, *x.shape[1:]), 0, 1)

        micro_batches = jax.tree.map(split, batch)

        def accumulate(carry, micro):
            micro_batch, micro_index = micro
            (loss_sum, (count, sums)), grads = grad_fn(params, micro_batch, micro_index)
            acc_loss, acc_count, acc_sums, acc_grads = carry
            acc_sums = jax.tree.map(jnp.add, acc_sums, sums)
            return (acc_loss + loss_sum, acc_count + count, acc_sums, jax.tree.map(jnp.add, acc_grads, grads)), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        first = jax.tree.map(lambda x: x[0], micro_batches)
        no_sums = jax.tree.map(jnp.zeros_like, jax.eval_shape(lambda: grad_fn(params, first, 0)[0][1][1]))
        micro = (micro_batches, jnp.arange(grad_accum))
        (loss_sum, count, sums, grad_sum), _ = jax.lax.scan(accumulate, (0.0, 0.0, no_sums, zeros), micro)

    if inject_nonfinite_at:
        loss_sum = jnp.where(state["step"] + 1 == inject_nonfinite_at, jnp.nan, loss_sum)
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grad_sum)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss_sum) & jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)

    def keep(new, old):  # a non-finite step changes nothing; nor does any step change the state's dtypes
        return jnp.where(finite, new, old).astype(old.dtype)  # (the f32 gradients would promote bf16 moments)

    new_state = {
        **state,
        "step": state["step"] + 1,
        "params": jax.tree.map(keep, new_params, params),
        "opt_state": jax.tree.map(keep, opt_state, state["opt_state"]),
    }
    metrics = {"loss": loss_sum / denom, "grad_norm": grad_norm, "tokens": count, "finite": finite}
    metrics.update({name: value / denom for name, value in sums.items()})
    return new_state, metrics


def eval_step(
    graphdef: nnx.GraphDef, params: Any, batch: Batch, loss: LossFn = token_loss
) -> tuple[jax.Array, jax.Array]:
    """(sum of losses, counted items) on one batch, for an item-weighted validation loss."""
    return loss(graphdef, params, batch)[:2]
