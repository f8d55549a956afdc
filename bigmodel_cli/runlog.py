"""Run logger: one JSON line per step in metrics.jsonl, plus TensorBoard and optional W&B scalars."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from bigmodel_cli import atomic, storage
from bigmodel_cli.rundir import METRICS_FILE, TENSORBOARD_DIR


def _as_float(value: Any) -> float | None:
    """Return value as a float (accepts numpy/jax scalars), or None when it is not numeric."""
    if isinstance(value, str):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _json_value(value: Any) -> Any:
    """Make value JSON-safe: NaN/inf become null, since bare NaN is not valid JSON."""
    number = _as_float(value)
    if number is None:
        return value
    return number if math.isfinite(number) else None


def tag_for(key: str) -> str:
    """TensorBoard tag for a metric key: eval_* keys go under eval/, everything else under train/."""
    if key.startswith("eval_"):
        return "eval/" + key.removeprefix("eval_")
    return "train/" + key


class RunLogger:
    """Append metrics to RUN_DIR/metrics.jsonl, TensorBoard and (optionally) Weights & Biases."""

    def __init__(
        self,
        run_dir: str | Path,
        *,
        enabled: bool = True,
        tensorboard: bool = True,
        wandb_project: str = "",
    ) -> None:
        self.run_dir = storage.path(run_dir)
        self.enabled = enabled
        self.path = self.run_dir / METRICS_FILE
        self._use_tensorboard = tensorboard
        self._file: Any = None
        # A bucket's object cannot be appended to: for a gs:// run the lines are kept here and the whole object
        # is rewritten at each step (metrics.jsonl stays small: one line per logged step).
        self._lines: list[str] | None = None
        self._tb: Any = None
        self._purge_step: int | None = None
        self._wandb: Any = None
        if not enabled:
            return
        if wandb_project:
            # Imported here so wandb stays an optional dependency that costs nothing when unused.
            try:
                import wandb
            except ImportError as e:
                msg = "wandb_project is set but wandb is not installed: pip install wandb"
                raise RuntimeError(msg) from e
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if wandb_project:
            local_dir = None if storage.is_url(self.run_dir) else str(self.run_dir)  # wandb writes locally only
            self._wandb = wandb.init(project=wandb_project, name=self.run_dir.name, dir=local_dir)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Record metrics for one step everywhere this logger writes to."""
        if not self.enabled:
            return
        step = int(step)
        record = {"step": step} | {k: _json_value(v) for k, v in metrics.items() if k != "step"}
        line = json.dumps(record) + "\n"
        if storage.is_url(self.path):
            if self._lines is None:
                self._lines = self._read_lines()
            self._lines.append(line)
            atomic.write_text(self.path, "".join(self._lines))
        else:
            if self._file is None:
                self._file = self.path.open("a", encoding="utf-8")
            self._file.write(line)
            # Flush every line so a killed run keeps everything it logged.
            self._file.flush()

        scalars = {k: f for k, v in metrics.items() if k != "step" and (f := _as_float(v)) is not None}
        if self._use_tensorboard and scalars:
            writer = self._tensorboard()
            for key, value in scalars.items():
                writer.add_scalar(tag_for(key), value, global_step=step)
            writer.flush()
        if self._wandb is not None and scalars:
            self._wandb.log({tag_for(k): v for k, v in scalars.items()}, step=step)

    def truncate_after(self, step: int) -> None:
        """Drop lines with a step above `step`: those a killed run wrote after the checkpoint resumed from."""
        if not self.enabled:
            return
        self._close_file()
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        # The next TensorBoard writer marks later steps of older event files as superseded.
        self._purge_step = step + 1
        if not self.path.exists():
            return
        kept = []
        for line in self._read_lines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by the kill
            logged_step = record.get("step") if isinstance(record, dict) else None
            if isinstance(logged_step, int) and logged_step <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
        atomic.write_text(self.path, "".join(kept))
        self._lines = kept if storage.is_url(self.path) else None

    def _read_lines(self) -> list[str]:
        """metrics.jsonl's lines as they are (none when it does not exist yet)."""
        if not self.path.exists():
            return []
        with self.path.open(encoding="utf-8") as f:
            return list(f)

    def close(self) -> None:
        """Flush and close every sink; safe to call more than once."""
        self._close_file()
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _tensorboard(self) -> Any:
        """Open the TensorBoard writer on first use, so truncate_after can still set its purge step."""
        if self._tb is None:
            SummaryWriter = _summary_writer_class()

            if storage.is_url(self.run_dir):
                _send_tensorboard_urls_through_storage()

            # tensorboardX names event files by the second and overwrites on a clash; a nanosecond
            # suffix keeps a quickly restarted writer's file separate and still sorted by time.
            self._tb = SummaryWriter(
                logdir=str(self.run_dir / TENSORBOARD_DIR),
                purge_step=self._purge_step,
                filename_suffix=f".{time.time_ns()}",
            )
        return self._tb

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _summary_writer_class() -> type:
    """tensorboardX's SummaryWriter, imported on first use to keep `bigmodel --help` and other commands fast.
    tensorboardX imports torch whenever it is installed, only for a type hint: 1.3 s and about 170 MB of a
    JAX process. Hiding torch for that one import costs nothing (its writers take numpy arrays)."""
    hide = "torch" not in sys.modules
    if hide:
        sys.modules["torch"] = None  # type: ignore[assignment]  # makes `import torch` raise ImportError
    try:
        from tensorboardX import SummaryWriter
    finally:
        if hide:
            del sys.modules["torch"]
    return SummaryWriter


class _ObjectEventFile:
    """An event file in a bucket for tensorboardX: an object cannot be appended to, so each flush rewrites the
    whole object (the same scheme as metrics.jsonl). tensorboardX's own GCS writer uploads again from its
    destructor, after close, which at exit can retry for minutes and print a traceback."""

    def __init__(self, url: str) -> None:
        self.path, self.data, self.closed = storage.path(url), bytearray(), False

    def write(self, data: bytes) -> None:
        self.data += data

    def flush(self) -> None:
        if not self.closed:
            self.path.write_bytes(bytes(self.data))

    def close(self) -> None:
        self.flush()
        self.closed = True


class _ObjectEventFiles:
    @staticmethod
    def open(url: str) -> _ObjectEventFile:
        return _ObjectEventFile(url)

    @staticmethod
    def directory_check(url: str) -> None:
        """A bucket has no directories to create."""


def _send_tensorboard_urls_through_storage() -> None:
    from tensorboardX.record_writer import register_writer_factory

    register_writer_factory("gs", _ObjectEventFiles())
