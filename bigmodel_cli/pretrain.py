"""`bigmodel pretrain`: next-token training on preprocessed (or synthetic) tokens."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax

from bigmodel_cli import parallel, storage
from bigmodel_cli.config import Config
from bigmodel_cli.console import Console
from bigmodel_cli.data import loader
from bigmodel_cli.data.manifest import check_compatible, load_manifest
from bigmodel_cli.data.tokenizer import tokenizer_sha
from bigmodel_cli.errors import UserError
from bigmodel_cli.model import attention
from bigmodel_cli.train import loop


def resolve(cfg: Config) -> tuple[Config, list[loader.DataPart] | None]:
    """Fill in what the data decides (vocab size, sequence length) and check the two agree.

    Returns the config and the data's parts, each manifest read once: data.path as one part, or a mixture's
    parts (the first one's tokenizer is the run's); None for synthetic data.
    """
    parts = None
    vocab = cfg.model.vocab_size
    if cfg.data.synthetic:
        if vocab <= 0:
            raise UserError("data.synthetic needs model.vocab_size: set it in [model] or with --set")
    elif cfg.data.mixture:
        parts = loader.load_mixture(cfg.data.mixture)  # every part has the first one's tokenizer (checked)
    else:
        if not cfg.data.path:
            raise UserError("data.path is not set: point it at a `bigmodel preprocess` output directory")
        data_dir = storage.path(cfg.data.path)  # a gs:// directory is read in place (see data/loader.py)
        if not data_dir.is_dir():
            raise UserError(f"data.path {cfg.data.path} not found: run bigmodel preprocess ... --out DIR first")
        parts = [loader.DataPart(data_dir, 1.0, load_manifest(data_dir))]
    if parts is not None:
        manifest = parts[0].manifest
        # The run copies this file: a damaged one would be found only by generate or export, much later.
        loader.check_tokenizer(parts[0].path, manifest)
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
    return cfg, parts


def open_data(cfg: Config, parts: list[loader.DataPart], run_dir: Path):
    """The train and val (None without one) windows, every file checksummed and its token ids checked; when
    resuming, the data checked against the run's tokenizer. Reads only: done before run_dir is touched."""
    seq_len, vocab = cfg.data.seq_len, cfg.model.vocab_size
    manifest = parts[0].manifest
    if not cfg.data.mixture and "train" not in manifest["splits"]:
        raise UserError(
            f"{cfg.data.path} has no train split (preprocessed with --val-fraction 1, for evaluation only): "
            "preprocess the training text with a smaller --val-fraction"
        )
    if cfg.data.mixture:
        train = loader.open_mixture(parts, "train", seq_len)
        with_val = [p for p in parts if "val" in p.manifest["splits"]]  # as one data.path: no split, no validation
        val = loader.open_mixture(with_val, "val", seq_len) if with_val else None
    else:
        path = parts[0].path
        train = loader.TokenWindows(path, "train", manifest, seq_len, vocab)
        # --val-fraction 0 data has no val split: the run trains without validation.
        val = loader.TokenWindows(path, "val", manifest, seq_len, vocab) if "val" in manifest["splits"] else None
    run_tokenizer = tokenizer_sha(run_dir, manifest["tokenizer"]["sha256"])
    if run_tokenizer is not None:  # resuming: the data must fit the run's tokenizer
        check_compatible(manifest, run_tokenizer, vocab, cfg.data.mixture or cfg.data.path)
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
    cfg, parts = resolve(cfg)
    mesh = parallel.make_mesh(cfg.mesh)  # before the run directory exists: a bad mesh leaves nothing behind
    attention.check_backend(cfg.model)  # likewise an attention kernel this machine lacks
    seq_len, batch_size, rows = (
        cfg.data.seq_len,
        cfg.train.batch_size,
        parallel.process_rows(cfg.train.batch_size, mesh),
    )
    meta: dict = {"stage": "pretrain"}
    if parts is not None:
        meta["tokenizer_sha256"] = parts[0].manifest["tokenizer"]["sha256"]
        meta["unigram_entropy"] = parts[0].manifest.get("unigram_entropy")

    def open_batches() -> loop.Batches:
        if parts is None:
            return loop.Batches(
                loader.SyntheticBatches(cfg.model.vocab_size, seq_len, batch_size, cfg.train.seed, rows)
            )
        train_windows, val_windows = open_data(cfg, parts, run_dir)

        def val_batches():
            return loader.eval_batches(val_windows, batch_size, cfg.train.eval_batches, rows)

        train_batch = loader.TrainBatches(train_windows, batch_size, cfg.train.seed, rows)
        return loop.Batches(train_batch, val_batches if val_windows is not None else None)

    def copy_tokenizer(run_dir: Path) -> None:
        if parts is not None and jax.process_index() == 0:
            # The run is self-contained: the data's tokenizer file (checked) and any config files beside it.
            data_tokenizer = parts[0].manifest["tokenizer"]
            for name in data_tokenizer.get("files", [data_tokenizer["file"]]):
                storage.copy_file(parts[0].path / name, run_dir / name)

    inputs = loop.LoopInputs(
        cfg=cfg, mesh=mesh, run_dir=run_dir, open_batches=open_batches, seq_len=seq_len, meta=meta, console=console
    )
    return loop.run(inputs, resume=resume, allow_config_change=allow_config_change, on_ready=copy_tokenizer)
