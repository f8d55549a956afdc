"""gs:// outputs: a directory a command makes in the bucket is uploaded only when it is complete, as a local one
is renamed into place. Against the emulated bucket of tests/gcs_emulator.py (the commands that read and write a
bucket run are tested in tests/test_gcs.py, on the one bucket run made there)."""

from __future__ import annotations

import pytest


def _bucket(url: str):
    from etils import epath

    return epath.Path(url)


def test_a_bucket_new_dir_is_uploaded_only_when_its_block_succeeds_with_top_level_json_last(gcs, tmp_path, monkeypatch):
    from bigmodel_cli import atomic, storage
    from bigmodel_cli.errors import UserError

    out = _bucket(f"{gcs}/out")
    try:
        with atomic.new_dir(out, "output") as staging:
            (staging / "weights.bin").write_bytes(b"w")
            raise RuntimeError("killed")
    except RuntimeError:
        pass
    assert not staging.exists() and not out.exists()  # nothing uploaded, the local staging removed

    uploaded = []
    copy = storage.copy_file
    monkeypatch.setattr(storage, "copy_file", lambda src, dst: (uploaded.append(str(dst)), copy(src, dst)))
    with atomic.new_dir(out, "output") as staging:
        (staging / "config.json").write_text("{}")
        (staging / "sub").mkdir()
        (staging / "sub" / "a.json").write_text("[]")
        (staging / "weights.bin").write_bytes(b"w")
    assert uploaded == [f"{out}/sub/a.json", f"{out}/weights.bin", f"{out}/config.json"]
    assert (out / "weights.bin").read_bytes() == b"w" and not staging.exists()
    with pytest.raises(UserError, match="already exists and is not empty"):
        with atomic.new_dir(out, "output"):
            pass
