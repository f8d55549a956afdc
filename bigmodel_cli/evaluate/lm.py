"""`bigmodel evaluate` for language modelling: token-weighted loss and perplexity on a data split."""

from __future__ import annotations

import functools
from pathlib import Path

import jax

from bigmodel_cli import modelio, parallel
from bigmodel_cli.console import track
from bigmodel_cli.data import loader
from bigmodel_cli.data.preprocess import check_compatible, load_manifest
from bigmodel_cli.data.tokenizer import sha256_file
from bigmodel_cli.errors import UserError
from bigmodel_cli.evaluate.metrics import perplexity
from bigmodel_cli.train.step import eval_step
from bigmodel_cli.utils import write_json_atomic


def run(
    model: Path, *, data: Path | None = None, split: str = "val", batch_size: int = 8, max_batches: int = 50
) -> dict:
    """Evaluate the model on a preprocessed split; writes metrics.json next to the model and returns it."""
    loaded = modelio.load(model)
    data_dir = Path(data) if data is not None else Path(loaded.data_path) if loaded.data_path else None
    if data_dir is None or not data_dir.is_dir():
        raise UserError(f"no evaluation data: pass --data DIR (a bigmodel preprocess output); got {data_dir}")
    manifest = load_manifest(data_dir)
    if split not in manifest["splits"]:
        raise UserError(f"--split {split!r} is not in {data_dir} (has {', '.join(manifest['splits'])})")
    tokenizer_sha = sha256_file(loaded.tokenizer_file) if loaded.tokenizer_file.is_file() else None
    check_compatible(manifest, tokenizer_sha, loaded.model_cfg.vocab_size, str(data_dir))
    dp = parallel.data_parallel_size(loaded.mesh)
    if batch_size % dp:
        raise UserError(f"--batch-size {batch_size} must be a multiple of the {dp} devices")
    windows = loader.TokenWindows(data_dir, split, manifest, loaded.seq_len)
    batch_sharding = parallel.batch_sharding(loaded.mesh)
    step = jax.jit(functools.partial(eval_step, loaded.graphdef))
    total, count = 0.0, 0.0
    with parallel.activate(loaded.mesh):
        n_batches = -(-min(windows.count, batch_size * max_batches) // batch_size)
        for batch in track(loader.eval_batches(windows, batch_size, max_batches), "evaluate", n_batches):
            loss_sum, n = step(loaded.params, {k: jax.device_put(v, batch_sharding) for k, v in batch.items()})
            total, count = total + float(loss_sum), count + float(n)
    loss = total / count
    metrics = {
        "loss": loss,
        "perplexity": perplexity(loss),
        "tokens": int(count),
        "split": split,
        "step": loaded.step,
        "data": str(data_dir),
    }
    if modelio.locate(model)[0] != "hf":  # a Hugging Face directory is the user's (maybe read-only): leave it be
        write_json_atomic(loaded.home / "metrics.json", metrics)
    return metrics
