"""`data.mixture = "dirA:0.7,dirB:0.3"`: several preprocessed directories drawn by weight (parsing only, no
heavy imports, so that config.py can resolve the directories relative to the recipe)."""

from __future__ import annotations

import math
from pathlib import Path

from bigmodel_cli import storage
from bigmodel_cli.errors import UserError


def parse_mixture(spec: str) -> list[tuple[Path, float]]:
    """'dirA:0.7,dirB:0.3' -> [(dirA, 0.7), (dirB, 0.3)]; weights are relative (they need not sum to 1)."""
    parts = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        path, sep, weight = item.rpartition(":")
        try:
            w = float(weight) if sep and path else float("nan")
        except ValueError:
            w = float("nan")
        if not (math.isfinite(w) and w > 0):
            raise UserError(f"data.mixture entry {item!r} is not DIR:WEIGHT with a weight > 0, e.g. data/web:0.7")
        parts.append((storage.path(path), w))  # a gs:// directory stays whole
    if not parts:
        raise UserError(f'data.mixture {spec!r} lists no data: write e.g. "data/web:0.7,data/books:0.3"')
    return parts


def resolve_mixture(spec: str, base_dir: Path) -> str:
    """The same mixture with every directory made absolute, relative ones taken from base_dir."""
    return ",".join(f"{_absolute(path, base_dir)}:{weight:g}" for path, weight in parse_mixture(spec))


def _absolute(path, base_dir: Path):
    """A mixture directory made absolute: a URL already is one."""
    if storage.is_url(path):
        storage.check_client(path, "data.mixture")
        return path
    return (Path(base_dir) / path).resolve()
