"""Outputs that appear whole or not at all: a staging directory renamed into place when the writing is done."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

from bigmodel_cli.errors import UserError


def check_new_dir(out: Path, what: str) -> None:
    """`out` may be written: it does not exist, or is an empty directory (nothing a user made is replaced)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{what} {out} already exists and is not empty: choose a new --out directory")


@contextlib.contextmanager
def new_dir(out: Path, what: str) -> Iterator[Path]:
    """Yield a fresh staging directory beside `out`; it becomes `out` when the block ends without an error,
    and is removed otherwise, so an interrupted job leaves nothing behind."""
    out = Path(out)
    check_new_dir(out, what)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp's 0700 would otherwise carry over to `out`
    try:
        yield staging
        _give_umask_modes(staging, umask)
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _give_umask_modes(root: Path, umask: int) -> None:
    """Give everything under `root` the mode a plain open() or mkdir() would: writers that go through a
    temporary file (safetensors does) leave it 0600, unlike its siblings."""
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            if os.path.islink(path):  # chmod would follow it out of the directory
                continue
            mode = os.stat(path).st_mode
            full = 0o777 if stat.S_ISDIR(mode) or mode & 0o111 else 0o666  # executables stay executable
            os.chmod(path, full & ~umask)
