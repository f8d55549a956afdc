"""Orbax checkpoints: one layout (params, opt_state, meta) for every stage; export reads params only.

Restoring tells two failures apart. A checkpoint that does not fit the model (a parameter missing, or of
another shape or dtype) is the user's config: `CheckpointMismatch`, one line, nothing touched. A checkpoint
whose files cannot be read or whose bytes fail their checksums is damage: training moves it aside and uses
the previous one; read-only commands skip it without touching the run directory.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
import xxhash

from bigmodel_cli import storage
from bigmodel_cli.errors import UserError
from bigmodel_cli.model import layout

# Orbax logs every save and restore at INFO/WARNING through absl; the CLI prints its own one-liners.
logging.getLogger("absl").setLevel(logging.ERROR)

ARRAY_ITEMS = ("params", "opt_state")


class CheckpointMismatch(UserError):
    """The checkpoint holds another model's arrays: a config error, not damage."""


class CheckpointDamaged(Exception):
    """The checkpoint's bytes are not what was saved."""


def _quiet_abandoned_reads() -> None:
    """Orbax reads a checkpoint's arrays concurrently. Once one read fails on a damaged file, the others are
    abandoned, and Python prints each one's failure as it collects it ("Exception ignored in: <coroutine object
    _read_array_index_and_device_put>", a TensorStore spec each: hundreds of lines). The caller reports the
    damage once; those echoes of it are dropped, and every other unraisable exception is printed as before."""
    previous = sys.unraisablehook
    if getattr(previous, "quiets_abandoned_reads", False):
        return

    def hook(unraisable) -> None:
        code = getattr(unraisable.object, "cr_code", None)
        if code is not None and code.co_name == "_read_array_index_and_device_put" and "orbax" in code.co_filename:
            return
        previous(unraisable)

    hook.quiets_abandoned_reads = True
    sys.unraisablehook = hook


def next_free(directory: Path) -> int:
    """The smallest n such that `<directory>.corrupt-<n>` does not exist yet."""
    n = 1
    while directory.with_name(f"{directory.name}.corrupt-{n}").exists():
        n += 1
    return n


def _abstract(tree: Any) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _name(path: tuple) -> str:
    """'layers.0.mlp.up_proj' or '1.0.mu.embed_tokens' for a key path: the names Orbax's metadata uses too."""
    return ".".join(str(next(getattr(k, a) for a in ("key", "idx", "name") if hasattr(k, a))) for k in path)


def _flat(tree: Any) -> dict[str, Any]:
    return {_name(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _reason(err: BaseException) -> str:
    """One line about an error: Orbax and TensorStore messages can run to dozens of lines."""
    text = str(err).strip()
    first = text.splitlines()[0][:160] if text else ""
    return first if isinstance(err, CheckpointDamaged) else f"{type(err).__name__}: {first}".rstrip(": ")


# ---- checksums ----------------------------------------------------------------------------------------
# What is hashed: each shard that Orbax writes (replica 0 of every distinct slice of a global array), keyed by
# its slice of the global array, e.g. "0:144,0:128". Why per shard: in a multi-process run no process holds a
# whole array, and gathering one to hash it would cost what the save costs. Each process hashes the shards it
# writes, from a host view of each (no copy on CPU; on GPU/TPU one device-to-host copy, as Orbax's own save
# makes), and the small tables are merged across processes so that every process saves and checks one meta.
# On restore, whatever the mesh now is, a single process holds every slice (from one shard, or assembled from
# several): it checks every byte. In a multi-process restore each process checks the saved slices that one
# of its shards holds whole (all of them when the mesh is the one saved with), and all processes agree on the
# verdict. xxh3_64: 22-28 GB/s on one core of the AVX-512 EPYC (sha1 ~2, blake2b ~1), ~4% of a 35m save or
# restore: scripts/bench/bench_checksum.py.


def _bounds(index: tuple, shape: tuple) -> tuple[tuple[int, int], ...]:
    return tuple((s.start or 0, n if s.stop is None else s.stop) for s, n in zip(index, shape, strict=True))


def _key(bounds: tuple[tuple[int, int], ...]) -> str:
    return ",".join(f"{a}:{b}" for a, b in bounds)


def _unkey(key: str) -> tuple[tuple[int, int], ...]:
    return tuple(tuple(int(v) for v in part.split(":")) for part in key.split(",")) if key else ()


def _hash(data: np.ndarray) -> str:
    return xxhash.xxh3_64_hexdigest(np.ascontiguousarray(data).reshape(-1).view(np.uint8))


def digest(tree: Any) -> str | None:
    """One hash of every array's bytes, whatever the mesh holds them on: what a LoRA run records of its frozen
    base, and preference tuning of its reference, to refuse going on with one that changed since. None where this
    process does not hold every array whole (a multi-process run), which then records nothing."""
    arrays = _flat(tree)
    if not all(getattr(x, "is_fully_addressable", True) for x in arrays.values()):
        return None
    hashes = "".join(f"{name}={_hash(np.asarray(x))};" for name, x in sorted(arrays.items()))
    return xxhash.xxh3_64_hexdigest(hashes.encode())


def describe(tree: Any) -> dict[str, dict]:
    """What meta["arrays"][item] holds: {array name: {"shape", "dtype", "xxh3": {slice: hash}}}."""
    hashes = shard_hashes(tree)
    return {
        name: {"shape": list(x.shape), "dtype": str(np.dtype(x.dtype)), "xxh3": hashes.get(name, {})}
        for name, x in _flat(tree).items()
    }


def shard_hashes(tree: Any) -> dict[str, dict[str, str]]:
    """{array name: {slice: hash}} for every shard of `tree` that is written, merged over all processes."""
    local: dict[str, dict[str, str]] = {}
    for name, x in _flat(tree).items():
        for shard in x.addressable_shards:
            if shard.replica_id == 0:
                local.setdefault(name, {})[_key(_bounds(shard.index, x.shape))] = _hash(np.asarray(shard.data))
    return _merge_across_processes(local)


def _merge_across_processes(local: dict[str, dict[str, str]]) -> dict[str, dict[str, str]]:
    if jax.process_count() == 1:
        return local
    from jax.experimental import multihost_utils

    blob = np.frombuffer(json.dumps(local).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.array([blob.size], np.int32))).ravel()
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: blob.size] = blob
    merged: dict[str, dict[str, str]] = {}
    for size, row in zip(sizes, np.asarray(multihost_utils.process_allgather(padded)), strict=True):
        for name, shards in json.loads(bytes(row[:size])).items():
            merged.setdefault(name, {}).update(shards)
    return merged


def first_bad_array(tree: Any, saved: dict[str, dict]) -> str | None:
    """The first array whose bytes differ from `saved` (as `describe` made it), checked where this process can."""
    bad = None
    for name, x in _flat(tree).items():
        shards = [(_bounds(s.index, x.shape), s) for s in x.addressable_shards]
        whole = None  # the array on the host, assembled once if some saved slice spans several local shards
        for key, want in saved.get(name, {}).get("xxh3", {}).items():
            data = _covering(_unkey(key), shards)
            if data is None and x.is_fully_addressable:
                whole = np.asarray(x) if whole is None else whole
                data = whole[tuple(slice(lo, hi) for lo, hi in _unkey(key))]
            if data is not None and _hash(data) != want:
                bad = f"{name} [{key}]" if key else name
                break
        if bad:
            break
    if jax.process_count() > 1:  # every process must take the same branch, or they would wait for each other
        from jax.experimental import multihost_utils

        flags = np.asarray(multihost_utils.process_allgather(np.array([bad is not None], np.int32)))
        if flags.any() and bad is None:
            bad = "an array checked by another process"
    return bad


def _covering(want: tuple, shards: list) -> np.ndarray | None:
    """The slice `want` of the global array, from a shard that holds all of it (None: another process has it)."""
    for have, shard in shards:
        if all(a <= lo and hi <= b for (a, b), (lo, hi) in zip(have, want, strict=True)):
            local = tuple(slice(lo - a, hi - a) for (a, _), (lo, hi) in zip(have, want, strict=True))
            return np.asarray(shard.data)[local]
    return None


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


# ---- does the checkpoint fit the model? ---------------------------------------------------------------


def first_difference(have: dict[str, tuple], like: Any) -> str | None:
    """How saved arrays ({name: (shape, dtype name)}) and those of `like` first differ; None if they do not."""
    want = {name: (tuple(x.shape), str(np.dtype(x.dtype))) for name, x in _flat(like).items()}
    for name, (shape, dtype) in want.items():
        if name not in have:
            return f"{name} missing from the checkpoint"
        if have[name][0] != shape:
            return f"{name}: shape {have[name][0]} in the checkpoint, {shape} in the model"
        if have[name][1] != dtype:
            return f"{name}: dtype {have[name][1]} in the checkpoint, {dtype} in the model"
    extra = [name for name in have if name not in want]
    return f"{extra[0]} is in the checkpoint but not in this model" if extra else None


class Checkpoints:
    """Keeps the last `keep` checkpoints of a run under RUN_DIR/checkpoints/<step>."""

    def __init__(self, directory: Path | str, keep: int = 3, async_save: bool = True, read_only: bool = False):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, read_only=read_only, create=not read_only
        )
        self.shown = storage.path(directory)  # as the user gave it, for messages
        self.directory = storage.absolute(directory)
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self._reader = ocp.StandardCheckpointHandler()  # reads the metadata of one item: see check_fits

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: dict, meta: dict, force: bool = False) -> None:
        """Save params and optimizer state, with each array's shape, dtype and shard hashes in meta["arrays"]."""
        arrays = {item: describe(state[item]) for item in ARRAY_ITEMS}
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(state["params"]),
            opt_state=ocp.args.StandardSave(state["opt_state"]),
            meta=ocp.args.JsonSave({**meta, "arrays": arrays}),
        )
        self.manager.save(step, args=args, force=force)

    def check_fits(self, step: int, like: dict, meta: dict | None = None) -> None:
        """Raise CheckpointMismatch if `step` holds other arrays than `like`; reads metadata only, no arrays."""
        if meta is None:
            meta = self._meta(step)
        for item, tree in like.items():
            saved = meta.get("arrays", {}).get(item)
            if saved is not None:  # our record: one small JSON file, read anyway for the checksums
                have = {name: (tuple(a["shape"]), a["dtype"]) for name, a in saved.items()}
            else:  # saved before the record existed: Orbax's metadata, which opens every array (~0.4 ms each)
                tree_metadata = _flat(self._reader.metadata(self.directory / str(step) / item))
                have = {name: (tuple(m.shape), str(np.dtype(m.dtype))) for name, m in tree_metadata.items()}
            difference = first_difference(have, tree)
            if difference:
                what, settings = ("", "model") if item == "params" else ("optimizer state ", "model or optim")
                raise CheckpointMismatch(
                    f"checkpoint {self.shown / str(step)} does not fit this model: {what}{difference} "
                    f"(the {settings} settings differ from those it was saved with)"
                )

    def restore(self, step: int, like: dict) -> tuple[dict, dict]:
        """Restore the items of `like` (params, opt_state) into its shardings, plus the meta; checked.

        Raises CheckpointMismatch when the model does not fit, anything else when the checkpoint is damaged.
        """
        meta = self._meta(step)  # unreadable: damage, for the caller
        saved = self._saved_layout(step, like, meta)
        items = {item: ocp.args.StandardRestore(_abstract(tree)) for item, tree in saved.items()}
        state = dict(self.manager.restore(step, args=ocp.args.Composite(**items)))
        for item in like:
            bad = first_bad_array(state[item], meta.get("arrays", {}).get(item, {}))
            if bad:
                raise CheckpointDamaged(f"checksum mismatch in {'' if item == 'params' else 'optimizer state '}{bad}")
            if saved is not like:  # saved with the other model.scan_layers: same weights, other layout
                state[item] = layout.relayout(state[item], like[item])
        return {item: state[item] for item in like}, {k: v for k, v in meta.items() if k != "arrays"}

    def _saved_layout(self, step: int, like: dict, meta: dict) -> dict:
        """`like`, or `like` with its layers in the other layout (stacked or unrolled) when the checkpoint holds
        that one: a run may switch model.scan_layers between restarts. Raises CheckpointMismatch otherwise."""
        try:
            self.check_fits(step, like, meta)
            return like
        except CheckpointMismatch as mismatch:
            other = {item: layout.other_layout(tree) for item, tree in like.items()}
            try:
                self.check_fits(step, other, meta)
            except CheckpointMismatch:
                raise mismatch from None
            return other

    def _meta(self, step: int) -> dict:
        return dict(self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"] or {})

    def restore_latest_good(self, like: dict, warn: Callable[[str], None]) -> tuple[int, dict | None, dict]:
        """(step, state, meta) of the newest checkpoint that restores; damaged ones are moved aside, not deleted.

        A damaged checkpoint (missing files, empty array chunks, broken metadata, a checksum mismatch) is renamed
        to `<step>.corrupt-<n>` so it stays for inspection, and so that training can write that step again. A
        checkpoint that does not fit the model raises CheckpointMismatch and nothing is renamed.
        """
        like = {item: like[item] for item in ARRAY_ITEMS}
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                state, meta = self.restore(step, like)
                return step, state, meta
            except UserError:
                raise
            except Exception as err:  # Orbax raises many types for damaged files: all mean "unusable"
                _quiet_abandoned_reads()
                directory = self.directory / str(step)
                aside = directory.with_name(f"{step}.corrupt-{next_free(directory)}")
                # One process renames, after every process has named the same `aside` and before any reloads.
                _barrier(f"bigmodel-corrupt-{step}-named")
                if jax.process_index() == 0:
                    storage.move_tree(directory, aside)
                _barrier(f"bigmodel-corrupt-{step}-moved")
                self.manager.reload()
                warn(
                    f"checkpoint {self.shown / str(step)} is damaged ({_reason(err)}); moved to {aside.name}, "
                    "using the previous one"
                )
        return 0, None, {}

    def restore_params(
        self, like_params: Any, warn: Callable[[str], None], step: int | None = None
    ) -> tuple[int, Any, dict]:
        """(step, params, meta) for evaluate/generate/export: `step`, or the newest good one; changes no file.

        Damaged checkpoints are skipped with a warning (a read-only command leaves the run directory as it is);
        a damaged `step`, or no good checkpoint at all, is a one-line UserError.
        """
        steps = [step] if step is not None else sorted(self.manager.all_steps(), reverse=True)
        skipped: list[str] = []
        for candidate in steps:
            try:
                state, meta = self.restore(candidate, {"params": like_params})
            except UserError:
                raise
            except Exception as err:  # as in restore_latest_good: unreadable or failing its checksums
                _quiet_abandoned_reads()
                skipped.append(f"checkpoint {self.shown / str(candidate)} is damaged ({_reason(err)})")
                continue
            for line in skipped:  # only now: when none is good, the error below says it in one line
                warn(f"{line}; using the previous one")
            return candidate, state["params"], meta
        if step is not None:
            raise UserError(f"{skipped[0]}: pass the run directory to use its newest good checkpoint")
        raise UserError(
            f"no checkpoint in {self.shown} can be read, all {len(skipped)} are damaged (the newest: "
            f"{skipped[0].split(' is damaged ')[1]}): retrain, or restore the run from a backup"
        )

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self._reader.close()
        self.manager.close()
