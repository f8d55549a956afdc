"""Where a directory may live: a local path, or an object-store URL (gs://) reached through etils.epath, the
path layer Orbax already uses. pathlib would turn `gs://bucket/run` into the local `gs:/bucket/run`, so every
directory named on the command line or in a recipe is parsed here."""

from __future__ import annotations

import importlib
import json
import os
import shutil
from pathlib import Path

from bigmodel_cli.errors import UserError

# scheme -> (the fsspec client module epath needs, the pip extra that installs it)
CLIENTS = {"gs": ("gcsfs", "gcs")}


def _fresh_listings() -> None:
    """gcsfs caches object listings, sizes included, for the life of its client. A run directory is also written
    by other clients (Orbax's TensorStore, other hosts, a rerun), so every listing here asks the bucket."""
    try:
        import fsspec
    except ImportError:
        return
    fsspec.config.conf.setdefault("gcs", {}).setdefault("use_listings_cache", False)


_fresh_listings()


def is_url(value: object) -> bool:
    return "://" in str(value)


def scheme(value: object) -> str:
    return str(value).split("://", 1)[0]


def check_client(value: object, where: str = "") -> None:
    """A one-line UserError, before anything is written, when `value` is a URL this install cannot reach."""
    if not is_url(value):
        return
    label = f"{where} {value}" if where else str(value)
    name = scheme(value)
    if name not in CLIENTS:
        raise UserError(f"{label}: {name}:// is not supported: use a local path or gs://BUCKET/...")
    module, extra = CLIENTS[name]
    try:
        importlib.import_module(module)
    except ImportError:
        raise UserError(
            f"{label} is in Google Cloud Storage, and its client ({module}) is not installed: "
            f"pip install 'bigmodel[{extra}]'"
        ) from None


def parse(value: str):
    """A command-line directory: a Path, or for a URL an epath.Path that keeps the URL whole."""
    if is_url(value):
        from etils import epath

        return epath.Path(str(value))
    return Path(value)


def path(value):
    """`value` (a str, Path or epath.Path) as parse() would give it: Path(value) for a local path, which would
    collapse a URL's `//`, an epath.Path that keeps a URL whole."""
    return parse(str(value)) if is_url(value) else Path(value)


def absolute(value):
    """The absolute form of a directory: a URL already is one."""
    return path(value) if is_url(value) else Path(value).absolute()


def copy_file(source, destination) -> None:
    """Copy one file, either end local or in a bucket (one object write: a reader sees all of it or none)."""
    if not is_url(source) and not is_url(destination):
        shutil.copyfile(source, destination)
        return
    path(destination).write_bytes(path(source).read_bytes())


def move_tree(source, destination) -> None:
    """Move a directory. In a bucket there is no rename of a prefix: every object is copied, then the source
    deleted; a process killed part way leaves the source whole (and a partial copy beside it)."""
    if not is_url(source):
        os.replace(source, destination)
        return
    # Through epath, as Orbax reads the bucket: one client, so its cached listings see the move (gcsfs caches
    # listings per client).
    _copy_tree(path(source), path(destination))
    path(source).rmtree()


def _copy_tree(source, destination) -> None:
    for child in source.iterdir():
        if child.is_dir():
            _copy_tree(child, destination / child.name)
        else:
            child.copy(destination / child.name)


# ---- reading a file in place, local or in a bucket (preprocessed data streams into the loader) ----------


def size(value) -> int:
    """A file's size in bytes, local or an object in a bucket."""
    if not is_url(value):
        return os.path.getsize(value)
    return int(_filesystem(value).size(str(value)))


def read_range(value, start: int, stop: int) -> bytes:
    """Bytes start .. stop-1 of a file: for an object in a bucket, one ranged GET, nothing kept locally."""
    if not is_url(value):
        with open(value, "rb") as f:
            f.seek(start)
            return f.read(stop - start)
    return _filesystem(value).cat_file(str(value), start=start, end=stop)


def _filesystem(value):
    """The fsspec client of a URL's scheme (fsspec keeps one instance per set of options: no new connection)."""
    import fsspec

    return fsspec.filesystem(scheme(value))


def read_json_object(file) -> dict | None:
    """A JSON object file (local or in a bucket), None when absent; a UserError naming the file when it is not
    one: the config files of model and tokenizer directories."""
    file = path(file)
    if not file.is_file():
        return None
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{file} is not valid JSON ({err}): restore the model's own file") from None
    if not isinstance(value, dict):
        raise UserError(f"{file} is not a JSON object: restore the model's own file")
    return value
