"""The run directory: the names of its files, one writer at a time, a status.json that tells the truth, and how
a run ends.

How a training command ends, as its exit code and status.json (what a scheduler and `bigmodel runs` see):

| exit | status.json | what happened |
| ---- | ----------- | ------------- |
| 0    | finished    | the run reached train.steps |
| 1    | failed      | an internal error (a bug; rerun with --debug for the traceback), or an I/O error |
| 2    | failed      | a one-line error the user can act on: bad input or config, a config change that cannot resume, |
|      |             | the run directory locked by another process, a batch that cannot fit in memory, disk full, |
|      |             | out of memory, a non-finite loss; after the fix, a rerun resumes from the last checkpoint |
| 130  | stopped     | SIGINT (Ctrl-C): checkpointed at the next step boundary; a second SIGINT stops at once |
| 143  | stopped     | SIGTERM (preemption, a scheduler's stop): the same; 128 + the signal number |

status.json also holds "step" (for stopped and failed: the checkpoint a rerun resumes from) and, for those two,
"message": the line the command printed. A run being set up is "starting", a training one "running".
A refusal before the run directory is written (a bad recipe, a config change that cannot resume, the lock held
by another process) exits 2 and leaves status.json as it was.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import signal
import socket
import threading
import time
from pathlib import Path

from bigmodel_cli import atomic, storage
from bigmodel_cli.errors import UserError

# ---- what a run directory holds ----------------------------------------------------------------------------
# Every command that writes or reads a run directory takes the names from here. A model's files (tokenizer,
# task, final metrics) keep the same names in an export directory, so that a run and its export read alike.
CONFIG_FILE = "config.toml"  # the fully resolved config the run was made with
CHECKPOINTS_DIR = "checkpoints"  # Orbax checkpoints, one directory per step
PARTIAL_CHECKPOINT = "*.orbax-checkpoint-tmp*"  # Orbax writes a step here, then renames it to <step>
COMMIT_SUCCESS_FILE = "commit_success.txt"  # in a bucket: Orbax writes <step> in place, then this file in it
TOKENIZER_FILE = "tokenizer.model"  # a SentencePiece model (a data directory names its own the same)
# A Hugging Face model's tokenizer, under the names transformers gives them (see bigmodel_cli/data/tokenizer.py):
TOKENIZER_JSON_FILE = "tokenizer.json"  # the `tokenizers` library's; AutoTokenizer prefers it to tokenizer.model
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"  # BOS/EOS for tokenizer.model, special tokens, the chat template
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"  # older special-token names, read when the config has none
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # the chat template as transformers 5 saves it (wins over the config's)
MODEL_FILE = "model.json"  # finetuning: the ModelConfig of the model it started from
TASK_FILE = "task.json"  # finetuning: the task and its prompt options (taskinfo)
METRICS_FILE = "metrics.jsonl"  # one JSON line per logged step
TENSORBOARD_DIR = "tensorboard"  # TensorBoard event files of the same metrics
PROFILE_DIR = "profile"  # train.profile_steps: jax.profiler traces, plugins/profile/<time>/<host>.xplane.pb
EVAL_METRICS_FILE = "metrics.json"  # the latest `bigmodel evaluate` of the model
PREDICTIONS_FILE = "predictions.jsonl"  # a task evaluation's predictions, beside its metrics.json
SUITE_FILE = "suite.json"  # an evaluation suite's table (`evaluate --suite`), in RUN/eval-suite-NAME by default
STATUS_FILE = "status.json"  # starting, running, stopped, failed or finished, with a step
LOCK_FILE = "bigmodel.lock"  # held by the one process that writes (see lock())


def eval_dir(home: Path, task: str) -> Path:
    """Where `bigmodel evaluate --task TASK` writes for a model by default."""
    return storage.path(home) / f"eval-{task}"


# ---- config changes on resume ----------------------------------------------------------------------------
# --allow-config-change may change these keys when a run resumes from a checkpoint. They shape only the steps
# still to come: the optimizer's hyperparameters, the data (read with the same tokenizer), the batch, the mesh,
# how often to log, evaluate and save. Every other key is fixed for the life of a run, because the checkpoint
# was made with it: the parameter tree and its dtype (model shape, vocabulary, LoRA rank and targets, the
# starting model) or the tokenizer (synthetic tokens or not). A new key is fixed until it is listed here.
MAY_CHANGE_ON_RESUME: dict[str, str] = {
    "model.preset": "a name: the shape keys it sets are checked one by one",
    "model.max_seq_len": "RoPE has no learned positions",
    "model.rope_theta": "RoPE frequencies are computed, not stored",
    "model.norm_eps": "a constant of the computation",
    "model.dtype": "the compute dtype; parameters keep model.param_dtype",
    "model.attention": "an implementation choice",
    "model.attention_chunks": "an implementation choice",
    "model.init_std": "used only when a run starts",
    "model.scan_layers": "a layout of the same weights: checkpoints convert on restore",
    "data.path": "if its tokenizer is the run's (pretrain checks that before it touches the run directory)",
    "data.mixture": "if its tokenizer is the run's (pretrain checks that before it touches the run directory)",
    "data.seq_len": "RoPE has no learned positions",
    "optim.*": "hyperparameters (not optim.name, whose state differs; optim.grad_clip only between positive values: "
    "0 removes a stage of the optimizer)",
    "train.*": "steps, batch, accumulation, seed of the data order, remat, cadence of logs and evaluations",
    "mesh.*": "checkpoints restore onto any mesh",
    "checkpoint.*": "cadence, how many to keep, async saving",
    "task.*": "how task files are read",
    "finetune.train_file": "task data",
    "finetune.train_file2": "task data",
    "finetune.val_file": "task data",
    "finetune.val_file2": "task data",
    "finetune.val_fraction": "task data",
    "lora.alpha": "a scale of the adapters' output",
    "lora.dropout": "used only in training",
}


def resume_blockers(old: dict, new: dict) -> list[str]:
    """'section.key: old -> new' for each change that a resume from a checkpoint made with `old` cannot take."""
    blocked = []
    for section in sorted(set(old) | set(new)):
        a, b = old.get(section, {}), new.get(section, {})
        for key in sorted(set(a) | set(b)):
            name = f"{section}.{key}"
            if a.get(key) == b.get(key):
                continue
            allowed = name in MAY_CHANGE_ON_RESUME or f"{section}.*" in MAY_CHANGE_ON_RESUME
            if name == "optim.grad_clip" and ((a.get(key) or 0) > 0) != ((b.get(key) or 0) > 0):
                allowed = False
            if name == "optim.name" and (a.get(key) or "adamw") != (b.get(key) or "adamw"):
                allowed = False  # AdamW's moments and Muon's momentum are different trees
            if not allowed:
                blocked.append(f"{name}: {a.get(key)!r} -> {b.get(key)!r}")
    return blocked


# ---- one writer per run directory ------------------------------------------------------------------------
_held: dict[object, tuple[int | None, bool]] = {}  # run dir key -> (lock file descriptor, writes status.json)
# URL run dir key -> (its lock object, an event set to stop refreshing it, the thread that refreshes it)
_refreshers: dict[object, tuple[Path, threading.Event, threading.Thread]] = {}

# A bucket has no flock, and no process death to release one: the lock object is refreshed while held, and
# one not refreshed for this long is taken over (a holder on another host may have died without deleting it).
LOCK_REFRESH_S = 60.0
LOCK_STALE_S = 5 * 60.0


def _key(run_dir: Path):
    """One key per run directory, however it was spelled: a resolved Path, or the URL."""
    return str(run_dir).rstrip("/") if storage.is_url(run_dir) else Path(run_dir).resolve()


def _lock_name(process_index: int) -> str:
    return LOCK_FILE if process_index == 0 else f"{LOCK_FILE}.{process_index}"


def _holder_info() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def lock(run_dir: Path, process_index: int = 0) -> None:
    """Hold RUN_DIR's exclusive lock until unlock() or exit; a UserError names the host and PID that hold it.

    The OS releases a flock when its holder dies, however it dies, so the lock of a killed run is free at once
    and the next holder rewrites the host and PID. In a multi-process run each process locks its own file (all
    of them write checkpoint shards), so a second job is refused by every one of its processes.
    A gs:// run directory has no flock: see _lock_object.
    """
    key = _key(run_dir)
    if key in _held:  # this process already holds it (prepare_run_dir, then train)
        return
    if storage.is_url(run_dir):
        _lock_object(run_dir, key, process_index)
        return
    path = key / _lock_name(process_index)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        holder = _read_holder(fd)
        os.close(fd)
        if err.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
            return  # a filesystem without locks (some network mounts): run unlocked rather than not at all
        raise _in_use(run_dir, holder) from None
    info = json.dumps(_holder_info()) + "\n"
    os.ftruncate(fd, 0)
    os.pwrite(fd, info.encode(), 0)
    _held[key] = (fd, process_index == 0)


def writer_gone(run_dir: Path) -> bool:
    """True when no process holds RUN_DIR's lock any more: a status.json that still says "running" is then the
    last word of a killed process (kill -9, a lost machine). False while a writer holds it, or when unsure."""
    if storage.is_url(run_dir):
        try:
            held = json.loads((storage.path(run_dir) / LOCK_FILE).read_text())
        except (OSError, ValueError):
            return True  # unlock() deletes the object: none, and a status still "running", means no writer
        return isinstance(held, dict) and _lock_abandoned(held)
    try:
        fd = os.open(Path(run_dir) / LOCK_FILE, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # taken, then dropped at once: nobody held it
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def _in_use(run_dir: Path, holder: str) -> UserError:
    return UserError(
        f"{run_dir} is in use by another bigmodel process ({holder}): wait for it to end or stop it, "
        "or choose another --run-dir"
    )


def _lock_object(run_dir: Path, key, process_index: int) -> None:
    """The lock of a run directory in a bucket: an object holding the holder's host, PID, start and the time it
    was last refreshed (every LOCK_REFRESH_S, by a background thread, while held; deleted by unlock()).

    Another holder's lock object is respected unless its process is known to be gone: on this host, a PID that
    no longer runs (a killed run, rerun at once; a PID the OS gave to another process since holds it until
    stale); on any host, a lock not refreshed for LOCK_STALE_S.
    Limits: reading and then writing the object is not atomic, so two processes that start within the same
    moment may both take it (GCS's if-generation-match precondition would close that gap; the test emulator
    ignores preconditions, so it is not relied on); a holder whose refreshes stall for LOCK_STALE_S (a
    suspended machine) loses its lock to the next process; clocks of the hosts are compared, so they must agree.
    """
    path = storage.path(run_dir) / _lock_name(process_index)
    try:
        held = json.loads(path.read_text())
    except (OSError, ValueError):  # none yet, or unreadable (torn by nothing: an object is written whole)
        held = None
    if isinstance(held, dict) and not _lock_abandoned(held):
        raise _in_use(run_dir, _describe_holder(held))
    info = _holder_info()
    _write_lock_object(path, info)
    stop = threading.Event()
    thread = threading.Thread(target=_refresh_lock_object, args=(path, info, stop), daemon=True)
    thread.start()
    _refreshers[key] = (path, stop, thread)
    _held[key] = (None, process_index == 0)


def _lock_abandoned(held: dict) -> bool:
    if held.get("host") == socket.gethostname() and isinstance(held.get("pid"), int):
        if held["pid"] == os.getpid():
            return True  # an earlier command of this same process
        try:
            os.kill(held["pid"], 0)
        except ProcessLookupError:
            return True
        except OSError:
            pass  # it runs, as another user
    refreshed = held.get("refreshed")
    return not isinstance(refreshed, (int, float)) or time.time() - refreshed > LOCK_STALE_S


def _write_lock_object(path, info: dict) -> None:
    path.write_text(json.dumps({**info, "refreshed": time.time()}) + "\n")


def _refresh_lock_object(path, info: dict, stop: threading.Event) -> None:
    while not stop.wait(LOCK_REFRESH_S):
        with contextlib.suppress(Exception):  # a missed refresh is retried; the run must not die of it
            _write_lock_object(path, info)


def _describe_holder(info: dict) -> str:
    try:
        return f"pid {info['pid']} on host {info['host']}, since {info['since']}"
    except KeyError:
        return "its host and PID are not recorded yet"


def _read_holder(fd: int) -> str:
    """'pid N on host H, since T' from a lock file, as well as it can be read."""
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return "its host and PID are not recorded yet"
    return _describe_holder(info) if isinstance(info, dict) else "its host and PID are not recorded yet"


def unlock(run_dir: Path) -> None:
    """Release RUN_DIR's lock if this process holds it. The file stays: deleting it would let two holders in.
    A bucket's lock object, which nothing else releases, is deleted."""
    key = _key(run_dir)
    fd, _ = _held.pop(key, (None, False))
    if fd is not None:
        os.close(fd)
    refresher = _refreshers.pop(key, None)
    if refresher is not None:
        path, stop, thread = refresher
        stop.set()
        thread.join(timeout=60)  # a refresh under way would write the object again after its deletion
        with contextlib.suppress(OSError, ValueError):
            info = json.loads(path.read_text())
            if (info.get("host"), info.get("pid")) == (socket.gethostname(), os.getpid()):  # not taken over
                path.unlink()


def release_all(state: str = "", message: str = "") -> None:
    """At the end of a command, release the run directories it still holds, first ending their status as
    `state` (stopped or failed): the command ended between preparing a run and training it."""
    for run_dir, (_, writes_status) in list(_held.items()):
        run_dir = storage.path(run_dir)
        if state:
            RunStatus(run_dir, enabled=writes_status).end(state, message)
        unlock(run_dir)


def is_lock_file(path: Path) -> bool:
    return path.name.startswith(LOCK_FILE)


# ---- status.json and checkpoints left half-written -------------------------------------------------------
class RunStatus:
    """RUN_DIR/status.json: starting, running, stopped, failed or finished, with a step; written by process 0."""

    def __init__(self, run_dir: Path, enabled: bool = True):
        self.run_dir, self.enabled = storage.path(run_dir), enabled
        self.state = ""

    def write(self, state: str, step: int | None = None, **extra) -> None:
        self.state = state
        if self.enabled:
            step = latest_checkpoint(self.run_dir) if step is None else step
            atomic.write_json(self.run_dir / STATUS_FILE, {"state": state, "step": step, **extra})

    def end(self, state: str, message: str = "") -> None:
        """The last write of a run that did not finish: step is the checkpoint a rerun resumes from."""
        if self.enabled:
            remove_partial_checkpoints(self.run_dir)  # first: on a full disk this frees the room to write
        with contextlib.suppress(OSError):  # a status that cannot be written must not hide the error itself
            self.write(state, **({"message": message} if message else {}))


def latest_checkpoint(run_dir: Path) -> int:
    """The newest complete checkpoint's step (0 when there is none): where a rerun resumes."""
    directory = storage.path(run_dir) / CHECKPOINTS_DIR
    steps = [int(p.name) for p in _step_dirs(directory) if not _is_partial(p)]
    return max(steps, default=0)


def _step_dirs(directory: Path) -> list[Path]:
    return [p for p in directory.iterdir() if p.name.isdigit()] if directory.is_dir() else []


def _is_partial(step_dir: Path) -> bool:
    """In a bucket Orbax writes a step in place and marks it complete last, with this file (no rename there)."""
    return storage.is_url(step_dir) and not (step_dir / COMMIT_SUCCESS_FILE).exists()


def remove_partial_checkpoints(run_dir: Path) -> None:
    """Delete checkpoints that a dead or failed writer left half-written; only the lock holder may call this."""
    directory = storage.path(run_dir) / CHECKPOINTS_DIR
    if not directory.is_dir():
        return
    if storage.is_url(directory):
        for partial in filter(_is_partial, _step_dirs(directory)):
            with contextlib.suppress(OSError):
                partial.rmtree()
        return
    for partial in directory.glob(PARTIAL_CHECKPOINT):
        shutil.rmtree(partial, ignore_errors=True)


# ---- how a run ends ----------------------------------------------------------------------------------------
class Stopped(KeyboardInterrupt):
    """A run stopped by a signal. A KeyboardInterrupt, so that every `except Exception` lets it through, and
    code that cleans up after Ctrl-C does so after SIGTERM too. The CLI exits with 128 + the signal number."""

    def __init__(self, signum: int, message: str = ""):
        self.signum = signum
        self.message = message or f"{signal.Signals(signum).name}: stopped"
        super().__init__(self.message)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


# The stop signals raise_stopped has received. Python prints and drops an exception raised in a signal handler
# while a callback runs (JAX's garbage-collection hook: "Exception ignored in: _xla_gc_callback"), so the training
# loop looks here too before its first step: a stop must never become a full run that exits 0.
RECEIVED: list[int] = []


def raise_stopped(signum: int, frame) -> None:
    """A signal handler: stop the program with Stopped (a true status, the right exit code) instead of dying."""
    RECEIVED.append(signum)
    raise Stopped(signum)


def explain_failure(err: BaseException, run_dir: Path) -> str | None:
    """One line for a failure the user can act on (disk full, out of memory), or None for anything else."""
    seen: list[BaseException] = []
    while err is not None and len(seen) < 8:  # Orbax and XLA wrap the OS error: look down the chain
        seen.append(err)
        err = err.__cause__ or err.__context__
    text = " ".join(str(e) for e in seen)
    resume = f"rerun the same command to resume from step {latest_checkpoint(run_dir)}"
    if any(isinstance(e, OSError) and e.errno == errno.ENOSPC for e in seen) or "No space left on device" in text:
        return f"disk full while writing {run_dir}: free some space (or lower checkpoint.keep), then {resume}"
    if any(isinstance(e, OSError) and e.errno == errno.EDQUOT for e in seen) or "quota exceeded" in text.lower():
        return f"disk quota exceeded while writing {run_dir}: free some space, then {resume}"
    if any(isinstance(e, MemoryError) for e in seen) or "out of memory" in text.lower():
        return (
            "out of memory while training: lower train.batch_size, raise train.grad_accum, set train.remat=full "
            f"or add devices to mesh.fsdp, then {resume}"
        )
    return None
