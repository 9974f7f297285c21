"""The device mesh and the sharding rules of duet-jax, on ``jax.sharding`` (no home-made SPMD).

One 2-D mesh with named axes ``("data", "fsdp")``:

* frozen base weights are sharded FSDP-style along ``fsdp``: each array on its largest dimension
  that ``fsdp`` divides (never the leading layer axis of a stacked layer, so ``lax.scan`` slices one
  layer locally); XLA all-gathers a layer's weights where the layer runs;
* LoRA weights, optimizer state and the projector are replicated (they are small; the projector is
  a pure function of its seed, so every device projects identically without communication);
* batches are sharded on their leading (example) axis over ``("data", "fsdp")`` together, as in
  ZeRO-3 / MaxText: every device computes on its own examples; with ``finetune_many`` the ``k``
  adapters are spread over ``data`` (``vmap(spmd_axis_name="data")``) and each adapter's batch over
  ``fsdp``.

Programs are plain ``jax.jit``: the inputs are placed with :func:`place` / :func:`shard_frozen`, and
``jax.lax.with_sharding_constraint`` pins the per-step batch to :func:`batch_sharding`. The same code
runs on one device (a 1 x 1 mesh, or ``mesh=None``: nothing is placed).

Example::

    from duet_jax.sharding import MeshConfig, make_mesh
    mesh = make_mesh(MeshConfig(data=2, fsdp=4))        # 8 devices
    res = finetune(g, lora, frozen, pool, idx, key, cfg, mesh=mesh)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from duet_jax.errors import ConfigError

__all__ = [
    "AXES",
    "BATCH_AXES",
    "MeshConfig",
    "make_mesh",
    "as_mesh",
    "replicated",
    "batch_sharding",
    "param_spec",
    "shard_frozen",
    "replicate",
    "shard_rows",
    "put",
    "gather",
    "place_pool",
    "process_rows",
    "trunk_rows",
    "process_block",
    "local_rows",
    "from_process_local",
    "constrain_batch",
    "initialize_distributed",
    "is_primary",
    "broadcast_json",
    "gather_tree",
    "all_processes",
    "process_dir",
]

AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshConfig:
    """The device mesh (``--mesh.data``, ``--mesh.fsdp``).

    Attributes:
      data: devices on the ``data`` axis (adapters / batches); ``None``: the devices left over.
      fsdp: devices on the ``fsdp`` axis (frozen weights sharded, batches too); ``None``: the
        devices left over. Both ``None`` (the default): every device on ``fsdp``, i.e. weights
        sharded over all devices and batches split over all devices.
    """

    data: int | None = None
    fsdp: int | None = None

    def __post_init__(self):
        for name in ("data", "fsdp"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int | np.integer) or int(v) < 1):
                raise ConfigError(f"mesh.{name} must be a positive integer or None (auto), got {v!r}")

    def shape(self, n_devices: int) -> tuple[int, int]:
        """``(data, fsdp)`` for ``n_devices`` devices."""
        d, f = self.data, self.fsdp
        if d is None and f is None:
            d, f = 1, n_devices
        elif d is None:
            if n_devices % f:
                raise ConfigError(f"mesh.fsdp={f} does not divide the {n_devices} devices")
            d = n_devices // f
        elif f is None:
            if n_devices % d:
                raise ConfigError(f"mesh.data={d} does not divide the {n_devices} devices")
            f = n_devices // d
        if d * f != n_devices:
            raise ConfigError(f"mesh data x fsdp = {d} x {f} = {d * f}, but there are {n_devices} "
                              "devices (use None for one axis to take the rest)")
        return int(d), int(f)


def make_mesh(config: MeshConfig | None = None, devices: Sequence | None = None) -> Mesh:
    """A ``("data", "fsdp")`` mesh over ``devices`` (default: all of ``jax.devices()``, every host)."""
    config = config or MeshConfig()
    devices = list(jax.devices() if devices is None else devices)
    d, f = config.shape(len(devices))
    try:  # topology-aware order on TPU / GPU
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh((d, f), devices)
    except Exception:  # CPU devices, odd shapes: keep the given order
        grid = np.asarray(devices, dtype=object).reshape(d, f)
    return Mesh(grid, AXES)


def as_mesh(mesh) -> Mesh | None:
    """``None`` -> ``None``; a :class:`MeshConfig` -> :func:`make_mesh`; a ``Mesh`` as is."""
    if mesh is None or isinstance(mesh, Mesh):
        return mesh
    if isinstance(mesh, MeshConfig):
        return make_mesh(mesh)
    raise ConfigError(f"mesh must be None, a MeshConfig or a jax.sharding.Mesh, got {type(mesh).__name__}")


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def _axes_for(mesh: Mesh, n: int, axes: Sequence[str]) -> tuple[str, ...]:
    """The largest prefix-free choice of ``axes`` whose device count divides ``n``."""
    axes = tuple(a for a in axes if mesh.shape[a] > 1)
    if not axes:
        return ()
    total = int(np.prod([mesh.shape[a] for a in axes]))
    if n % total == 0:
        return axes
    for a in sorted(axes, key=lambda a: -mesh.shape[a]):
        if n % mesh.shape[a] == 0:
            return (a,)
    return ()


def batch_sharding(mesh: Mesh, n: int, axes: Sequence[str] = BATCH_AXES) -> NamedSharding:
    """Leading axis of size ``n`` over ``axes`` (as many of them as divide ``n``), rest replicated."""
    use = _axes_for(mesh, n, axes)
    return NamedSharding(mesh, P(use if use else None))


def param_spec(shape: Sequence[int], mesh: Mesh, *, stacked: bool) -> P:
    """FSDP spec of one frozen parameter: its largest dimension divisible by ``fsdp`` (skipping
    the layer axis of stacked parameters); vectors (norms, biases) and indivisible arrays are
    replicated."""
    f = mesh.shape["fsdp"]
    first = 1 if stacked else 0
    dims = [i for i in range(first, len(shape)) if shape[i] % f == 0]
    if f == 1 or len(shape) - first < 2 or not dims:
        return P()
    best = max(dims, key=lambda i: (shape[i], -i))
    spec = [None] * len(shape)
    spec[best] = "fsdp"
    return P(*spec)


def put(x, sharding: NamedSharding):
    """``x`` on ``sharding``. One process: ``jax.device_put`` (a no-op when already there). Several
    processes (multi-host): built with ``jax.make_array_from_callback`` from the host value, which
    every process must hold identically (each process fills only its own devices' shards)."""
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return jax.device_put(x, sharding)  # already global: reshard
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        data = np.asarray(jax.random.key_data(x))
        impl = jax.random.key_impl(x)
        arr = jax.make_array_from_callback(data.shape, _key_data_sharding(sharding, x.ndim, data.ndim),
                                           lambda idx: data[idx])
        return jax.random.wrap_key_data(arr, impl=impl)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def gather(x) -> np.ndarray:
    """A (possibly sharded, possibly multi-host) array as one host numpy array, in every process."""
    if jax.process_count() == 1 or not isinstance(x, jax.Array) or x.is_fully_addressable \
            or x.is_fully_replicated:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _key_data_sharding(sharding: NamedSharding, key_ndim: int, data_ndim: int) -> NamedSharding:
    spec = tuple(sharding.spec) + (None,) * (data_ndim - len(tuple(sharding.spec)))
    return NamedSharding(sharding.mesh, P(*spec[:data_ndim]))


def _is_stacked(path) -> bool:
    return any(getattr(k, "key", getattr(k, "name", None)) == "stacks" for k in path)


def shard_frozen(frozen, mesh: Mesh):
    """Place the frozen base weights (an ``nnx.State``) FSDP-sharded on ``mesh``."""

    def place_one(path, x):
        spec = param_spec(np.shape(x), mesh, stacked=_is_stacked(path))
        return put(x, NamedSharding(mesh, spec))

    return jax.tree_util.tree_map_with_path(place_one, frozen)


def replicate(tree, mesh: Mesh):
    """Every array of ``tree`` replicated on ``mesh``."""
    s = replicated(mesh)
    return jax.tree.map(lambda x: put(x, s), tree)


def shard_rows(x, mesh: Mesh, axes: Sequence[str] = BATCH_AXES):
    """``x``'s leading axis over ``axes`` (replicated if no axis divides it)."""
    return put(x, batch_sharding(mesh, np.shape(x)[0], axes))


def place_pool(pool, mesh: Mesh):
    """A :class:`~duet_jax.train.pool.Pool` on ``mesh``: token arrays replicated (small), the
    frozen-trunk cache ``hidden`` (``[N, T, D]``, large) sharded by rows."""
    rest = dataclasses.replace(pool, hidden=None)
    rest = replicate(rest, mesh)
    if pool.hidden is None:
        return rest
    return dataclasses.replace(rest, hidden=shard_rows(pool.hidden, mesh))


def trunk_rows(n: int, mesh: Mesh, axes: Sequence[str] = BATCH_AXES) -> int:
    """Rows of a per-process row-sharded array of ``n`` rows: ``n`` rounded up to a multiple of the
    devices on ``axes`` (the extra rows are zeros nobody indexes), so the rows split evenly over
    the processes whatever ``n`` is."""
    total = int(np.prod([mesh.shape[a] for a in axes if a in mesh.shape]))
    return -(-n // total) * total


def process_block(n: int, mesh: Mesh | None) -> tuple[int, int, int] | None:
    """The per-process plan of a row-sharded ``[n, ...]`` array (the frozen-trunk cache) when
    there are several processes: ``(n_rows, lo, hi)``, the padded row count (:func:`trunk_rows`)
    and this process's rows ``[lo, hi)``; ``None`` with one process or no mesh (every row here)."""
    if mesh is None or jax.process_count() == 1:
        return None
    n_rows = trunk_rows(n, mesh)
    return (n_rows, *process_rows(n_rows, mesh))


def local_rows(x) -> np.ndarray:
    """This process's block of a row-sharded array as host numpy (the rows
    :func:`process_rows` names, in order); the whole array when it is fully addressable."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        return np.asarray(x)
    blocks = {}
    for sh in x.addressable_shards:
        start = sh.index[0].start or 0
        blocks.setdefault(start, sh.data)
    return np.concatenate([np.asarray(blocks[k]) for k in sorted(blocks)])


def process_rows(n: int, mesh: Mesh, axes: Sequence[str] = BATCH_AXES) -> tuple[int, int]:
    """``[start, stop)``: the rows of a row-sharded ``[n, ...]`` array (:func:`batch_sharding`) that
    this process's devices hold; a process loads only those (multi-host data loading). Assumes the
    process's devices hold one contiguous block of rows (true for ``make_mesh``'s device order);
    the whole range ``(0, n)`` when the rows are replicated or there is one process."""
    sharding = batch_sharding(mesh, n, axes)
    idx = sharding.addressable_devices_indices_map((n,))
    starts = [(i[0].start or 0) for i in idx.values()]
    stops = [(n if i[0].stop is None else i[0].stop) for i in idx.values()]
    return min(starts), max(stops)


def from_process_local(local, n: int, mesh: Mesh, axes: Sequence[str] = BATCH_AXES):
    """The global row-sharded ``[n, ...]`` array from this process's rows ``process_rows(n, mesh)``
    (``jax.make_array_from_process_local_data``); one process: ``local`` is all rows."""
    local = np.asarray(local)
    sharding = batch_sharding(mesh, n, axes)
    return jax.make_array_from_process_local_data(sharding, local, (n, *local.shape[1:]))


def constrain_batch(tree, sharding: NamedSharding | None):
    """``with_sharding_constraint`` of every leaf's leading axis (inside jit); no-op for ``None``."""
    if sharding is None:
        return tree
    return jax.tree.map(lambda a: jax.lax.with_sharding_constraint(a, sharding), tree)


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
    """``jax.distributed.initialize`` for multi-host runs, once per process, before any other JAX
    call (a single-process run does not need it).

    Values: the arguments, else ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` /
    ``JAX_PROCESS_ID`` from the environment, else JAX's own detection (TPU VMs, SLURM, Open MPI).
    """
    import os

    env = lambda k, f=str: f(os.environ[k]) if os.environ.get(k) else None
    kwargs = {k: v for k, v in dict(coordinator_address=coordinator_address or env("JAX_COORDINATOR_ADDRESS"),
                                    num_processes=num_processes if num_processes is not None
                                    else env("JAX_NUM_PROCESSES", int),
                                    process_id=process_id if process_id is not None
                                    else env("JAX_PROCESS_ID", int)).items()
              if v is not None}
    jax.distributed.initialize(**kwargs)


def is_primary() -> bool:
    """Whether this process writes the run's files (process 0; always, with one process)."""
    return jax.process_index() == 0


def broadcast_json(value=None):
    """Process 0's ``value`` (anything JSON can hold) in every process: the run directory's state
    (history, best adapter) lives on process 0's disk only. A collective: every process calls it.
    One process: ``value`` itself."""
    if jax.process_count() == 1:
        return value
    import json

    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(value).encode(), np.uint8) if is_primary() else np.zeros(0, np.uint8)
    n = int(multihost_utils.broadcast_one_to_all(np.asarray([data.size], np.int64))[0])
    buf = np.zeros(n, np.uint8)
    buf[: data.size] = data
    out = np.asarray(multihost_utils.broadcast_one_to_all(buf), np.uint8)
    return json.loads(out.tobytes().decode())


def gather_tree(tree):
    """:func:`gather` of every array in ``tree`` (a collective with several processes)."""
    return jax.tree.map(gather, tree)


def all_processes(flag: bool) -> bool:
    """Whether ``flag`` holds in every process (a collective with several processes): for choices
    that decide whether a collective program runs (a cache hit), which must agree everywhere."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.asarray([bool(flag)]))))


def process_dir(path):
    """``path`` itself with one process; ``path/process<i>`` with several, so each process keeps its
    own copy of a cache or store (no shared file system assumed, no two writers of one file)."""
    from pathlib import Path

    path = Path(path)
    return path if jax.process_count() == 1 else path / f"process{jax.process_index()}"
