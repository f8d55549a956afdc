"""The token-weighted loss of a loaded model over padded batches: what `evaluate` reports for a data split, a
text file or a loss-scored task, computed by the training loop's own eval step."""

from __future__ import annotations

import functools
from collections.abc import Iterable

import jax

from bigmodel_cli import parallel
from bigmodel_cli.console import track
from bigmodel_cli.model.params import LoadedModel
from bigmodel_cli.train.step import eval_step


def loss_sums(
    loaded: LoadedModel, batches: Iterable[dict], n_batches: int | None = None, progress: str | None = None
) -> tuple[float, float]:
    """(sum of token losses in nats, counted tokens) over the batches; `progress` names a progress display."""
    step = jax.jit(functools.partial(eval_step, loaded.graphdef))
    dp = parallel.data_parallel_size(loaded.mesh)
    batch_sharding, replicated = parallel.batch_sharding(loaded.mesh), parallel.replicated(loaded.mesh)
    total, count = 0.0, 0.0
    with parallel.activate(loaded.mesh):
        for batch in track(batches, progress, n_batches) if progress else batches:
            rows = len(batch["inputs"])
            # A batch of rows that do not split over the data-parallel devices is computed whole on each.
            sharding = batch_sharding if rows % dp == 0 else replicated
            loss_sum, n = step(loaded.params, {k: jax.device_put(v, sharding) for k, v in batch.items()})
            total, count = total + float(loss_sum), count + float(n)
    return total, count
