"""Raw text -> tokenizer + sharded token files (train/val) + manifest.json, streaming in constant memory.

Two passes over the inputs: the first samples lines to train a tokenizer on (skipped with --tokenizer),
the second encodes documents in batches on worker processes and appends the tokens to shard files in
input order. Each document ends with EOS; with a tokenizer that adds BOS to a prompt (Llama's, from
--tokenizer), it also starts with BOS, as the model was pretrained.

Everything is written into a hidden staging directory that is renamed to --out only at the
end, so an interrupted run leaves no output, and the same inputs always give byte-identical files.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import multiprocessing
import os
import random
import signal
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from bigmodel_cli import atomic
from bigmodel_cli.console import Console
from bigmodel_cli.data import sources as src_lib
from bigmodel_cli.data import tokenizer as tok
from bigmodel_cli.data.manifest import MANIFEST_FILE
from bigmodel_cli.errors import UserError
from bigmodel_cli.rundir import TOKENIZER_FILE

FORMAT = "bigmodel-tokens-v2"
BATCH_CHARS = 1 << 20  # characters handed to one worker at a time
NO_TEXT = "the inputs hold no text: check the files (and --text-field for JSON, CSV and Parquet)"
SAMPLE_SEED = 0  # the tokenizer's training sample is a seeded reservoir: same inputs, same tokenizer


@dataclass(frozen=True)
class PreprocessConfig:
    inputs: tuple[Path | str, ...]  # files, directories, glob patterns and hf:NAME[:CONFIG][@SPLIT] datasets
    out: Path  # output directory; must not exist or be empty
    vocab_size: int = 8000  # tokenizer size (ignored for char, which sizes itself)
    model_type: str = "bpe"  # bpe, unigram or char
    tokenizer: Path | None = None  # an existing tokenizer instead of training one: .model, tokenizer.json, model dir
    val_fraction: float = 0.1  # share of documents (of tokens, for tiny corpora) held out; 0 none, 1 all (a test set)
    text_field: str = "text"  # record field(s) holding the text: "a.b" nests, "title,body" joins several
    txt_mode: str = "file"  # a .txt file is one document (file), one per line, or one per paragraph
    byte_fallback: bool | None = None  # unknown characters as UTF-8 bytes, not <unk>; None = on (every model type)
    character_coverage: float = 0.0  # share of characters the vocabulary must cover; 0 = 0.9995 (1.0 for char)
    max_sentences: int = 1_000_000  # the tokenizer trains on a sample of at most this many lines
    special_tokens: tuple[str, ...] = ()  # strings that always become one token each, e.g. <|user|>
    pack_documents: bool = False  # store document boundaries so batches carry segment_ids and positions
    shard_tokens: int = 100_000_000  # tokens per output file (the last one of a split holds the rest)
    workers: int = 0  # encoding processes; 0 = one per CPU core


def run(cfg: PreprocessConfig, console: Console | None = None) -> dict:
    """Tokenize the inputs into cfg.out; returns the manifest. `console` shows bytes/s and tokens/s as it goes.

    The encoding workers import the caller's main module (forkserver): call this from a script under
    `if __name__ == "__main__":`, or with workers=1."""
    if not 0 <= cfg.val_fraction <= 1:
        raise UserError(f"--val-fraction must be from 0 (no validation split) to 1 (all), got {cfg.val_fraction}")
    if cfg.tokenizer is None and cfg.model_type not in tok.MODEL_TYPES:
        raise UserError(f"--model-type must be one of {', '.join(tok.MODEL_TYPES)}; got {cfg.model_type!r}")
    if cfg.max_sentences <= 0 or cfg.shard_tokens <= 0:
        raise UserError("--max-sentences and the shard size must be positive")
    atomic.check_new_dir(cfg.out, "output")  # before reading any input: fail fast
    opts = src_lib.ReadOptions(text_fields=src_lib.parse_text_fields(cfg.text_field), txt_mode=cfg.txt_mode)
    if opts.txt_mode not in src_lib.TXT_MODES:
        raise UserError(f"--txt-mode must be one of {', '.join(src_lib.TXT_MODES)}; got {opts.txt_mode!r}")
    sources = src_lib.expand(cfg.inputs)

    with atomic.new_dir(cfg.out, "output") as staging:
        return _write(cfg, sources, opts, staging, console or Console("quiet"))


# ---- pass 1: a tokenizer trained on a sample --------------------------------------------------


def _all_pieces(sources: list[src_lib.Source], opts: src_lib.ReadOptions, docs: list[int] | None = None):
    """Every source's pieces in order; counts each source's documents into docs."""
    for i, source in enumerate(sources):
        for text, last in source.pieces(opts):
            if docs is not None and last:
                docs[i] += 1
            yield text, last


def sample_lines(pieces: Iterator[src_lib.Piece], k: int, seed: int = SAMPLE_SEED) -> list[str]:
    """A uniform sample of k training lines from a stream of any length (reservoir sampling, Li's algorithm L:
    a few random draws per kept line, none per skipped one)."""
    rng = random.Random(seed)

    def u() -> float:  # uniform in (0, 1), never 0 or 1
        return (rng.getrandbits(52) + 0.5) / 2**52

    reservoir: list[str] = []
    seen = 0  # lines of the stream before the current piece's remaining lines
    w = math.exp(math.log(u()) / k)
    nxt = k + math.floor(math.log(u()) / math.log1p(-w))  # index of the next line to keep
    for text, _ in pieces:
        lines = tok.training_lines(text)
        if len(reservoir) < k:
            take = lines[: k - len(reservoir)]
            reservoir += take
            seen += len(take)
            lines = lines[len(take) :]
        while lines and nxt < seen + len(lines):
            reservoir[rng.randrange(k)] = lines[nxt - seen]
            w *= math.exp(math.log(u()) / k)
            nxt += math.floor(math.log(u()) / math.log1p(-w)) + 1
        seen += len(lines)
    return reservoir


def _given_tokenizer(source: Path | str) -> tok.TokenizerFiles:
    """The files of --tokenizer: a tokenizer file, a model directory, or hf:DIR; opened once to validate."""
    if str(source).startswith("hf:"):
        from bigmodel_cli import modelio  # jax and the model formats: loaded only for an hf: source

        source = modelio.locate(source)[1]
    files = tok.find_files(source)
    if files is None:
        raise UserError(
            f"--tokenizer {source}: no such tokenizer; pass a SentencePiece .model, a tokenizer.json, or a model "
            "directory holding tokenizer.json or tokenizer.model"
        )
    files.open()
    return files


def _make_tokenizer(cfg: PreprocessConfig, sources, opts, staging: Path) -> dict[str, str]:
    """The tokenizer's files in staging (given with --tokenizer, or trained): name -> sha256."""
    if cfg.tokenizer is not None:
        return _given_tokenizer(cfg.tokenizer).copy_to(staging)
    tokenizer_file = staging / TOKENIZER_FILE
    lines = sample_lines(_all_pieces(sources, opts), cfg.max_sentences)
    if not lines:
        raise UserError(NO_TEXT)
    tok.train(
        lines,
        tokenizer_file,
        cfg.vocab_size,
        cfg.model_type,
        byte_fallback=cfg.byte_fallback,
        character_coverage=cfg.character_coverage,
        special_tokens=cfg.special_tokens,
    )
    return {TOKENIZER_FILE: tok.sha256_file(tokenizer_file)}


# ---- pass 2: encoding on worker processes -----------------------------------------------------

_WORKER: dict = {}


def _init_worker(model_file: str, bos_id: int, eos_id: int, dtype: str) -> None:
    _WORKER.update(tokenizer=tok.open_tokenizer(model_file), bos=bos_id, eos=eos_id, dtype=np.dtype(dtype))


def _init_pool_worker(model_file: str, bos_id: int, eos_id: int, dtype: str) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it stops the pool
    _init_worker(model_file, bos_id, eos_id, dtype)


def _encode_batch(texts: list[str], ends: list[bool], starts: bool, num_threads: int = 1) -> tuple[np.ndarray, ...]:
    """Token ids of the pieces, flat, with BOS (when bos >= 0) before each document's first piece and EOS
    after its last; and each piece's length. `starts`: the first piece starts a document."""
    ids = _WORKER["tokenizer"].encode(texts, num_threads=num_threads)
    bos, eos = _WORKER["bos"], _WORKER["eos"]
    for piece, first, last in zip(ids, [starts, *ends[:-1]], ends, strict=True):
        if first and bos >= 0:
            piece.insert(0, bos)
        if last and eos >= 0:
            piece.append(eos)
    lengths = np.fromiter(map(len, ids), np.int64, len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(ids), _WORKER["dtype"], int(lengths.sum()))
    return flat, lengths


def _batches(pieces: Iterator[src_lib.Piece]) -> Iterator[list[src_lib.Piece]]:
    batch: list[src_lib.Piece] = []
    size = 0
    for piece in pieces:
        batch.append(piece)
        size += len(piece[0])
        if size >= BATCH_CHARS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _utf8_bytes(batch: list[src_lib.Piece]) -> int:
    return sum(len(text.encode("utf-8", "surrogatepass")) for text, _ in batch)


def encode_stream(
    batches: Iterator[list[src_lib.Piece]], model_file: Path, bos_id: int, eos_id: int, dtype: str, workers: int
):
    """(ends, tokens, lengths, utf8_bytes) per batch, in input order. A corpus of one batch is encoded here;
    a larger one on `workers` processes with at most two batches each in flight, so memory stays constant.
    bos_id -1: documents start without BOS."""
    batches = iter(batches)
    head = list(itertools.islice(batches, 2))
    starts = True  # the next batch's first piece starts a document
    if workers <= 1 or len(head) < 2:
        _init_worker(str(model_file), bos_id, eos_id, dtype)
        for batch in itertools.chain(head, batches):
            ends = [last for _, last in batch]
            encoded = _encode_batch([t for t, _ in batch], ends, starts, num_threads=os.cpu_count() or 1)
            starts = ends[-1]
            yield (ends, *encoded, _utf8_bytes(batch))
        return
    # forkserver: the workers do not inherit this process's threads (JAX, when run from the test suite).
    context = multiprocessing.get_context("forkserver")
    initargs = (str(model_file), bos_id, eos_id, dtype)
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_pool_worker, initargs=initargs) as pool:
        pending: deque = deque()
        try:
            for batch in itertools.chain(head, batches):
                ends = [last for _, last in batch]
                future = pool.submit(_encode_batch, [t for t, _ in batch], ends, starts)
                starts = ends[-1]
                pending.append((ends, future, _utf8_bytes(batch)))
                if len(pending) >= 2 * workers:
                    ends, future, nbytes = pending.popleft()
                    yield (ends, *future.result(), nbytes)
            while pending:
                ends, future, nbytes = pending.popleft()
                yield (ends, *future.result(), nbytes)
        except BrokenProcessPool:
            raise UserError(
                "an encoding worker process died: out of memory, or preprocess.run was called from a script "
                "without `if __name__ == '__main__':` (the workers import the main module); or use workers=1"
            ) from None
        finally:
            for _, future, _ in pending:
                future.cancel()


# ---- splitting and writing --------------------------------------------------------------------

SPLITS = ("train", "val")


def is_val(index: int, fraction: float) -> bool:
    """Piece `index` goes to val: evenly spaced, the first one near 1/(2*fraction), so a stream of any length
    holds out `fraction` of its pieces without knowing its length."""
    return math.floor((index + 1) * fraction + 0.5) > math.floor(index * fraction + 0.5)


class Router:
    """Assigns pieces to splits in stream order and finds where document segments start in each split.

    A segment starts at each EOS (which opens the next document, as it opens generation from an empty prompt),
    or, when documents start with BOS (eos_id -1 here) or the tokenizer has no EOS, at each document's first
    token; and wherever a split's stream jumps
    (its previous piece of the same document went to the other split)."""

    def __init__(self, fraction: float, eos_id: int):
        self.fraction, self.eos = fraction, eos_id
        self.index = 0  # global piece number
        self.doc_start = True  # the next piece begins a document
        self.last_piece = [-2, -2]  # per split: global number of its latest piece
        self.after_eos = [False, False]  # per split: its stream ends with an EOS

    def route(self, ends: list[bool], flat: np.ndarray, lengths: np.ndarray, split: list[int] | None = None):
        """{split: (tokens, segment start offsets within them)} for one encoded batch."""
        n = len(ends)
        if split is None:
            split = [int(is_val(self.index + j, self.fraction)) for j in range(n)]
        pos, starts = [0, 0], ([], [])
        for j, (s, length, last) in enumerate(zip(split, lengths.tolist(), ends, strict=True)):
            i = self.index + j
            continues = not self.doc_start and self.last_piece[s] == i - 1
            if not continues and not self.after_eos[s]:
                starts[s].append(pos[s])
            eos_here = last and self.eos >= 0
            if eos_here:
                starts[s].append(pos[s] + length - 1)
            self.last_piece[s], self.after_eos[s] = i, eos_here
            pos[s] += length
            self.doc_start = last
        self.index += n
        to_val = np.repeat(np.asarray(split, bool), lengths)
        return {"train": (flat[~to_val], starts[0]), "val": (flat[to_val], starts[1])}


class ShardWriter:
    """Appends one split's tokens to files of at most shard_tokens tokens each, plus (packing) an index file
    per shard of the int64 offsets in it where document segments start. Each file's sha256 goes into its
    manifest entry, hashed as it is written (no second read), for the loader to verify."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype, shard_tokens: int, index: bool):
        self.directory, self.split, self.dtype = directory, split, dtype
        self.shard_tokens, self.index = shard_tokens, index
        self.files: list[dict] = []
        self.tokens = 0
        self._bin = self._idx = None
        self._hashes = (hashlib.sha256(), hashlib.sha256())  # of the open .bin and .idx
        self._in_shard = 0
        self._last_start = -1  # global offset of the last start written (no duplicates)

    def _next_shard(self) -> None:
        self._close_shard()
        name = f"{self.split}-{len(self.files):05d}"
        entry = {"file": f"{name}.bin", "tokens": 0}
        self._bin = open(self.directory / entry["file"], "wb")  # noqa: SIM115 - closed in _close_shard
        if self.index:
            entry.update(index=f"{name}.idx", segments=0)
            self._idx = open(self.directory / entry["index"], "wb")  # noqa: SIM115
        self._hashes = (hashlib.sha256(), hashlib.sha256())
        self.files.append(entry)
        self._in_shard = 0

    def append(self, tokens: np.ndarray, starts: list[int]) -> None:
        starts_arr = np.asarray(starts, np.int64)
        pos = 0
        while pos < len(tokens):
            if self._bin is None or self._in_shard == self.shard_tokens:
                self._next_shard()
            take = min(len(tokens) - pos, self.shard_tokens - self._in_shard)
            part = tokens[pos : pos + take].astype(self.dtype, copy=False)
            part.tofile(self._bin)
            self._hashes[0].update(part)
            if self.index:
                mine = starts_arr[(starts_arr >= pos) & (starts_arr < pos + take)] + (self.tokens - pos)
                mine = np.unique(mine[mine > self._last_start])
                if len(mine):
                    offsets = mine - (self.tokens - self._in_shard)
                    offsets.tofile(self._idx)
                    self._hashes[1].update(offsets)
                    self.files[-1]["segments"] += len(mine)
                    self._last_start = int(mine[-1])
            self._in_shard += take
            self.files[-1]["tokens"] += take
            self.tokens += take
            pos += take

    def _close_shard(self) -> None:
        if self._bin is not None:
            self.files[-1]["sha256"] = self._hashes[0].hexdigest()
            if self.index:
                self.files[-1]["index_sha256"] = self._hashes[1].hexdigest()
        for f in (self._bin, self._idx):
            if f is not None:
                f.close()
        self._bin = self._idx = None

    def close(self) -> dict:
        self._close_shard()
        return {"tokens": self.tokens, "files": self.files}


def _write(cfg: PreprocessConfig, sources, opts, staging: Path, console: Console) -> dict:
    if cfg.tokenizer is None:
        console.info(f"training a {cfg.model_type} tokenizer on at most {cfg.max_sentences:,} sampled lines")
    tokenizer_shas = _make_tokenizer(cfg, sources, opts, staging)
    files = tok.find_files(staging)
    tokenizer_file, tokenizer = files.main, files.open()
    eos = tokenizer.eos_id
    bos = tok.sequence_start(tokenizer) if tokenizer.add_bos else -1  # Llama-style: documents start with BOS
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32)
    writers = {s: ShardWriter(staging, s, dtype, cfg.shard_tokens, cfg.pack_documents) for s in SPLITS}
    counts = np.zeros(tokenizer.vocab_size, np.int64)  # token frequencies, for the unigram entropy
    # ...of the train split; of the val split when that is all there is (a test set: the baseline to beat)
    counted = "train" if cfg.val_fraction < 1 else "val"
    docs = [0] * len(sources)
    # Segments start at each EOS, or where documents start with BOS, at each BOS: every document's first token.
    router = Router(cfg.val_fraction, eos if bos < 0 else -1)
    workers = cfg.workers or os.cpu_count() or 1

    pieces = _all_pieces(sources, opts, docs)
    # Pieces needed to hold some out whole; 0 and 1 hold out none or all of them, whatever the corpus size.
    needed = math.ceil(1 / cfg.val_fraction) if 0 < cfg.val_fraction < 1 else 0
    with console.throughput("encode") as meter:
        head = list(itertools.islice(pieces, needed))
        if len(head) < needed:
            # Too few pieces to hold some out whole: split the token stream instead (the last val_fraction).
            encoded = list(encode_stream(_batches(iter(head)), tokenizer_file, bos, eos, dtype.name, 1))
            meter.advance(sum(batch[3] for batch in encoded), sum(len(batch[1]) for batch in encoded))
            ends = [e for batch in encoded for e in batch[0]]
            flat = np.concatenate([batch[1] for batch in encoded]) if encoded else np.zeros(0, dtype)
            lengths = np.concatenate([batch[2] for batch in encoded]) if encoded else np.zeros(0, np.int64)
            tokens, starts = router.route(ends, flat, lengths, split=[0] * len(ends))["train"]
            n_val = max(1, int(len(tokens) * cfg.val_fraction))
            cut = len(tokens) - n_val
            starts = np.asarray(starts, np.int64)
            writers["train"].append(tokens[:cut], starts[starts < cut].tolist())
            writers["val"].append(tokens[cut:], [0, *(starts[starts >= cut] - cut).tolist()])
            counts += np.bincount(tokens[:cut], minlength=tokenizer.vocab_size)
        else:
            for ends, flat, lengths, nbytes in encode_stream(
                _batches(itertools.chain(head, pieces)), tokenizer_file, bos, eos, dtype.name, workers
            ):
                meter.advance(nbytes, len(flat))
                for split, (tokens, starts) in router.route(ends, flat, lengths).items():
                    writers[split].append(tokens, starts)
                    if split == counted:
                        counts += np.bincount(tokens, minlength=tokenizer.vocab_size)
    if sum(docs) == 0:
        raise UserError(NO_TEXT)
    splits = {s: w.close() for s, w in writers.items()}
    wanted = {"train": cfg.val_fraction < 1, "val": cfg.val_fraction > 0}
    for name, info in splits.items():
        if wanted[name] and info["tokens"] < 2:
            raise UserError(f"the {name} split got {info['tokens']} tokens: add data or change --val-fraction")

    probs = counts[counts > 0] / counts.sum()
    tokenizer_info = {
        "file": files.main_name,
        "sha256": tokenizer_shas[files.main_name],
        "model_type": "given" if cfg.tokenizer is not None else cfg.model_type,
        "vocab_size": tokenizer.vocab_size,
        "bos_id": tokenizer.bos_id,
        "eos_id": eos,
        "pad_id": tokenizer.pad_id,
    }
    if len(tokenizer_shas) > 1 or bos >= 0:  # a Hugging Face model's tokenizer: its config files, BOS or not
        tokenizer_info.update(files=tokenizer_shas, add_bos=bos >= 0)
    manifest = {
        "format": FORMAT,
        "tokenizer": tokenizer_info,
        "dtype": dtype.name,
        "splits": splits,
        "pack_documents": cfg.pack_documents,
        "documents": sum(docs),
        "unigram_entropy": float(-(probs * np.log(probs)).sum()),  # nats/token of `counted`: a loss to beat
        "inputs": [{**s.fingerprint(), "documents": n} for s, n in zip(sources, docs, strict=True)],
        "options": {k: v for k, v in asdict(cfg).items() if k not in ("inputs", "out", "tokenizer", "workers")},
    }
    text = json.dumps(manifest, indent=2, default=str) + "\n"
    (staging / MANIFEST_FILE).write_text(text)
    return json.loads(text)  # exactly what load_manifest will read
