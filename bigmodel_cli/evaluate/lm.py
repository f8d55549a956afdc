"""`bigmodel evaluate` for language modelling: token-weighted loss and perplexity on a data split."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np

from bigmodel_cli import atomic, modelio, parallel, rundir, storage
from bigmodel_cli.data import loader
from bigmodel_cli.data.manifest import check_compatible, load_manifest
from bigmodel_cli.data.tokenizer import sequence_start, tokenizer_sha
from bigmodel_cli.errors import UserError
from bigmodel_cli.evaluate.loss import loss_sums
from bigmodel_cli.model import quantize as quantization
from bigmodel_cli.model.params import LoadedModel
from bigmodel_cli.tasks import records
from bigmodel_cli.tasks.metrics import perplexity


def run(
    model: Path,
    *,
    data: Path | None = None,
    split: str = "val",
    batch_size: int = 8,
    max_batches: int = 50,
    out: Path | None = None,
    quantize: str = "",
    loaded: LoadedModel | None = None,
) -> dict:
    """Evaluate the model (quantized as --quantize asks) on a preprocessed split (max_batches 0 = all of it);
    writes metrics.json. `loaded`: the model, already loaded (and quantized), to skip loading it again."""
    loaded = loaded or _load(model, quantize)
    data_dir = storage.path(data) if data is not None else storage.path(loaded.data_path) if loaded.data_path else None
    if data_dir is None:  # a run trained on a mixture, a Hugging Face model: no one data directory to read
        raise UserError(
            f"{model} names no one data directory to evaluate on: pass --data DIR (a bigmodel preprocess output)"
        )
    if not data_dir.is_dir():
        raise UserError(f"no evaluation data: pass --data DIR (a bigmodel preprocess output); {data_dir} is not one")
    manifest = load_manifest(data_dir)
    if split not in manifest["splits"]:
        raise UserError(f"--split {split!r} is not in {data_dir} (has {', '.join(manifest['splits'])})")
    model_sha = tokenizer_sha(loaded.home, manifest["tokenizer"]["sha256"])
    check_compatible(manifest, model_sha, loaded.model_cfg.vocab_size, str(data_dir))
    dp = parallel.data_parallel_size(loaded.mesh)
    if batch_size % dp:
        raise UserError(f"--batch-size {batch_size} must be a multiple of the {dp} devices")
    # Ids beyond the model's vocabulary would make the loss nan: refused as the split is opened.
    windows = loader.TokenWindows(data_dir, split, manifest, loaded.seq_len, loaded.model_cfg.vocab_size)
    max_batches = max_batches or -(-windows.count // batch_size)
    n_batches = -(-min(windows.count, batch_size * max_batches) // batch_size)
    total, count = loss_sums(loaded, loader.eval_batches(windows, batch_size, max_batches), n_batches, "evaluate")
    loss = total / count
    metrics = {
        "loss": loss,
        "perplexity": perplexity(loss),
        "tokens": int(count),
        "split": split,
        "step": loaded.step,
        "data": str(data_dir),
    }
    _write(model, loaded, out, metrics)
    return metrics


def _write(model: Path, loaded: LoadedModel, out: Path | None, metrics: dict) -> None:
    """metrics.json in --out, else beside the model; a directory that refuses it costs a warning, not the results."""
    if out is None and modelio.locate(model)[0] == "hf":  # a Hugging Face directory is the user's (maybe read-only)
        return
    target = storage.path(out) if out is not None else loaded.home  # either may be in a bucket
    try:
        target.mkdir(parents=True, exist_ok=True)
        atomic.write_json(target / rundir.EVAL_METRICS_FILE, metrics)
    except OSError as err:
        hint = "choose a writable --out DIR" if out is not None else "pass --out DIR to save them"
        print(f"warning: could not write {target / 'metrics.json'} ({err.strerror or err}): {hint}", file=sys.stderr)


def _load(model: Path, quantize: str) -> LoadedModel:
    quantization.check(quantize)
    return quantization.apply(modelio.load(model), quantize)


def run_text(
    model: Path,
    text_file: Path,
    *,
    batch_size: int = 8,
    out: Path | None = None,
    quantize: str = "",
    loaded: LoadedModel | None = None,
) -> dict:
    """Loss, perplexity and bits per byte of every token of a raw text file, as one document.

    The text is cut into consecutive windows of the model's sequence length (each token is predicted once,
    from the tokens before it in its window, as nanoGPT's evaluation does), after the token that starts
    documents in training (BOS for a tokenizer that adds one, else the EOS between documents). Bits per byte
    divide the summed loss by the text's UTF-8 bytes, so that models with different tokenizers compare."""
    quantization.check(quantize)
    text = records.read_text(text_file, "--text")
    loaded = loaded or _load(model, quantize)
    tokenizer = loaded.tokenizer("--text needs the model's tokenizer")
    if tokenizer.vocab_size > loaded.model_cfg.vocab_size:
        raise UserError(
            f"{tokenizer.path} has {tokenizer.vocab_size} tokens but the model only "
            f"{loaded.model_cfg.vocab_size}: pass the model's own directory"
        )
    dp = parallel.data_parallel_size(loaded.mesh)
    if batch_size % dp:
        raise UserError(f"--batch-size {batch_size} must be a multiple of the {dp} devices")
    first = sequence_start(tokenizer)
    start = [first] if first >= 0 else []
    ids = np.asarray(start + tokenizer.encode([text])[0], np.int32)
    seq_len = loaded.seq_len
    n_windows = -(-(len(ids) - 1) // seq_len)
    n_batches = -(-n_windows // batch_size)
    total, count = loss_sums(loaded, _text_batches(ids, seq_len, batch_size, n_windows), n_batches, "evaluate")
    n_bytes = len(text.encode("utf-8"))
    loss = total / count
    metrics = {
        "loss": loss,
        "perplexity": perplexity(loss),
        "bits_per_byte": total / math.log(2) / n_bytes,
        "tokens": int(count),
        "bytes": n_bytes,
        "step": loaded.step,
        "text": str(text_file),
    }
    _write(model, loaded, out, metrics)
    return metrics


def _text_batches(ids: np.ndarray, seq_len: int, batch_size: int, n_windows: int):
    """[B, T] batches of consecutive windows over ids; the tail window is weighted only where it has targets."""

    def take(rows: np.ndarray) -> dict:
        windows = np.zeros((len(rows), seq_len + 1), np.int32)
        weights = np.zeros((len(rows), seq_len), np.float32)
        for row, window in enumerate(rows):
            piece = ids[window * seq_len : window * seq_len + seq_len + 1]
            windows[row, : len(piece)] = piece
            weights[row, : len(piece) - 1] = 1.0
        return loader.as_batch(windows, weights)

    return loader.padded_batches(n_windows, batch_size, take)
