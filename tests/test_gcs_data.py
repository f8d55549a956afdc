"""Preprocessed data in a bucket (data.path = gs://...) is read in place: every object streamed through sha256
once when a split is opened, then each window one ranged read, with no local copy (bigmodel_cli/data/loader.py
says why no cache). Against the gcp-storage-emulator bucket of tests/gcs_emulator.py."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

from bigmodel_cli import storage
from bigmodel_cli.data import loader
from bigmodel_cli.data.manifest import load_manifest
from bigmodel_cli.data.mixture import resolve_mixture
from bigmodel_cli.data.preprocess import PreprocessConfig
from bigmodel_cli.data.preprocess import run as preprocess
from bigmodel_cli.errors import UserError
from tests.conftest import pretrain_args, run_cli_subprocess, synthetic_text

SETTINGS = {"train.steps": 6, "train.log_every": 2, "train.eval_every": 4, "checkpoint.every": 6}


def _upload(local: Path, url: str) -> str:
    """A preprocessed directory's files copied into the bucket under url (one object each)."""
    for file in sorted(local.iterdir()):
        storage.copy_file(file, f"{url}/{file.name}")
    return url


def _flip_bit(url: str, offset: int) -> None:
    obj = storage.path(url)
    raw = bytearray(obj.read_bytes())
    raw[offset] ^= 1
    obj.write_bytes(bytes(raw))


def _metrics(run: Path) -> list[dict]:
    """Each logged step's loss and val_loss (timings left out: they differ between any two runs)."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: row[k] for k in ("step", "loss", "val_loss") if k in row} for row in rows]


@pytest.fixture
def packed(tmp_path_factory) -> Path:
    """Packed documents (index files) in several shards, so windows cross file ends."""
    root = tmp_path_factory.mktemp("packed")
    (root / "c.txt").write_text(synthetic_text(400), encoding="utf-8")
    out = root / "out"
    cfg = PreprocessConfig(
        inputs=(root / "c.txt",), out=out, model_type="char", txt_mode="line", pack_documents=True,
        shard_tokens=3000, workers=1,
    )  # fmt: skip
    preprocess(cfg)
    return out


def test_windows_read_from_the_bucket_by_ranges_equal_the_local_ones(gcs, packed, monkeypatch):
    url = _upload(packed, f"{gcs}/packed")
    reads = []
    plain_read = storage.read_range
    monkeypatch.setattr(storage, "read_range", lambda *a: reads.append(a[2] - a[1]) or plain_read(*a))
    local = loader.TokenWindows(packed, "train", load_manifest(packed), 16)
    remote = loader.TokenWindows(url, "train", load_manifest(url), 16)
    assert str(remote.data_dir) == url  # not collapsed to gs:/bucket/...
    assert len(remote.shards) > 2 and not any(isinstance(s, np.memmap) for s in remote.shards)
    assert reads == []  # opening streams the objects through the hash, by no ranged read
    for key in range(remote.count):
        mine, theirs = loader.batch_of(local, [key]), loader.batch_of(remote, [key])
        assert all(np.array_equal(mine[n], theirs[n]) for n in ("inputs", "targets", "segment_ids", "positions"))
    # One ranged read of 17 int32/uint16 tokens per window, two where it crosses a shard's end: never a whole file.
    assert max(reads) <= 17 * np.dtype(load_manifest(packed)["dtype"]).itemsize
    assert remote.count <= len(reads) <= remote.count + len(remote.shards)


def test_a_mixture_may_name_directories_in_a_bucket(gcs, packed, tiny_data):
    url = _upload(packed, f"{gcs}/packed")
    assert resolve_mixture(f"{url}:3, rel:1", Path("/base")) == f"{url}:3,{Path('/base/rel').resolve()}:1"
    mix = loader.open_mixture(loader.load_mixture(f"{url}:3,{packed}:1"), "train", 16)
    for key in (0, 1, 5):
        batch = loader.batch_of(mix, [key])
        part, index = mix.sequential(key)
        assert np.array_equal(batch["inputs"][0], mix.parts[part].window(index)[:-1])
    assert np.array_equal(mix.parts[0].window(3), mix.parts[1].window(3))  # the same data, read both ways


def test_pretrain_on_data_in_the_bucket_equals_pretrain_on_the_local_copy_and_copies_nothing(
    cli, gcs, tiny_data, tmp_path, monkeypatch
):
    url = _upload(tiny_data, f"{gcs}/data")
    cli(*pretrain_args(tmp_path / "local", tiny_data, SETTINGS))
    work, scratch = tmp_path / "work", tmp_path / "tmp"
    work.mkdir(), scratch.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("TMPDIR", str(scratch))
    monkeypatch.setattr(tempfile, "tempdir", None)  # gettempdir() reads TMPDIR again
    cli(*pretrain_args(tmp_path / "bucket", url, SETTINGS))
    assert _metrics(tmp_path / "bucket") == _metrics(tmp_path / "local")
    assert len(_metrics(tmp_path / "bucket")) == 3
    # No copy of the data anywhere: not in the working or temporary directory, not in the run.
    assert list(work.iterdir()) == [] and list(scratch.iterdir()) == []
    names = [name for _, _, files in os.walk(tmp_path / "bucket") for name in files]
    assert not [n for n in names if n.endswith(".bin")]
    assert (tmp_path / "bucket" / "tokenizer.model").read_bytes() == (tiny_data / "tokenizer.model").read_bytes()


def test_a_bit_flip_in_a_shard_in_the_bucket_is_refused_in_one_line(cli, gcs, tiny_data, tmp_path):
    url = _upload(tiny_data, f"{gcs}/data")
    _flip_bit(f"{url}/train-00000.bin", (tiny_data / "train-00000.bin").stat().st_size // 2)
    run = tmp_path / "run"
    # In its own process: the emulator, in this one, logs the connections a client closes early to stderr.
    result = run_cli_subprocess(*pretrain_args(run, url, SETTINGS), check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stdout + result.stderr
    assert f"{url}/train-00000.bin is damaged" in lines[0] and "rerun bigmodel preprocess" in lines[0]
    assert not run.exists()  # refused before the run directory was made


def test_a_damaged_tokenizer_or_missing_directory_in_the_bucket_is_refused(cli, gcs, tiny_data, tmp_path):
    url = _upload(tiny_data, f"{gcs}/data")
    _flip_bit(f"{url}/tokenizer.model", 100)
    result = cli(*pretrain_args(tmp_path / "run", url, SETTINGS), ok=False)
    assert result.exit_code == 2 and f"{url}/tokenizer.model is damaged or was replaced" in result.stderr
    result = cli(*pretrain_args(tmp_path / "run", f"{gcs}/nothing", SETTINGS), ok=False)
    assert result.exit_code == 2 and f"data.path {gcs}/nothing not found" in result.stderr
    with pytest.raises(UserError, match="no manifest.json"):
        load_manifest(f"{gcs}/nothing")


def test_token_ids_beyond_the_vocabulary_in_the_bucket_are_refused(gcs, tiny_data, tmp_path):
    data = Path(shutil.copytree(tiny_data, tmp_path / "data"))
    manifest = json.loads((data / "manifest.json").read_text())
    ids = np.fromfile(data / "train-00000.bin", manifest["dtype"])
    ids[7] = manifest["tokenizer"]["vocab_size"] + 5
    ids.tofile(data / "train-00000.bin")
    manifest["splits"]["train"]["files"][0]["sha256"] = hashlib.sha256(ids.tobytes()).hexdigest()  # checksum fits
    (data / "manifest.json").write_text(json.dumps(manifest))
    url = _upload(data, f"{gcs}/data")
    with pytest.raises(UserError, match=r"train-00000.bin holds 1 token ids beyond .* \(the first \d+ at token 7"):
        loader.TokenWindows(url, "train", load_manifest(url), 16)


def test_preprocess_reads_inputs_in_a_bucket_as_it_reads_them_here(cli, gcs, tmp_path):
    """A gs:// file, prefix or glob pattern is read where it lies (compressed text, JSON Lines and Parquet alike),
    into the tokens and manifest the same files give on local disk."""
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq

    local = tmp_path / "corpus"
    (local / "more").mkdir(parents=True)
    (local / "a.txt.gz").write_bytes(gzip.compress(synthetic_text(60, seed=1).encode()))
    rows = [{"text": line} for line in synthetic_text(40, seed=2).splitlines() if line]
    (local / "more" / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pq.write_table(pa.table({"text": [r["text"] for r in rows[::-1]]}), local / "more" / "c.parquet")
    for file in sorted(p for p in local.rglob("*") if p.is_file()):
        storage.copy_file(file, f"{gcs}/corpus/{file.relative_to(local).as_posix()}")

    def tokens_and_inputs(*inputs) -> tuple[bytes, list]:
        out = tmp_path / f"out{len(list(tmp_path.iterdir()))}"
        cli("preprocess", *inputs, "--out", out, "--model-type", "char", "--val-fraction", "0")
        manifest = load_manifest(out)
        data = b"".join((out / f["file"]).read_bytes() for f in manifest["splits"]["train"]["files"])
        return data, manifest["inputs"]

    here = tokens_and_inputs(local)
    assert tokens_and_inputs(f"{gcs}/corpus") == here  # a prefix, as a directory
    patterns = (str(local / "a.txt.gz"), str(local / "more" / "*"))
    assert tokens_and_inputs(f"{gcs}/corpus/a.txt.gz", f"{gcs}/corpus/more/*") == tokens_and_inputs(*patterns)
    missing = cli("preprocess", f"{gcs}/corpus/nothing.txt", "--out", tmp_path / "none", ok=False)
    assert missing.exit_code == 2 and f"input {gcs}/corpus/nothing.txt not found" in missing.stderr
    deep = cli("preprocess", f"{gcs}/corpus/**/*.jsonl", "--out", tmp_path / "none", ok=False)
    assert deep.exit_code == 2 and "cannot hold **: name the prefix itself" in deep.stderr
