"""gs:// run directories: `bigmodel pretrain --run-dir gs://...` keeps the whole run in the bucket and resumes
from the bucket alone. Against gcp-storage-emulator, in this process, reached by every client (gcsfs through
etils.epath, TensorStore for Orbax, google-cloud-storage for TensorBoard) through the environment, which the
CLI subprocesses inherit."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.conftest import pretrain_args, run_cli_subprocess

STEPS = 40
SETTINGS = {"train.steps": STEPS, "checkpoint.every": 10, "train.log_every": 5, "train.eval_every": 20}


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


def _start(args, cwd, env):
    return subprocess.Popen(
        [sys.executable, "-m", "bigmodel_cli", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=cwd,
        env={**os.environ, **env},
    )


def test_kill_then_resume_from_the_bucket_alone_is_bit_identical_to_a_local_run(gcs, tiny_data, tmp_path):
    local = tmp_path / "local"
    run_cli_subprocess(*pretrain_args(local, tiny_data, SETTINGS))

    url = f"{gcs}/runs/b"
    run = _bucket(url)
    work, cache = tmp_path / "work", tmp_path / "cache"  # everything local the gs:// run makes
    work.mkdir()
    env = {"BIGMODEL_CACHE_DIR": str(cache)}
    # The data too is made into the bucket, from the same corpus as tiny_data: the run reads it there.
    data = f"{gcs}/data"
    run_cli_subprocess("preprocess", tiny_data.parent / "corpus.txt", "--out", data, "--model-type", "char", cwd=work)
    assert (_bucket(data) / "manifest.json").is_file() and list(work.iterdir()) == []
    args = pretrain_args(url, data, SETTINGS)
    proc = _start(args, work, env)
    deadline = time.time() + 180
    while not (run / "checkpoints" / "20" / "commit_success.txt").exists():
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert json.loads((run / "status.json").read_text())["state"] == "running"
    assert max(_steps((run / "metrics.jsonl").read_text())) < STEPS, "the run finished before it was killed"
    shutil.rmtree(work)
    shutil.rmtree(cache, ignore_errors=True)
    work.mkdir()

    resumed = run_cli_subprocess(*args, cwd=work, env=env)  # the lock object of the killed run is taken over
    assert "resumed from step" in resumed.stdout + resumed.stderr
    status = json.loads((run / "status.json").read_text())
    assert (status["state"], status["step"]) == ("finished", STEPS)
    assert _steps((run / "metrics.jsonl").read_text()) == list(range(5, STEPS + 1, 5))  # each step once
    final_local, final_bucket = _params(local / "checkpoints" / str(STEPS)), _params(run / "checkpoints" / str(STEPS))
    assert final_local.keys() == final_bucket.keys()
    for name, value in final_local.items():
        assert np.array_equal(value, final_bucket[name]), name
    assert list(work.iterdir()) == []  # no ./gs:/bucket/..., nothing written locally
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


def test_a_damaged_checkpoint_in_the_bucket_is_moved_aside_and_the_previous_one_used(gcs, tiny_data, tmp_path):
    url = f"{gcs}/runs/c"
    run = _bucket(url)
    args = pretrain_args(url, tiny_data, {**SETTINGS, "train.steps": 20})
    run_cli_subprocess(*args, cwd=tmp_path)
    import fsspec

    fs, params = fsspec.core.url_to_fs(f"{url}/checkpoints/20/params")
    chunks = [name for name in fs.find(params) if "/d/" in name]  # the arrays' data files
    assert chunks
    fs.rm(chunks)

    rerun = run_cli_subprocess(*args, cwd=tmp_path)
    assert "checkpoint gs://bucket/runs/c/checkpoints/20 is damaged" in rerun.stdout + rerun.stderr
    assert "resumed from step 10" in rerun.stdout + rerun.stderr
    names = {p.name for p in (run / "checkpoints").iterdir()}
    assert {"20", "20.corrupt-1"} <= names
    status = json.loads((run / "status.json").read_text())
    assert (status["state"], status["step"]) == ("finished", 20)


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
