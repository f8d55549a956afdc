"""The train state and the jitted train step over it, for both the training loop and `plan`.

The loop builds the state from real arrays; plan builds the same structure from abstract ones (shape, dtype,
sharding) and compiles the same step, so what plan reports is what training will run.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx

from bigmodel_cli import parallel
from bigmodel_cli.model.params import abstract_params, init_params
from bigmodel_cli.train import optim
from bigmodel_cli.train.step import LossFn, token_loss, train_step

# `initial(mesh) -> (graphdef, trainable, frozen)`: a stage's starting weights (finetuning); frozen may be None.
Initial = Callable[[Any], tuple[nnx.GraphDef, Any, Any]]


def make_state(
    cfg, mesh, initial: Initial | None = None, *, abstract: bool = False
) -> tuple[nnx.GraphDef, optax.GradientTransformation, dict]:
    """(graphdef, optimizer, state) with params and optimizer state created in their shardings.

    The state holds `step`, `params` (what trains), `opt_state` and, when initial gives any, `frozen` (weights
    that join the forward pass without training: LoRA's base). By default the parameters are freshly
    initialised from cfg.train.seed and all of them train. abstract=True (fresh parameters only) builds the
    same state as jax.ShapeDtypeStructs carrying their shardings, allocating nothing: what `plan` compiles for.
    """
    tx = optim.make_optimizer(cfg.optim, cfg.train.steps)
    frozen = None
    if initial is not None:
        graphdef, params, frozen = initial(mesh)
    elif abstract:
        graphdef, params = abstract_params(cfg.model, mesh, cfg.train.remat)
    else:
        graphdef, params = init_params(cfg.model, mesh, cfg.train.seed, cfg.train.remat)
    replicated = parallel.replicated(mesh)
    opt_state = abstract_optimizer_state(tx, params, mesh)
    if abstract:
        step = jax.ShapeDtypeStruct((), np.int32, sharding=replicated)
    else:
        with parallel.activate(mesh):
            opt_state = jax.jit(tx.init, out_shardings=jax.tree.map(lambda s: s.sharding, opt_state))(params)
        step = jax.device_put(np.int32(0), replicated)
    state = {"step": step, "params": params, "opt_state": opt_state}
    if frozen:
        state["frozen"] = frozen
    return graphdef, tx, state


def abstract_optimizer_state(tx: optax.GradientTransformation, params, mesh):
    """tx's state for params as ShapeDtypeStructs: every copy of the parameter tree in it (Adam's moments)
    sharded as the parameters are, the rest (step counts) replicated. Left to jit, the moments, zeros that
    depend on no input, come out replicated: each device would hold the whole optimizer state however wide
    mesh.fsdp is."""
    replicated = parallel.replicated(mesh)

    def like(shape, sharding):
        return jax.ShapeDtypeStruct(shape.shape, shape.dtype, sharding=sharding)

    def mirror(shape, param):  # a masked-out leaf (Muon's partition) stays masked
        return shape if isinstance(shape, optax.MaskedNode) else like(shape, param.sharding)

    return optax.tree_map_params(
        tx,
        mirror,
        jax.eval_shape(tx.init, params),
        params,
        transform_non_params=lambda shape: like(shape, replicated),
        is_leaf=lambda node: isinstance(node, optax.MaskedNode),
    )


def jit_train_step(
    graphdef,
    tx,
    grad_accum: int,
    state: dict,
    mesh,
    inject_nonfinite_at: int = 0,
    dropout_seed: int | None = None,
    loss: LossFn = token_loss,
):
    """The train step jitted once with explicit shardings (those of state, real or abstract) and the state
    donated; `loss` is what it minimises (step.LossFn)."""
    state_shardings = jax.tree.map(lambda x: x.sharding, state)
    step = functools.partial(
        train_step,
        graphdef,
        tx,
        grad_accum,
        inject_nonfinite_at=inject_nonfinite_at,
        dropout_seed=dropout_seed,
        loss=loss,
    )
    return jax.jit(
        step,
        in_shardings=(state_shardings, parallel.batch_sharding(mesh)),
        out_shardings=(state_shardings, parallel.replicated(mesh)),
        donate_argnums=(0,),
    )
