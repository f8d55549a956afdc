"""Damaged data is refused in one line (issue #20): shard checksums, the data's tokenizer, truncated
compressed inputs, and token ids beyond the vocabulary."""

import bz2
import gzip
import hashlib
import json
import lzma
import shutil
from pathlib import Path

import numpy as np
import pytest
import zstandard

from bigmodel_cli.data import loader
from bigmodel_cli.data.manifest import load_manifest
from bigmodel_cli.data.preprocess import PreprocessConfig
from bigmodel_cli.data.preprocess import run as preprocess
from bigmodel_cli.errors import UserError
from tests.conftest import pretrain_args, synthetic_text

QUICK = {"train.steps": 2, "checkpoint.every": 2}  # if a refusal is missed, the run it lets through stays short


@pytest.fixture(scope="module")
def trained(cli, tiny_data, tmp_path_factory) -> Path:
    """A run trained for two steps on tiny_data, for evaluate."""
    run = tmp_path_factory.mktemp("integrity") / "run"
    cli(*pretrain_args(run, tiny_data, QUICK))
    return run


def _copy(data: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(data, tmp_path / "data"))


def _flip_bit(path: Path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 1
    path.write_bytes(bytes(raw))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _refused(result, *mentions: str) -> str:
    """The command exited 2 with one line on stderr that holds every one of `mentions`; returns the line."""
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1, result.output + result.stderr
    assert "Traceback" not in result.output and all(m in lines[0] for m in mentions), lines
    return lines[0]


def test_preprocess_writes_a_sha256_of_every_shard_and_index_file(tmp_path):
    (tmp_path / "c.txt").write_text(synthetic_text(400), encoding="utf-8")
    out = tmp_path / "out"
    cfg = PreprocessConfig(
        inputs=(tmp_path / "c.txt",), out=out, model_type="char", txt_mode="line", pack_documents=True,
        shard_tokens=3000, workers=1,
    )  # fmt: skip
    manifest = preprocess(cfg)
    files = [f for split in manifest["splits"].values() for f in split["files"]]
    assert len(files) > 2
    for f in files:
        assert f["sha256"] == _sha256(out / f["file"]) and f["index_sha256"] == _sha256(out / f["index"])
    # A flipped bit in an index file (segment starts) is found as the split is opened, like one in a token file.
    _flip_bit(out / files[0]["index"], 3)
    with pytest.raises(UserError, match=f"{files[0]['index']} is damaged.*rerun bigmodel preprocess"):
        loader.TokenWindows(out, "train", load_manifest(out), 16)


def test_a_bit_flip_in_a_data_shard_is_refused_in_one_line(cli, tiny_data, trained, tmp_path):
    data = _copy(tiny_data, tmp_path)
    for name in ("train-00000.bin", "val-00000.bin"):
        _flip_bit(data / name, (data / name).stat().st_size // 2)
    run = tmp_path / "run"
    _refused(cli(*pretrain_args(run, data, QUICK), ok=False), "train-00000.bin is damaged", "rerun bigmodel preprocess")
    assert not run.exists()  # refused before the run directory was made
    result = cli("evaluate", trained, "--data", data, ok=False)
    _refused(result, "val-00000.bin is damaged", "rerun bigmodel preprocess")


def test_a_damaged_tokenizer_in_the_data_is_refused_before_the_run_directory_exists(cli, tiny_data, tmp_path):
    data = _copy(tiny_data, tmp_path)
    _flip_bit(data / "tokenizer.model", (data / "tokenizer.model").stat().st_size // 2)
    run = tmp_path / "run"
    result = cli(*pretrain_args(run, data, QUICK), ok=False)
    _refused(result, f"{data / 'tokenizer.model'} is damaged or was replaced", "rerun bigmodel preprocess")
    assert not run.exists()


COMPRESSORS = {
    ".zst": lambda raw: zstandard.ZstdCompressor().compress(raw),
    ".gz": gzip.compress,
    ".bz2": bz2.compress,
    ".xz": lzma.compress,
}


@pytest.mark.parametrize("ext", list(COMPRESSORS))
@pytest.mark.parametrize("keep", ["half", "all but the last byte"])
def test_a_truncated_compressed_input_is_refused_and_leaves_no_output(cli, tmp_path, ext, keep):
    packed = COMPRESSORS[ext](synthetic_text(20000).encode())  # several zstd blocks: a cut keeps some
    source = tmp_path / f"corpus.txt{ext}"
    source.write_bytes(packed[: len(packed) // 2 if keep == "half" else -1])
    result = cli("preprocess", source, "--out", tmp_path / "out", "--model-type", "char", ok=False)
    _refused(result, f"corpus.txt{ext} is not a valid {ext} file", "ended before the end")
    assert sorted(p.name for p in tmp_path.iterdir()) == [source.name]  # no --out, no staging directory


@pytest.mark.parametrize("checksums", ["updated by hand", "absent (a manifest from before checksums)"])
def test_token_ids_beyond_the_vocabulary_are_refused_by_pretrain_and_evaluate(
    cli, tiny_data, trained, tmp_path, checksums
):
    data = _copy(tiny_data, tmp_path)
    manifest = json.loads((data / "manifest.json").read_text())
    vocab = manifest["tokenizer"]["vocab_size"]
    for name in ("train-00000.bin", "val-00000.bin"):  # a hand-made shard: two ids past the vocabulary
        ids = np.fromfile(data / name, manifest["dtype"])
        ids[[40, 50]] = [vocab + 3, vocab]
        ids.tofile(data / name)
    _rewrite_checksums(data, manifest, keep=checksums == "updated by hand")
    run = tmp_path / "run"
    line = _refused(cli(*pretrain_args(run, data, QUICK), ok=False), "train-00000.bin holds 2 token ids beyond")
    assert f"the first {vocab + 3} at token 40" in line and "rerun bigmodel preprocess" in line
    assert not run.exists()
    result = cli("evaluate", trained, "--data", data, ok=False)
    _refused(result, "val-00000.bin holds 2 token ids beyond", f"vocabulary of {vocab}", "rerun bigmodel preprocess")
    # The same data with its ids back in range loads, with or without checksums in the manifest.
    for name in ("train-00000.bin", "val-00000.bin"):
        shutil.copyfile(tiny_data / name, data / name)
    _rewrite_checksums(data, manifest, keep=checksums == "updated by hand")
    assert loader.TokenWindows(data, "train", load_manifest(data), 32).count > 0


def _rewrite_checksums(data: Path, manifest: dict, keep: bool) -> None:
    """Write the manifest with each shard's sha256 recomputed (keep) or removed, as in manifests from before."""
    for split in manifest["splits"].values():
        for f in split["files"]:
            if keep:
                f["sha256"] = _sha256(data / f["file"])
            else:
                f.pop("sha256", None)
    (data / "manifest.json").write_text(json.dumps(manifest))
