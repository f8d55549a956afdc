"""`bigmodel plan`, `report` and `runs`: look at recipes and runs without training, and print what they find."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from bigmodel_cli import storage
from bigmodel_cli.cli_app import (
    Overrides,
    _console,
    _options,
    _setup_jax,
)
from bigmodel_cli.errors import UserError


def plan(
    recipe: Annotated[Path, typer.Argument(help="A TOML recipe.")],
    overrides: Overrides = None,
    devices: Annotated[int, typer.Option(help="Plan for N devices (on CPU: N fake devices).")] = 0,
    memory_budget_gb: Annotated[float, typer.Option(help="Refuse a recipe needing more GiB per device.")] = 0.0,
    json_out: Annotated[bool, typer.Option("--json", help="Print the plan as one JSON object.")] = False,
) -> None:
    """Compile the train step for a recipe's mesh without training: sizes, memory per device, FLOPs, shardings.

    Example: bigmodel plan recipes/base.toml --devices 8 --memory-budget-gb 16
    """
    import json

    if devices and "jax" not in sys.modules:  # fake CPU devices must be requested before jax starts
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
    import jax

    from bigmodel_cli import config
    from bigmodel_cli import plan as stage

    if devices and jax.device_count() != devices:
        raise UserError(f"--devices {devices}: this process already has {jax.device_count()} devices")
    cfg = config.load_config(recipe, overrides or [])
    _setup_jax()
    result = stage.run(cfg, memory_budget_gb)
    if json_out:
        print(json.dumps(result))
        return
    from rich.console import Console

    stage.render(result, Console(highlight=False, width=None if sys.stdout.isatty() else 160))


def report(
    run_dirs: Annotated[
        list[Path], typer.Argument(parser=storage.parse, help="One or more run directories to compare.")
    ],
    out: Annotated[Path, typer.Option("--out", parser=storage.parse, help="report.png or report.html")] = Path(
        "report.png"
    ),
) -> None:
    """Plot loss, validation loss, learning rate and throughput of runs, with their final metrics.

    Example: bigmodel report runs/a runs/b --out report.html
    """
    from bigmodel_cli import report as stage

    path = stage.run(list(run_dirs), out)
    _console().result({"out": str(path)})


def runs(
    root: Annotated[Path, typer.Argument(parser=storage.parse, help="Directory holding run directories.")] = Path(
        "runs"
    ),
) -> None:
    """List runs under a directory with their step, last loss and status.

    Example: bigmodel runs runs/
    """
    from bigmodel_cli import report as stage

    stage.print_runs(stage.list_runs(root), root, json_lines=_options["log_format"] == "json")
