"""The worker-side shell snippets the TPU VM scripts hand to `gcloud ... ssh --command`, run here as sshd would
in a throwaway $HOME with a fake `bigmodel`: the quoting survives, launch starts one run, stop stops it."""

from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path

import pytest

from tests.tpu_vm_helpers import TPU, TRICKY_CMD, dry_run, gcloud_stub_env, option, run_remote


@pytest.fixture
def env(tmp_path):
    yield from gcloud_stub_env(tmp_path)


def worker_home(tmp_path: Path, fake_bigmodel: str) -> dict:
    """A throwaway worker $HOME with ~/bigmodel-venv holding a fake `bigmodel`."""
    home = tmp_path / "worker-home"
    bin_dir = home / "bigmodel-venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "activate").write_text(f'PATH="{bin_dir}:$PATH"\n')
    fake = bin_dir / "bigmodel"
    fake.write_text("#!/usr/bin/env bash\n" + fake_bigmodel)
    fake.chmod(0o755)
    return {"HOME": str(home), "PATH": os.environ["PATH"], "LC_ALL": "C"}


RECORD_ARGS = 'printf "%s\\0" "$@" > "$HOME/argv"\necho "fake bigmodel ran"\n'


def test_launch_foreground_runs_exact_command(tmp_path, env):
    worker = worker_home(tmp_path, RECORD_ARGS)
    (cmd,) = dry_run("launch.sh", *TPU, "--foreground", "--", *TRICKY_CMD, env=env)
    proc = run_remote(option(cmd, "--command"), worker)
    assert proc.returncode == 0, proc.stderr
    assert "fake bigmodel ran" in proc.stdout
    home = Path(worker["HOME"])
    assert (home / "argv").read_text().split("\0")[:-1] == TRICKY_CMD[1:]
    assert "fake bigmodel ran" in (home / "bigmodel-logs" / "r1.log").read_text()


def wait_for(predicate, timeout: float = 15) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie left for the init process to reap counts as gone.
    stat_file = Path(f"/proc/{pid}/stat")
    return not (stat_file.exists() and stat_file.read_text().split(") ", 1)[1].startswith("Z"))


@pytest.fixture
def cleanup_pids():
    pids: list[int] = []
    yield pids
    for pid in pids:
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


needs_setsid = pytest.mark.skipif(shutil.which("setsid") is None, reason="setsid (util-linux) not installed")


@needs_setsid
def test_launch_background_then_stop(tmp_path, env, cleanup_pids):
    # A fake training run: records its argv, then saves a "checkpoint" and exits on SIGTERM.
    worker = worker_home(
        tmp_path,
        RECORD_ARGS + "trap 'echo checkpoint saved; exit 0' TERM\nwhile :; do sleep 0.1; done\n",
    )
    home = Path(worker["HOME"])
    (launch,) = dry_run("launch.sh", *TPU, "--", *TRICKY_CMD, env=env)
    proc = run_remote(option(launch, "--command"), worker)
    assert proc.returncode == 0, proc.stderr
    assert "started r1" in proc.stdout
    pid = int((home / "bigmodel-logs" / "r1.pid").read_text())
    cleanup_pids.append(pid)
    assert wait_for(lambda: (home / "argv").exists())
    assert (home / "argv").read_text().split("\0")[:-1] == TRICKY_CMD[1:]
    assert pid_alive(pid)

    # A second launch of the same run refuses to start.
    again = run_remote(option(launch, "--command"), worker)
    assert again.returncode != 0
    assert "already running" in again.stderr

    (stop,) = dry_run("stop.sh", *TPU, "--grace", "10", env=env)
    assert "--worker=all" in stop
    proc = run_remote(option(stop, "--command"), worker)
    assert proc.returncode == 0, proc.stderr
    assert "SIGTERM" in proc.stdout and "SIGKILL to" not in proc.stdout
    assert wait_for(lambda: not pid_alive(pid))
    assert "checkpoint saved" in (home / "bigmodel-logs" / "r1.log").read_text()
    assert not (home / "bigmodel-logs" / "r1.pid").exists()


@needs_setsid
def test_stop_kills_after_grace(tmp_path, env, cleanup_pids):
    # A run that ignores SIGTERM must be killed once the grace period is over.
    worker = worker_home(tmp_path, "trap '' TERM\nwhile :; do sleep 0.1; done\n")
    (launch,) = dry_run("launch.sh", *TPU, "--run", "stuck", "--", "bigmodel", env=env)
    assert run_remote(option(launch, "--command"), worker).returncode == 0
    pid = int((Path(worker["HOME"]) / "bigmodel-logs" / "stuck.pid").read_text())
    cleanup_pids.append(pid)
    (stop,) = dry_run("stop.sh", *TPU, "--run", "stuck", "--grace", "1", env=env)
    proc = run_remote(option(stop, "--command"), worker)
    assert proc.returncode == 0, proc.stderr
    assert "SIGKILL to" in proc.stdout
    assert wait_for(lambda: not pid_alive(pid))
