"""Tests for the TPU VM shell scripts in scripts/tpu_vm/.

gcloud is never run: a stub that fails loudly is put first on PATH, and the
scripts are run with --dry-run, which prints the gcloud commands instead. The
worker-side shell snippets that launch and stop hand to `gcloud ... ssh --command`
are run in test_tpu_vm_worker.py.
"""

from __future__ import annotations

import os
import stat

import pytest

from tests.tpu_vm_helpers import (
    REQUIRED,
    SCRIPT_DIR,
    SCRIPTS,
    TPU,
    TRICKY_CMD,
    ZONE,
    assert_one_line_error,
    bash_words,
    dry_run,
    gcloud_stub_env,
    option,
    run_remote,
    script,
)


@pytest.fixture
def env(tmp_path):
    yield from gcloud_stub_env(tmp_path)


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
