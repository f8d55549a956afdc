"""Preference losses (DPO, IPO, SimPO, ORPO) as losses of the shared train step, and the sequence log-probabilities
they compare: of a chosen and a rejected completion, under the policy and under the frozen reference.

A preference batch holds, per pair, the chosen and the rejected sequence as two rows of the usual layout
(`chosen_inputs`, `chosen_targets`, `chosen_weights`, and the same for `rejected_`: weights 1 on the completion's
tokens), plus `reference_logps` [B, 2]: the reference model's summed log-probabilities of the two completions.

The reference log-probabilities are computed once, in one pass over the pairs before training (`reference_logps`),
not per batch: training visits every pair at least once, usually for several epochs, so one pass is never more
work than a reference forward per step, and the step then holds no reference weights at all. With full finetuning
that saves a second copy of the model; with LoRA the reference (the base with adapters off) is the frozen base
itself. The step stays a pure function of (state, batch).

The formulas follow TRL 1.16 (trl/trainer/dpo_trainer.py `_compute_loss` for DPO's "sigmoid" and IPO,
trl/experimental/cpo/cpo_trainer.py `cpo_loss` for SimPO, trl/experimental/orpo/orpo_trainer.py for ORPO), and so
do the metric names, so that dashboards compare one to one.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bigmodel_cli import parallel
from bigmodel_cli.errors import UserError

LOSSES = ("dpo", "ipo", "simpo", "orpo")
# The losses that compare the policy with the reference model; SimPO and ORPO need none.
WITH_REFERENCE = ("dpo", "ipo")
SIDES = ("chosen", "rejected")
# Keys of an encoded preference set, as tasks/preference.py writes them.
ARRAY_KEYS = tuple(f"{side}_{name}" for side in SIDES for name in ("inputs", "targets", "weights"))


@dataclass(frozen=True)
class PreferenceConfig:
    loss: str = "dpo"  # dpo (TRL's "sigmoid"), ipo, simpo (reference-free, length-normalised) or orpo
    beta: float = 0.1  # dpo/ipo: strength of the pull towards the reference; simpo: reward scale; orpo: lambda
    label_smoothing: float = 0.0  # dpo and simpo: assumed share of flipped labels (conservative DPO), in [0, 0.5)
    simpo_gamma: float = 0.5  # simpo: target reward margin (TRL's simpo_gamma)

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise UserError(f"preference.loss must be one of {', '.join(LOSSES)}; got {self.loss!r}")
        if self.beta <= 0:
            raise UserError(f"preference.beta must be positive, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise UserError(f"preference.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and self.loss not in ("dpo", "simpo"):
            raise UserError(f"preference.label_smoothing applies to dpo and simpo, not {self.loss}: set it to 0")

    @property
    def needs_reference(self) -> bool:
        return self.loss in WITH_REFERENCE


def _token_logps(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """log p(target) at every position of [B,T,V] logits: [B,T], in f32."""
    logits = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]  # [B,T]
    return picked - jax.nn.logsumexp(logits, axis=-1)


def sequence_logps(
    graphdef: nnx.GraphDef, params: Any, batch: dict, dropout_key: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """(summed log-probabilities [B, 2], completion token counts [B, 2]) of each pair's chosen and rejected
    completion: both sides in one forward pass of 2B rows."""
    model = nnx.merge(graphdef, params)
    both = {
        name: jnp.concatenate([batch[f"chosen_{name}"], batch[f"rejected_{name}"]]) for name in ("inputs", "targets")
    }
    weights = jnp.concatenate([batch["chosen_weights"], batch["rejected_weights"]]).astype(jnp.float32)  # [2B,T]
    logits = model(both["inputs"], None, None, dropout_key)  # [2B,T,V]
    logps = jnp.sum(_token_logps(logits, both["targets"]) * weights, axis=-1)  # [2B]
    counts = jnp.sum(weights, axis=-1)
    return jnp.stack(jnp.split(logps, 2), axis=-1), jnp.stack(jnp.split(counts, 2), axis=-1)


def _log1mexp(x: jax.Array) -> jax.Array:
    """log(1 - exp(x)) for x < 0, accurate at both ends."""
    return jnp.where(x > -0.693, jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


def pair_losses(cfg: PreferenceConfig, logps: jax.Array, counts: jax.Array, reference: jax.Array | None) -> dict:
    """Per-pair loss [B] and TRL's per-pair metrics from policy logps [B, 2], token counts [B, 2] and the
    reference's logps [B, 2] (dpo, ipo)."""
    beta, smoothing = cfg.beta, cfg.label_smoothing
    means = logps / jnp.maximum(counts, 1.0)  # mean log-probability per completion token
    out: dict[str, jax.Array] = {}
    if cfg.loss in WITH_REFERENCE:
        ratios = logps - reference  # log pi / pi_ref of chosen and rejected
        rewards = beta * ratios
        if cfg.loss == "dpo":
            delta = ratios[:, 0] - ratios[:, 1]
            loss = -jax.nn.log_sigmoid(beta * delta) * (1 - smoothing) - jax.nn.log_sigmoid(-beta * delta) * smoothing
        else:  # ipo: TRL normalises the log-ratios by the completion's length
            delta = ratios[:, 0] / jnp.maximum(counts[:, 0], 1.0) - ratios[:, 1] / jnp.maximum(counts[:, 1], 1.0)
            loss = (delta - 1 / (2 * beta)) ** 2
        shown = logps
    elif cfg.loss == "simpo":
        margin = means[:, 0] - means[:, 1] - cfg.simpo_gamma / beta
        loss = -jax.nn.log_sigmoid(beta * margin) * (1 - smoothing) - jax.nn.log_sigmoid(-beta * margin) * smoothing
        rewards, shown = beta * means, means
    else:  # orpo: the chosen completion's NLL plus lambda (beta) times the log-odds-ratio loss
        log_odds = (means[:, 0] - means[:, 1]) - (_log1mexp(means[:, 0]) - _log1mexp(means[:, 1]))
        nll = -means[:, 0]
        loss = nll - beta * jax.nn.log_sigmoid(log_odds)
        rewards, shown = beta * means, means
        out.update({"log_odds_chosen": log_odds, "log_odds_ratio": jax.nn.log_sigmoid(log_odds), "nll_loss": nll})
    out.update(
        {
            "loss": loss,
            "rewards/chosen": rewards[:, 0],
            "rewards/rejected": rewards[:, 1],
            "rewards/accuracies": (rewards[:, 0] > rewards[:, 1]).astype(jnp.float32),
            "rewards/margins": rewards[:, 0] - rewards[:, 1],
            "logps/chosen": shown[:, 0],
            "logps/rejected": shown[:, 1],
        }
    )
    return out


def preference_loss(
    cfg: PreferenceConfig, graphdef: nnx.GraphDef, params: Any, batch: dict, dropout_key: jax.Array | None = None
) -> tuple[jax.Array, jax.Array, dict]:
    """The train step's loss for preference pairs: (sum of pair losses, pairs counted, {metric: sum over pairs}).

    A pair counts when both completions have tokens (evaluation pads batches with weightless pairs)."""
    logps, counts = sequence_logps(graphdef, params, batch, dropout_key)
    per_pair = pair_losses(cfg, logps, counts, batch.get("reference_logps"))
    counted = ((counts[:, 0] > 0) & (counts[:, 1] > 0)).astype(jnp.float32)  # [B]
    loss = per_pair.pop("loss")
    sums = {name: jnp.sum(value * counted) for name, value in per_pair.items()}
    return jnp.sum(loss * counted), jnp.sum(counted), sums


def loss_fn(cfg: PreferenceConfig):
    """The preference loss as the train step takes it: (graphdef, params, batch, dropout_key) -> sums."""
    return functools.partial(preference_loss, cfg)


def padded_pairs(arrays: dict, batch_size: int):
    """Batches of pairs in order, batch_size at a time; the last one padded with weightless copies of pair 0."""
    count = len(arrays["chosen_inputs"])
    for start in range(0, count, batch_size):
        ids = np.arange(start, start + batch_size)
        valid = (ids < count).astype(np.float32)[:, None]
        batch = {k: v[np.where(ids < count, ids, 0)] for k, v in arrays.items()}
        for side in SIDES:
            batch[f"{side}_weights"] = batch[f"{side}_weights"] * valid
        yield batch


def all_sequence_logps(graphdef: nnx.GraphDef, params: Any, arrays: dict, batch_size: int, mesh) -> np.ndarray:
    """Summed log-probabilities [N, 2] of every pair's chosen and rejected completion under (graphdef, params):
    one forward pass over the pairs, without gradients (the reference before training; evaluation)."""
    sharding = parallel.batch_sharding(mesh)
    step = parallel.data_parallel_size(mesh)
    batch_size = -(-batch_size // step) * step  # whole rows on every device
    # Replicated out: every process reads every pair's numbers (each sees the whole set, as in finetuning).
    forward = jax.jit(lambda p, b: sequence_logps(graphdef, p, b)[0], out_shardings=parallel.replicated(mesh))
    count = len(arrays["chosen_inputs"])
    out = []
    with parallel.activate(mesh):
        for batch in padded_pairs({k: arrays[k] for k in ARRAY_KEYS}, batch_size):
            device_batch = {k: jax.device_put(v, sharding) for k, v in batch.items()}
            out.append(np.asarray(forward(params, device_batch)))
    return np.concatenate(out)[:count]


def with_reference(
    encoded: dict, graphdef: nnx.GraphDef, params: Any, batch_size: int, mesh, cfg: PreferenceConfig
) -> dict:
    """The encoded pairs plus `reference_logps` [N, 2] under the starting weights, for the losses that need them."""
    if not cfg.needs_reference:
        return encoded
    return {**encoded, "reference_logps": all_sequence_logps(graphdef, params, encoded, batch_size, mesh)}
