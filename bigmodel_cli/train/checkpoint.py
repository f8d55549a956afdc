"""Orbax checkpoints: one layout (params, opt_state, meta) for every stage; export reads params only."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

# Orbax logs every save and restore at INFO/WARNING through absl; the CLI prints its own one-liners.
logging.getLogger("absl").setLevel(logging.ERROR)


def _abstract(tree: Any) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


class Checkpoints:
    """Keeps the last `keep` checkpoints of a run under RUN_DIR/checkpoints/<step>."""

    def __init__(self, directory: Path | str, keep: int = 3, async_save: bool = True, read_only: bool = False):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, read_only=read_only, create=not read_only
        )
        self.manager = ocp.CheckpointManager(Path(directory).absolute(), options=options)

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

    def restore_params(self, step: int, like_params: Any) -> tuple[Any, dict]:
        """Only the parameters (and meta), for evaluate/generate/export."""
        args = ocp.args.Composite(
            params=ocp.args.StandardRestore(_abstract(like_params)), meta=ocp.args.JsonRestore()
        )
        out = self.manager.restore(step, args=args)
        return out["params"], dict(out["meta"])

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
