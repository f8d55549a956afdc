"""Batches as a pure function of (step, seed, data): resuming needs only the step number.

The order of training sequences is Grain's: `MapDataset.range(n).shuffle(seed).repeat()` is a random-access
permutation reseeded each epoch, so sequence k of the run is computed directly, never by replaying the ones
before it; `MapDataset.mix` interleaves several data sets by weight the same way. Tokens are read from
memory-mapped shard files, and a Grain iterator builds the next batches on a background thread.

Each shard file is checked once when a split is opened: its sha256 against the manifest's and its token ids
against the vocabulary, in one read per file, files on parallel threads (docs/benchmarks.md has the cost).

Data in a bucket (data.path = gs://...) is read in place by ranged reads: no download first, no local cache.
Each window is one ranged GET of its seq_len + 1 tokens (two where it spans a file end), made on the Grain
prefetch thread while the device runs the step before: ~2 ms a read on the test emulator, so ~64 ms for a
batch of 32 windows of 129 tokens (0.4 ms from local files). Not a local cache with a size limit: windows are
drawn in a fresh random order over the whole split every epoch, so a cache holding a fraction f of the data
serves only about f of the reads while costing that much disk, and a cache of all of it is the full download
this avoids. (Reads in flight together were ~20 times slower on the emulator, which serves one request at a
time; whether they pay on GCS is untested.) Index files (8 bytes a document) are read whole into memory, as
for local data.

The integrity check streams every object through sha256 once when a split is opened, never writing it to disk
(~310 MiB/s from the emulator: every start of a run reads the data once, at GCS's per-object throughput).
GCS's stored hashes cannot stand in for it: the manifest records sha256, and GCS keeps only crc32c (and md5,
absent for composed objects), so comparing them would need a hash the manifest does not have.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import grain
import numpy as np

from bigmodel_cli import storage
from bigmodel_cli.data.manifest import load_manifest, split_files
from bigmodel_cli.data.mixture import parse_mixture
from bigmodel_cli.data.tokenizer import sha256_file
from bigmodel_cli.errors import UserError

# Grain's index shuffle costs about 65536/n cycle-walking rounds per call for an epoch of n < 65536 sequences
# (~2.5 ms per call at n = 10): such an epoch's order is computed once and kept instead.
SMALL_EPOCH = 1 << 16


def _grain_seed(seed: int, part: int) -> int:
    """A 32-bit shuffle seed per (run seed, data set); Grain reseeds epochs with seed + epoch."""
    return int(np.random.SeedSequence([seed, part]).generate_state(1)[0])


class _Shuffled:
    """Sequence indices in training order, epoch after epoch (a random-access sequence of length sys.maxsize)."""

    def __init__(self, n: int, seed: int):
        self.n = n
        self._ds = grain.MapDataset.range(n).shuffle(seed=seed).repeat()
        self._epochs: dict[int, np.ndarray] = {}  # small epochs' orders, at most two kept

    def __len__(self) -> int:
        return sys.maxsize

    def __getitem__(self, k: int) -> int:
        if self.n >= SMALL_EPOCH:
            return int(self._ds[k])
        epoch, i = divmod(k, self.n)
        if epoch not in self._epochs:
            base = epoch * self.n
            self._epochs = {e: o for e, o in self._epochs.items() if e == epoch - 1}
            self._epochs[epoch] = np.array([self._ds[base + j] for j in range(self.n)], np.int64)
        return int(self._epochs[epoch][i])


def _tag(part: int, index: int) -> tuple[int, int]:
    return part, int(index)


# ---- integrity: checksums and token ids ---------------------------------------------------------

SCAN_BYTES = 1 << 22  # read per step when checking a file: hashing speed is flat from about 1 MB up


def _scan(path: Path, dtype: np.dtype | None) -> tuple[str, int]:
    """A file's sha256 and, for token files (dtype given), its largest token id (-1 if none), in one read."""
    digest, top = hashlib.sha256(), -1
    buf = bytearray(SCAN_BYTES)
    with storage.path(path).open("rb") as f:  # buffered: readinto fills buf whole until the end of the file
        while n := f.readinto(buf):
            digest.update(memoryview(buf)[:n])
            if dtype is not None and n >= dtype.itemsize:
                top = max(top, int(np.frombuffer(buf, dtype, n // dtype.itemsize).max()))
    return digest.hexdigest(), top


def _check_file(path: Path, expected: str | None, dtype: np.dtype | None, vocab_size: int) -> None:
    """Refuse a file whose sha256 differs from the manifest's, or a token file with ids >= vocab_size."""
    if not path.is_file():
        raise UserError(f"{path} is missing: rerun bigmodel preprocess into a new directory")
    actual, top = _scan(path, dtype)
    # Manifests written before shard checksums have none (expected None): such shards still load, with only
    # their sizes and token ids checked.
    if expected is not None and actual != expected:
        raise UserError(
            f"{path} is damaged (its sha256 {actual[:12]} is not the manifest's {expected[:12]}): "
            "rerun bigmodel preprocess into a new directory"
        )
    if top >= vocab_size:
        ids = _read_array(path, dtype) if storage.is_url(path) else np.memmap(path, dtype=dtype, mode="r")
        bad = np.flatnonzero(ids >= vocab_size)
        raise UserError(
            f"{path} holds {len(bad)} token ids beyond the vocabulary of {vocab_size} (the first {ids[bad[0]]} "
            f"at token {bad[0]}, the largest {top}): it was not made by bigmodel preprocess with this "
            "tokenizer; rerun bigmodel preprocess"
        )


def check_files(checks: list[tuple[Path, str | None, np.dtype | None]], vocab_size: int) -> None:
    """_check_file on each (path, sha256, token dtype or None), files on parallel threads (hashlib and NumPy
    release the GIL); the first failure in list order is raised."""
    if len(checks) <= 1:
        for path, expected, dtype in checks:
            _check_file(path, expected, dtype, vocab_size)
        return
    with ThreadPoolExecutor(min(len(checks), os.cpu_count() or 1)) as pool:
        futures = [pool.submit(_check_file, *check, vocab_size) for check in checks]
        for future in futures:
            future.result()


def check_tokenizer(data_dir: Path, manifest: dict) -> Path:
    """The data directory's tokenizer file (and a Hugging Face tokenizer's config files), refused unless each
    sha256 is the manifest's; returns the tokenizer file's path."""
    info = manifest["tokenizer"]
    for name, expected in {info["file"]: info["sha256"], **info.get("files", {})}.items():
        path = storage.path(data_dir) / name
        if not path.is_file():
            raise UserError(f"{path} is missing: rerun bigmodel preprocess into a new directory")
        actual = sha256_file(path)
        if actual != expected:
            raise UserError(
                f"{path} is damaged or was replaced (its sha256 {actual[:12]} is not the manifest's "
                f"{expected[:12]}): rerun bigmodel preprocess into a new directory"
            )
    return storage.path(data_dir) / info["file"]


class _ObjectTokens:
    """A token file in a bucket, sliced like its np.memmap: each slice is one ranged read, kept nowhere."""

    def __init__(self, path, dtype: np.dtype):
        self.path, self.dtype = path, dtype

    def __getitem__(self, window: slice) -> np.ndarray:
        size = self.dtype.itemsize
        return np.frombuffer(storage.read_range(self.path, window.start * size, window.stop * size), self.dtype)


def _open_tokens(path, dtype: np.dtype) -> np.memmap | _ObjectTokens:
    """A token file for reading windows: memory-mapped when local, read in place by ranges in a bucket."""
    return _ObjectTokens(path, dtype) if storage.is_url(path) else np.memmap(path, dtype=dtype, mode="r")


def _read_array(path, dtype) -> np.ndarray:
    """A whole file as an array in memory (an index file), local or in a bucket."""
    if storage.is_url(path):
        return np.frombuffer(storage.path(path).read_bytes(), dtype)
    return np.fromfile(path, dtype)


class TokenWindows:
    """Non-overlapping windows of seq_len + 1 tokens over one split's token files, read across file ends.

    Token ids must be below the tokenizer's vocabulary size and the model's (vocab_size, when given)."""

    def __init__(self, data_dir: Path, split: str, manifest: dict, seq_len: int, vocab_size: int | None = None):
        if split not in manifest["splits"]:
            raise UserError(f"{data_dir} has no {split!r} split (has {', '.join(manifest['splits'])})")
        dtype = np.dtype(manifest["dtype"])
        self.data_dir, self.seq_len = storage.path(data_dir), seq_len
        self.packed = bool(manifest.get("pack_documents"))
        self.shards: list[np.memmap | _ObjectTokens] = []
        bounds, starts, checks = [0], [], []
        for info in split_files(manifest, split):
            path = self.data_dir / info["file"]
            if not path.is_file():
                raise UserError(f"{path} is missing: rerun bigmodel preprocess")
            if storage.size(path) != info["tokens"] * dtype.itemsize:
                raise UserError(f"{path} does not hold the {info['tokens']} tokens of its manifest: rerun preprocess")
            checks.append((path, info.get("sha256"), dtype))
            if self.packed:
                checks.append((self.data_dir / info["index"], info.get("index_sha256"), None))
        vocab = manifest["tokenizer"]["vocab_size"]
        check_files(checks, vocab if vocab_size is None else min(vocab, vocab_size))
        for info in split_files(manifest, split):
            if info["tokens"] == 0:
                continue
            if self.packed:
                starts.append(_read_array(self.data_dir / info["index"], np.int64) + bounds[-1])
            self.shards.append(_open_tokens(self.data_dir / info["file"], dtype))
            bounds.append(bounds[-1] + info["tokens"])
        self.bounds = np.asarray(bounds, np.int64)  # shard i holds global offsets bounds[i] .. bounds[i+1]-1
        self.total = int(self.bounds[-1])
        self.starts = np.unique(np.concatenate([np.zeros(1, np.int64), *starts])) if self.packed else None
        self.count = (self.total - 1) // seq_len
        if self.count < 1:
            raise UserError(
                f"the {split} split of {data_dir} has {self.total} tokens, fewer than one sequence of "
                f"{seq_len + 1}: use more data or a smaller data.seq_len"
            )

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """Tokens start .. stop-1 of the split as int32, whichever files they lie in."""
        first = int(np.searchsorted(self.bounds, start, side="right")) - 1
        pieces = []
        while start < stop:
            lo, hi = int(self.bounds[first]), int(self.bounds[first + 1])
            end = min(stop, hi)
            pieces.append(self.shards[first][start - lo : end - lo])
            start, first = end, first + 1
        return np.concatenate(pieces).astype(np.int32) if len(pieces) > 1 else pieces[0].astype(np.int32)

    def window(self, index: int) -> np.ndarray:
        start = index * self.seq_len
        return self.tokens(start, start + self.seq_len + 1)

    def segments(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Segment ids (1, 2, ... per document within the window) and positions within each document for the
        window's inputs [T]. Positions restart at 0 at the window's first token: a window sees no earlier part."""
        start, length = index * self.seq_len, self.seq_len
        if self.starts is None:  # no boundaries stored: the window is one segment
            return np.ones(length, np.int32), np.arange(length, dtype=np.int32)
        lo = np.searchsorted(self.starts, start, side="right")
        hi = np.searchsorted(self.starts, start + length, side="left")
        inner = self.starts[lo:hi] - start  # segment starts strictly inside the window
        opens = np.zeros(length, np.int32)
        opens[inner] = 1
        begin = np.zeros(length, np.int64)
        begin[inner] = inner
        segment_ids = np.cumsum(opens, dtype=np.int32) + 1
        positions = (np.arange(length) - np.maximum.accumulate(begin)).astype(np.int32)
        return segment_ids, positions

    def example(self, key: int, segments: bool = False) -> dict[str, np.ndarray]:
        """Window `key`: its tokens [T+1], and with segments its segment_ids and positions [T]."""
        out = {"tokens": self.window(key)}
        if segments:
            out["segment_ids"], out["positions"] = self.segments(key)
        return out

    def order(self, seed: int) -> grain.MapDataset:
        """Window keys in training order: a fresh permutation every epoch."""
        return grain.MapDataset.source(_Shuffled(self.count, _grain_seed(seed, 0)))

    def sequential(self, index: int) -> int:
        return index


class Mixture:
    """Several data sets' windows drawn by weight: the share of sequences each contributes to every batch.

    Training draws each set in its own reshuffled order, endlessly; evaluation takes each set's windows in
    order, interleaved by weight, until the first runs out."""

    def __init__(self, parts: list[TokenWindows], weights: list[float]):
        if len(parts) != len(weights) or not parts:
            raise UserError(f"data.mixture: {len(parts)} data sets but {len(weights)} weights: give one weight per set")
        if len({p.seq_len for p in parts}) != 1:
            raise UserError("data.mixture: its data sets are read with different sequence lengths: use one seq_len")
        # Grain turns weights into integer proportions by truncating the smallest one's, scaled to 100: 0.19 gave
        # 99.99999999999999 -> 99 (a 1% error in the share). Handed the proportions rounded, it keeps them.
        self.parts, self.weights = parts, [round(w * 100 / min(weights)) for w in weights]
        self.seq_len = parts[0].seq_len
        self.packed = any(p.packed for p in parts)
        tagged = [grain.MapDataset.range(p.count).map(functools.partial(_tag, i)) for i, p in enumerate(parts)]
        self._sequential = grain.MapDataset.mix(tagged, self.weights)
        self.count = len(self._sequential)

    def example(self, key: tuple[int, int] | int, segments: bool = False) -> dict[str, np.ndarray]:
        part, index = self._sequential[key] if isinstance(key, int) else key
        return self.parts[part].example(index, segments)

    def order(self, seed: int) -> grain.MapDataset:
        orders = [
            grain.MapDataset.source(_Shuffled(p.count, _grain_seed(seed, i + 1))).map(functools.partial(_tag, i))
            for i, p in enumerate(self.parts)
        ]
        return grain.MapDataset.mix(orders, self.weights)

    def sequential(self, index: int) -> tuple[int, int]:
        return self._sequential[index]


class DataPart(NamedTuple):
    """One preprocessed data directory of a run, with its share of a mixture and its manifest."""

    path: Path
    weight: float
    manifest: dict


def load_mixture(spec: str) -> list[DataPart]:
    """The parts of a mixture ("dirA:0.7,dirB:0.3") with their manifests, checked to share one tokenizer."""
    parts = [DataPart(path, w, load_manifest(path)) for path, w in parse_mixture(spec)]
    first_dir, _, first = parts[0]
    for path, _, manifest in parts[1:]:
        if manifest["tokenizer"]["sha256"] != first["tokenizer"]["sha256"]:
            raise UserError(
                f"data.mixture: {path} was tokenized with a different tokenizer than {first_dir}: preprocess it "
                f"again with --tokenizer {first_dir}"
            )
    return parts


def open_mixture(parts: list[DataPart], split: str, seq_len: int) -> Mixture:
    """One split of every part of a mixture (load_mixture's), as a Mixture."""
    return Mixture([TokenWindows(p, split, m, seq_len) for p, _, m in parts], [w for _, w, _ in parts])


def as_batch(windows: np.ndarray, weights: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """[B, T+1] token windows -> inputs, next-token targets and loss weights [B, T]."""
    inputs, targets = windows[:, :-1], windows[:, 1:]
    if weights is None:
        weights = np.ones(inputs.shape, np.float32)
    return {"inputs": inputs, "targets": targets, "weights": weights}


def batch_of(windows: TokenWindows | Mixture, keys: list) -> dict[str, np.ndarray]:
    """The batch of the given window keys; packed data adds segment_ids and positions [B, T] (int32)."""
    examples = [windows.example(k, windows.packed) for k in keys]
    batch = as_batch(np.stack([e["tokens"] for e in examples]))
    if windows.packed:
        batch["segment_ids"] = np.stack([e["segment_ids"] for e in examples])
        batch["positions"] = np.stack([e["positions"] for e in examples])
    return batch


class TrainBatches:
    """Global batch for a step: elements step*B ... step*B+B-1 of the seeded order, reshuffled each epoch.

    Only this process's `rows` of it are read."""

    def __init__(self, windows: TokenWindows | Mixture, batch_size: int, seed: int, rows: slice | None = None):
        self.windows, self.batch_size, self.seed = windows, batch_size, seed
        self.rows = rows or slice(0, batch_size)  # this process's share of every global batch
        self._order = windows.order(seed)

    def indices(self, step: int) -> list:
        """Window keys of this process's rows of the global batch at `step` (crossing epochs as needed)."""
        return [self._order[k] for k in range(step * self.batch_size, (step + 1) * self.batch_size)[self.rows]]

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        return batch_of(self.windows, self.indices(step))


class SyntheticBatches:
    """Seeded uniform random tokens, for benchmarks that need no data."""

    def __init__(self, vocab_size: int, seq_len: int, batch_size: int, seed: int, rows: slice | None = None):
        self.vocab_size, self.seq_len, self.batch_size, self.seed = vocab_size, seq_len, batch_size, seed
        self.rows = rows or slice(0, batch_size)

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, step])
        windows = rng.integers(0, self.vocab_size, (self.batch_size, self.seq_len + 1), dtype=np.int32)
        return as_batch(windows[self.rows])


def padded_batches(count: int, batch_size: int, take, rows: slice | None = None) -> Iterator[dict]:
    """Items 0..count-1 in order, batch_size at a time, as `take(ids) -> batch` builds them; the last batch is
    filled with repeats of item 0 weighted 0, so every batch has one shape and no row is all padding for
    attention. Every evaluation (validation, a split, a text file, a task's loss) batches through here."""
    rows = rows or slice(0, batch_size)
    for start in range(0, count, batch_size):
        ids = np.arange(start, start + batch_size)
        valid = ids < count
        batch = take(np.where(valid, ids, 0))
        batch["weights"] = batch["weights"] * valid[:, None].astype(np.float32)
        yield {k: v[rows] for k, v in batch.items()}


def eval_batches(windows: TokenWindows | Mixture, batch_size: int, max_batches: int, rows: slice | None = None):
    """The first max_batches*B validation windows in order (segment ids included), padded as padded_batches."""
    total = min(windows.count, max_batches * batch_size)
    return padded_batches(
        total, batch_size, lambda ids: batch_of(windows, [windows.sequential(int(i)) for i in ids]), rows
    )


def array_batches(arrays: dict, batch_size: int, max_batches: int = 0, rows: slice | None = None):
    """Rows of encoded examples (inputs, targets, weights arrays) in order, padded as padded_batches;
    max_batches 0 = all of them."""
    count = len(arrays["inputs"])
    if max_batches:
        count = min(count, batch_size * max_batches)
    keys = ("inputs", "targets", "weights")
    return padded_batches(count, batch_size, lambda ids: {k: arrays[k][ids] for k in keys}, rows)


def _numbered(make_batch, step: int) -> tuple[int, dict]:
    return step, make_batch(step)


def prefetch(make_batch, steps: range, depth: int = 2) -> Iterator[tuple[int, dict]]:
    """(step, batch) for `steps`, built `depth` ahead on a Grain background thread so the device never waits
    on the host. One thread: make_batch keeps per-epoch state."""
    if not len(steps):
        return iter(())
    ds = grain.MapDataset.range(steps.start, steps.stop, steps.step).map(functools.partial(_numbered, make_batch))
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=depth)))
