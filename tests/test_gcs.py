"""gs:// run directories: `bigmodel pretrain --run-dir gs://...` keeps the whole run in the bucket and resumes
from the bucket alone; `runs`, `report`, `evaluate`, `generate`, `export` and `finetune` read a run kept in the
bucket and write their outputs there (or locally), with the same results as on a local run of the same recipe.
Against gcp-storage-emulator, in this process, reached by every client (gcsfs through etils.epath, TensorStore
for Orbax, google-cloud-storage for TensorBoard) through the environment, which the CLI subprocesses inherit.
One bucket run, made once (`bucket_run`), serves every test that needs a trained run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest

from tests.conftest import pretrain_args
from tests.gcs_emulator import forget_listings, restore_bucket, saved_bucket, use_the_bucket

STEPS = 40
SETTINGS = {"train.steps": STEPS, "checkpoint.every": 10, "train.log_every": 5, "train.eval_every": 20}
PROMPT = ["--prompt", "the ", "--max-new-tokens", "24", "--temperature", "0"]


def _bucket(url: str):
    from etils import epath

    return epath.Path(url)


def _steps(metrics_text: str) -> list[int]:
    return [json.loads(line)["step"] for line in metrics_text.splitlines()]


def _params(checkpoint) -> dict:
    """A checkpoint's params as host arrays, read by Orbax from a local or gs:// step directory."""
    import jax
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as reader:
        tree = reader.restore(checkpoint / "params")
    return {jax.tree_util.keystr(path): np.asarray(x) for path, x in jax.tree_util.tree_leaves_with_path(tree)}


def _tensors(data: bytes) -> dict[str, np.ndarray]:
    from safetensors.numpy import load

    return load(data)


def _start(args, cwd):
    return subprocess.Popen(
        [sys.executable, "-m", "bigmodel_cli", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=cwd,
    )


@pytest.fixture(scope="module")
def bucket_run(gcs_server, tiny_data, cli, tmp_path_factory) -> SimpleNamespace:
    """A gs:// run made as a preempted VM makes it: its data preprocessed into the bucket, trained there,
    SIGKILLed after checkpoint 20 and resumed on a clean machine from the bucket alone; and a local run of the same
    recipe, data and seed. What was seen on the way, and a copy of the bucket's objects, which `bucket` puts back
    into each test's emptied bucket."""
    root = tmp_path_factory.mktemp("bucket_run")
    local = root / "local"
    cli(*pretrain_args(local, tiny_data, SETTINGS))
    seen = {}
    work = root / "work"  # everything local the gs:// run makes, but for its compiled programs (the suite's cache)
    work.mkdir()
    with pytest.MonkeyPatch.context() as patch:
        gcs = use_the_bucket(gcs_server, patch)
        patch.chdir(work)
        url, data = f"{gcs}/runs/b", f"{gcs}/data"
        run = _bucket(url)
        # The data too is made into the bucket, from the same corpus as tiny_data: the run reads it there.
        cli("preprocess", tiny_data.parent / "corpus.txt", "--out", data, "--model-type", "char")
        seen["manifest in the bucket"] = (_bucket(data) / "manifest.json").is_file()
        seen["local files after preprocess"] = list(work.iterdir())
        args = pretrain_args(url, data, SETTINGS)
        proc = _start(args, work)
        try:
            deadline = time.time() + 180
            while not (run / "checkpoints" / "20" / "commit_success.txt").exists():
                assert proc.poll() is None, proc.stdout.read()
                assert time.time() < deadline, "no checkpoint appeared"
                time.sleep(0.1)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        forget_listings()
        seen["state when killed"] = json.loads((run / "status.json").read_text())["state"]
        seen["last step when killed"] = max(_steps((run / "metrics.jsonl").read_text()))
        patch.chdir(root)  # out of work, which goes with everything else the killed process left locally
        shutil.rmtree(work)
        work.mkdir()
        patch.chdir(work)
        forget_listings()
        resumed = cli(*args)  # the lock object of the killed run is taken over
        seen["resumed output"] = resumed.stdout + resumed.stderr
        seen["local files after resume"] = list(work.iterdir())
        saved = saved_bucket(gcs_server)
        forget_listings()
    return SimpleNamespace(local=local, url=url, data=data, saved=saved, seen=seen)


@pytest.fixture
def bucket(gcs, gcs_server, bucket_run) -> SimpleNamespace:
    """The bucket as bucket_run left it."""
    restore_bucket(gcs_server, bucket_run.saved)
    return bucket_run


def test_kill_then_resume_from_the_bucket_alone_is_bit_identical_to_a_local_run(bucket, tiny_data, tmp_path):
    seen, run, local = bucket.seen, _bucket(bucket.url), bucket.local
    assert seen["manifest in the bucket"] and seen["local files after preprocess"] == []
    assert seen["state when killed"] == "running"
    assert seen["last step when killed"] < STEPS, "the run finished before it was killed"
    assert "resumed from step" in seen["resumed output"]
    status = json.loads((run / "status.json").read_text())
    assert (status["state"], status["step"]) == ("finished", STEPS)
    assert _steps((run / "metrics.jsonl").read_text()) == list(range(5, STEPS + 1, 5))  # each step once
    final_local, final_bucket = _params(local / "checkpoints" / str(STEPS)), _params(run / "checkpoints" / str(STEPS))
    assert final_local.keys() == final_bucket.keys()
    for name, value in final_local.items():
        assert np.array_equal(value, final_bucket[name]), name
    assert seen["local files after resume"] == []  # no ./gs:/bucket/..., nothing written locally
    # The whole run is in the bucket, and the lock object is released (deleted).
    names = {p.name for p in run.iterdir()}
    assert {"config.toml", "status.json", "metrics.jsonl", "tokenizer.model", "checkpoints", "tensorboard"} <= names
    assert (run / "tokenizer.model").read_bytes() == (tiny_data / "tokenizer.model").read_bytes()
    assert not [name for name in names if name.startswith("bigmodel.lock")]
    # TensorBoard's events in the bucket are whole event files: the resumed run's losses read back.
    events = tmp_path / "tensorboard"
    events.mkdir()
    for event_file in (run / "tensorboard").iterdir():
        (events / event_file.name).write_bytes(event_file.read_bytes())
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events))
    acc.Reload()
    loss_tags = [tag for tag in acc.Tags()["scalars"] if tag.endswith("loss") and "val" not in tag]
    assert loss_tags and {e.step for e in acc.Scalars(loss_tags[0])} >= set(range(25, STEPS + 1, 5))


def test_a_damaged_checkpoint_in_the_bucket_is_moved_aside_and_the_previous_one_used(
    bucket, cli, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    url, run = bucket.url, _bucket(bucket.url)
    import fsspec

    fs, params = fsspec.core.url_to_fs(f"{url}/checkpoints/{STEPS}/params")
    chunks = [name for name in fs.find(params) if "/d/" in name]  # the arrays' data files
    assert chunks
    fs.rm(chunks)
    forget_listings()

    rerun = cli(*pretrain_args(url, bucket.data, SETTINGS))
    assert f"checkpoint {url}/checkpoints/{STEPS} is damaged" in rerun.stdout + rerun.stderr
    assert f"resumed from step {STEPS - 10}" in rerun.stdout + rerun.stderr
    names = {p.name for p in (run / "checkpoints").iterdir()}
    assert {str(STEPS), f"{STEPS}.corrupt-1"} <= names
    status = json.loads((run / "status.json").read_text())
    assert (status["state"], status["step"]) == ("finished", STEPS)


def test_the_lock_object_of_a_live_holder_refuses_a_stale_one_is_taken_over(gcs, monkeypatch):
    from bigmodel_cli import rundir
    from bigmodel_cli.errors import UserError

    run = _bucket(f"{gcs}/runs/locked")
    lock = run / rundir.LOCK_FILE
    other = {"host": "elsewhere", "pid": 4242, "since": "2026-01-01 00:00:00 UTC"}
    lock.write_text(json.dumps({**other, "refreshed": time.time()}))
    with pytest.raises(UserError, match="in use by another bigmodel process \\(pid 4242 on host elsewhere"):
        rundir.lock(run)

    lock.write_text(json.dumps({**other, "refreshed": time.time() - rundir.LOCK_STALE_S - 1}))
    monkeypatch.setattr(rundir, "LOCK_REFRESH_S", 0.05)
    rundir.lock(run)
    try:
        mine = json.loads(lock.read_text())
        assert (mine["host"], mine["pid"]) == (socket.gethostname(), os.getpid())
        time.sleep(0.5)
        assert json.loads(lock.read_text())["refreshed"] > mine["refreshed"]  # kept fresh while held
    finally:
        rundir.unlock(run)
    assert not lock.exists()  # released: deleted, so that the next run on any host starts at once


def test_commands_read_a_bucket_run_and_write_to_the_bucket(bucket, tiny_data, tmp_path, monkeypatch, cli):
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    gcs, url = "gs://bucket", bucket.url
    # The same recipe, data and seed: the bucket run and the local run hold the same parameters.
    local = shutil.copytree(bucket.local, tmp_path / "local")

    # runs: lists the bucket's run with its step and status.
    listed = [json.loads(line) for line in cli("--log-format", "json", "runs", f"{gcs}/runs").stdout.splitlines()]
    assert [(r["path"], r["step"], r["status"]) for r in listed] == [(url, STEPS, "finished")]

    # report: a PNG (locally) from the bucket's metrics.
    cli("report", url, "--out", tmp_path / "report.png")
    assert (tmp_path / "report.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")

    # evaluate: metrics.json lands in the bucket's run, with the local run's loss.
    cli("evaluate", url, "--data", tiny_data)
    cli("evaluate", local, "--data", tiny_data)
    in_bucket = json.loads((_bucket(url) / "metrics.json").read_text())
    here = json.loads((local / "metrics.json").read_text())
    assert in_bucket["loss"] == here["loss"] and in_bucket["step"] == here["step"] == STEPS
    cli("evaluate", url, "--data", tiny_data, "--out", f"{gcs}/evals/a")  # --out in the bucket too
    assert json.loads((_bucket(gcs) / "evals" / "a" / "metrics.json").read_text())["loss"] == here["loss"]
    (tmp_path / "held.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 20)
    (_bucket(gcs) / "held.txt").write_text((tmp_path / "held.txt").read_text())
    by_text = [
        json.loads(cli("evaluate", url, "--text", t, "--json").stdout)
        for t in (tmp_path / "held.txt", f"{gcs}/held.txt")
    ]
    assert by_text[1].pop("text") == f"{gcs}/held.txt" and by_text[0].pop("text") == str(tmp_path / "held.txt")
    assert by_text[0] == by_text[1] and by_text[0]["bytes"] == 44 * 20  # --text read where it lies

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
    assert cli("generate", f"{url}/checkpoints/{STEPS}", *PROMPT).stdout == text

    # finetune from the bucket run into the bucket: its task.json there, evaluated and exported with its task.
    rows = ["label,text"] + [
        f"{'pos' if i % 2 else 'neg'},{'good fine' if i % 2 else 'bad poor'} {i}" for i in range(24)
    ]
    task_file = _bucket(gcs) / "tasks" / "cls.csv"  # a task file in the bucket, read where it lies
    task_file.write_text("\n".join(rows) + "\n")
    ft_url = f"{gcs}/runs/ft"
    ft = ["--task", "classify", "--init-from", url, "--data", str(task_file), "--run-dir", ft_url]
    cli("finetune", *ft, "--set", "train.steps=2", "--set", "train.batch_size=8", "--set", "checkpoint.every=2")
    assert json.loads((_bucket(ft_url) / "task.json").read_text())["task"] == "classify"
    assert (_bucket(ft_url) / "tokenizer.model").read_bytes() == (local / "tokenizer.model").read_bytes()
    cli("evaluate", ft_url, "--task", "classify", "--data", str(task_file))
    assert "accuracy" in json.loads((_bucket(ft_url) / "eval-classify" / "metrics.json").read_text())
    cli("export", ft_url, "--out", f"{gcs}/exports/ft")
    assert json.loads((_bucket(gcs) / "exports" / "ft" / "task.json").read_text())["task"] == "classify"

    assert not (work / "gs:").exists() and list(work.iterdir()) == []  # nothing collapsed into ./gs:/...
