"""A jax.profiler trace of a range of train steps (train.profile_steps), written into the run directory."""

from __future__ import annotations

from pathlib import Path

import jax

from bigmodel_cli import rundir, storage
from bigmodel_cli.console import Console
from bigmodel_cli.errors import UserError


def check(cfg, run_dir: Path) -> None:
    """Refuse a trace the profiler could not write: it writes local files only."""
    if cfg.train.profile_range() and storage.is_url(run_dir):
        raise UserError(
            f"--profile-steps writes its trace to a local directory, not {run_dir}: profile with a local --run-dir"
        )


class StepTrace:
    """Starts a trace before step A and stops it once step B-1 has finished on the device.

    Steps are counted from 1, as in metrics.jsonl. Dispatch is asynchronous, so the trace starts only after the
    previous step's outputs are ready and stops only after the last traced step's are: no work of the steps
    before or after the range shows in it. A run resumed after step A traces nothing (its range would be cut);
    only the first process traces.
    """

    def __init__(self, steps: range | None, run_dir: Path, first_step: int, console: Console):
        self.directory = Path(run_dir) / rundir.PROFILE_DIR
        self.console = console
        self.active = False
        self.last_traced = 0
        self.steps = steps if steps and jax.process_index() == 0 else None
        if self.steps and first_step > self.steps.start:
            console.info(f"--profile-steps {steps.start}:{steps.stop}: resumed at step {first_step}, no trace")
            self.steps = None

    def before(self, step: int, state) -> None:
        """Called before step `step` runs, with the state it will start from."""
        if self.steps and step == self.steps.start:
            jax.block_until_ready(state)
            jax.profiler.start_trace(str(self.directory), create_perfetto_trace=True)
            self.active = True

    def after(self, step: int, outputs) -> None:
        """Called once step `step` is dispatched, with its outputs."""
        self.last_traced = step
        if self.active and step == self.steps[-1]:
            jax.block_until_ready(outputs)
            self.stop()

    def stop(self) -> None:
        """End the trace (also when the run stops inside the range) and say where it is."""
        if not self.active:
            return
        self.active = False
        jax.profiler.stop_trace()
        self.console.info(f"profile of steps {self.steps.start} to {self.last_traced} written to {self.directory}")
