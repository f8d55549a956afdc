"""How a run starts and ends: config changes checked first, one writer per run directory, exit codes and a true
status.json after signals, disk full and a batch that cannot fit (issue #20)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bigmodel_cli import rundir
from tests.conftest import pretrain_args, run_cli_subprocess, synthetic_text

LONG = {"train.steps": 400, "checkpoint.every": 5, "checkpoint.keep": 2, "train.log_every": 5}  # stopped early


def _status(run: Path) -> dict:
    return json.loads((run / "status.json").read_text())


def _partial_checkpoints(run: Path) -> list[str]:
    return [p.name for p in (run / "checkpoints").glob(rundir.PARTIAL_CHECKPOINT)]


def _start(run: Path, data: Path, tmp_path: Path, settings: dict = LONG) -> tuple[subprocess.Popen, Path, Path]:
    """A training process in the background, its output in files (a full pipe would block it)."""
    out, err = tmp_path / f"{run.name}.out", tmp_path / f"{run.name}.err"
    with out.open("w") as stdout, err.open("w") as stderr:
        args = [sys.executable, "-m", "bigmodel_cli", *map(str, pretrain_args(run, data, settings))]
        proc = subprocess.Popen(args, stdout=stdout, stderr=stderr, text=True)
    return proc, out, err


def _wait_for_checkpoint(run: Path, proc: subprocess.Popen, err: Path, step: int = 5) -> int:
    """Wait until the run has a checkpoint at or after `step` (so it holds the lock and is training)."""
    deadline = time.time() + 180
    while rundir.latest_checkpoint(run) < step:
        assert proc.poll() is None, err.read_text()
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    return rundir.latest_checkpoint(run)


def test_config_change_that_cannot_resume_is_refused_before_anything_is_written(cli, tiny_data, tmp_path):
    run = tmp_path / "run"
    settings = {"train.steps": 4, "checkpoint.every": 2}
    cli(*pretrain_args(run, tiny_data, settings))
    before = {name: (run / name).read_bytes() for name in ("config.toml", "status.json")}
    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())

    more_layers = {**settings, "train.steps": 6, "model.n_layers": 3}
    refused = cli(*pretrain_args(run, tiny_data, more_layers), "--allow-config-change", ok=False)
    assert refused.exit_code == 2
    assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert "model.n_layers: 2 -> 3" in refused.stderr and "train.steps" not in refused.stderr  # steps may change
    assert {name: (run / name).read_bytes() for name in before} == before  # config.toml not rewritten
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == checkpoints  # nothing called damaged

    # Data made with another tokenizer of the same vocabulary size: refused by its tokenizer, also before writing.
    (tmp_path / "other.txt").write_text(synthetic_text(300, seed=1), encoding="utf-8")
    cli("preprocess", tmp_path / "other.txt", "--out", tmp_path / "other", "--model-type", "char")
    other = cli(*pretrain_args(run, tmp_path / "other", settings), "--allow-config-change", ok=False)
    assert other.exit_code == 2 and "different tokenizer" in other.stderr
    assert {name: (run / name).read_bytes() for name in before} == before

    allowed = cli(*pretrain_args(run, tiny_data, {**settings, "train.steps": 6}), "--allow-config-change")
    assert "resumed from step 4" in allowed.stdout and _status(run)["state"] == "finished"


def _listed(cli, root: Path) -> str:
    """The status `bigmodel runs` gives the one run under root."""
    (row,) = [json.loads(line) for line in cli("--log-format", "json", "runs", root).stdout.splitlines()]
    return row["status"]


def test_second_writer_is_refused_naming_the_holder_and_a_sigkilled_holders_lock_is_taken_over(
    cli, tiny_data, tmp_path
):
    run = tmp_path / "run"
    holder, _, err = _start(run, tiny_data, tmp_path)
    try:
        _wait_for_checkpoint(run, holder, err)
        config = (run / "config.toml").read_bytes()
        second = cli(*pretrain_args(run, tiny_data, LONG), ok=False)
        assert second.exit_code == 2
        assert len(second.stderr.strip().splitlines()) == 1, second.stderr
        assert f"pid {holder.pid} on host {socket.gethostname()}" in second.stderr and "in use" in second.stderr
        assert (run / "config.toml").read_bytes() == config
        assert _listed(cli, tmp_path) == "running"
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert _status(run)["state"] == "running" and _listed(cli, tmp_path) == "killed"  # nobody holds its lock

    # The kernel dropped the dead holder's flock: the next run takes the lock over and records itself.
    resume_from = rundir.latest_checkpoint(run)
    short = {**LONG, "train.steps": resume_from + 2}
    taken = cli(*pretrain_args(run, tiny_data, short), "--allow-config-change")
    assert f"resumed from step {resume_from}" in taken.stdout
    assert json.loads((run / rundir.LOCK_FILE).read_text())["pid"] == os.getpid()
    assert _status(run)["state"] == "finished" and not _partial_checkpoints(run)


# SIGTERM (143, the same status and one line, then a bit-identical resume): tests/test_reliability.py
@pytest.mark.parametrize(
    ("signals", "code"),
    [((signal.SIGINT,), 130), ((signal.SIGINT, signal.SIGINT), 130)],
    ids=["sigint", "double-sigint"],
)
def test_signal_stops_with_its_exit_code_and_a_true_status(tiny_data, tmp_path, signals, code):
    run = tmp_path / "run"
    proc, _, err = _start(run, tiny_data, tmp_path)
    _wait_for_checkpoint(run, proc, err)
    for signum in signals:  # back to back: the second lands while the first is being handled
        proc.send_signal(signum)
    assert proc.wait(timeout=120) == code, err.read_text()
    lines = err.read_text().strip().splitlines()
    assert len(lines) == 1, lines
    status = _status(run)
    assert status["state"] == "stopped" and not _partial_checkpoints(run)
    if len(signals) == 1:  # graceful: a checkpoint at the step the status names, and the line says so
        assert lines[0].startswith(f"{signal.Signals(signals[0]).name}: saved a checkpoint at step {status['step']}")
        assert (run / "checkpoints" / str(status["step"])).is_dir()


def test_a_stop_whose_exception_python_dropped_still_stops_the_run(cli, tiny_data, tmp_path, monkeypatch):
    """A SIGTERM that lands while JAX's garbage-collection callback runs: Python prints "Exception ignored in:
    _xla_gc_callback" and drops the Stopped the handler raised, so the run went on to its last step and exited 0."""
    from bigmodel_cli.train import loop

    real = loop.check_layout

    def setup_hit_by_a_signal(*args):
        try:  # the callback's frame: Python reports the exception and goes on
            rundir.raise_stopped(signal.SIGTERM, None)
        except rundir.Stopped:
            pass
        return real(*args)

    monkeypatch.setattr(loop, "check_layout", setup_hit_by_a_signal)
    run = tmp_path / "run"
    result = cli(*pretrain_args(run, tiny_data, {"train.steps": 4}), ok=False)
    assert result.exit_code == 143 and result.stderr.strip().splitlines() == ["SIGTERM: stopped"]
    assert _status(run) == {**_status(run), "state": "stopped", "step": 0}
    assert not (run / "checkpoints" / "4").exists()
    monkeypatch.undo()
    assert cli(*pretrain_args(run, tiny_data, {"train.steps": 4})).exit_code == 0  # the next command is not stopped


def _orbax_disk_full(*args, **kwargs):
    raise ValueError(  # what Orbax 0.12 raises when its writer hits ENOSPC (os_error_code 28)
        'RESOURCE_EXHAUSTED: Error writing "norm.weight/0" in OCDBT database at local file "...": Failed to write '
        "1160081 bytes to file 31: No space left on device [os_error_code='28']"
    )


def test_disk_full_reported_by_a_checkpoint_write_fails_cleanly_then_resumes(cli, tiny_data, tmp_path, monkeypatch):
    from bigmodel_cli.train.checkpoint import Checkpoints

    run = tmp_path / "run"
    args = pretrain_args(run, tiny_data, {"train.steps": 12, "checkpoint.every": 5, "checkpoint.keep": 2})
    real_save = Checkpoints.save

    def save(self, step, *rest, **kwargs):
        if step == 10:  # Orbax has made its staging directory when the disk fills up
            (self.directory / "10.orbax-checkpoint-tmp-1").mkdir()
            _orbax_disk_full()
        return real_save(self, step, *rest, **kwargs)

    monkeypatch.setattr(Checkpoints, "save", save)
    failed = cli(*args, ok=False)
    assert failed.exit_code == 2
    assert failed.stderr.strip().splitlines() == [failed.stderr.strip()] and "error: disk full" in failed.stderr
    assert "resume from step 5" in failed.stderr
    assert _status(run)["state"] == "failed" and _status(run)["step"] == 5 and not _partial_checkpoints(run)
    monkeypatch.undo()
    resumed = cli(*args)
    assert "resumed from step 5" in resumed.stdout and _status(run)["state"] == "finished"


@pytest.fixture
def small_disk(tmp_path):
    """A 9 MiB tmpfs (one tiny checkpoint fits, two do not) and a function that enlarges it; skipped without
    mount rights (the injected error above covers that case)."""
    where = tmp_path / "disk"
    where.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=9m", "tmpfs", where], capture_output=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")

    def enlarge():
        subprocess.run(["mount", "-o", "remount,size=64m", where], check=True)

    try:
        yield where, enlarge
    finally:
        subprocess.run(["umount", where], check=False)


def test_disk_full_on_a_small_tmpfs_fails_cleanly_then_resumes(tiny_data, small_disk, cli):
    disk, enlarge = small_disk
    run = disk / "run"
    args = pretrain_args(run, tiny_data, {"train.steps": 12, "checkpoint.every": 5, "checkpoint.keep": 2})
    failed = run_cli_subprocess(*args, check=False)
    assert failed.returncode == 2, failed.stderr
    assert failed.stderr.strip().startswith("error: disk full") and len(failed.stderr.strip().splitlines()) == 1
    assert _status(run)["state"] == "failed" and _status(run)["step"] == 5 and not _partial_checkpoints(run)
    enlarge()
    resumed = cli(*args)  # only the failing run needs a process of its own: its stderr is all it printed
    assert "resumed from step 5" in resumed.stdout and _status(run)["state"] == "finished"


def test_a_batch_that_cannot_fit_is_refused_within_seconds_with_an_estimate(tiny_data, tmp_path):
    run = tmp_path / "run"
    started = time.time()
    refused = run_cli_subprocess(
        *pretrain_args(run, tiny_data, {"train.steps": 4, "train.batch_size": 1_000_000}), check=False, timeout=90
    )
    assert refused.returncode == 2 and time.time() - started < 90
    (line,) = refused.stderr.strip().splitlines()
    assert "train.batch_size=1000000 needs at least" in line and "GiB per device" in line and "host RAM" in line
    assert _status(run)["state"] == "failed"


def test_only_changes_that_a_checkpoint_can_take_may_resume():
    old = {"model": {"n_layers": 2, "dtype": "float32"}, "optim": {"lr": 3e-3, "grad_clip": 1.0}, "train": {"steps": 4}}
    new = {
        "model": {"n_layers": 2, "dtype": "bfloat16"},
        "optim": {"lr": 1e-3, "grad_clip": 0.5},
        "train": {"steps": 8},
    }
    assert rundir.resume_blockers(old, new) == []
    shape = {**new, "model": {"n_layers": 3, "dtype": "float32"}, "lora": {"rank": 8}}
    assert rundir.resume_blockers(old, shape) == ["lora.rank: None -> 8", "model.n_layers: 2 -> 3"]
    no_clip = {**old, "optim": {"lr": 3e-3, "grad_clip": 0.0}}  # removes a stage, and its state, from the optimizer
    assert rundir.resume_blockers(old, no_clip) == ["optim.grad_clip: 1.0 -> 0.0"]
    muon = {**old, "optim": {**old["optim"], "name": "muon"}}  # a config from before optim.name means adamw
    assert rundir.resume_blockers(old, muon) == ["optim.name: None -> 'muon'"]
    assert rundir.resume_blockers({**old, "optim": {**old["optim"], "name": "adamw"}}, old) == []


def test_disk_full_and_out_of_memory_are_explained_in_one_line(tmp_path):
    try:
        try:
            _orbax_disk_full()
        except ValueError as err:
            raise RuntimeError("Save Finalize thread (save_finalize) failed.") from err
    except RuntimeError as wrapped:
        assert rundir.explain_failure(wrapped, tmp_path).startswith(f"disk full while writing {tmp_path}")
    oom = RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 2826264985600 bytes.")
    assert "train.batch_size" in rundir.explain_failure(oom, tmp_path)
    assert rundir.explain_failure(ValueError("a bug"), tmp_path) is None
