"""Outputs appear whole or not at all, with the user's umask, and never replace what a user made."""

import json
import os
from pathlib import Path

import pytest

from bigmodel_cli import atomic
from bigmodel_cli.errors import UserError


def test_output_appears_whole_with_the_umask_permissions(tmp_path):
    out = tmp_path / "deep" / "out"
    with atomic.new_dir(out, "output") as staging:
        (staging / "a.txt").write_text("done")
        assert not out.exists()  # nothing visible until the block ends
    assert (out / "a.txt").read_text() == "done"
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's 0700
    assert [p.name for p in out.parent.iterdir()] == ["out"]


def test_a_failure_leaves_nothing_behind(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError), atomic.new_dir(out, "output") as staging:
        (staging / "half.bin").write_bytes(b"x")
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_an_existing_output_is_never_replaced(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    with pytest.raises(UserError, match="export directory .* already exists and is not empty"):
        with atomic.new_dir(out, "export directory"):
            pass
    assert (out / "mine.txt").read_text() == "keep"
    empty = tmp_path / "empty"
    empty.mkdir()
    with atomic.new_dir(empty, "output") as staging:
        (staging / "b").write_text("b")
    assert (empty / "b").read_text() == "b"  # an empty directory may be filled


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def test_a_file_is_replaced_whole_with_the_mode_open_gives(tmp_path):
    path = tmp_path / "status.json"
    path.write_text("old")
    atomic.write_json(path, {"state": "running", "step": 3})
    assert json.loads(path.read_text()) == {"state": "running", "step": 3}
    assert path.read_text().endswith("}\n")
    plain = tmp_path / "plain"
    plain.write_text("x")
    assert path.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777 == 0o666 & ~_umask()  # not mkstemp's 0600
    atomic.write_text(tmp_path / "t.txt", "héllo\n")
    assert (tmp_path / "t.txt").read_bytes() == "héllo\n".encode()
    atomic.write_bytes(tmp_path / "b.bin", b"\0\1")
    assert (tmp_path / "b.bin").read_bytes() == b"\0\1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.bin", "plain", "status.json", "t.txt"]


def test_the_umask_decides_the_mode(tmp_path):
    old = os.umask(0o077)
    try:
        atomic.write_text(tmp_path / "private", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "private").stat().st_mode & 0o777 == 0o600


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    path.write_text("old\n")

    def fail(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError, match="No space left"):
        atomic.write_text(path, "new\n")
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]


def test_staging_left_by_a_killed_writer_is_removed_and_a_live_ones_kept(tmp_path):
    """SIGKILL gives a writer no time to remove its staging directory: the next writer of the same output removes
    it (nobody holds its lock), and leaves alone one whose writer still runs."""
    import signal
    import subprocess
    import sys

    out = tmp_path / "data"
    fill = (
        "import sys, time; from pathlib import Path; from bigmodel_cli import atomic\n"
        "with atomic.new_dir(Path(sys.argv[1]), 'x') as s:\n"
        "    (s / 'part').write_text('half'); print(s, flush=True); time.sleep(60)\n"
    )
    writers = [subprocess.Popen([sys.executable, "-c", fill, out], stdout=subprocess.PIPE, text=True) for _ in "ab"]
    killed, alive = writers
    stagings = [Path(w.stdout.readline().strip()) for w in writers]
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    try:
        assert all(s.is_dir() for s in stagings)
        with atomic.new_dir(out, "output") as staging:
            (staging / "whole").write_text("done")
        assert not stagings[0].exists() and stagings[1].is_dir()  # the dead writer's only
        assert sorted(p.name for p in out.iterdir()) == ["whole"]  # no lock file carried over
    finally:
        alive.kill()
        alive.wait()
