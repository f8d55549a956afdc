"""Batches as a pure function of (step, seed, data): resuming needs only the step number."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from bigmodel_cli.errors import UserError


class TokenWindows:
    """Non-overlapping windows of seq_len + 1 tokens over one split's token file (memory-mapped)."""

    def __init__(self, data_dir: Path, split: str, manifest: dict, seq_len: int):
        info = manifest["splits"][split]
        path = Path(data_dir) / info["file"]
        if not path.is_file():
            raise UserError(f"{path} is missing: rerun bigmodel preprocess")
        self.tokens = np.memmap(path, dtype=np.dtype(manifest["dtype"]), mode="r")
        self.seq_len = seq_len
        self.count = (len(self.tokens) - 1) // seq_len
        if self.count < 1:
            raise UserError(
                f"the {split} split of {data_dir} has {len(self.tokens)} tokens, fewer than one sequence of "
                f"{seq_len + 1}: use more data or a smaller data.seq_len"
            )

    def window(self, index: int) -> np.ndarray:
        start = index * self.seq_len
        return np.asarray(self.tokens[start : start + self.seq_len + 1], dtype=np.int32)


def as_batch(windows: np.ndarray, weights: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """[B, T+1] token windows -> inputs, next-token targets and loss weights [B, T]."""
    inputs, targets = windows[:, :-1], windows[:, 1:]
    if weights is None:
        weights = np.ones(inputs.shape, np.float32)
    return {"inputs": inputs, "targets": targets, "weights": weights}


class TrainBatches:
    """Global batch for a step: rows step*B ... step*B+B-1 of a seeded permutation, reshuffled each epoch."""

    def __init__(self, windows: TokenWindows, batch_size: int, seed: int, rows: slice | None = None):
        self.windows, self.batch_size, self.seed = windows, batch_size, seed
        self.rows = rows or slice(0, batch_size)  # this process's share of every global batch
        self._perm_epoch, self._perm = -1, np.empty(0, np.int64)

    def _order(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._perm, self._perm_epoch = rng.permutation(self.windows.count), epoch
        return self._perm

    def indices(self, step: int) -> np.ndarray:
        """Window indices of the global batch at `step` (crossing epoch boundaries as needed)."""
        flat = np.arange(step * self.batch_size, (step + 1) * self.batch_size)[self.rows]
        n = self.windows.count
        return np.array([self._order(int(i // n))[i % n] for i in flat], np.int64)

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        return as_batch(np.stack([self.windows.window(int(i)) for i in self.indices(step)]))


class SyntheticBatches:
    """Seeded uniform random tokens, for benchmarks that need no data."""

    def __init__(self, vocab_size: int, seq_len: int, batch_size: int, seed: int, rows: slice | None = None):
        self.vocab_size, self.seq_len, self.batch_size, self.seed = vocab_size, seq_len, batch_size, seed
        self.rows = rows or slice(0, batch_size)

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, step])
        windows = rng.integers(0, self.vocab_size, (self.batch_size, self.seq_len + 1), dtype=np.int32)
        return as_batch(windows[self.rows])


def eval_batches(windows: TokenWindows, batch_size: int, max_batches: int, rows: slice | None = None):
    """The first max_batches*B validation windows in order; the last batch is padded with zero-weight rows."""
    total = min(windows.count, max_batches * batch_size)
    rows = rows or slice(0, batch_size)
    for start in range(0, total, batch_size):
        ids = np.arange(start, start + batch_size)
        valid = ids < total
        batch = as_batch(np.stack([windows.window(int(i) if ok else 0) for i, ok in zip(ids, valid)]))
        batch["weights"] = batch["weights"] * valid[:, None].astype(np.float32)
        yield {k: v[rows] for k, v in batch.items()}


def prefetch(make_batch, steps: range, depth: int = 2) -> Iterator[tuple[int, dict]]:
    """Build the batches for `steps` on a background thread so the device never waits on the host."""
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce():
        try:
            for step in steps:
                if stop.is_set():
                    return
                slots.put((step, make_batch(step)))
        except BaseException as err:  # surfaced in the consumer, which owns error reporting
            slots.put((None, err))
        slots.put((None, None))

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        while True:
            step, item = slots.get()
            if step is None:
                if isinstance(item, BaseException):
                    raise item
                return
            yield step, item
    finally:
        stop.set()
        while thread.is_alive():  # drain so the producer is not blocked on a full queue
            try:
                slots.get(timeout=0.1)
            except queue.Empty:
                pass
