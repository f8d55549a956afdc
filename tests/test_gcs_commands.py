"""gs:// runs beyond pretrain: `runs`, `report`, `evaluate`, `generate` and `export` read a run kept in the bucket
and write their outputs there (or locally), with the same results as on a local copy of the same run. Against
the emulated bucket of tests/gcs_emulator.py."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import pretrain_args, run_cli_subprocess

SETTINGS = {"train.steps": 10, "checkpoint.every": 10, "train.log_every": 5, "train.eval_every": 10}
PROMPT = ["--prompt", "the ", "--max-new-tokens", "24", "--temperature", "0"]


def _bucket(url: str):
    from etils import epath

    return epath.Path(url)


def _tensors(data: bytes) -> dict[str, np.ndarray]:
    from safetensors.numpy import load

    return load(data)


def test_commands_read_a_bucket_run_and_write_to_the_bucket(gcs, tiny_data, tmp_path, monkeypatch, cli):
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    local = tmp_path / "local"
    url = f"{gcs}/runs/a"
    # The same recipe, data and seed: the bucket run and the local run hold the same parameters.
    run_cli_subprocess(*pretrain_args(local, tiny_data, SETTINGS))
    run_cli_subprocess(*pretrain_args(url, tiny_data, SETTINGS), cwd=work)

    # runs: lists the bucket's run with its step and status.
    listed = [json.loads(line) for line in cli("--log-format", "json", "runs", f"{gcs}/runs").stdout.splitlines()]
    assert [(r["path"], r["step"], r["status"]) for r in listed] == [(url, 10, "finished")]

    # report: a PNG (locally) from the bucket's metrics.
    cli("report", url, "--out", tmp_path / "report.png")
    assert (tmp_path / "report.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")

    # evaluate: metrics.json lands in the bucket's run, with the local run's loss.
    cli("evaluate", url, "--data", tiny_data)
    cli("evaluate", local, "--data", tiny_data)
    in_bucket = json.loads((_bucket(url) / "metrics.json").read_text())
    here = json.loads((local / "metrics.json").read_text())
    assert in_bucket["loss"] == here["loss"] and in_bucket["step"] == here["step"] == 10
    cli("evaluate", url, "--data", tiny_data, "--out", f"{gcs}/evals/a")  # --out in the bucket too
    assert json.loads((_bucket(gcs) / "evals" / "a" / "metrics.json").read_text())["loss"] == here["loss"]

    # generate: the bucket run's tokenizer and checkpoint give the local run's text.
    text = cli("generate", url, *PROMPT).stdout
    assert text == cli("generate", local, *PROMPT).stdout and text.strip()

    # export --format hf into the bucket: the local export's tensors and files, config.json among them.
    hf_url = f"{gcs}/exports/hf"
    cli("export", url, "--format", "hf", "--out", hf_url)
    cli("export", local, "--format", "hf", "--out", tmp_path / "hf")
    exported = _bucket(hf_url)
    assert {p.name for p in exported.iterdir()} == {p.name for p in (tmp_path / "hf").iterdir()}
    ours, theirs = (
        _tensors((exported / "model.safetensors").read_bytes()),
        _tensors((tmp_path / "hf" / "model.safetensors").read_bytes()),
    )
    assert ours.keys() == theirs.keys() and all(np.array_equal(ours[k], theirs[k]) for k in ours)
    assert (exported / "config.json").read_text() == (tmp_path / "hf" / "config.json").read_text()
    # A non-empty gs:// --out is refused, as a local one is.
    refused = cli("export", url, "--format", "hf", "--out", hf_url, ok=False)
    assert refused.exit_code != 0 and "already exists and is not empty" in refused.output + refused.stderr

    # export --format bigmodel into the bucket, then loaded back from there: the same text again.
    native_url = f"{gcs}/exports/native"
    cli("export", url, "--out", native_url)
    assert cli("generate", native_url, *PROMPT).stdout == text

    # a checkpoint of the bucket run, named by its step
    assert cli("generate", f"{url}/checkpoints/10", *PROMPT).stdout == text

    # finetune from the bucket run into the bucket: its task.json there, evaluated and exported with its task.
    rows = ["label,text"] + [
        f"{'pos' if i % 2 else 'neg'},{'good fine' if i % 2 else 'bad poor'} {i}" for i in range(24)
    ]
    (tmp_path / "cls.csv").write_text("\n".join(rows) + "\n")
    ft_url = f"{gcs}/runs/ft"
    ft = ["--task", "classify", "--init-from", url, "--data", tmp_path / "cls.csv", "--run-dir", ft_url]
    cli("finetune", *ft, "--set", "train.steps=2", "--set", "train.batch_size=8", "--set", "checkpoint.every=2")
    assert json.loads((_bucket(ft_url) / "task.json").read_text())["task"] == "classify"
    assert (_bucket(ft_url) / "tokenizer.model").read_bytes() == (local / "tokenizer.model").read_bytes()
    task_file = _bucket(gcs) / "tasks" / "cls.csv"  # a task file in the bucket, read where it lies
    task_file.write_text((tmp_path / "cls.csv").read_text())
    cli("evaluate", ft_url, "--task", "classify", "--data", str(task_file))
    assert "accuracy" in json.loads((_bucket(ft_url) / "eval-classify" / "metrics.json").read_text())
    cli("export", ft_url, "--out", f"{gcs}/exports/ft")
    assert json.loads((_bucket(gcs) / "exports" / "ft" / "task.json").read_text())["task"] == "classify"

    assert not (work / "gs:").exists() and list(work.iterdir()) == []  # nothing collapsed into ./gs:/...


def test_a_bucket_new_dir_is_uploaded_only_when_its_block_succeeds_with_top_level_json_last(gcs, tmp_path, monkeypatch):
    from bigmodel_cli import atomic, storage
    from bigmodel_cli.errors import UserError

    out = _bucket(f"{gcs}/out")
    try:
        with atomic.new_dir(out, "output") as staging:
            (staging / "weights.bin").write_bytes(b"w")
            raise RuntimeError("killed")
    except RuntimeError:
        pass
    assert not staging.exists() and not out.exists()  # nothing uploaded, the local staging removed

    uploaded = []
    copy = storage.copy_file
    monkeypatch.setattr(storage, "copy_file", lambda src, dst: (uploaded.append(str(dst)), copy(src, dst)))
    with atomic.new_dir(out, "output") as staging:
        (staging / "config.json").write_text("{}")
        (staging / "sub").mkdir()
        (staging / "sub" / "a.json").write_text("[]")
        (staging / "weights.bin").write_bytes(b"w")
    assert uploaded == [f"{out}/sub/a.json", f"{out}/weights.bin", f"{out}/config.json"]
    assert (out / "weights.bin").read_bytes() == b"w" and not staging.exists()
    with pytest.raises(UserError, match="already exists and is not empty"):
        with atomic.new_dir(out, "output"):
            pass
