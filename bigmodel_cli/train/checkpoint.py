"""Orbax checkpoints: one layout (params, opt_state, meta) for every stage; export reads params only."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

# Orbax logs every save and restore at INFO/WARNING through absl; the CLI prints its own one-liners.
logging.getLogger("absl").setLevel(logging.ERROR)


def next_free(directory: Path) -> int:
    """The smallest n such that `<directory>.corrupt-<n>` does not exist yet."""
    n = 1
    while directory.with_name(f"{directory.name}.corrupt-{n}").exists():
        n += 1
    return n


def _abstract(tree: Any) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


class Checkpoints:
    """Keeps the last `keep` checkpoints of a run under RUN_DIR/checkpoints/<step>."""

    def __init__(self, directory: Path | str, keep: int = 3, async_save: bool = True, read_only: bool = False):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, read_only=read_only, create=not read_only
        )
        self.directory = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: dict, meta: dict, force: bool = False) -> None:
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(state["params"]),
            opt_state=ocp.args.StandardSave(state["opt_state"]),
            meta=ocp.args.JsonSave(meta),
        )
        self.manager.save(step, args=args, force=force)

    def restore(self, step: int, like: dict) -> tuple[dict, dict]:
        """Restore params and optimizer state into the shardings of `like`, plus the saved meta."""
        args = ocp.args.Composite(
            params=ocp.args.StandardRestore(_abstract(like["params"])),
            opt_state=ocp.args.StandardRestore(_abstract(like["opt_state"])),
            meta=ocp.args.JsonRestore(),
        )
        out = self.manager.restore(step, args=args)
        return {"params": out["params"], "opt_state": out["opt_state"]}, dict(out["meta"])

    def restore_latest_good(self, like: dict, warn) -> tuple[int, dict | None, dict]:
        """(step, state, meta) of the newest checkpoint that restores; damaged ones are moved aside, not deleted.

        A damaged checkpoint (missing files, empty array chunks, broken metadata) is renamed to
        `<step>.corrupt-<n>` so it stays for inspection, and so that training can write that step again.
        """
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                state, meta = self.restore(step, like)
                return step, state, meta
            except Exception as err:  # Orbax raises many types for damaged files: all mean "unusable"
                directory = self.directory / str(step)
                aside = directory.with_name(f"{step}.corrupt-{next_free(directory)}")
                os.replace(directory, aside)
                self.manager.reload()
                reason = str(err).strip().splitlines()[0][:160] if str(err).strip() else ""
                warn(
                    f"checkpoint {directory} is damaged ({type(err).__name__}: {reason}); moved to {aside.name}, "
                    "using the previous one"
                )
        return 0, None, {}

    def restore_params(self, step: int, like_params: Any) -> tuple[Any, dict]:
        """Only the parameters (and meta), for evaluate/generate/export."""
        args = ocp.args.Composite(params=ocp.args.StandardRestore(_abstract(like_params)), meta=ocp.args.JsonRestore())
        out = self.manager.restore(step, args=args)
        return out["params"], dict(out["meta"])

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
