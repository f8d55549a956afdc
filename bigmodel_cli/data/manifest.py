"""A preprocessed data directory's manifest.json, read back: the files of each split and whether a model can
use the data. bigmodel_cli/data/preprocess.py writes it."""

from __future__ import annotations

import json
from pathlib import Path

from bigmodel_cli import storage
from bigmodel_cli.errors import UserError

MANIFEST_FILE = "manifest.json"  # in a preprocessed data directory: its splits, shards, checksums and tokenizer


def split_files(manifest: dict, split: str) -> list[dict]:
    """The files of a split as [{file, tokens, index?}], for both this format and the one-file v1."""
    info = manifest["splits"][split]
    if "files" in info:
        return info["files"]
    return [{"file": info["file"], "tokens": info["tokens"]}]


def load_manifest(data_dir: Path) -> dict:
    """Read and sanity-check a preprocess output directory's manifest, leaving out splits that hold no tokens.

    The file lists both splits always (one may be empty, made with --val-fraction 0 or 1); a reader asking for
    an empty one then gets "DIR has no 'val' split (has train)", not a complaint about sequence lengths."""
    manifest_file = storage.path(data_dir) / MANIFEST_FILE  # a URL stays whole
    if not manifest_file.is_file():
        raise UserError(f"{data_dir} is not a preprocessed data directory (no manifest.json): run bigmodel preprocess")
    try:
        manifest = json.loads(manifest_file.read_text())
        _ = manifest["tokenizer"]["vocab_size"]
        for split in manifest["splits"]:
            _ = [(f["file"], f["tokens"]) for f in split_files(manifest, split)]
        manifest["splits"] = {name: info for name, info in manifest["splits"].items() if info["tokens"] > 0}
        if not manifest["splits"]:
            raise KeyError("splits")
    except (json.JSONDecodeError, KeyError, TypeError):
        raise UserError(f"{manifest_file} is damaged: rerun bigmodel preprocess into a new directory") from None
    return manifest


def check_compatible(manifest: dict, tokenizer_sha256: str | None, vocab_size: int, what: str = "the data") -> None:
    """Refuse data made with another tokenizer, or with more token ids than the model has (one-line UserError).

    tokenizer_sha256 None skips the tokenizer check (a model trained on synthetic tokens has none)."""
    info = manifest["tokenizer"]
    if tokenizer_sha256 is not None and info["sha256"] != tokenizer_sha256:
        raise UserError(
            f"{what} was tokenized with a different tokenizer (sha256 {info['sha256'][:12]}) than the model's "
            f"({tokenizer_sha256[:12]}): preprocess it with --tokenizer MODEL_DIR"
        )
    if info["vocab_size"] > vocab_size:
        raise UserError(
            f"{what} has a vocabulary of {info['vocab_size']} tokens but the model only {vocab_size}: "
            f"use data made with the model's tokenizer (or a model with model.vocab_size >= {info['vocab_size']})"
        )
