"""Checkpoints that do not fit the model are config errors; flipped bits fail checksums and are skipped."""

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from bigmodel_cli.errors import UserError
from bigmodel_cli.train.checkpoint import CheckpointMismatch, Checkpoints
from tests.conftest import pretrain_args


def _state(n_layers: int = 2, width: int = 64, dtype=jnp.float32, seed: int = 0) -> dict:
    """A params/opt_state pair shaped like a small model's, of random (incompressible) values."""
    rng = np.random.default_rng(seed)

    def rand(*shape):
        return jnp.asarray(rng.standard_normal(shape, dtype=np.float32), dtype=dtype)

    params = {"embed": rand(32, width), "layers": {str(i): {"w": rand(width, 4 * width)} for i in range(n_layers)}}
    opt_state = {"count": jnp.zeros((), jnp.int32), "mu": jax.tree.map(lambda x: x * 0.5, params)}
    return {"params": params, "opt_state": opt_state}


def _save(directory: Path, steps=(1, 2)) -> dict:
    ckpt = Checkpoints(directory, keep=5, async_save=False)
    for step in steps:
        state = _state(seed=step)
        ckpt.save(step, state, {"step": step})
    ckpt.close()
    return state


def flip_bytes(checkpoint: Path, item: str = "params", n: int = 16) -> Path:
    """Invert n bytes in the middle of the largest array file of one item of a checkpoint."""
    target = max((p for p in (checkpoint / item).rglob("d/*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(target.read_bytes())
    middle = len(data) // 2
    data[middle : middle + n] = bytes(b ^ 0xFF for b in data[middle : middle + n])
    target.write_bytes(bytes(data))
    return target


def _snapshot(directory: Path) -> dict:
    return {str(p.relative_to(directory)): p.stat().st_mtime_ns for p in sorted(directory.rglob("*"))}


def _equal(a, b) -> bool:
    return all(jax.tree.leaves(jax.tree.map(lambda x, y: bool(np.array_equal(x, y)), a, b)))


# ---- a checkpoint that does not fit the model: a config error, nothing renamed --------------------------


def _more_layers(state):
    return _state(n_layers=3)


def _wider(state):
    return _state(width=32)


def _half_precision(state):
    return _state(dtype=jnp.bfloat16)


def _fewer_layers(state):
    return _state(n_layers=1)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_more_layers, "layers.2.w missing from the checkpoint"),
        (_wider, "embed: shape (32, 64) in the checkpoint, (32, 32) in the model"),
        (_half_precision, "embed: dtype float32 in the checkpoint, bfloat16 in the model"),
        (_fewer_layers, "layers.1.w is in the checkpoint but not in this model"),
    ],
    ids=lambda v: getattr(v, "__name__", ""),
)
def test_a_model_that_does_not_fit_is_a_config_error_and_nothing_is_renamed(tmp_path, change, message):
    state = _save(tmp_path / "checkpoints")
    before = _snapshot(tmp_path)
    like = change(state)
    ckpt = Checkpoints(tmp_path / "checkpoints")
    warnings = []
    with pytest.raises(CheckpointMismatch) as err:
        ckpt.restore_latest_good(like, warnings.append)
    assert f"checkpoints/2 does not fit this model: {message}" in str(err.value)
    assert "\n" not in str(err.value) and not warnings
    with pytest.raises(CheckpointMismatch, match="does not fit this model"):  # export, evaluate, generate
        ckpt.restore_params(like["params"], warnings.append)
    ckpt.close()
    assert _snapshot(tmp_path) == before  # no *.corrupt-N, nothing rewritten
    step, restored, _ = Checkpoints(tmp_path / "checkpoints").restore_latest_good(state, warnings.append)
    assert step == 2 and _equal(restored["params"], state["params"]) and not warnings


def test_a_checkpoint_saved_before_the_array_record_is_checked_from_orbax_metadata(tmp_path):
    _save(tmp_path / "checkpoints", steps=(1,))
    meta_file = tmp_path / "checkpoints" / "1" / "meta" / "metadata"
    meta_file.write_text(json.dumps({"step": 1}))  # as bigmodel wrote meta before it kept shapes and hashes
    ckpt = Checkpoints(tmp_path / "checkpoints")
    with pytest.raises(CheckpointMismatch, match="does not fit this model: layers.2.w missing from the checkpoint"):
        ckpt.restore_latest_good(_state(n_layers=3), print)
    step, restored, _ = ckpt.restore_latest_good(_state(), print)
    assert step == 1 and _equal(restored, _state(seed=1))
    ckpt.close()


# ---- flipped bits: the checksum fails, the previous checkpoint is used -----------------------------------


def test_a_bit_flip_fails_the_checksum_and_training_falls_back(tmp_path):
    _save(tmp_path / "checkpoints")
    flip_bytes(tmp_path / "checkpoints" / "2")
    warnings = []
    step, restored, meta = Checkpoints(tmp_path / "checkpoints").restore_latest_good(_state(), warnings.append)
    assert step == 1 and meta == {"step": 1} and _equal(restored, _state(seed=1))
    assert len(warnings) == 1 and "checkpoints/2 is damaged (checksum mismatch in " in warnings[0]
    assert "moved to 2.corrupt-1" in warnings[0] and (tmp_path / "checkpoints" / "2.corrupt-1").is_dir()


def test_a_bit_flip_in_the_optimizer_state_is_caught_too(tmp_path):
    _save(tmp_path / "checkpoints")
    flip_bytes(tmp_path / "checkpoints" / "2", item="opt_state")
    warnings = []
    step, _, _ = Checkpoints(tmp_path / "checkpoints").restore_latest_good(_state(), warnings.append)
    assert step == 1 and "checksum mismatch in optimizer state mu." in warnings[0]


def test_read_only_restores_skip_a_damaged_checkpoint_and_change_nothing(tmp_path):
    _save(tmp_path / "checkpoints")
    flip_bytes(tmp_path / "checkpoints" / "2")
    before = _snapshot(tmp_path)
    ckpt = Checkpoints(tmp_path / "checkpoints", read_only=True)
    warnings = []
    step, params, _ = ckpt.restore_params(_state()["params"], warnings.append)
    assert step == 1 and _equal(params, _state(seed=1)["params"])
    assert len(warnings) == 1 and "checkpoints/2 is damaged (checksum mismatch in " in warnings[0]
    with pytest.raises(UserError, match=r"checkpoints/2 is damaged \(checksum mismatch"):  # the user named it
        ckpt.restore_params(_state()["params"], warnings.append, step=2)
    flip_bytes(tmp_path / "checkpoints" / "1")
    before = _snapshot(tmp_path)
    with pytest.raises(UserError, match="no checkpoint in .* can be read"):
        ckpt.restore_params(_state()["params"], warnings.append)
    ckpt.close()
    assert _snapshot(tmp_path) == before


def test_checksums_of_sharded_arrays_hold_on_another_mesh(tmp_path):
    """Saved as 8 shards, checked on one device and on 2x4: per-shard hashes do not tie a checkpoint to a mesh."""
    devices = np.array(jax.devices()[:8])
    state = _state(width=64)
    wide = NamedSharding(Mesh(devices, ("fsdp",)), PartitionSpec("fsdp"))
    sharded = jax.tree.map(lambda x: jax.device_put(x, wide) if x.ndim and x.shape[0] % 8 == 0 else x, state)
    ckpt = Checkpoints(tmp_path / "checkpoints", async_save=False)
    ckpt.save(1, sharded, {})
    arrays = json.loads((tmp_path / "checkpoints" / "1" / "meta" / "metadata").read_text())["arrays"]
    assert len(arrays["params"]["embed"]["xxh3"]) == 8  # one hash per shard written
    grid = NamedSharding(Mesh(devices.reshape(2, 4), ("a", "b")), PartitionSpec("b", "a"))  # no shard saved whole
    layouts = [state, jax.tree.map(lambda x: jax.device_put(x, grid) if x.ndim == 2 else x, state)]
    for like in layouts:
        step, restored, _ = ckpt.restore_latest_good(like, print)
        assert step == 1 and _equal(restored, state)
    ckpt.close()
    flip_bytes(tmp_path / "checkpoints" / "1")
    for like in layouts:
        with pytest.raises(UserError, match="checksum mismatch"):
            Checkpoints(tmp_path / "checkpoints").restore_params(like["params"], print, step=1)


# ---- through the CLI ---------------------------------------------------------------------------------

SETTINGS = {"train.steps": 4, "checkpoint.every": 2, "checkpoint.keep": 3, "train.log_every": 2, "train.eval_every": 0}


@pytest.fixture(scope="module")
def finished(cli, tiny_data, tmp_path_factory) -> Path:
    """A 4-step run with checkpoints 2 and 4, trained once; tests copy it."""
    run = tmp_path_factory.mktemp("finished") / "run"
    cli(*pretrain_args(run, tiny_data, SETTINGS))
    return run


def _copy(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


def _one_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


def test_model_change_on_resume_renames_nothing_and_the_run_resumes(cli, tiny_data, finished, tmp_path):
    run = _copy(finished, tmp_path)
    changed = cli(
        *pretrain_args(run, tiny_data, {**SETTINGS, "model.n_layers": 3, "train.steps": 6}, "--allow-config-change"),
        ok=False,
    )
    line = _one_line(changed)  # refused by the config check, or else by the restore-time guard
    assert "model.n_layers: 2 -> 3" in line or "layers.2.input_layernorm.weight missing from the checkpoint" in line
    assert not list((run / "checkpoints").glob("*.corrupt-*"))
    again = cli(*pretrain_args(run, tiny_data, {**SETTINGS, "train.steps": 6}, "--allow-config-change"))
    assert "resumed from step 4" in again.stdout and not list((run / "checkpoints").glob("*.corrupt-*"))


def test_a_run_whose_config_was_edited_is_refused_naming_the_parameter(cli, tiny_data, finished, tmp_path):
    """The restore-time guard, behind the config check: config.toml itself now says 3 layers."""
    run = _copy(finished, tmp_path)
    config = run / "config.toml"
    config.write_text(config.read_text().replace("n_layers = 2", "n_layers = 3"))
    before = _snapshot(run / "checkpoints")
    message = "checkpoints/4 does not fit this model: layers.2.input_layernorm.weight missing from the checkpoint"
    resumed = cli(*pretrain_args(run, tiny_data, {**SETTINGS, "model.n_layers": 3}), ok=False)
    assert message in _one_line(resumed)
    assert message in _one_line(cli("export", run, "--out", tmp_path / "export", ok=False))
    assert _snapshot(run / "checkpoints") == before


def test_a_bit_flip_is_skipped_by_every_command_that_reads_checkpoints(cli, tiny_data, finished, tmp_path):
    run = _copy(finished, tmp_path)
    flip_bytes(run / "checkpoints" / "4")
    before = _snapshot(run / "checkpoints")
    damaged = "checkpoints/4 is damaged (checksum mismatch in "

    def warned(result) -> None:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.exit_code == 0 and len(lines) == 1, result.output
        assert lines[0].startswith("warning: ") and damaged in lines[0] and "using the previous one" in lines[0]

    exported = cli("export", run, "--out", tmp_path / "export", ok=False)
    warned(exported)
    assert json.loads((tmp_path / "export" / "config.json").read_text())["step"] == 2
    cli("export", run / "checkpoints" / "2", "--out", tmp_path / "export-2")
    assert (tmp_path / "export" / "model.safetensors").read_bytes() == (
        tmp_path / "export-2" / "model.safetensors"
    ).read_bytes()
    warned(cli("evaluate", run, "--max-batches", "1", ok=False))
    warned(cli("generate", run, "--prompt", "two", "--max-new-tokens", "4", ok=False))
    assert damaged in _one_line(cli("export", run / "checkpoints" / "4", "--out", tmp_path / "e4", ok=False))
    assert _snapshot(run / "checkpoints") == before  # read-only commands rename nothing

    resumed = cli(*pretrain_args(run, tiny_data, SETTINGS))
    assert damaged in resumed.stdout and "moved to 4.corrupt-1" in resumed.stdout
    assert "resumed from step 2" in resumed.stdout and (run / "checkpoints" / "4").is_dir()


def test_when_every_checkpoint_is_damaged_readers_refuse_in_one_line(cli, finished, tmp_path):
    run = _copy(finished, tmp_path)
    for step in (2, 4):
        flip_bytes(run / "checkpoints" / str(step))
    line = _one_line(cli("export", run, "--out", tmp_path / "export", ok=False))
    assert "no checkpoint in " in line and "can be read" in line and not (tmp_path / "export").exists()


def test_orbaxs_abandoned_reads_of_a_damaged_checkpoint_print_nothing_other_failures_still_do(monkeypatch):
    """After one array read fails, Orbax abandons the others, and Python printed each as "Exception ignored in:
    <coroutine object _read_array_index_and_device_put>" with a TensorStore spec (62 to 1,158 lines after one
    warning). Those echoes are dropped; any other unraisable exception still reaches the previous hook."""
    import sys
    from types import SimpleNamespace

    from bigmodel_cli.train import checkpoint

    printed = []
    monkeypatch.setattr(sys, "unraisablehook", printed.append)
    namespace = {}
    exec(compile("async def _read_array_index_and_device_put(): pass", "/x/orbax/serialization.py", "exec"), namespace)
    abandoned, other = namespace["_read_array_index_and_device_put"](), object()
    checkpoint._quiet_abandoned_reads()
    checkpoint._quiet_abandoned_reads()  # once per process, however many damaged checkpoints
    for thing in (abandoned, other):
        sys.unraisablehook(SimpleNamespace(object=thing, exc_value=Exception("read failed")))
    abandoned.close()
    assert [u.object for u in printed] == [other]
