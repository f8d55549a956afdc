"""Tests for the TPU VM shell scripts in scripts/tpu_vm/.

gcloud is never run: a stub that fails loudly is put first on PATH, and the
scripts are run with --dry-run, which prints the gcloud commands instead. The
worker-side shell snippets that the scripts hand to `gcloud ... ssh --command`
are also run here, in a throwaway $HOME with a fake `bigmodel`, to check that
the quoting survives and that launch/stop do what they claim.
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT_DIR = ROOT / "scripts" / "tpu_vm"
SCRIPTS = ["create.sh", "setup.sh", "launch.sh", "logs.sh", "stop.sh", "delete.sh"]
ZONE = "us-central2-b"
TPU = ["--name", "my-tpu", "--zone", ZONE]
# Arguments each script needs besides --name/--zone for a dry run to succeed.
REQUIRED = {
    "create.sh": ["--accelerator-type", "v5litepod-16"],
    "setup.sh": ["--source", "git+https://example.com/bigmodel.git"],
    "launch.sh": ["--", "bigmodel", "--help"],
    "logs.sh": [],
    "stop.sh": [],
    "delete.sh": [],
}
# A command with spaces, both kinds of quotes and shell metacharacters.
TRICKY_CMD = [
    "bigmodel",
    "pretrain",
    "recipes/base.toml",
    "--run-dir",
    "gs://bucket/runs/r1",
    "--note",
    'it\'s a "quoted" note; $HOME `x` & *',
]


@pytest.fixture
def env(tmp_path):
    """Environment with no BIGMODEL_TPU_* defaults and a gcloud stub on PATH."""
    stub_dir = tmp_path / "stub-bin"
    stub_dir.mkdir()
    marker = tmp_path / "gcloud-was-called"
    stub = stub_dir / "gcloud"
    stub.write_text(f'#!/bin/sh\necho "$@" >> {marker}\necho "gcloud stub called" >&2\nexit 97\n')
    stub.chmod(0o755)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("BIGMODEL_TPU_")}
    clean["PATH"] = f"{stub_dir}{os.pathsep}{clean.get('PATH', '')}"
    yield clean
    assert not marker.exists(), f"gcloud was called: {marker.read_text()}"


def script(name: str, *args: str, env: dict, stdin: str | None = "") -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(SCRIPT_DIR / name), *args],
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=30,
    )


def dry_run(name: str, *args: str, env: dict) -> list[list[str]]:
    """Runs a script with --dry-run; returns its commands, each split the way bash would."""
    proc = script(name, "--dry-run", *args, env=env)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines, "dry run printed nothing"
    return [bash_words(line) for line in lines]


def bash_words(line: str) -> list[str]:
    """The words that bash makes of a line (so the line can be pasted into a shell)."""
    proc = subprocess.run(
        ["bash", "-c", 'eval "set -- $1" && printf "%s\\0" "$@"', "_", line],
        capture_output=True,
        text=True,
        check=True,
    )
    return proc.stdout.split("\0")[:-1]


def option(argv: list[str], name: str) -> str:
    """The value of `name VALUE` or `name=VALUE` in argv."""
    for i, arg in enumerate(argv):
        if arg == name:
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg[len(name) + 1 :]
    raise AssertionError(f"{name} not in {argv}")


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode != 0
    assert proc.stdout == ""
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1, err
    assert "error" in err
    for needle in needles:
        assert needle in err


# --- every script ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_file(name):
    path = SCRIPT_DIR / name
    assert path.stat().st_mode & stat.S_IXUSR, f"{name} is not executable"
    text = path.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in text


@pytest.mark.parametrize("name", SCRIPTS)
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help(name, flag, env):
    proc = script(name, flag, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"Usage: {name} ")
    assert "Example" in proc.stdout
    assert "--dry-run" in proc.stdout
    assert "BIGMODEL_TPU_NAME" in proc.stdout


@pytest.mark.parametrize("name", SCRIPTS)
def test_missing_name(name, env):
    proc = script(name, "--dry-run", "--zone", ZONE, *REQUIRED[name], env=env)
    assert_one_line_error(proc, "--name", "BIGMODEL_TPU_NAME")


@pytest.mark.parametrize("name", SCRIPTS)
def test_missing_zone(name, env):
    proc = script(name, "--dry-run", "--name", "my-tpu", *REQUIRED[name], env=env)
    assert_one_line_error(proc, "--zone", "BIGMODEL_TPU_ZONE")


@pytest.mark.parametrize("name", SCRIPTS)
def test_bad_options(name, env):
    assert_one_line_error(script(name, *TPU, "--no-such-option", env=env), "--no-such-option")
    assert_one_line_error(script(name, "--zone", ZONE, "--name", env=env), "--name needs a value")
    assert_one_line_error(script(name, *TPU, "stray", env=env), "stray")


@pytest.mark.parametrize("name", SCRIPTS)
def test_defaults_from_env(name, env):
    env.update(BIGMODEL_TPU_NAME="env-tpu", BIGMODEL_TPU_ZONE="europe-west4-a", BIGMODEL_TPU_PROJECT="proj")
    last = dry_run(name, *REQUIRED[name], env=env)[-1]
    assert last[:4] == ["gcloud", "compute", "tpus", "tpu-vm"]
    assert "env-tpu" in last
    assert "--zone=europe-west4-a" in last
    assert "--project=proj" in last
    # Options win over the environment.
    last = dry_run(name, "--name", "cli-tpu", "--zone", ZONE, *REQUIRED[name], env=env)[-1]
    assert "cli-tpu" in last and "env-tpu" not in last
    assert f"--zone={ZONE}" in last


def test_option_equals_form(env):
    (cmd,) = dry_run("create.sh", "--name=my-tpu", f"--zone={ZONE}", "--accelerator-type=v4-8", env=env)
    assert cmd[5] == "my-tpu"
    assert "--accelerator-type=v4-8" in cmd


# --- create.sh ------------------------------------------------------------------------------


def test_create(env):
    (cmd,) = dry_run("create.sh", *TPU, "--accelerator-type", "v5litepod-16", "--spot", env=env)
    assert cmd == [
        "gcloud", "compute", "tpus", "tpu-vm", "create", "my-tpu",
        "--accelerator-type=v5litepod-16", "--version=v2-alpha-tpuv5-lite", "--spot", f"--zone={ZONE}",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("accel", "version"),
    [("v6e-8", "v2-alpha-tpuv6e"), ("v5p-32", "v2-alpha-tpuv5"), ("v4-16", "tpu-ubuntu2204-base")],
)
def test_create_runtime_default(accel, version, env):
    (cmd,) = dry_run("create.sh", *TPU, "--accelerator-type", accel, env=env)
    assert f"--version={version}" in cmd


def test_create_options(env):
    (cmd,) = dry_run(
        "create.sh", *TPU, "--accelerator-type", "v4-8", "--runtime-version", "custom-rt",
        "--preemptible", "--project", "my-proj", env=env,
    )  # fmt: skip
    assert "--version=custom-rt" in cmd
    assert "--preemptible" in cmd and "--spot" not in cmd
    assert "--project=my-proj" in cmd


def test_create_errors(env):
    assert_one_line_error(script("create.sh", "--dry-run", *TPU, env=env), "--accelerator-type")
    proc = script("create.sh", *TPU, "--accelerator-type", "v4-8", "--spot", "--preemptible", env=env)
    assert_one_line_error(proc, "--spot", "--preemptible")


# --- setup.sh -------------------------------------------------------------------------------


def test_setup_git(env):
    url = "git+https://github.com/example/bigmodel.git@v0.1.0"
    (cmd,) = dry_run("setup.sh", *TPU, "--source", url, env=env)
    assert cmd[4:6] == ["ssh", "my-tpu"]
    assert "--worker=all" in cmd
    assert f"--zone={ZONE}" in cmd
    remote = option(cmd, "--command")
    assert "-m venv bigmodel-venv" in remote
    assert f"pip install -U 'jax[tpu]' bigmodel\\[gcs\\]\\ @\\ {url}" in remote  # printf %q quoting


def test_setup_wheel(tmp_path, env):
    wheel = tmp_path / "dist dir" / "bigmodel-0.1.0-py3-none-any.whl"
    wheel.parent.mkdir()
    wheel.write_bytes(b"")
    scp, ssh = dry_run("setup.sh", *TPU, "--source", str(wheel), "--python", "python3.12", env=env)
    assert scp == [
        "gcloud", "compute", "tpus", "tpu-vm", "scp", str(wheel), f"my-tpu:{wheel.name}",
        "--worker=all", f"--zone={ZONE}",
    ]  # fmt: skip
    assert ssh[4:6] == ["ssh", "my-tpu"] and "--worker=all" in ssh
    remote = option(ssh, "--command")
    assert f"pip install -U 'jax[tpu]' ./{wheel.name}\\[gcs\\]" in remote
    assert "python3.12 -m venv" in remote


def test_setup_errors(tmp_path, env):
    assert_one_line_error(script("setup.sh", "--dry-run", *TPU, env=env), "--source")
    missing = tmp_path / "nope-0.1.0.whl"
    assert_one_line_error(script("setup.sh", "--dry-run", *TPU, "--source", str(missing), env=env), "no such file")
    other = tmp_path / "notes.txt"
    other.write_text("x")
    assert_one_line_error(script("setup.sh", "--dry-run", *TPU, "--source", str(other), env=env), "--source")


# --- launch.sh ------------------------------------------------------------------------------


def test_launch(env):
    (cmd,) = dry_run("launch.sh", *TPU, "--", *TRICKY_CMD, env=env)
    assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu"]
    assert "--worker=all" in cmd
    assert f"--zone={ZONE}" in cmd
    remote = option(cmd, "--command")
    assert "nohup" in remote
    # The run name defaults to the last part of --run-dir.
    assert "bigmodel-logs/r1.log" in remote
    assert "bigmodel-logs/r1.pid" in remote
    # The command survives both layers of quoting: bash must split it back into TRICKY_CMD.
    quoted = remote.split("setsid nohup ", 1)[1].split(" > bigmodel-logs/r1.log", 1)[0]
    assert bash_words(quoted) == TRICKY_CMD


def test_launch_run_name_and_foreground(env):
    (cmd,) = dry_run("launch.sh", *TPU, "--run", "exp-7", "--foreground", "--", "bigmodel", "--help", env=env)
    remote = option(cmd, "--command")
    assert "nohup" not in remote
    assert "tee bigmodel-logs/exp-7.log" in remote


def test_launch_errors(env):
    assert_one_line_error(script("launch.sh", "--dry-run", *TPU, env=env), "missing command")
    assert_one_line_error(script("launch.sh", "--dry-run", *TPU, "--", env=env), "missing command")
    proc = script("launch.sh", "--dry-run", *TPU, "--run", "../x", "--", "bigmodel", env=env)
    assert_one_line_error(proc, "run name")


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


def run_remote(remote: str, worker_env: dict, timeout: float = 30) -> subprocess.CompletedProcess:
    """Runs a worker-side snippet the way sshd would: `bash -c SNIPPET` in $HOME."""
    return subprocess.run(
        ["bash", "-c", remote],
        env=worker_env,
        cwd="/",
        capture_output=True,
        text=True,
        timeout=timeout,
    )


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


# --- logs.sh --------------------------------------------------------------------------------


def test_logs_stream(env):
    (cmd,) = dry_run("logs.sh", *TPU, "--run", "r1", env=env)
    assert cmd[4:6] == ["ssh", "my-tpu"]
    assert "--worker=0" in cmd and f"--zone={ZONE}" in cmd
    remote = option(cmd, "--command")
    assert "run=r1 " in remote and "tail -n" in remote
    (cmd,) = dry_run("logs.sh", *TPU, "--worker", "all", env=env)
    assert "--worker=all" in cmd


def test_logs_stream_runs(tmp_path, env):
    logs = tmp_path / "worker-home" / "bigmodel-logs"
    logs.mkdir(parents=True)
    (logs / "r1.log").write_text("step 1\nstep 2\n")
    (cmd,) = dry_run("logs.sh", *TPU, "--run", "r1", "--lines", "1", "--no-follow", env=env)
    proc = run_remote(option(cmd, "--command"), {"HOME": str(logs.parent), "PATH": os.environ["PATH"]})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.endswith("] step 2\n") and "step 1" not in proc.stdout


def test_logs_fetch(tmp_path, env):
    out = tmp_path / "fetched logs"
    cmds = dry_run("logs.sh", *TPU, "--run", "r1", "--fetch", str(out), "--num-workers", "2", env=env)
    base = ["gcloud", "compute", "tpus", "tpu-vm", "scp", "my-tpu:bigmodel-logs/r1.log"]
    assert cmds == [
        ["mkdir", "-p", f"{out}/worker-0"],
        [*base, f"{out}/worker-0/", "--worker=0", f"--zone={ZONE}"],
        ["mkdir", "-p", f"{out}/worker-1"],
        [*base, f"{out}/worker-1/", "--worker=1", f"--zone={ZONE}"],
    ]
    # Without --num-workers the count comes from `describe`.
    cmds = dry_run("logs.sh", *TPU, "--fetch", str(out), env=env)
    assert cmds[0][4:6] == ["describe", "my-tpu"]
    assert "my-tpu:bigmodel-logs/*.log" in cmds[2]


def test_logs_errors(env):
    assert_one_line_error(script("logs.sh", "--dry-run", *TPU, "--lines", "many", env=env), "--lines")
    assert_one_line_error(script("logs.sh", "--dry-run", *TPU, "--worker", "x", env=env), "--worker")
    proc = script("logs.sh", "--dry-run", *TPU, "--fetch", "d", "--worker", "0,1", env=env)
    assert_one_line_error(proc, "--worker")


# --- stop.sh --------------------------------------------------------------------------------


def test_stop(env):
    (cmd,) = dry_run("stop.sh", *TPU, "--run", "r1", "--grace", "300", env=env)
    assert cmd[4:6] == ["ssh", "my-tpu"]
    assert "--worker=all" in cmd and f"--zone={ZONE}" in cmd
    remote = option(cmd, "--command")
    assert "run=r1 grace=300;" in remote
    assert "kill -TERM" in remote and "kill -KILL" in remote


def test_stop_errors(env):
    assert_one_line_error(script("stop.sh", "--dry-run", *TPU, "--grace", "-1", env=env), "--grace")


# --- delete.sh ------------------------------------------------------------------------------


def test_delete(env):
    for extra in ([], ["--yes"]):
        (cmd,) = dry_run("delete.sh", *TPU, *extra, env=env)
        assert cmd == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "my-tpu", "--quiet", f"--zone={ZONE}"]


@pytest.mark.parametrize("answer", ["n\n", "", "maybe\n"])
def test_delete_asks_first(answer, env):
    # Not a dry run: anything but "y" must stop before gcloud (the stub would fail the test).
    proc = script("delete.sh", *TPU, env=env, stdin=answer)
    assert proc.returncode != 0
    assert "[y/N]" in proc.stderr
    assert "not deleted" in proc.stderr
