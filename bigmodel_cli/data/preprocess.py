"""Raw text files -> tokenizer + packed token arrays (train/val) + manifest.json."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bigmodel_cli.data import tokenizer as tok
from bigmodel_cli.errors import UserError

SUFFIXES = (".txt", ".jsonl")


@dataclass(frozen=True)
class PreprocessConfig:
    inputs: tuple[Path, ...]  # .txt files (one document each) and .jsonl files (one document per line)
    out: Path  # output directory; must not exist or be empty
    vocab_size: int = 8000  # tokenizer size (ignored for char, which sizes itself)
    model_type: str = "bpe"  # bpe, unigram or char
    tokenizer: Path | None = None  # an existing SentencePiece .model instead of training one
    val_fraction: float = 0.1  # share of tokens (from the end of the stream) held out for validation
    text_field: str = "text"  # field of each JSONL record that holds the document


def _expand(inputs: tuple[Path, ...]) -> list[Path]:
    files = []
    for path in inputs:
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
            if not found:
                raise UserError(f"{path} holds no {' or '.join(SUFFIXES)} files: point at text files")
            files += found
        elif path.is_file():
            if path.suffix not in SUFFIXES:
                raise UserError(f"{path}: unsupported file type {path.suffix!r}; use .txt or .jsonl")
            files.append(path)
        else:
            raise UserError(f"input {path} not found: check the path")
    return files


def read_documents(path: Path, text_field: str) -> list[str]:
    """Documents of one file: the whole .txt, or each JSONL record's text field."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{path} is not UTF-8 text (byte {err.start}): convert it or leave it out") from None
    if "\x00" in text:
        raise UserError(f"{path} looks binary (it holds NUL bytes): pass text files only")
    if path.suffix == ".txt":
        return [text] if text.strip() else []
    docs = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}:{number} is not valid JSON ({err.msg}): fix or remove the line") from None
        if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
            raise UserError(f"{path}:{number} has no string field {text_field!r}: pass --text-field NAME")
        docs.append(record[text_field])
    return docs


def run(cfg: PreprocessConfig) -> dict:
    """Tokenize the inputs into cfg.out; returns the manifest."""
    if not 0 < cfg.val_fraction < 1:
        raise UserError(f"--val-fraction must be between 0 and 1, got {cfg.val_fraction}")
    if cfg.out.exists() and (not cfg.out.is_dir() or any(cfg.out.iterdir())):
        raise UserError(f"output {cfg.out} already exists and is not empty: choose a new --out directory")
    files = _expand(cfg.inputs)
    documents = [doc for path in files for doc in read_documents(path, cfg.text_field)]
    if not documents:
        raise UserError("the inputs hold no text: check the files (and --text-field for JSONL)")

    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{cfg.out.name}.tmp-", dir=cfg.out.parent))
    try:
        manifest = _write(cfg, files, documents, staging)
        if cfg.out.exists():
            cfg.out.rmdir()  # empty, checked above
        os.replace(staging, cfg.out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


def _write(cfg: PreprocessConfig, files: list[Path], documents: list[str], staging: Path) -> dict:
    tokenizer_file = staging / "tokenizer.model"
    if cfg.tokenizer is not None:
        tok.Tokenizer(cfg.tokenizer)  # validates before copying
        shutil.copyfile(cfg.tokenizer, tokenizer_file)
    else:
        tok.train(documents, tokenizer_file, cfg.vocab_size, cfg.model_type)
    tokenizer = tok.Tokenizer(tokenizer_file)
    eos = tokenizer.eos_id
    ids = [i for doc in tokenizer.encode(documents, num_threads=os.cpu_count() or 1) for i in (*doc, eos)]
    dtype = np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32
    stream = np.asarray(ids, dtype=dtype)
    n_val = max(1, int(len(stream) * cfg.val_fraction))
    splits = {"train": stream[:-n_val], "val": stream[-n_val:]}
    for name, tokens in splits.items():
        tokens.tofile(staging / f"{name}.bin")
    counts = np.bincount(splits["train"], minlength=tokenizer.vocab_size).astype(np.float64)
    probs = counts[counts > 0] / counts.sum()
    manifest = {
        "format": "bigmodel-tokens-v1",
        "tokenizer": {
            "file": "tokenizer.model",
            "sha256": tok.sha256_file(tokenizer_file),
            "model_type": "given" if cfg.tokenizer is not None else cfg.model_type,
            "vocab_size": tokenizer.vocab_size,
            "bos_id": tokenizer.bos_id,
            "eos_id": eos,
            "pad_id": tokenizer.pad_id,
        },
        "dtype": np.dtype(dtype).name,
        "splits": {name: {"file": f"{name}.bin", "tokens": int(len(t))} for name, t in splits.items()},
        "documents": len(documents),
        "unigram_entropy": float(-(probs * np.log(probs)).sum()),  # nats/token: the loss a model must beat
        "inputs": [{"name": p.name, "bytes": p.stat().st_size, "sha256": tok.sha256_file(p)} for p in files],
    }
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def load_manifest(data_dir: Path) -> dict:
    """Read and sanity-check a preprocess output directory's manifest."""
    manifest_file = Path(data_dir) / "manifest.json"
    if not manifest_file.is_file():
        raise UserError(f"{data_dir} is not a preprocessed data directory (no manifest.json): run bigmodel preprocess")
    try:
        manifest = json.loads(manifest_file.read_text())
        _ = manifest["tokenizer"]["vocab_size"], manifest["splits"]["train"]["tokens"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise UserError(f"{manifest_file} is damaged: rerun bigmodel preprocess into a new directory") from None
    return manifest
