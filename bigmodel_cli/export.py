"""`bigmodel export`: a run or checkpoint -> a self-contained directory (safetensors, config, tokenizer)."""

from __future__ import annotations

from pathlib import Path

from bigmodel_cli import modelio


def run(model: Path, out: Path) -> Path:
    """Export the model at `model` (run dir, checkpoint or export) into the new directory `out`."""
    return modelio.export(modelio.load(model), out)
