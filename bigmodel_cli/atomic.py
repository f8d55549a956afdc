"""Outputs that appear whole or not at all: a file written beside its place and renamed over it, or a staging
directory renamed into place when the writing is done."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bigmodel_cli import storage
from bigmodel_cli.errors import UserError


def write_bytes(path: Path, data: bytes) -> None:
    """Replace `path` with `data` at once: a reader, or a crash, sees the old file or the new one, never half."""
    if storage.is_url(path):  # an object write is already whole or nothing (and a bucket has no rename)
        storage.path(path).write_bytes(data)
        return
    path = Path(path)
    temp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")  # same directory: os.replace is a rename
    # A fresh name opened exclusively with 0666: the kernel applies the umask, so the file gets the mode a plain
    # open() would give it (mkstemp's 0600 would carry over to `path`).
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename makes it visible
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str, encoding: str = "utf-8") -> None:
    """write_bytes for text."""
    write_bytes(path, text.encode(encoding))


def write_json(path: Path, obj: Any) -> None:
    """write_bytes for a JSON document, indented by 2, ending in a newline."""
    write_text(path, json.dumps(obj, indent=2) + "\n")


def check_new_dir(out: Path, what: str) -> None:
    """`out` may be written: it does not exist, or is an empty directory (nothing a user made is replaced)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{what} {out} already exists and is not empty: choose a new --out directory")


@contextlib.contextmanager
def new_dir(out: Path, what: str) -> Iterator[Path]:
    """Yield a fresh staging directory beside `out`; it becomes `out` when the block ends without an error,
    and is removed otherwise, so an interrupted job leaves nothing behind. A gs:// `out` is staged in a local
    temporary directory and uploaded when the block ends without an error."""
    if storage.is_url(out):
        with _new_bucket_dir(storage.path(out), what) as staging:
            yield staging
        return
    out = Path(out)
    check_new_dir(out, what)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_orphans(out)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    writer = _hold_writer_lock(staging)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp's 0700 would otherwise carry over to `out`
    try:
        yield staging
        _give_umask_modes(staging, umask)
        if out.exists():
            out.rmdir()  # empty, checked above
        os.unlink(staging / WRITER_LOCK)  # the lock stays held on the open file until the rename is done
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        os.close(writer)


# In a staging directory, flocked by the process that fills it for as long as that process lives: the OS drops it
# when the process dies, however it dies (SIGKILL leaves no time to remove the directory).
WRITER_LOCK = ".writer.lock"


def _hold_writer_lock(staging: Path) -> int:
    """Lock a file under a temporary name, then name it WRITER_LOCK: a sweep never finds it unlocked."""
    temp = staging / f"{WRITER_LOCK}.{secrets.token_hex(4)}"
    fd = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.rename(temp, staging / WRITER_LOCK)
    return fd


def _remove_orphans(out: Path) -> None:
    """Remove the staging directories of `out` whose writer died without cleaning up (a SIGKILLed preprocess or
    export): their lock file is there and nobody holds it. Any other leftover is left alone."""
    for orphan in out.parent.glob(f".{out.name}.tmp-*"):
        try:
            fd = os.open(orphan / WRITER_LOCK, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # its writer runs
        else:
            shutil.rmtree(orphan, ignore_errors=True)
        finally:
            os.close(fd)


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


@contextlib.contextmanager
def _new_bucket_dir(out, what: str) -> Iterator[Path]:
    """new_dir for a directory in a bucket, which has no rename: staged locally, then uploaded object by object.
    Top-level JSON files go last: readers recognise a directory by them (config.json of an export, manifest.json
    of preprocessed data or a StableHLO export), so a half upload is not taken for a whole one."""
    check_new_dir(out, what)
    staging = Path(tempfile.mkdtemp(prefix="bigmodel-upload-"))
    try:
        yield staging
        files = sorted(p for p in staging.rglob("*") if p.is_file())
        last = [p for p in files if p.parent == staging and p.suffix == ".json"]
        for file in [p for p in files if p not in last] + last:
            storage.copy_file(file, out / file.relative_to(staging).as_posix())
    finally:
        shutil.rmtree(staging, ignore_errors=True)
