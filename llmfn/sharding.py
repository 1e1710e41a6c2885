"""Scale-out: a (data, fsdp) device mesh, NamedSharding rules, and multi-host setup.

One device needs none of this: `make_mesh("")` is None and the training loop skips every
call here. With a mesh, each batch is split over both axes (data parallelism) and θ plus
the optimizer state are split over "fsdp" (fully sharded data parallelism); jit inserts
the all-gathers and reduce-scatters. Several hosts run the same program through JAX's
own runtime (`jax.distributed`); each process feeds the rows of the global batch that
live on its own devices.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ("data", "fsdp")  # mesh axis names, in mesh order
BATCH = P(AXES)  # the batch axis is split over every device
MIN_SHARDED_SIZE = 1024  # smaller arrays stay replicated: a collective would cost more than it saves


def _launched_by_cluster() -> bool:
    """True when a multi-process launcher (or the user) set JAX's distributed environment."""
    env = os.environ
    return (
        "JAX_COORDINATOR_ADDRESS" in env
        or int(env.get("SLURM_NTASKS", "1")) > 1  # srun / sbatch with several tasks
        or "OMPI_MCA_orte_hnp_uri" in env  # mpirun (Open MPI)
        or "," in env.get("TPU_WORKER_HOSTNAMES", "")  # multi-host TPU slice on GKE
    )


def initialize(coordinator: str | None, num_processes: int | None, process_id: int | None) -> None:
    """Join a multi-process run through `jax.distributed.initialize`, or do nothing.

    Calls it when any argument is given or a cluster launcher's environment is detected
    (Slurm, Open MPI, JAX_COORDINATOR_ADDRESS, multi-host TPU); JAX fills in what is
    missing from that environment. Must run before any other JAX call in the process.
    Raises ValueError when what is given and detected does not define the run.
    """
    given = (coordinator, num_processes, process_id)
    if jax.distributed.is_initialized() or (given == (None, None, None) and not _launched_by_cluster()):
        return
    try:
        jax.distributed.initialize(coordinator, num_processes, process_id)
    except ValueError as error:
        raise ValueError(
            f"cannot join a multi-process run ({error}): give the coordinator (host:port of process 0), "
            "the number of processes and this process's id, or start under a launcher that sets them"
        ) from None


def make_mesh(spec: str, devices=None) -> Mesh | None:
    """Parse "data=4,fsdp=2" into a Mesh over `devices` (default all `jax.devices()`).

    "" gives None: one device, no sharding at all. Axes left out of the spec have size 1;
    the mesh always has both axes ("data", "fsdp"). Raises ValueError for bad syntax,
    unknown axes, or sizes whose product is not the number of devices.
    """
    if not spec.strip():
        return None
    devices = jax.devices() if devices is None else list(devices)
    sizes = dict.fromkeys(AXES, 1)
    seen = set()
    for part in spec.split(","):
        name, eq, value = part.partition("=")
        name = name.strip()
        if not eq or not value.strip().isdigit() or int(value) < 1:
            raise ValueError(f"bad mesh spec {spec!r}: write axis=size pairs such as 'data=4,fsdp=2'")
        if name not in sizes:
            raise ValueError(f"unknown mesh axis {name!r} in {spec!r}: the axes are {', '.join(AXES)}")
        if name in seen:
            raise ValueError(f"mesh axis {name!r} given twice in {spec!r}")
        seen.add(name)
        sizes[name] = int(value)
    shape = tuple(sizes[a] for a in AXES)
    if int(np.prod(shape)) != len(devices):
        raise ValueError(
            f"mesh {spec!r} has {int(np.prod(shape))} devices but there are {len(devices)}: "
            "make the axis sizes multiply to the device count"
        )
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def _spec(shape: tuple[int, ...], fsdp: int) -> P:
    """FSDP rule for one array: split its largest axis divisible by the fsdp size."""
    if fsdp == 1 or int(np.prod(shape, dtype=np.int64)) < MIN_SHARDED_SIZE:
        return P()
    candidates = [i for i, n in enumerate(shape) if n % fsdp == 0]
    if not candidates:
        return P()
    axis = max(candidates, key=lambda i: shape[i])  # first of the largest on a tie
    return P(*(["fsdp" if i == axis else None for i in range(len(shape))]))


def state_shardings(state, mesh: Mesh):
    """A NamedSharding for every leaf of `state` (θ, optimizer state, anything array-like).

    Each array is split over "fsdp" along its largest axis divisible by the fsdp size and
    replicated over "data"; scalars, arrays under MIN_SHARDED_SIZE elements and arrays
    with no divisible axis are replicated. Leaves may be arrays or jax.ShapeDtypeStruct.
    """
    fsdp = mesh.shape["fsdp"]
    return jax.tree.map(lambda x: NamedSharding(mesh, _spec(np.shape(x), fsdp)), state)


def sharded_init(fn, mesh: Mesh, *args):
    """(fn(*args), its shardings): a state built already split by `state_shardings`.

    fn runs under jit with those output shardings, so each device computes only its own
    shards and θ is never whole on one device. Pass plain numbers or NumPy arrays in
    `args` (a seed, not a key array): every process then feeds the same replicated input.
    """
    shardings = state_shardings(jax.eval_shape(fn, *args), mesh)
    return jax.jit(fn, out_shardings=shardings)(*args), shardings


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Split the leading (batch) axis over every device, ("data", "fsdp") in mesh order."""
    return NamedSharding(mesh, BATCH)


def step_shardings(shardings, mesh: Mesh) -> tuple[tuple, tuple]:
    """(in_shardings, out_shardings) for `step(state, inputs, targets) -> (state, metrics)`.

    The state keeps `shardings` (from `state_shardings`) across the step, both batches are
    split by `batch_sharding`, and the metrics come back replicated so that every process
    can read them.
    """
    rows = batch_sharding(mesh)
    return (shardings, rows, rows), (shardings, NamedSharding(mesh, P()))


def local_rows(batch: np.ndarray, mesh: Mesh | None) -> np.ndarray:
    """The rows of a global (B, ...) batch that this process feeds to its own devices.

    Every process computes the same global batch; each keeps the rows that
    `batch_sharding(mesh)` places on its addressable devices, in order. Without a mesh,
    or with a single process, that is the whole batch.
    """
    if mesh is None or jax.process_count() == 1:
        return batch
    _check_splits(batch.shape[0], mesh)
    index = batch_sharding(mesh).addressable_devices_indices_map(batch.shape)
    starts = sorted({rows.start or 0 for rows, *_ in index.values()})
    per_device = batch.shape[0] // mesh.size
    return np.concatenate([batch[s : s + per_device] for s in starts])


def make_global_batch(rows: np.ndarray, mesh: Mesh | None) -> jax.Array:
    """One global (B, ...) array from each process's (B / processes, ...) rows.

    `jax.make_array_from_process_local_data` over `batch_sharding(mesh)`; B must be a
    multiple of the device count. Without a mesh, the rows go to the default device.
    """
    if mesh is None:
        return jnp.asarray(rows)
    _check_splits(rows.shape[0] * jax.process_count(), mesh)
    return jax.make_array_from_process_local_data(batch_sharding(mesh), rows)


def _check_splits(n_rows: int, mesh: Mesh) -> None:
    if n_rows % mesh.size:
        raise ValueError(f"a batch of {n_rows} rows does not split over {mesh.size} devices: "
                         "choose a batch size that is a multiple of the device count")


def place_batch(batch: np.ndarray, mesh: Mesh | None) -> jax.Array:
    """A (B, ...) batch that every process holds whole, as one array on the mesh.

    Split over every device (each process feeding its own rows) when B is a multiple of
    the device count; otherwise, as for the short last validation batch, replicated on
    every device, which computes the same numbers.
    """
    if mesh is None:
        return jnp.asarray(batch)
    if batch.shape[0] % mesh.size:
        return jax.make_array_from_process_local_data(NamedSharding(mesh, P()), batch, batch.shape)
    return make_global_batch(local_rows(batch, mesh), mesh)


def barrier(name: str) -> None:
    """Every process waits here until all have arrived (nothing to wait for with one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def any_process(flag: bool) -> bool:
    """True on every process if `flag` is true on any (a collective with several processes).

    Lets all processes agree to stop at the same step when only some of them got a signal.
    """
    if jax.process_count() == 1:
        return flag
    return bool(multihost_utils.process_allgather(np.asarray(flag)).any())


def gather(tree):
    """Every array of `tree` whole, as NumPy on every process (a collective with several).

    With one process the tree comes back unchanged: jit reads sharded arrays directly.
    """
    if jax.process_count() == 1:
        return tree
    return multihost_utils.process_allgather(tree, tiled=True)  # tiled: whole arrays, not stacked
