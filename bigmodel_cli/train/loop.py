"""The training loop shared by pretrain and finetune: its setup (layout, data, run directory), the sharded state
and compiled step, checkpoints, logging."""

from __future__ import annotations

import contextlib
import functools
import logging
import signal
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from bigmodel_cli import atomic, parallel, rundir
from bigmodel_cli import config as config_lib
from bigmodel_cli.console import Console
from bigmodel_cli.errors import UserError
from bigmodel_cli.model.sizing import count_params, train_flops_per_token
from bigmodel_cli.runlog import RunLogger
from bigmodel_cli.train import optim, profile
from bigmodel_cli.train.checkpoint import Checkpoints
from bigmodel_cli.train.memory import check_fits
from bigmodel_cli.train.state import Initial, jit_train_step, make_state
from bigmodel_cli.train.step import LossFn, eval_step, merge_params, token_loss
from bigmodel_cli.utils import device_peak_flops


@dataclass(frozen=True)
class Batches:
    """A run's data as the loop reads it."""

    train: Callable[[int], dict]  # step -> this process's rows of the global batch (numpy)
    val: Callable[[], Iterable[dict]] | None = None  # a fresh iterator over validation batches; None: no validation


@dataclass
class LoopInputs:
    """What a stage hands the loop: the config and mesh, where to write, and how to get batches."""

    cfg: Any  # a config with model/optim/train/mesh/checkpoint sections
    mesh: Mesh  # built once per run by the stage, from cfg.mesh
    run_dir: Path
    # Opens the data, reading only (opening checks it): called once the layout is checked, before the run
    # directory is touched, so that damaged data leaves nothing behind.
    open_batches: Callable[[], Batches]
    seq_len: int
    meta: dict  # saved with every checkpoint (data fingerprint, tokenizer...)
    console: Console
    initial: Initial | None = None  # start from these weights (finetuning) instead of fresh ones
    dropout_seed: int | None = None  # seeds dropout (LoRA) when the model uses any
    loss: LossFn = token_loss  # what the step minimises (finetune --task preference: a preference loss)


def run(
    inp: LoopInputs,
    *,
    resume: str = "auto",
    allow_config_change: bool = False,
    recorded_cfg: Any = None,
    on_ready: Callable[[Path], None] | None = None,
) -> dict:
    """Check the layout, open the data, prepare the run directory, then train (or resume) to cfg.train.steps;
    returns the final metrics.

    Nothing in the run directory is created or rewritten before every check has passed. recorded_cfg is what
    its config.toml records (the stage's own config; inp.cfg when None). on_ready(run_dir) runs once the
    directory is prepared, on every process, before training: the stage writes its own files there.
    """
    check_layout(inp.cfg, inp.mesh)
    profile.check(inp.cfg, inp.run_dir)
    batches = inp.open_batches()
    prepare_run_dir(inp.run_dir, recorded_cfg if recorded_cfg is not None else inp.cfg, resume, allow_config_change)
    if on_ready is not None:
        on_ready(inp.run_dir)
    return train(inp, batches)


def check_layout(cfg, mesh: Mesh) -> None:
    """Check what would otherwise fail only once training starts: the parameters' and the batch's layout on the
    mesh, wandb."""
    import importlib.util

    from bigmodel_cli.model.params import abstract_params

    abstract_params(cfg.model, mesh)  # shapes only: refuses mesh.rules that put two dimensions on one axis

    if cfg.train.wandb_project and importlib.util.find_spec("wandb") is None:
        raise UserError("train.wandb_project is set but wandb is not installed: pip install wandb (or unset it)")
    dp = parallel.data_parallel_size(mesh)
    micro = cfg.train.batch_size // cfg.train.grad_accum
    if micro % dp:
        raise UserError(
            f"train.batch_size / train.grad_accum = {micro} does not divide by the data-parallel size {dp} "
            f"(mesh.data * mesh.fsdp): pick a batch size that is a multiple of {dp * cfg.train.grad_accum}"
        )


FINGERPRINTED = {"base": "starting model (finetune.init_from)"}  # meta["fingerprints"] keys, as errors name them


def _check_same_inputs(inp: LoopInputs, saved: dict, step: int) -> None:
    """Refuse to resume on inputs the config names only by path but the checkpoints depend on (meta["fingerprints"]:
    the starting model a LoRA run keeps frozen, or preference tuning keeps as its reference), when they changed
    since step was saved."""
    for name, now in inp.meta.get("fingerprints", {}).items():
        then = saved.get("fingerprints", {}).get(name)
        if then is not None and now is not None and then != now:
            raise UserError(
                f"{inp.run_dir}: the {FINGERPRINTED[name]} changed since step {step} was saved (its weights "
                "differ): restore it, or finetune from it into a new --run-dir"
            )


class _Preempted:
    """SIGTERM/SIGINT set a flag; the loop checkpoints at the next step boundary and exits."""

    def __init__(self):
        self.signum: int | None = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:  # a second signal: stop now
            name = signal.Signals(signum).name
            raise rundir.Stopped(signum, f"{name} again: stopped at once; rerun the same command to resume")
        self.signum = signum

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def train(inp: LoopInputs, batches: Batches) -> dict:
    """Train (or resume) in the prepared run directory to cfg.train.steps; returns the final metrics.

    However it ends, status.json says how (see the table in rundir), no half-written checkpoint stays behind,
    the run directory's lock is released, and disk full or out of memory is a one-line UserError.
    """
    status = rundir.RunStatus(inp.run_dir, enabled=jax.process_index() == 0)
    try:
        with _quiet_background_errors():
            return _train(inp, batches, status)
    except KeyboardInterrupt as err:  # Ctrl-C, or rundir.Stopped by a signal
        if status.state != "stopped":  # not the graceful stop, which wrote its checkpoint's step
            status.end("stopped", str(err) or "interrupted")
        raise
    except BaseException as err:
        problem = rundir.explain_failure(err, inp.run_dir)
        status.end("failed", problem or str(err).strip().split("\n")[0][:300] or type(err).__name__)
        if problem:
            raise UserError(problem) from err
        raise
    finally:
        rundir.unlock(inp.run_dir)


@contextlib.contextmanager
def _quiet_background_errors():
    """Keep a failed checkpoint write to the one line that train() prints.

    Orbax's writer threads log each failure with a traceback (through absl), asyncio logs every write task
    whose exception nobody retrieved, and reports those still pending when Orbax closed its event loop; the
    same error is raised again in the main thread. After a failure the loggers stay quiet: the writer threads'
    stragglers come after train() has returned, while the process prints its one line and exits.
    """
    loggers = [logging.getLogger(name) for name in ("absl", "asyncio")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    if not getattr(sys.unraisablehook, "bigmodel_filter", False):  # kept after train: stragglers come late
        sys.unraisablehook = _drop_closed_loop_reports(sys.unraisablehook)
    yield
    for logger, level in zip(loggers, levels, strict=True):  # reached only when training did not fail
        logger.setLevel(level)


def _drop_closed_loop_reports(hook):
    def filtered(unraisable) -> None:
        if not (isinstance(unraisable.exc_value, RuntimeError) and "Event loop is closed" in str(unraisable.exc_value)):
            hook(unraisable)

    filtered.bigmodel_filter = True
    return filtered


def _train(inp: LoopInputs, batches: Batches, status: rundir.RunStatus) -> dict:
    """train() without its handling of how the run ends."""
    cfg, console, mesh = inp.cfg, inp.console, inp.mesh
    is_main = jax.process_index() == 0
    total_steps = cfg.train.steps

    # ---- model and optimizer state, created sharded; the compiled step ---------------------
    graphdef, tx, state = make_state(cfg, mesh, inp.initial)
    check_fits(cfg, mesh, state, inp.seq_len)  # before batches are built and the step compiled: minutes
    batch_sharding = parallel.batch_sharding(mesh)
    n_params, _ = count_params(cfg.model)
    step_fn = jit_train_step(
        graphdef, tx, cfg.train.grad_accum, state, mesh, cfg.train.inject_nonfinite_at, inp.dropout_seed, inp.loss
    )

    # ---- checkpoints: resume from the latest one --------------------------------------------
    ckpt = Checkpoints(
        inp.run_dir / rundir.CHECKPOINTS_DIR, keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save
    )
    start = 0
    if ckpt.latest_step():
        start, restored, saved_meta = ckpt.restore_latest_good(state, console.info)
        if restored is None:
            raise UserError(
                f"no checkpoint in {inp.run_dir / 'checkpoints'} could be restored (all moved aside as "
                "*.corrupt-N): rerun to start from scratch, or use a new --run-dir"
            )
        _check_same_inputs(inp, saved_meta, start)
        state = {**state, "step": jax.device_put(np.int32(start), parallel.replicated(mesh)), **restored}
        console.info(f"resumed from step {start} ({inp.run_dir / 'checkpoints' / str(start)})")

    eval_fn = jax.jit(functools.partial(eval_step, graphdef, loss=inp.loss), out_shardings=parallel.replicated(mesh))
    example = _to_device(batches.train(start), batch_sharding)
    t0 = time.perf_counter()
    with parallel.activate(mesh):
        lowered = step_fn.lower(state, example)
        t1 = time.perf_counter()
        compiled = lowered.compile()  # what the persistent compilation cache skips on a rerun
    lower_s, compile_s = t1 - t0, time.perf_counter() - t1
    console.info(
        f"model {n_params / 1e6:.2f}M params | mesh {dict(mesh.shape)} | "
        f"step traced in {lower_s:.2f}s, compiled in {compile_s:.2f}s"
    )

    tokens_per_step = cfg.train.batch_size * inp.seq_len
    # A LoRA run trains its adapters alone (state["frozen"] holds the base): MFU counts the FLOPs it runs, as plan.
    adapters = sum(x.size for x in jax.tree.leaves(state["params"])) if state.get("frozen") is not None else None
    flops_per_step = train_flops_per_token(cfg.model, inp.seq_len, adapters) * tokens_per_step
    peak = device_peak_flops(cfg.model.dtype) * (1 if jax.default_backend() == "cpu" else jax.device_count())

    def evaluate(state) -> float | None:
        if batches.val is None:
            return None
        params = merge_params(state.get("frozen"), state["params"])
        total, count = 0.0, 0.0
        with parallel.activate(mesh):
            for batch in batches.val():
                loss_sum, n = eval_fn(params, _to_device(batch, batch_sharding))
                total, count = total + float(loss_sum), count + float(n)
        return total / max(count, 1.0)

    def save(step: int, state: dict) -> None:
        ckpt.save(step, state, {**inp.meta, "step": step}, force=True)

    try:
        logger = RunLogger(inp.run_dir, enabled=is_main, wandb_project=cfg.train.wandb_project)
    except RuntimeError as err:  # wandb asked for but not installed
        raise UserError(str(err)) from None
    logger.truncate_after(start)
    last: dict[str, Any] = {}
    status.write("running", start)
    schedule = optim.schedule(cfg.optim, total_steps)
    skipped = 0
    trace = profile.StepTrace(cfg.train.profile_range(), inp.run_dir, start + 1, console)
    try:
        if rundir.RECEIVED:  # a stop during setup whose exception Python dropped (rundir.RECEIVED says when)
            raise rundir.Stopped(rundir.RECEIVED[-1])
        with _Preempted() as preempted, console.progress(total_steps, start) as progress:
            window_start, window_steps = time.perf_counter(), 0
            unchecked: list[tuple[int, Any]] = []  # (step, finite flag) of steps the host has not waited for
            for step, batch in _prefetch(batches.train, range(start, total_steps)):
                trace.before(step + 1, state)
                with parallel.activate(mesh):
                    state, metrics = compiled(state, _to_device(batch, batch_sharding))
                done = step + 1
                trace.after(done, (state, metrics))
                window_steps += 1
                is_last = done == total_steps
                boundary = done % cfg.train.log_every == 0 or done % cfg.checkpoint.every == 0 or is_last
                unchecked.append((step, metrics["finite"]))
                # Reading a flag waits for its step. Once a step, that wait cost a small model 2-4% of its CPU
                # step time; every _CHECK_EVERY steps it costs nothing, and a log line or checkpoint still
                # comes only after every step before it was checked.
                if boundary or preempted.signum or len(unchecked) >= _CHECK_EVERY:
                    for pending in unchecked:
                        skipped += _check_finite(*pending, cfg, batches.train, console)
                    unchecked.clear()
                if done % cfg.train.log_every == 0 or is_last or preempted.signum:
                    loss = float(metrics["loss"])  # waits for the step: timing below is honest
                    elapsed = time.perf_counter() - window_start
                    tokens_per_s = window_steps * tokens_per_step / elapsed
                    last = {
                        "loss": loss,
                        "lr": float(schedule(step)),
                        "grad_norm": float(metrics["grad_norm"]),
                        "tokens_per_s": tokens_per_s,
                        "mfu": flops_per_step * window_steps / elapsed / peak,
                    }
                    last.update({k: float(v) for k, v in metrics.items() if k not in _STEP_METRICS})  # the loss's
                    if skipped:
                        last["skipped_steps"] = skipped
                    evaluate_now = is_last or (cfg.train.eval_every and done % cfg.train.eval_every == 0)
                    if evaluate_now:
                        val_loss = evaluate(state)
                        if val_loss is not None:
                            last["val_loss"] = val_loss
                    logger.log(done, last)
                    progress.update(done, last)
                    window_start, window_steps = time.perf_counter(), 0
                if done % cfg.checkpoint.every == 0 or is_last or preempted.signum:
                    save(done, state)
                if preempted.signum and not is_last:
                    ckpt.wait()
                    name = signal.Signals(preempted.signum).name
                    message = f"{name}: saved a checkpoint at step {done}; rerun the same command to resume"
                    status.write("stopped", done, message=message)
                    raise rundir.Stopped(preempted.signum, message)  # the CLI exits 128 + signum, not 0
        ckpt.wait()
    finally:
        trace.stop()
        ckpt.close()
        logger.close()
    status.write("finished", total_steps, compile_s=compile_s, trace_s=lower_s)
    return {"step": total_steps, **last}


_STEP_METRICS = ("loss", "grad_norm", "tokens", "finite")  # what every step reports; a loss may add its own
_CHECK_EVERY = 16  # steps between the host's checks of the non-finite flags: a stop comes at most this late


def _check_finite(step: int, finite, cfg, train_batch: Callable, console: Console) -> int:
    """1 if 0-based `step` was skipped for a non-finite loss or gradient (skip mode); raises in stop mode."""
    if bool(finite):
        return 0
    indices = getattr(train_batch, "indices", None)
    shown = [i if isinstance(i, tuple) else int(i) for i in list(indices(step))[:8]] if indices else []
    where = f" (batch of data windows {shown}...)" if indices else ""
    if cfg.train.on_nonfinite == "skip":
        console.info(f"step {step + 1}: non-finite loss or gradient norm{where}: update skipped")
        return 1
    raise UserError(
        f"non-finite loss or gradient norm at step {step + 1}{where}: stopped, the last good checkpoint is "
        'kept; lower optim.lr, check the data, or set train.on_nonfinite = "skip"'
    )


def _to_device(batch: dict, sharding) -> dict:
    return {k: parallel.host_local_batch(v, sharding) for k, v in batch.items()}


def _prefetch(make_batch, steps: range):
    from bigmodel_cli.data.loader import prefetch

    return prefetch(make_batch, steps)


def prepare_run_dir(run_dir: Path, cfg: Any, resume: str, allow_config_change: bool) -> None:
    """Create or reuse a run directory and lock it for this process, refusing to mix two recipes in one.

    Nothing in it is written before every check has passed: the resume mode, the lock (another process may
    be writing here), and the changes from the run's config.toml (rundir.MAY_CHANGE_ON_RESUME).
    """
    if resume not in ("auto", "never", "must"):
        raise UserError(f"--resume must be auto, never or must; got {resume!r}")
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--run-dir {run_dir} is a file: choose a directory")
    if resume == "must" and rundir.latest_checkpoint(run_dir) == 0:
        raise UserError(f"--resume must: {run_dir} holds no checkpoint to resume from")
    if resume == "never" and run_dir.exists() and any(not rundir.is_lock_file(p) for p in run_dir.iterdir()):
        raise UserError(f"--resume never: {run_dir} is not empty; choose a new --run-dir")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create run directory {run_dir}: {err.strerror}") from None
    rundir.lock(run_dir, jax.process_index())  # held until train() ends, or the process does
    try:
        _check_config_change(run_dir, cfg, allow_config_change)
    except BaseException:  # released now, so that the command's end does not mark the run failed
        rundir.unlock(run_dir)
        raise
    if jax.process_index() == 0:
        rundir.remove_partial_checkpoints(run_dir)  # a killed writer's: nobody else writes here now
        atomic.write_text(run_dir / rundir.CONFIG_FILE, config_lib.dumps(cfg))
        rundir.RunStatus(run_dir).write("starting")


def _check_config_change(run_dir: Path, cfg: Any, allow_config_change: bool) -> None:
    """Refuse a config that differs from the run's, unless allowed and a resume can take every change."""
    config_file = run_dir / rundir.CONFIG_FILE
    if not config_file.is_file():
        return
    old = config_lib.load_config(config_file, base_dir=run_dir, cls=type(cfg))
    old_dict, new_dict = config_lib.to_dict(old), config_lib.to_dict(cfg)
    changed = config_lib.diff(old_dict, new_dict)
    if changed and not allow_config_change:
        raise UserError(
            f"{run_dir} was started with a different config ({'; '.join(changed)}): use a new --run-dir "
            "or pass --allow-config-change"
        )
    if not changed or rundir.latest_checkpoint(run_dir) == 0:
        return  # nothing to resume: the run starts again with the new config
    blocked = rundir.resume_blockers(old_dict, new_dict)
    if blocked:
        raise UserError(
            f"--allow-config-change cannot resume {run_dir} with {'; '.join(blocked)}: fixed for the life of a "
            "run, since its checkpoints were made with it; use a new --run-dir"
        )
