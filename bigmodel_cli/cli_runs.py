"""`bigmodel plan`, `report` and `runs`: look at recipes and runs without training, and print what they find."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from bigmodel_cli import storage
from bigmodel_cli.cli_app import (
    MODEL_SOURCES,
    Overrides,
    _console,
    _options,
    _setup_jax,
)
from bigmodel_cli.errors import UserError


def plan(
    recipe_or_model: Annotated[
        Path,
        typer.Argument(
            parser=storage.parse, help=f"A TOML pretraining recipe, or a model to finetune: {MODEL_SOURCES}."
        ),
    ],
    overrides: Overrides = None,
    devices: Annotated[int, typer.Option(help="Plan for N devices (on CPU: N fake devices).")] = 0,
    memory_budget_gb: Annotated[float, typer.Option(help="Refuse a plan needing more GiB per device.")] = 0.0,
    json_out: Annotated[bool, typer.Option("--json", help="Print the plan as one JSON object.")] = False,
    tokens: Annotated[
        float | None, typer.Option(help="Price training on N tokens (e.g. 2e10): wall time, chip-hours.")
    ] = None,
    chip: Annotated[
        str, typer.Option(help="Chip to price --tokens on, a row of the peak table (e.g. 'TPU v5e').")
    ] = "",
    chips: Annotated[int | None, typer.Option(help="Chips to price --tokens on (default: the mesh's devices).")] = None,
    mfu: Annotated[
        float | None, typer.Option(help="Model-FLOPs utilisation for --tokens (default: measured, else 0.4).")
    ] = None,
    price_per_chip_hour: Annotated[float | None, typer.Option(help="Dollars per chip-hour, to price --tokens.")] = None,
) -> None:
    """Compile the train step without training: sizes, trainable parameters, memory per device, FLOPs, shardings;
    with --tokens, the time, chip-hours and dollars of a training budget.

    A recipe plans pretraining it; a model plans finetuning it (from its config alone, no weights), with the
    finetuning defaults and --set train.batch_size, train.grad_accum, data.seq_len, lora.*, mesh.*.

    Example: bigmodel plan recipes/base.toml --devices 8 --memory-budget-gb 16

    Example: bigmodel plan hf:Qwen/Qwen2.5-7B --set lora.rank=8 --set data.seq_len=2048 --memory-budget-gb 80

    Example: bigmodel plan recipes/base.toml --tokens 5e9 --chips 8 --chip 'NVIDIA H100' --price-per-chip-hour 3
    """
    import json

    if devices < 0:
        raise UserError(f"--devices {devices}: give a number of devices, at least 1 (0: those of this machine)")
    if memory_budget_gb < 0:
        raise UserError(f"--memory-budget-gb {memory_budget_gb:g}: give GiB per device above 0 (0: no budget)")
    if devices and "jax" not in sys.modules:  # fake CPU devices must be requested before jax starts
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
    import jax

    from bigmodel_cli import config
    from bigmodel_cli import plan as stage

    if devices and jax.device_count() != devices:
        raise UserError(f"--devices {devices}: this process already has {jax.device_count()} devices")
    stage.check_cost_options(tokens, chip, chips, mfu, price_per_chip_hour)
    pretraining = str(recipe_or_model).endswith(".toml")
    if pretraining:
        cfg, run = config.load_config(recipe_or_model, overrides or []), stage.run
    else:  # any other argument is a model source
        cfg, run = stage.finetune_config(overrides or []), functools.partial(stage.run_finetune, recipe_or_model)
    _setup_jax()
    result = run(cfg, memory_budget_gb)
    if tokens is not None:
        result["cost"] = stage.training_cost(result, tokens, chip, chips, mfu, price_per_chip_hour, pretraining)
    if json_out or _options["log_format"] == "json":
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
    """Plot loss, validation loss, learning rate and throughput of runs, with their final metrics (and, in HTML,
    each run's `evaluate --suite` tables).

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
