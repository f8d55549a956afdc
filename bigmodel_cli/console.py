"""What a run prints: a rich progress bar on a terminal, plain or JSON lines elsewhere, nothing with --quiet."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Iterator

from rich.console import Console as RichConsole
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def _rank() -> int:
    """This process's index; without jax imported there is no multi-process run (preprocess stays light)."""
    jax = sys.modules.get("jax")
    return jax.process_index() if jax is not None else 0


class _Bar:
    def __init__(self, console: Console, total: int, start: int):
        self.console, self.total = console, total
        self.progress = None
        if console.mode == "rich" and console.rich.is_terminal:
            self.progress = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=console.rich,
            )
            self.task = self.progress.add_task("train", total=total, completed=start, info="")

    def update(self, step: int, metrics: dict) -> None:
        text = _format(metrics)
        if self.progress is not None:
            self.progress.update(self.task, completed=step, info=text)
            if "val_loss" in metrics:
                self.progress.console.print(f"step {step}/{self.total} | {text}")
        else:
            self.console.metrics(step, self.total, metrics)


def _format(metrics: dict) -> str:
    parts = [f"loss {metrics['loss']:.4f}"]
    if "val_loss" in metrics:
        parts.append(f"val_loss {metrics['val_loss']:.4f}")
    parts.append(f"lr {metrics['lr']:.2e}")
    parts.append(f"{metrics['tokens_per_s']:,.0f} tok/s")
    parts.append(f"MFU {100 * metrics['mfu']:.1f}%")
    return " | ".join(parts)


class Console:
    """mode: rich (progress bar on a TTY, plain lines otherwise), json (one object per line) or quiet."""

    def __init__(self, mode: str = "rich"):
        self.mode = mode
        # Only the first process talks, so a multi-host run prints one log, not one per worker.
        self.silent = mode == "quiet" or _rank() != 0
        self.rich = RichConsole(stderr=False, highlight=False)
        self.plain = not self.rich.is_terminal  # logs and pipes get whole lines: no wrapping, no colour

    def info(self, message: str) -> None:
        if self.silent:
            return
        if self.mode == "json":
            print(json.dumps({"event": "info", "message": message}), flush=True)
        elif self.plain:
            print(message, flush=True)
        else:
            self.rich.print(message, markup=False)

    def metrics(self, step: int, total: int, metrics: dict) -> None:
        if self.silent:
            return
        if self.mode == "json":
            print(json.dumps({"event": "metrics", "step": step, **metrics}), flush=True)
        else:
            print(f"step {step}/{total} | {_format(metrics)}", flush=True)

    def result(self, obj: dict) -> None:
        """A final result: JSON in json mode, key: value lines otherwise (printed even in quiet mode)."""
        if _rank() != 0:
            return
        if self.mode == "json":
            print(json.dumps(obj), flush=True)
        else:
            for key, value in obj.items():
                print(f"{key}: {value}", flush=True)

    @contextlib.contextmanager
    def progress(self, total: int, start: int = 0) -> Iterator[_Bar]:
        bar = _Bar(self, total, start) if not self.silent else _Silent()
        if getattr(bar, "progress", None) is not None:
            with bar.progress:
                yield bar
        else:
            yield bar

    @contextlib.contextmanager
    def throughput(self, name: str, every: float = 10.0) -> Iterator[_Throughput | _Silent]:
        """A meter for a job of unknown length that reads bytes and makes tokens (preprocess)."""
        if self.silent:
            yield _Silent()
            return
        meter = _Throughput(self, name, every)
        if meter.progress is not None:
            with meter.progress:
                yield meter
        else:
            yield meter
        meter.emit()  # the totals and mean rates, as one line that stays in the log


class _Silent:
    def update(self, step: int, metrics: dict) -> None:
        pass

    def advance(self, nbytes: int, tokens: int) -> None:
        pass


class _Throughput:
    """Bytes and tokens done so far, with their rates: a live line on a terminal, a log line every
    `every` seconds otherwise (a JSON object in json mode), so long jobs show life in any log."""

    def __init__(self, console: Console, name: str, every: float):
        self.console, self.name, self.every = console, name, every
        self.bytes = self.tokens = 0
        self.start = self.last_line = time.perf_counter()
        self.progress = None
        if console.mode == "rich" and console.rich.is_terminal:
            from rich.progress import SpinnerColumn

            self.progress = Progress(
                SpinnerColumn(),
                TextColumn(f"[bold]{name}"),
                TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(),
                console=console.rich,
                transient=True,
            )
            self.task = self.progress.add_task(name, total=None, info="")

    def fields(self) -> dict:
        seconds = max(time.perf_counter() - self.start, 1e-9)
        return {
            "bytes": self.bytes,
            "tokens": self.tokens,
            "bytes_per_s": self.bytes / seconds,
            "tokens_per_s": self.tokens / seconds,
            "seconds": seconds,
        }

    def text(self) -> str:
        f = self.fields()
        return (
            f"{f['bytes'] / 1e6:,.1f} MB | {f['bytes_per_s'] / 1e6:,.2f} MB/s | "
            f"{f['tokens']:,} tokens | {f['tokens_per_s']:,.0f} tok/s"
        )

    def advance(self, nbytes: int, tokens: int) -> None:
        self.bytes += nbytes
        self.tokens += tokens
        if self.progress is not None:
            self.progress.update(self.task, info=self.text())
        elif time.perf_counter() - self.last_line >= self.every:
            self.last_line = time.perf_counter()
            self.emit()

    def emit(self) -> None:
        if self.console.mode == "json":
            print(json.dumps({"event": "progress", "stage": self.name, **self.fields()}), flush=True)
        else:
            print(f"{self.name} | {self.text()}", flush=True)


_track_mode = {"mode": "rich"}  # set by the CLI's global options: rich, json or quiet


def set_track_mode(mode: str) -> None:
    _track_mode["mode"] = mode


def track(iterable, description: str, total: int | None = None, every: float = 10.0):
    """A progress bar over `iterable` on a terminal (with ETA); elsewhere a line on stderr every `every`
    seconds (a JSON object with --log-format json), so a long evaluation shows life in any log."""
    mode = _track_mode["mode"]
    if mode == "quiet" or _rank() != 0:
        return iterable
    if sys.stderr.isatty() and mode == "rich":
        from rich.progress import track as rich_track

        return rich_track(
            iterable, description=description, total=total, transient=True, console=RichConsole(stderr=True)
        )
    return _logged(iterable, description, total, every)


def _logged(iterable, description: str, total: int | None, every: float):
    start = last = time.perf_counter()
    done = 0
    for item in iterable:
        yield item
        done += 1
        now = time.perf_counter()
        if now - last >= every:
            last = now
            elapsed = now - start
            fields = {"stage": description, "done": done, "total": total, "seconds": round(elapsed, 1)}
            if _track_mode["mode"] == "json":
                print(json.dumps({"event": "progress", **fields}), file=sys.stderr, flush=True)
            else:
                eta = f" | ETA {elapsed / done * (total - done):.0f} s" if total else ""
                of = f"/{total}" if total else ""
                print(f"{description} | {done}{of} | {elapsed:.0f} s{eta}", file=sys.stderr, flush=True)
