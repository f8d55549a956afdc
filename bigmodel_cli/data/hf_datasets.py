"""Hugging Face datasets as preprocess sources (hf:NAME[:CONFIG][@SPLIT]): loaded through `datasets`, from the
local cache when the Hub cannot be reached, never waiting minutes on a dead network."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from typing import Any

from bigmodel_cli.errors import UserError

HUB_PROBE_S = 3.0  # how long to wait for the Hugging Face Hub before treating it as unreachable


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")


def hub_reachable(timeout: float = HUB_PROBE_S) -> bool:
    """Whether the Hub answers a TCP connect in time; the probe runs on a thread so DNS cannot hang us."""
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    result: list[bool] = []

    def probe():
        try:
            socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(result and result[0])


_CACHE: dict[tuple, Any] = {}


def load(hf: tuple[str, str | None, str], where: str):
    """Load (download or take from the local cache) a Hugging Face dataset split; never waits on a dead network."""
    if hf in _CACHE:
        return _CACHE[hf]
    name, config, split = hf
    import datasets
    import huggingface_hub.constants as hub_constants

    offline = _env_true("HF_DATASETS_OFFLINE") or _env_true("HF_HUB_OFFLINE") or not hub_reachable()
    saved = datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE
    if offline:  # only the local cache: load_dataset would otherwise retry the network for minutes
        datasets.config.HF_HUB_OFFLINE = hub_constants.HF_HUB_OFFLINE = True
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        if offline:
            raise UserError(
                f"{where}: the Hugging Face Hub cannot be reached (offline) and {name} is not in the local "
                f"datasets cache: run once with network access, or pass local files"
            ) from None
        raise UserError(f"{where}: could not load {name} ({first}): check the name, config and split") from None
    finally:
        datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved
    _CACHE[hf] = ds
    return ds


def records(hf: tuple[str, str | None, str], where: str, fields: tuple[str, ...]) -> Iterator[tuple[Any, str]]:
    """(record, where) for every row of a dataset split, after checking that the text fields are columns."""
    ds = load(hf, where)
    columns = ds.column_names
    missing = [f.split(".")[0] for f in fields if f.split(".")[0] not in columns]
    if missing:
        raise UserError(f"{where} has no column {missing[0]!r} (columns: {', '.join(columns)}): pass --text-field")
    for i, record in enumerate(ds):
        yield record, f"{where} row {i}"
