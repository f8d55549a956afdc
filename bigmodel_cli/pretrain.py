"""`bigmodel pretrain`: next-token training on preprocessed (or synthetic) tokens."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import jax

from bigmodel_cli.config import Config
from bigmodel_cli.console import Console
from bigmodel_cli.data import loader
from bigmodel_cli.data.manifest import check_compatible, load_manifest
from bigmodel_cli.data.tokenizer import sha256_file
from bigmodel_cli.errors import UserError
from bigmodel_cli.train import loop


def data_dir(cfg: Config) -> Path:
    """The directory whose tokenizer the run takes: data.path, or a mixture's first part."""
    return loader.load_mixture(cfg.data.mixture)[0][0] if cfg.data.mixture else Path(cfg.data.path)


def resolve(cfg: Config) -> tuple[Config, dict | None]:
    """Fill in what the data decides (vocab size, sequence length) and check the two agree."""
    manifest = None
    vocab = cfg.model.vocab_size
    if cfg.data.synthetic:
        if vocab <= 0:
            raise UserError("data.synthetic needs model.vocab_size: set it in [model] or with --set")
    elif cfg.data.mixture:
        manifest = loader.load_mixture(cfg.data.mixture)[0][2]  # every part has this tokenizer (checked)
    else:
        if not cfg.data.path:
            raise UserError("data.path is not set: point it at a `bigmodel preprocess` output directory")
        if not Path(cfg.data.path).is_dir():
            raise UserError(f"data.path {cfg.data.path} not found: run bigmodel preprocess ... --out DIR first")
        manifest = load_manifest(Path(cfg.data.path))
    if manifest is not None:
        # The run copies this file: a damaged one would be found only by generate or export, much later.
        loader.check_tokenizer(data_dir(cfg), manifest)
        data_vocab = manifest["tokenizer"]["vocab_size"]
        if vocab == 0:
            vocab = data_vocab
        elif vocab < data_vocab:
            raise UserError(
                f"model.vocab_size {vocab} is smaller than the data's tokenizer ({data_vocab}): raise it or leave it 0"
            )
    seq_len = cfg.data.seq_len or cfg.model.max_seq_len
    if seq_len > cfg.model.max_seq_len:
        raise UserError(f"data.seq_len {seq_len} exceeds model.max_seq_len {cfg.model.max_seq_len}: lower it")
    cfg = dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, vocab_size=vocab),
        data=dataclasses.replace(cfg.data, seq_len=seq_len),
    )
    return cfg, manifest


def process_rows(batch_size: int) -> slice:
    """This process's rows of every global batch (all of them on a single host)."""
    n, i = jax.process_count(), jax.process_index()
    per = batch_size // n
    return slice(i * per, (i + 1) * per)


def open_data(cfg: Config, manifest: dict, run_dir: Path):
    """The train and val (None without one) windows, every file checksummed and its token ids checked; when
    resuming, the data checked against the run's tokenizer. Reads only: done before run_dir is touched."""
    seq_len, vocab = cfg.data.seq_len, cfg.model.vocab_size
    if cfg.data.mixture:
        train = loader.open_mixture(cfg.data.mixture, "train", seq_len)
        val = loader.open_mixture(cfg.data.mixture, "val", seq_len)
    else:
        path = Path(cfg.data.path)
        train = loader.TokenWindows(path, "train", manifest, seq_len, vocab)
        # --val-fraction 0 data has no val split: the run trains without validation.
        val = loader.TokenWindows(path, "val", manifest, seq_len, vocab) if "val" in manifest["splits"] else None
    if (run_dir / "tokenizer.model").is_file():  # resuming: the data must fit the run's tokenizer
        check_compatible(manifest, sha256_file(run_dir / "tokenizer.model"), vocab, cfg.data.mixture or cfg.data.path)
    return train, val


def run(
    cfg: Config,
    run_dir: Path,
    *,
    resume: str = "auto",
    allow_config_change: bool = False,
    console: Console | None = None,
) -> dict:
    """Train per the recipe into run_dir; returns the final metrics."""
    console = console or Console()
    cfg, manifest = resolve(cfg)
    loop.check_layout(cfg)  # before the run directory exists: a bad mesh leaves nothing behind
    if manifest is not None and not cfg.data.mixture and "train" not in manifest["splits"]:
        raise UserError(
            f"{cfg.data.path} has no train split (preprocessed with --val-fraction 1, for evaluation only): "
            "preprocess the training text with a smaller --val-fraction"
        )
    # Damaged data is found before the run directory is created or its config rewritten.
    train_windows, val_windows = open_data(cfg, manifest, run_dir) if manifest is not None else (None, None)
    loop.prepare_run_dir(run_dir, cfg, resume, allow_config_change)
    seq_len, batch_size, rows = cfg.data.seq_len, cfg.train.batch_size, process_rows(cfg.train.batch_size)
    meta: dict = {"stage": "pretrain"}
    if manifest is None:
        train_batch = loader.SyntheticBatches(cfg.model.vocab_size, seq_len, batch_size, cfg.train.seed, rows)
        val_batches = None
    else:
        train_batch = loader.TrainBatches(train_windows, batch_size, cfg.train.seed, rows)

        def val_batches():
            return loader.eval_batches(val_windows, batch_size, cfg.train.eval_batches, rows)

        val_batches = val_batches if val_windows is not None else None

        tokenizer_file = data_dir(cfg) / manifest["tokenizer"]["file"]
        if jax.process_index() == 0:
            shutil.copyfile(tokenizer_file, run_dir / "tokenizer.model")  # the run is self-contained (checked)
        meta["tokenizer_sha256"] = manifest["tokenizer"]["sha256"]
        meta["unigram_entropy"] = manifest.get("unigram_entropy")
    return loop.train(
        loop.LoopInputs(
            cfg=cfg,
            run_dir=run_dir,
            train_batch=train_batch,
            val_batches=val_batches,
            seq_len=seq_len,
            meta=meta,
            console=console,
        )
    )
