"""AdamW (or Muon for the decoder layers' matrices) with linear warmup, cosine decay to a floor, global-norm
clipping and decay on matrices only."""

from __future__ import annotations

import jax
import optax
from optax.contrib import MuonDimensionNumbers

from bigmodel_cli.config import OptimConfig
from bigmodel_cli.model import layout


def schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup to cfg.lr, then cosine decay to cfg.lr * cfg.min_lr_ratio at total_steps."""
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.lr,
        warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1),
        end_value=cfg.lr * cfg.min_lr_ratio,
    )


def _decay_mask(params):
    # Norm weights are vectors; the embedding table is looked up, not multiplied: neither is decayed.
    def decays(path, leaf) -> bool:
        names = [str(getattr(k, "key", getattr(k, "name", ""))) for k in path]
        return leaf.ndim >= 2 and "embed_tokens" not in names

    return jax.tree_util.tree_map_with_path(decays, params)


def _muon_matrices(params):
    """Muon's dimension numbers for each decoder-layer projection kernel ([in, out], or [L, in, out] stacked,
    the layer axis orthogonalized separately), None for the rest: embeddings, the output head, norms, biases
    and LoRA adapters take AdamW, as in Muon's reference recipe."""
    lead = 1 if layout.is_stacked(params) else 0

    def numbers(path, leaf):
        names = layout.param_name(path).split(".")
        if names[0] == layout.LAYERS and names[-1].endswith("_proj") and leaf.ndim == 2 + lead:
            return MuonDimensionNumbers(reduction_axis=lead, output_axis=lead + 1)
        return None

    return jax.tree_util.tree_map_with_path(numbers, params)


def _on_stacked_layers(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """tx updating unrolled layers as if they were stacked [L, ...]: Muon then orthogonalizes each kind of
    matrix for all layers as one batched program, 1.3-1.5x faster on CPU than one matrix after another, for a
    transient stacked copy of the layers' updates, state and weights (XLA counts it in plan's temporaries).
    The state stays in the parameters' layout, so checkpoints are the same either way."""

    def update(updates, state, params=None):
        if layout.is_stacked(updates):
            return tx.update(updates, state, params)
        stacked_params = None if params is None else layout.stack(params)
        new_updates, new_state = tx.update(layout.stack(updates), layout.stack(state), stacked_params)
        return layout.unstack(new_updates), layout.unstack(new_state)

    return optax.GradientTransformation(tx.init, update)


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """The full optimizer chain used by pretrain and finetune."""
    parts = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip > 0 else []
    lr = schedule(cfg, total_steps)
    if cfg.name == "muon":
        # consistent_rms=0.2 scales each orthogonalized update to AdamW's typical RMS (Liu et al. 2025), so
        # optim.lr and weight_decay carry over from an AdamW recipe; momentum 0.95 (Nesterov) is Muon's own.
        parts.append(
            _on_stacked_layers(
                optax.contrib.muon(
                    lr,
                    beta=0.95,
                    eps=cfg.eps,
                    weight_decay=cfg.weight_decay,
                    adam_b1=cfg.b1,
                    adam_b2=cfg.b2,
                    adam_weight_decay=0.0,
                    muon_weight_dimension_numbers=_muon_matrices,
                    consistent_rms=0.2,
                )
            )
        )
    else:
        parts.append(
            optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=_decay_mask)
        )
    return optax.chain(*parts)
