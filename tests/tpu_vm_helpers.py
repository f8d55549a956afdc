"""What the TPU VM script tests share: the scripts, dry runs split as bash would, and a gcloud stub that fails
the test if it is ever called."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

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


def gcloud_stub_env(tmp_path: Path):
    """An environment with no BIGMODEL_TPU_* defaults and a gcloud stub on PATH, for a fixture to yield from:
    it fails the test if the stub was called."""
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
