"""Where a directory may live: a local path, or an object-store URL (gs://) reached through etils.epath, the
path layer Orbax already uses. pathlib would turn `gs://bucket/run` into the local `gs:/bucket/run`, so every
directory named on the command line or in a recipe is parsed here."""

from __future__ import annotations

import importlib
from pathlib import Path

from bigmodel_cli.errors import UserError

# scheme -> (the fsspec client module epath needs, the pip extra that installs it)
CLIENTS = {"gs": ("gcsfs", "gcs")}


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
