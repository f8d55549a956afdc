"""Outputs appear whole or not at all, with the user's umask, and never replace what a user made."""

import os

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
