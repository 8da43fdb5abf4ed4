"""Data parallelism on JAX's own runtime: a mesh with a data axis, sharded batches.

:func:`funcnet.train.fit`, :func:`~funcnet.train.make_step`,
:func:`~funcnet.train.evaluate` and :func:`~funcnet.train.predict` take
``devices=``: ``None`` (one device, the default), ``"all"`` (every device; every
process's after ``jax.distributed.initialize``), a sequence of devices, or a
:class:`jax.sharding.Mesh` with a data axis. Each batch is
then sharded along the data axis (its first dimension); parameters, the network's state
and the optimizer state are replicated; the step is one program compiled with ``jit``,
and XLA inserts the all-reduces (the gradient's, and BatchNorm's batch statistics over
the global batch). Nothing here communicates by hand.

The helpers::

    mesh = data_mesh("all")              # Mesh(devices, ("data",))
    xs = shard_batch(x, mesh)            # rows split across the data axis
    params = replicate(params, mesh)     # a full copy on every device

A batch whose size does not divide by the number of devices: :func:`shard_batch` refuses
it (:func:`pad_rows` first); inside a program :func:`constrain_batch` shards it unevenly,
and XLA pads the last shard internally and leaves the padding out of every reduction, so
the program computes exactly what one device computes on the same batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"

_EXPECTED = (f"None, 'all', a sequence of jax devices, or a jax.sharding.Mesh with a "
             f"{DATA_AXIS!r} axis")


def data_mesh(devices: Any = "all", where: str = "data_mesh") -> Mesh:
    """A :class:`~jax.sharding.Mesh` to shard batches over.

    ``devices``: ``"all"`` (``jax.devices()``: this process's devices, or, after
    ``jax.distributed.initialize``, those of every process), a sequence of distinct
    devices (one platform; in a multi-process run it must hold devices of every
    process, as every process runs the same program), or a ``Mesh``: returned as it is
    when it has an axis named ``"data"`` or a single axis (that axis is then the data
    axis). Other
    axes of a mesh hold replicas. A bad value raises ``TypeError`` / ``ValueError``
    naming ``where``, what was expected and what was given.
    """
    if isinstance(devices, Mesh):
        names = tuple(devices.axis_names)
        if DATA_AXIS not in names and len(names) != 1:
            raise ValueError(f"{where}: devices: a Mesh needs an axis named {DATA_AXIS!r} "
                             f"(or a single axis), got axes {names}")
        _check_devices(list(devices.devices.flat), where)
        return devices
    if isinstance(devices, str):
        if devices != "all":
            raise ValueError(f"{where}: devices must be {_EXPECTED}, got the string "
                             f"{devices!r}")
        devices = jax.devices()
    elif isinstance(devices, jax.Device):
        raise TypeError(f"{where}: devices must be {_EXPECTED}, got a single device "
                        f"{devices}; pass a sequence, [device]")
    elif not isinstance(devices, Sequence | np.ndarray):
        raise TypeError(f"{where}: devices must be {_EXPECTED}, got "
                        f"{type(devices).__name__} {devices!r:.60}")
    devices = list(devices.flat) if isinstance(devices, np.ndarray) else list(devices)
    _check_devices(devices, where)
    return Mesh(np.array(devices, dtype=object), (DATA_AXIS,))


def _check_devices(devices: list, where: str) -> None:
    if not devices:
        raise ValueError(f"{where}: devices must name at least one device, got an empty "
                         f"sequence")
    for i, d in enumerate(devices):
        if not isinstance(d, jax.Device):
            raise TypeError(f"{where}: devices[{i}] must be a jax device (e.g. from "
                            f"jax.devices()), got {type(d).__name__} {d!r:.60}")
    if len(set(devices)) != len(devices):
        raise ValueError(f"{where}: devices must be distinct, got {devices}")
    platforms = sorted({d.platform for d in devices})
    if len(platforms) > 1:
        raise ValueError(f"{where}: devices must share one platform, got {platforms}")
    if jax.process_count() == 1:
        return
    pid = jax.process_index()
    if not any(d.process_index == pid for d in devices):
        raise ValueError(f"{where}: devices must include devices of this process "
                         f"({pid}): every process runs the same program on its own "
                         f"devices, got devices of processes "
                         f"{sorted({d.process_index for d in devices})}")
    counts = {p: sum(d.process_index == p for d in devices)
              for p in range(jax.process_count())}
    if len(set(counts.values())) != 1:
        raise ValueError(f"{where}: devices must take as many devices from every process "
                         f"(each process feeds its devices the same share of a batch), got "
                         f"{counts} (process: devices)")


def _check_mesh(mesh: Any, where: str) -> None:
    if not isinstance(mesh, Mesh):
        raise TypeError(f"{where}: mesh must be a jax.sharding.Mesh (parallel.data_mesh(...) "
                        f"makes one from devices or 'all'), got {type(mesh).__name__} "
                        f"{mesh!r:.60}")


def data_axis(mesh: Mesh) -> str:
    """The name of ``mesh``'s data axis: ``"data"``, or its only axis."""
    _check_mesh(mesh, "parallel")
    return DATA_AXIS if DATA_AXIS in mesh.axis_names else mesh.axis_names[0]


def num_shards(mesh: Mesh) -> int:
    """How many parts a batch is split into: the size of the data axis."""
    axis = data_axis(mesh)
    return int(mesh.shape[axis])


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows (the first dimension) split along the data axis, the rest whole."""
    return NamedSharding(mesh, PartitionSpec(data_axis(mesh)))


def replicated(mesh: Mesh) -> NamedSharding:
    """A full copy on every device of ``mesh``."""
    _check_mesh(mesh, "parallel.replicate")
    return NamedSharding(mesh, PartitionSpec())


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Every array of ``tree`` copied to every device of ``mesh`` (device to device for
    arrays already on devices; arrays already replicated there are returned as they are)."""
    return jax.device_put(tree, replicated(mesh))


def shard_batch(tree: Any, mesh: Mesh) -> Any:
    """Every array of ``tree`` split along its first dimension across the data axis.

    The first dimension must divide by :func:`num_shards` (a ``ValueError`` says so).
    ``fit``, ``evaluate`` and ``predict`` take host arrays of any size and split them
    unevenly themselves; :func:`pad_rows` pads with zero rows, which are fine for
    ``predict`` (cut them off) but would count as examples in training data. ``None``
    leaves stay ``None``.
    """
    _check_mesh(mesh, "shard_batch")
    d = num_shards(mesh)
    for leaf in jax.tree_util.tree_leaves(tree):
        if jnp.ndim(leaf) < 1 or jnp.shape(leaf)[0] % d:
            raise ValueError(f"shard_batch: every array needs a first dimension that divides "
                             f"by the {d} devices of the data axis, got shape "
                             f"{tuple(jnp.shape(leaf))}; give fit / evaluate / predict the "
                             f"host array instead (they split it unevenly), or pad it "
                             f"(parallel.pad_rows) where zero rows do no harm (predict), "
                             f"not as training data (fit would count them as examples)")
    return jax.device_put(tree, batch_sharding(mesh))


def pad_rows(a: Any, multiple: int) -> Any:
    """``a`` with zero rows appended up to a multiple of ``multiple`` rows (numpy stays
    numpy, a jax array stays on its devices)."""
    if isinstance(multiple, bool) or not isinstance(multiple, int | np.integer) or multiple < 1:
        raise ValueError(f"pad_rows: multiple must be a positive int, got {multiple!r}")
    if not isinstance(a, np.ndarray | jax.Array) or jnp.ndim(a) < 1:
        raise TypeError(f"pad_rows: a must be a numpy or jax array with a first (row) "
                        f"dimension, got {type(a).__name__} of shape {np.shape(a)}")
    pad = -jnp.shape(a)[0] % multiple
    if not pad:
        return a
    widths = [(0, pad)] + [(0, 0)] * (jnp.ndim(a) - 1)
    return np.pad(a, widths) if isinstance(a, np.ndarray) else jnp.pad(a, widths)


def constrain_batch(tree: Any, mesh: Mesh | None) -> Any:
    """Inside ``jit``: shard every array of ``tree`` along its first dimension (``mesh``
    ``None``: unchanged). Rows that do not divide by the devices are sharded unevenly:
    XLA pads the last shard internally and keeps the padding out of every result."""
    if mesh is None:
        return tree
    return jax.lax.with_sharding_constraint(tree, batch_sharding(mesh))


def check_dataset_on_device(x: jax.Array, y: Any, num_classes: int | None, where: str,
                            integer_x: bool = False) -> tuple[jax.Array, Any]:
    """:func:`funcnet.data.check_dataset` for ``x`` already on devices: the same checks and
    messages, computed where the data lives (a few scalars come back to the host, never
    the data; ``y`` is checked where it is, device or host). Returns ``(x, y)`` with
    integer labels as int32."""
    from funcnet import data as _data

    on_device = isinstance(y, jax.Array)
    y = y if on_device else np.asarray(y)
    if x.ndim < 1 or y.ndim < 1:
        raise ValueError(f"{where}: x and y must be batched arrays (N, ...), got shapes "
                         f"{x.shape} and {y.shape}")
    _data.check_examples(x.shape, y.shape, where)
    _data.check_x_dtype(x.dtype, integer_x, where)
    if not integer_x:
        finite, first_bad = jax.device_get(_finite_rows(x))
        if not finite:
            raise ValueError(f"{where}: x contains non-finite values (first at example "
                             f"{int(first_bad)})")
    if jnp.issubdtype(y.dtype, jnp.integer):
        if not on_device:  # labels on the host are checked there
            return x, _data.check_labels(y, num_classes, where)
        if y.ndim != 1:
            raise ValueError(f"{where}: labels must have shape (N,), got {y.shape}")
        lo, hi = (int(v) for v in jax.device_get((jnp.min(y), jnp.max(y))))
        top = num_classes if num_classes is not None else int(np.iinfo(np.int32).max) + 1
        if lo < 0 or hi >= top:
            rng = (f"[0, {num_classes})" if num_classes is not None
                   else "[0, 2**31) (int32)")
            raise ValueError(f"{where}: labels must lie in {rng}, got values in [{lo}, {hi}]")
        return x, y.astype(jnp.int32)
    if not jnp.issubdtype(y.dtype, jnp.floating):
        raise TypeError(f"{where}: y must be integer labels or floating targets, got dtype "
                        f"{y.dtype}")
    finite = jax.device_get(jnp.all(jnp.isfinite(y))) if on_device else np.isfinite(y).all()
    if not finite:
        raise ValueError(f"{where}: y contains non-finite values")
    return x, y


@jax.jit
def _finite_rows(x):
    """``(every element finite, the first example with a non-finite one)``."""
    row_ok = jnp.all(jnp.isfinite(x.reshape(x.shape[0], -1)), axis=1)
    return jnp.all(row_ok), jnp.argmin(row_ok)
