"""`bigmodel plan`, `report` and `runs`: look at recipes and runs without training, and print what they find."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

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
    from rich.table import Table

    out = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
    if result["note"]:
        out.print(f"note: {result['note']}")
    gib = {k: f"{v / 2**30:.3f} GiB" for k, v in result["bytes_per_device"].items()}
    out.print(f"parameters: {result['params']:,} | mesh {result['mesh']} on {result['devices']} devices")
    out.print(
        f"per device: params {gib['params']}, optimizer {gib['optimizer']}, "
        f"activations+temporaries {gib['activations_and_temporaries']}, total {gib['total']}"
    )
    out.print(
        f"FLOPs per step: model {result['model_flops_per_step']:.3e} "
        f"(XLA, per device: {result['xla_flops_per_step_per_device']:.3e}), "
        f"{result['tokens_per_step']:,} tokens per step"
    )
    table = Table("parameter", "shape", "dtype", "sharding")
    for row in result["parameters"]:
        table.add_row(row["name"], "x".join(map(str, row["shape"])), row["dtype"], row["sharding"])
    out.print(table)


def report(
    run_dirs: Annotated[list[Path], typer.Argument(help="One or more run directories to compare.")],
    out: Annotated[Path, typer.Option("--out", help="report.png or report.html")] = Path("report.png"),
) -> None:
    """Plot loss, validation loss, learning rate and throughput of runs, with their final metrics.

    Example: bigmodel report runs/a runs/b --out report.html
    """
    from bigmodel_cli import report as stage

    path = stage.run(list(run_dirs), out)
    _console().result({"out": str(path)})


def runs(root: Annotated[Path, typer.Argument(help="Directory holding run directories.")] = Path("runs")) -> None:
    """List runs under a directory with their step, last loss and status.

    Example: bigmodel runs runs/
    """
    import json

    from bigmodel_cli.report import list_runs

    found = list_runs(root)
    if _options["log_format"] == "json":
        for row in found:
            print(json.dumps({k: (str(v) if k == "path" else v) for k, v in row.items()}))
        return
    if not found:
        print(f"no runs under {root}")
        return
    width = max(len(str(r["path"])) for r in found)
    print(f"{'run':<{width}}  {'step':>7}  {'loss':>8}  {'val_loss':>8}  status")
    for r in found:
        loss = f"{r['loss']:.4f}" if r["loss"] is not None else "-"
        val = f"{r['val_loss']:.4f}" if r["val_loss"] is not None else "-"
        print(
            f"{str(r['path']):<{width}}  {r['step'] if r['step'] is not None else '-':>7}  {loss:>8}  {val:>8}  "
            f"{r['status']}"
        )
