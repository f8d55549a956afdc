"""The Typer app behind `bigmodel`: global options, the option types commands share, and `command`, which gives
every subcommand its one-line errors and exit codes."""

from __future__ import annotations

import functools
import logging
import os
import signal
import socket
import sys
import threading
import typing
from pathlib import Path
from typing import Annotated

import typer

from bigmodel_cli import __version__, host, rundir, storage
from bigmodel_cli.errors import UserError

app = typer.Typer(
    name="bigmodel",
    help="Raw text to a pretrained, evaluated and exported Llama-style Transformer.\n\nExample: bigmodel quickstart",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

_options = {"debug": False, "log_format": "rich", "quiet": False}

Coordinator = Annotated[str, typer.Option(help="Multi-process run: HOST:PORT of process 0 (or BIGMODEL_COORDINATOR).")]
NumProcesses = Annotated[int, typer.Option(help="Multi-process run: how many processes (or BIGMODEL_NUM_PROCESSES).")]
ProcessId = Annotated[int, typer.Option(help="Multi-process run: this process's index (or BIGMODEL_PROCESS_ID).")]

Resume = Annotated[str, typer.Option(help="auto: continue if checkpoints exist; never; must.")]
AllowConfigChange = Annotated[bool, typer.Option(help="Resume even though the recipe changed.")]
ProfileSteps = Annotated[
    str,
    typer.Option(
        help="A:B: write a jax.profiler trace of steps A to B-1 (B excluded, counted from 1) to RUN/profile "
        "(sets train.profile_steps; see docs/profiling.md)."
    ),
]


def profile_values(profile_steps: str) -> dict:
    """--profile-steps as the recipe key it sets (a --set of the same key still wins)."""
    return {"train": {"profile_steps": profile_steps}} if profile_steps else {}


# What every model argument takes (bigmodel_cli/modelio.py): hf: names a local directory when one exists, else a Hub id.
MODEL_SOURCES = (
    "a run directory, one of its checkpoints, an export, hf:DIR, or hf:ORG/NAME[@REV] "
    "(a Hugging Face Hub model, unless a directory of that name exists)"
)
Quantize = Annotated[
    str, typer.Option(help="int8: weight-only int8 weights with per-channel scales, for CPU and edge inference.")
]
# translate's second file, wherever it lies (storage.parse keeps a gs:// URL whole)
Data2 = Annotated[
    Path | None, typer.Option(parser=storage.parse, help="translate: target-language file aligned with --data.")
]
Overrides = Annotated[
    list[str] | None, typer.Option("--set", help="Override a recipe key, e.g. --set optim.lr=1e-3 (repeatable).")
]


def _version(value: bool) -> None:
    if value:
        print(f"bigmodel {__version__}")
        raise typer.Exit()


@app.callback()
def global_options(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show Python tracebacks for errors.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only final results.")] = False,
    log_format: Annotated[
        str, typer.Option("--log-format", help="rich (default) or json: one object per line.")
    ] = "rich",
) -> None:
    """Raw text to a pretrained, evaluated and exported Llama-style Transformer."""
    if log_format not in ("rich", "json"):  # refused as click refuses any bad option value: usage, exit 2
        raise typer.BadParameter(f"{log_format!r}: use rich or json", param_hint="'--log-format'")
    _options.update(debug=debug, quiet=quiet, log_format=log_format)
    if not debug:  # gcsfs logs every failed try with its traceback; the command's last line names the cause
        logging.getLogger("gcsfs").setLevel(logging.CRITICAL)
    from bigmodel_cli.console import set_track_mode

    set_track_mode("quiet" if quiet else log_format)


def _console():
    from bigmodel_cli.console import Console

    return Console("quiet" if _options["quiet"] else _options["log_format"])


def _setup_jax(coordinator: str = "", num_processes: int = 0, process_id: int = -1, inference: bool = False) -> None:
    from bigmodel_cli import parallel, utils

    if inference:  # host.MEMORY_SCHEDULING: no float32 copy of a bfloat16 model
        os.environ["XLA_FLAGS"] = host.with_memory_scheduling(os.environ.get("XLA_FLAGS", ""))

    utils.enable_compilation_cache()
    parallel.init_distributed(coordinator, num_processes, process_id)


def command(fn):
    """Register a subcommand whose end is one line and an exit code: 0 done, 2 a UserError, 1 an internal or
    I/O error, 128 + the signal when stopped (130 SIGINT, 143 SIGTERM); the table is in rundir."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        ended = ("failed", "")  # how to mark a run directory that the command still holds when it ends
        previous = _stop_on_signals()
        try:
            _check_storage_clients(fn, kwargs)
            result = fn(*args, **kwargs)
            ended = ("", "")
            return result
        except UserError as err:
            ended = ("failed", str(err))
            if _options["debug"]:
                raise
            print(f"error: {err}", file=sys.stderr)
            raise typer.Exit(2) from None
        except KeyboardInterrupt as err:  # Ctrl-C, or rundir.Stopped: a signal stopped a run (getattr: either)
            ended = ("stopped", "")
            print(getattr(err, "message", "interrupted"), file=sys.stderr)
            raise typer.Exit(getattr(err, "exit_code", 130)) from None
        except OSError as err:
            if _options["debug"]:
                raise
            print(f"error: {_os_error_line(err)}", file=sys.stderr)
            raise typer.Exit(1) from None
        except Exception as err:  # a bug, not bad input: say so, and how to see the traceback
            if _options["debug"]:
                raise
            print(
                f"error: internal error {type(err).__name__}: {err} (rerun with --debug for details)", file=sys.stderr
            )
            raise typer.Exit(1) from None
        finally:
            rundir.release_all(*ended)
            for sig, handler in (previous or {}).items():  # None: a handler set outside Python, i.e. the default
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)

    return app.command()(wrapper)


def _os_error_line(err: OSError) -> str:
    """An I/O error as one line: the file, what went wrong, and where to look. An object store that cannot be
    reached (no network, a name that does not resolve) is not a path or disk problem."""
    where = f"{err.filename}: " if err.filename else ""
    if isinstance(err, ConnectionError | TimeoutError | socket.gaierror) or type(err).__module__.startswith("aiohttp"):
        return (
            f"{where}{err}: the storage service could not be reached (check the network; for gs://, the "
            "credentials too: gcloud auth application-default login)"
        )
    return f"{where}{err.strerror or err} (check the path and free disk space)"


def _check_storage_clients(fn, options: dict) -> None:
    """Refuse, before the command writes anything, a URL directory whose storage client is not installed."""
    from typer.models import OptionInfo

    hints = typing.get_type_hints(fn, include_extras=True)
    for name, value in options.items():
        is_option = any(isinstance(m, OptionInfo) for m in getattr(hints.get(name), "__metadata__", ()))
        label = "--" + name.replace("_", "-") if is_option else name.upper()
        for item in value if isinstance(value, list | tuple) else [value]:
            if not isinstance(item, str):  # a parsed directory (--set strings and the like are checked by config)
                storage.check_client(item, label)


def _stop_on_signals() -> dict | None:
    """Make SIGTERM and SIGINT raise rundir.Stopped (exit 143 or 130, a true status.json) rather than kill the
    process mid-write, and record them (rundir.RECEIVED); returns {signal: the previous handler} to restore, or
    None off the main thread, where handlers cannot be set."""
    if threading.current_thread() is not threading.main_thread():
        return None
    rundir.RECEIVED.clear()  # this command's signals only (tests run many commands in one process)
    return {sig: signal.signal(sig, rundir.raise_stopped) for sig in (signal.SIGTERM, signal.SIGINT)}
