"""Device mesh, logical-axis rules and the shardings built from them: the only module that names mesh axes."""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from bigmodel_cli.config import MeshConfig
from bigmodel_cli.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axes. FSDP shards the embedding dimension of every matrix, tensor parallelism
# splits heads, MLP hidden units and the vocabulary (Megatron style), the batch goes over data x fsdp.
DEFAULT_RULES: dict[str, Any] = {
    "batch": ("data", "fsdp"),
    "length": None,
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "norm": None,
    "layers": None,  # the leading axis of stacked (model.scan_layers) weights: each device holds every layer
}


def parse_rules(text: str) -> dict[str, Any]:
    """DEFAULT_RULES with overrides like "embed=, vocab=tensor, batch=data+fsdp" (empty = replicated)."""
    rules = dict(DEFAULT_RULES)
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, axes = item.partition("=")
        name = name.strip()
        mesh_axes = tuple(a.strip() for a in axes.split("+") if a.strip())
        repeated = len(set(mesh_axes)) != len(mesh_axes)  # data+data: a dimension split twice over one axis
        if not sep or name not in DEFAULT_RULES or any(a not in MESH_AXES for a in mesh_axes) or repeated:
            raise UserError(
                f"mesh.rules entry {item!r} is not LOGICAL=AXIS[+AXIS]; logical names: {', '.join(DEFAULT_RULES)}; "
                f"mesh axes: {', '.join(MESH_AXES)}"
            )
        rules[name] = mesh_axes[0] if len(mesh_axes) == 1 else (mesh_axes or None)
    return rules


# The rules of the mesh built last: one process runs one stage on one mesh, so the mesh and its rules
# are set together in make_mesh instead of being threaded through every call.
_rules: dict[str, Any] = dict(DEFAULT_RULES)


def make_mesh(cfg: MeshConfig, devices: list | None = None) -> Mesh:
    """Build the (data, fsdp, tensor) mesh and adopt cfg.rules; a -1 axis takes the devices left over."""
    global _rules
    _rules = parse_rules(cfg.rules)
    devices = devices if devices is not None else jax.devices()
    n = len(devices)
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    if -1 in sizes:
        known = math.prod(s for s in sizes if s != -1)
        if n % known:
            raise UserError(f"mesh: {n} devices do not divide by fsdp*tensor*... = {known}; {_fits(n)}")
        sizes[sizes.index(-1)] = n // known
    if math.prod(sizes) != n:
        raise UserError(f"mesh: data*fsdp*tensor = {math.prod(sizes)} but there are {n} devices; {_fits(n)}")
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=auto, devices=devices)


def _fits(n: int) -> str:
    return f"set sizes whose product is {n}, e.g. --set mesh.data={n} --set mesh.fsdp=1 --set mesh.tensor=1"


def spec(logical_axes: tuple[str | None, ...], rules: dict[str, Any] | None = None) -> PartitionSpec:
    """Map logical axis names to a PartitionSpec through the rules table."""
    rules = _rules if rules is None else rules
    return PartitionSpec(*(rules.get(a) if a is not None else None for a in logical_axes))


def _fit(shape: tuple[int, ...], pspec: PartitionSpec, mesh: Mesh) -> PartitionSpec:
    """Drop mesh axes that do not divide a dimension, so small layers (or odd vocabularies) stay legal."""
    out = []
    for dim, axes in zip(shape, tuple(pspec) + (None,) * (len(shape) - len(pspec)), strict=False):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        kept = tuple(a for a in names if mesh.shape[a] > 1)
        while kept and dim % math.prod(mesh.shape[a] for a in kept):
            kept = kept[:-1]
        out.append(kept[0] if len(kept) == 1 else (kept or None))
    return PartitionSpec(*out)


def param_shardings(abstract_state: nnx.State, mesh: Mesh, rules: dict[str, Any] | None = None) -> Any:
    """A NamedSharding for every parameter (a pure dict like the params), from each one's `logical_axes`."""

    def one(variable: nnx.Variable) -> nnx.Variable:
        shape = variable.get_value().shape
        axes = variable.get_metadata().get("logical_axes") or (None,) * len(shape)
        fitted = _fit(shape, spec(axes, rules), mesh)
        used = [a for entry in fitted if entry for a in (entry if isinstance(entry, tuple) else (entry,))]
        if len(set(used)) != len(used):  # JAX refuses it too, but later, after the run directory is written
            twice = next(a for a in used if used.count(a) > 1)
            raise UserError(
                f"mesh.rules put two dimensions of a parameter ({', '.join(map(str, axes))}) on the mesh axis "
                f"{twice!r}: map those logical names to different axes"
            )
        return variable.replace(NamedSharding(mesh, fitted))

    shardings = jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.to_pure_dict(shardings)


def layer_sharding(sharding: NamedSharding, stacked: bool) -> NamedSharding:
    """The sharding of a stacked weight [L, ...] from that of one layer's (stacked=True), or back (False)."""
    if not stacked:
        return NamedSharding(sharding.mesh, PartitionSpec(*tuple(sharding.spec)[1:]))
    return NamedSharding(sharding.mesh, PartitionSpec(_rules.get("layers"), *sharding.spec))


def batch_sharding(mesh: Mesh, ndim: int = 2, rules: dict[str, Any] | None = None) -> NamedSharding:
    """Sharding of a [batch, length, ...] array: batch over the data-parallel axes."""
    return NamedSharding(mesh, spec(("batch",) + (None,) * (ndim - 1), rules))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def data_parallel_size(mesh: Mesh, rules: dict[str, Any] | None = None) -> int:
    axes = (rules or _rules)["batch"]
    axes = (axes,) if isinstance(axes, str) else axes
    return math.prod(mesh.shape[a] for a in axes)


_active: list[tuple[Mesh, dict[str, Any]]] = []


@contextlib.contextmanager
def activate(mesh: Mesh, rules: dict[str, Any] | None = None) -> Iterator[None]:
    """Make `constrain` pin activations to this mesh while tracing inside the block."""
    _active.append((mesh, rules or _rules))
    try:
        with jax.set_mesh(mesh):
            yield
    finally:
        _active.pop()


def constrain(x: jax.Array, logical_axes: tuple[str | None, ...]) -> jax.Array:
    """Sharding constraint on an activation by logical names; a no-op outside `activate`."""
    if not _active:
        return x
    mesh, rules = _active[-1]
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, _fit(x.shape, spec(logical_axes, rules), mesh)))


def process_rows(batch_size: int, mesh: Mesh) -> slice:
    """This process's rows of every global batch: those its devices hold under batch_sharding. All of them on a
    single host, and also where the mesh does not split the batch across processes (mesh.data=1, tensor=8 over
    two hosts): each process then feeds the whole batch, not a share that would differ between them."""
    if batch_size % data_parallel_size(mesh):  # refused (loop.check_layout) before any batch is read
        return slice(0, batch_size)
    held = batch_sharding(mesh).addressable_devices_indices_map((batch_size, 1)).values()
    rows = sorted({(index[0].start or 0, batch_size if index[0].stop is None else index[0].stop) for index in held})
    if any(stop != start for (_, stop), (start, _) in itertools.pairwise(rows)):  # not one block: no loader gives it
        raise UserError(
            f"mesh {dict(mesh.shape)} gives process {jax.process_index()} rows {rows} of each batch, not "
            "one block: order the mesh so that each process's devices hold neighbouring rows"
        )
    return slice(rows[0][0], rows[-1][1])


def host_local_batch(global_batch: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """Turn this process's rows of a global batch into one global jax.Array."""
    return jax.make_array_from_process_local_data(sharding, global_batch)


def init_distributed(coordinator: str = "", num_processes: int = 0, process_id: int = -1) -> bool:
    """Join a multi-process run through jax.distributed; True if this is one.

    Explicit flags (or BIGMODEL_COORDINATOR / _NUM_PROCESSES / _PROCESS_ID) win; otherwise JAX's own
    detection handles TPU VM slices, SLURM and Open MPI.
    """
    import os

    coordinator = coordinator or os.environ.get("BIGMODEL_COORDINATOR", "")
    num_processes = num_processes or int(os.environ.get("BIGMODEL_NUM_PROCESSES", "0") or 0)
    if process_id < 0:
        process_id = int(os.environ.get("BIGMODEL_PROCESS_ID", "-1") or -1)
    explicit = bool(coordinator or num_processes > 0 or process_id >= 0)
    if explicit:
        if not coordinator or num_processes <= 0 or not 0 <= process_id < num_processes:
            raise UserError(
                "multi-process runs need all of --coordinator HOST:PORT, --num-processes N and --process-id I "
                f"(0 <= I < N); got {coordinator or '-'}, {num_processes}, {process_id}"
            )
        # CPU collectives across processes go through gloo, which makes multi-process testable on one machine.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)
        return True
    multi_host_slurm = int(os.environ.get("SLURM_NTASKS", "1")) > 1
    multi_mpi = int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
    multi_tpu = len(os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1
    if multi_host_slurm or multi_mpi or multi_tpu:
        jax.distributed.initialize()
        return True
    return False
