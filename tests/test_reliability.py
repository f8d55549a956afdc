"""Preemption and damage: kill -9, SIGTERM, corrupt checkpoints, NaN guard, changed recipes."""

import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bigmodel_cli import rundir
from tests.conftest import pretrain_args

STEPS = 60


def _args(run_dir: Path, data: Path, *extra: str) -> list:
    settings = {"train.steps": STEPS, "checkpoint.every": 10, "checkpoint.keep": 3, "train.log_every": 5}
    return pretrain_args(run_dir, data, {**settings, "train.eval_every": 30}, *extra)


# Only the runs that are signalled or killed need a process of their own; the others run in this one (`cli`),
# where the step is compiled once, not once per process.


def _weights(cli, run_dir: Path, out: Path) -> bytes:
    cli("export", run_dir, "--out", out)
    return (out / "model.safetensors").read_bytes()


@pytest.fixture(scope="module")
def reference_run(tiny_data, tmp_path_factory, cli) -> tuple[Path, bytes]:
    """An uninterrupted run, finished, and its final weights."""
    root = tmp_path_factory.mktemp("reference")
    cli(*_args(root / "run", tiny_data))
    return root / "run", _weights(cli, root / "run", root / "export")


@pytest.fixture(scope="module")
def reference(reference_run) -> bytes:
    return reference_run[1]


def _start(run_dir, data, stderr=subprocess.STDOUT):
    return subprocess.Popen(
        [sys.executable, "-m", "bigmodel_cli", *map(str, _args(run_dir, data))],
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
    )


def _wait_for_checkpoint(run_dir: Path, step: int, proc) -> None:
    deadline = time.time() + 180
    while not (run_dir / "checkpoints" / str(step)).is_dir():
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.02)


@pytest.mark.slow
def test_sigkill_at_three_random_points_then_bit_identical(tiny_data, tmp_path, reference, cli):
    rng = random.Random(7)
    run = tmp_path / "run"
    # The suite's kill -9 test: three kills, then the resumed weights equal an uninterrupted run's, bit for bit.
    for after in (10, 20, 40):  # each kill lands somewhere after that checkpoint appeared
        proc = _start(run, tiny_data)
        _wait_for_checkpoint(run, after, proc)
        time.sleep(rng.uniform(0.0, 0.4))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finished = cli(*_args(run, tiny_data))
    assert "resumed from step" in finished.stdout
    assert _weights(cli, run, tmp_path / "export") == reference
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(5, STEPS + 1, 5))  # no duplicated or missing log lines after resumes


@pytest.mark.slow
def test_sigterm_saves_at_step_boundary_and_resumes_bit_identical(tiny_data, tmp_path, reference, cli):
    # (SIGINT's exit codes and status: tests/test_run_lifecycle.py)
    run, err = tmp_path / "run", tmp_path / "stderr"
    with err.open("w") as stderr:  # a file: a full pipe would block the process
        proc = _start(run, tiny_data, stderr)
    _wait_for_checkpoint(run, 10, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, out + err.read_text()  # stopped by SIGTERM: 128 + 15, not success
    stopped = json.loads((run / "status.json").read_text())
    (line,) = err.read_text().strip().splitlines()  # one line, which names the step it saved
    assert line.startswith(f"SIGTERM: saved a checkpoint at step {stopped['step']}")
    assert stopped["state"] == "stopped" and (run / "checkpoints" / str(stopped["step"])).is_dir()
    assert not list((run / "checkpoints").glob(rundir.PARTIAL_CHECKPOINT))
    cli(*_args(run, tiny_data))
    assert json.loads((run / "status.json").read_text())["state"] == "finished"
    assert _weights(cli, run, tmp_path / "export") == reference


def _remove_chunks(ckpt: Path):
    for f in (ckpt / "params").rglob("d/*"):
        f.unlink()


def _empty_chunks(ckpt: Path):
    for f in (ckpt / "params").rglob("d/*"):
        f.write_bytes(b"")


def _break_metadata(ckpt: Path):
    (ckpt / "params" / "_METADATA").write_text("{not json")


@pytest.mark.slow
@pytest.mark.parametrize("damage", [_remove_chunks, _empty_chunks, _break_metadata], ids=lambda f: f.__name__)
def test_damaged_latest_checkpoint_falls_back_to_previous(tiny_data, tmp_path, reference_run, damage, cli):
    run = tmp_path / "run"
    shutil.copytree(reference_run[0], run)  # a finished run, as training left it
    reference = reference_run[1]
    damage(run / "checkpoints" / str(STEPS))
    again = cli(*_args(run, tiny_data))
    lines = [line for line in again.stdout.splitlines() if "is damaged" in line]
    assert len(lines) == 1 and f"moved to {STEPS}.corrupt-1" in lines[0]
    assert "resumed from step 50" in again.stdout
    assert (run / "checkpoints" / f"{STEPS}.corrupt-1").is_dir()  # kept for inspection, never deleted
    assert _weights(cli, run, tmp_path / "export") == reference


def test_nonfinite_loss_stops_at_the_right_step_and_keeps_checkpoints(tiny_data, tmp_path, cli):
    run = tmp_path / "run"
    proc = cli(*_args(run, tiny_data, "--set", "train.inject_nonfinite_at=13"), ok=False)
    assert proc.exit_code == 2
    assert "non-finite loss or gradient norm at step 13" in proc.stderr and "data windows" in proc.stderr
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["10"]
    assert json.loads((run / "status.json").read_text())["state"] == "failed"


def test_a_nonfinite_step_stops_the_run_soon_even_when_it_logs_rarely(tiny_data, tmp_path, cli, monkeypatch):
    """The host checks the steps' non-finite flags in groups (a wait per step slows small models), and still
    stops within a group of the bad step when no log line or checkpoint comes for much longer."""
    from bigmodel_cli.data import loader
    from bigmodel_cli.train import loop

    built, build = [], loader.TrainBatches.__call__
    monkeypatch.setattr(loader.TrainBatches, "__call__", lambda self, step: (built.append(step), build(self, step))[1])
    rare = ("--set", "train.log_every=50", "--set", "checkpoint.every=50")
    proc = cli(*_args(tmp_path / "run", tiny_data, "--set", "train.inject_nonfinite_at=13", *rare), ok=False)
    assert proc.exit_code == 2 and "non-finite loss or gradient norm at step 13" in proc.stderr
    # Stopped well before step 50, the first log line or checkpoint (batches are built a few steps ahead).
    assert 13 <= max(built) <= 13 + loop._CHECK_EVERY + 4 < 35
    assert not (tmp_path / "run" / "checkpoints").exists() or not list((tmp_path / "run" / "checkpoints").iterdir())


def test_nonfinite_skip_mode_skips_the_update_and_goes_on(tiny_data, tmp_path, cli):
    run = tmp_path / "run"
    out = cli(
        *_args(
            run,
            tiny_data,
            "--set",
            "train.inject_nonfinite_at=13",
            "--set",
            "train.on_nonfinite=skip",
            "--set",
            "train.steps=20",
        )
    )
    assert "step 13: non-finite loss or gradient norm" in out.stdout and "update skipped" in out.stdout
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 20 and rows[-1]["skipped_steps"] == 1 and rows[-1]["loss"] is not None


def test_changed_recipe_is_refused_unless_allowed(tiny_data, tmp_path, cli):
    run = tmp_path / "run"
    cli(*_args(run, tiny_data, "--set", "train.steps=10"))
    changed = cli(*_args(run, tiny_data, "--set", "train.steps=20", "--set", "optim.lr=0.01"), ok=False)
    assert changed.exit_code == 2
    assert "optim.lr: 0.003 -> 0.01" in changed.stderr and "train.steps: 10 -> 20" in changed.stderr
    allowed = cli(*_args(run, tiny_data, "--set", "train.steps=20", "--allow-config-change"))
    assert "resumed from step 10" in allowed.stdout
    never = cli(*_args(run, tiny_data, "--resume", "never"), ok=False)
    assert never.exit_code == 2 and "not empty" in never.stderr
    must = cli(*_args(tmp_path / "fresh", tiny_data, "--resume", "must"), ok=False)
    assert must.exit_code == 2 and "no checkpoint" in must.stderr and not (tmp_path / "fresh").exists()
