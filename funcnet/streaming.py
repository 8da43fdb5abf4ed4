"""Epochs over a batch source: :func:`funcnet.train.fit` when the data come one batch at a time.

``fit(net, params, source)`` (no ``y``) trains on the batches a *source* gives:

- a callable, ``source(epoch) -> iterable of batches`` (``epoch`` 0-based), e.g.
  :class:`funcnet.data.ArrayBatches` over memory-mapped files, or a function that builds
  a generator with its own augmentation;
- or a re-iterable object, iterated afresh every epoch (a list of batches, a data loader
  whose ``iter()`` starts a new pass). A one-shot iterator (a generator object, for which
  ``iter(it) is it``) cannot give a second epoch and is refused: wrap it in a function
  of the epoch. :func:`fit` reads the first batch of epoch 0 for its checks and trains
  epoch 0 on that same iterator (the source is asked once per epoch); a generator that
  has already run when the source gives it is refused (a ``TypeError``): its batches
  are gone.

A batch is ``(x, y)`` or ``(x, y, w)`` with ``w`` ``(B,)`` per-example weights (0 marks
padding). Every batch has at most ``batch_size`` rows, ``batch_size`` being the rows of
the first batch; a shorter batch is padded to ``batch_size`` with weight-0 rows (one
compiled step for all), or, for a network whose layers mix the batch (BatchNorm), runs
at its true size (another compiled step per distinct size), as :func:`fit` does with
arrays. Numpy batches are checked on the host as :func:`funcnet.data.check_dataset`
checks a data set (shape, dtype, finite values, labels in range), naming the epoch and
the batch; batches already on devices (``jax.Array``) are checked for their shapes and
dtypes on the host, and inside the step: a label out of range or a non-finite value makes
the step not apply and stops training as any non-finite loss does (the last good state
kept). To find the bad step, ``fit`` asks the source for that epoch again: a source must
give the same batches for the same epoch (``ArrayBatches`` does; seed a generator by the
epoch), or the error falls back to the epoch's start. In a multi-process run every process
must pass the same checks: a batch refused in one process leaves the others waiting.

JAX dispatches a step and returns before it has run, so the next batch is read and
checked while the device computes; only the batches of the steps in flight are held.

On several devices (``devices=``) each batch is sharded along the mesh's data axis. With
several processes (``jax.distributed``) every process gives its own part of every
global batch, the same number of rows in every process, and the global batch is those
parts in process order (:class:`funcnet.data.ArrayBatches` with ``process=`` gives
exactly the batches one process would).
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from funcnet import cache as _cache
from funcnet import data as _data
from funcnet import parallel as _parallel


def is_source(x: Any) -> bool:
    """Whether ``x`` is a batch source rather than an array: a callable, or an iterable
    that is not array-like (not a numpy / jax array, not a sequence of numbers)."""
    if isinstance(x, np.ndarray | jax.Array) or hasattr(x, "__array__"):
        return False
    return callable(x) or isinstance(x, Iterable)


def check_source(source: Any, where: str) -> None:
    """A callable or a re-iterable; a one-shot iterator is refused with the fix."""
    if isinstance(source, np.ndarray | jax.Array) or hasattr(source, "__array__"):
        raise TypeError(f"{where}: y is missing: give the labels y with the arrays x, or a "
                        f"batch source (x without y) whose batches are (x, y) pairs; got x "
                        f"of shape {tuple(np.shape(source))} and no y")
    if callable(source):
        return
    if not isinstance(source, Iterable):
        raise TypeError(f"{where}: x must be an array (with y) or a batch source (without y): "
                        f"a callable epoch -> iterable of (x, y) batches, or a re-iterable; "
                        f"got {type(source).__name__}")
    if isinstance(source, Iterator):
        raise TypeError(
            f"{where}: x is a one-shot iterator ({type(source).__name__}), which cannot give a "
            f"second epoch; pass a function of the epoch that returns a fresh iterator, "
            f"e.g. fit(net, params, lambda epoch: make_batches(epoch), ...)")


def epoch_batches(source: Any, epoch: int, where: str) -> Iterator:
    """A fresh iterator over the batches of ``epoch`` (a generator that has already run
    is refused: the batches it gave are lost)."""
    batches = source(epoch) if callable(source) else source
    try:
        it = iter(batches)
    except TypeError:
        raise TypeError(f"{where}: the batch source returned {type(batches).__name__} for "
                        f"epoch {epoch}, not an iterable of batches") from None
    if inspect.isgenerator(it) and inspect.getgeneratorstate(it) != "GEN_CREATED":
        raise TypeError(
            f"{where}: the batch source gave, for epoch {epoch + 1}, a generator that was "
            f"already advanced ({type(it).__name__}), whose batches are partly or wholly "
            f"gone; the source must return a fresh iterable of the epoch's batches every "
            f"time it is asked, e.g. fit(net, params, lambda epoch: make_batches(epoch), "
            f"...) or an object whose __iter__ starts a new pass")
    return it


def num_batches(source: Any) -> int | None:
    """``len(source)`` when the source knows it, else ``None``."""
    try:
        n = len(source)
    except TypeError:
        return None
    return int(n) if isinstance(n, int | np.integer) and n >= 0 else None


def split_batch(batch: Any, where: str) -> tuple[Any, Any, Any]:
    """``(x, y)`` or ``(x, y, w)`` -> ``(x, y, w or None)``."""
    if isinstance(batch, dict):
        raise TypeError(f"{where}: a batch must be a tuple (x, y) or (x, y, w), got a dict "
                        f"with keys {sorted(batch)}")
    if not isinstance(batch, tuple | list) or len(batch) not in (2, 3):
        raise TypeError(f"{where}: a batch must be a tuple (x, y) or (x, y, w), got "
                        f"{type(batch).__name__} {batch!r:.60}")
    x, y = batch[0], batch[1]
    w = batch[2] if len(batch) == 3 else None
    return x, y, w


def first_batch(source: Any, where: str) -> tuple[tuple[Any, Any, Any], Iterator]:
    """The first batch of epoch 0, for the shapes and dtypes checked before training, and
    epoch 0's batches from it on (that batch, then the rest of the same iterator), for
    :class:`StreamRunner` to train epoch 0 on without asking the source again (a source
    that gives one shared stream, or a loader with persistent workers, would not start
    over)."""
    it = epoch_batches(source, 0, where)
    try:
        batch = next(it)
    except StopIteration:
        raise ValueError(f"{where}: the batch source gave no batch for epoch 0") from None
    return split_batch(batch, f"{where}: epoch 1, batch 1"), itertools.chain([batch], it)


def _step_program(update: Callable, mesh: Any) -> Callable:
    """:class:`StreamRunner`'s jitted step for the step body ``update``."""

    def step(state, x, y, w, active, n):
        # n: the rows without the transport padding to a multiple of the devices
        batch = _parallel.constrain_batch((x[:n], y[:n], w[:n]), mesh)
        return update(state, *batch, active)

    on_mesh = {} if mesh is None else {"out_shardings": _parallel.replicated(mesh)}
    return jax.jit(step, static_argnums=5, donate_argnums=(0,), **on_mesh)


def stack_metrics(collected: list[dict], before: dict | None = None) -> dict[str, jax.Array]:
    """The per-step metrics dicts ``collected`` as one dict of ``(steps,)`` arrays, after
    the arrays of ``before`` (a scanned epoch's) if given. Stacked on the host: the epoch's
    caller reads them there, and ``jnp.stack`` would compile a program per step count."""
    host = jax.device_get(collected)
    metrics = {k: np.stack([np.asarray(m[k]) for m in host]) for k in host[0]}
    if before is not None:
        metrics = {k: np.concatenate([np.asarray(jax.device_get(before[k])), v])
                   for k, v in metrics.items()}
    return {k: jax.device_put(v) for k, v in metrics.items()}


_STEPS = _cache.ProgramCache(16)  # per step body and mesh


def _label_dtype(dtype: Any) -> np.dtype:
    """The dtype a batch's ``y`` is trained with: integer labels as int32, others as given."""
    dtype = np.dtype(dtype)
    return np.dtype(np.int32) if np.issubdtype(dtype, np.integer) else dtype


class StreamRunner:
    """Runs epochs of ``update`` (see ``funcnet.train._make_update``) over a batch source.

    ``run(state, key, active, on_step, epoch) -> (state, metrics, active)`` as
    ``funcnet.train.EpochRunner``: ``metrics`` a dict of ``(steps,)`` arrays. One
    compiled step for every batch of ``batch_size`` rows (shorter ones padded with weight
    0), plus one per other size for a network that ``mixes_batch``.
    """

    mode = "loop"

    def __init__(self, update: Callable, source: Any, batch_size: int, *, x_like: Any,
                 y_like: Any, num_classes: int | None, integer_x: bool, mesh: Any = None,
                 exact_last: bool = False, where: str = "fit", epoch0: Any = None):
        self.source, self.batch_size = source, int(batch_size)
        # epoch 0's batches when fit has read its first one (first_batch): used once
        self._epoch0 = epoch0
        self.mesh, self.exact_last, self.where = mesh, exact_last, where
        self._init = {"x_like": x_like, "y_like": y_like, "num_classes": num_classes,
                      "integer_x": integer_x, "mesh": mesh, "exact_last": exact_last,
                      "where": where}
        self.num_classes, self.integer_x = num_classes, integer_x
        self.x_tail, self.x_dtype = tuple(x_like.shape[1:]), np.dtype(x_like.dtype)
        self.y_tail, self.y_dtype = tuple(y_like.shape[1:]), _label_dtype(y_like.dtype)
        self.w_dtype = self.x_dtype if np.issubdtype(self.x_dtype, np.floating) else np.float32
        self.num_batches = num_batches(source)
        self.processes = jax.process_count() if mesh is not None else 1

        # the program of an earlier runner with the same step body (fit's are cached per
        # configuration) and mesh
        self._step = _STEPS.get(lambda u: _step_program(u, mesh), update, values=(mesh,))

    def with_update(self, update: Callable) -> StreamRunner:
        """The same source and batching with another step body (fit's full-guard replay)."""
        return StreamRunner(update, self.source, self.batch_size, **self._init)

    # -- one batch ------------------------------------------------------------------------

    def _check(self, x: Any, y: Any, w: Any, where: str) -> tuple[Any, Any, np.ndarray]:
        arrays = []
        for name, a in (("x", x), ("y", y)):
            if not isinstance(a, jax.Array):  # numpy, native byte order (JAX takes no other)
                a = _data._as_array(a, name, where)
            arrays.append(a)
        x, y = arrays
        if x.ndim < 1 or y.ndim < 1:
            raise ValueError(f"{where}: x and y must be batched arrays (B, ...), got shapes "
                             f"{x.shape} and {y.shape}")
        rows = x.shape[0]
        if tuple(x.shape[1:]) != self.x_tail:
            raise ValueError(f"{where}: x has shape {tuple(x.shape)}; every batch must be "
                             f"(B, {', '.join(map(str, self.x_tail))}) like the first")
        if tuple(y.shape[1:]) != self.y_tail or y.shape[0] != rows:
            raise ValueError(f"{where}: y has shape {tuple(y.shape)}; expected "
                             f"({rows}{''.join(', ' + str(d) for d in self.y_tail)}), one "
                             f"row per example of x {tuple(x.shape)}")
        if rows == 0 or rows > self.batch_size:
            raise ValueError(f"{where}: a batch must have 1 to batch_size={self.batch_size} "
                             f"rows (the first batch's), got {rows}")
        if np.dtype(x.dtype) != self.x_dtype:
            raise TypeError(f"{where}: x has dtype {x.dtype}; every batch must have the first "
                            f"batch's dtype {self.x_dtype}")
        if isinstance(x, np.ndarray) and isinstance(y, np.ndarray):
            x, y = _data.check_dataset(x, y, self.num_classes, where=where,
                                       integer_x=self.integer_x)
        elif isinstance(y, np.ndarray) and np.issubdtype(y.dtype, np.integer):
            y = _data.check_labels(y, self.num_classes, where)
        if _label_dtype(y.dtype) != self.y_dtype:
            raise TypeError(f"{where}: y has dtype {y.dtype}; every batch must have the first "
                            f"batch's dtype {self.y_dtype} (integer labels of any width are "
                            f"taken as int32)")
        if np.issubdtype(np.dtype(y.dtype), np.integer):
            y = y.astype(np.int32) if isinstance(y, np.ndarray) else y.astype(jnp.int32)
        if w is None:
            w = np.ones(rows, self.w_dtype)
        else:
            w = np.asarray(w)
            if w.shape != (rows,) or not np.issubdtype(w.dtype, np.floating):
                raise ValueError(f"{where}: w must be floating weights of shape ({rows},), "
                                 f"got {w.dtype} {w.shape}")
            if not np.all(np.isfinite(w)) or np.any(w < 0):
                raise ValueError(f"{where}: w must be finite and >= 0")
            total = np.sum(w, dtype=np.float64)
            if total > np.finfo(self.w_dtype).max:  # the cast (or the loss's sum) overflows
                raise ValueError(f"{where}: w overflows the training dtype {self.w_dtype}: "
                                 f"weights up to {float(np.max(w)):g}, sum {total:g}; "
                                 f"scale them down")
            w = w.astype(self.w_dtype)
            if self.processes == 1 and total == 0:  # 0 / 0: the batch's loss would be NaN
                raise ValueError(f"{where}: w are all 0, so the batch's weighted mean loss is "
                                 f"undefined; leave such a batch out")
            if self.exact_last and not np.all(w > 0):
                raise ValueError(
                    f"{where}: the batch has rows of weight 0 (padding), but the network has "
                    f"a layer that mixes the batch (BatchNorm), whose batch statistics would "
                    f"include them; give partial batches at their true size (with "
                    f"ArrayBatches(process=...): drop_remainder=True, or a data set size "
                    f"that divides by batch_size)")
        return x, y, w

    def _pad(self, a: Any, rows: int) -> Any:
        pad = rows - a.shape[0]
        if pad <= 0:
            return a
        widths = [(0, pad)] + [(0, 0)] * (a.ndim - 1)
        return np.pad(a, widths) if isinstance(a, np.ndarray) else jnp.pad(a, widths)

    def _prepare(self, batch: Any, epoch: int, b: int) -> tuple[tuple, int]:
        where = f"{self.where}: epoch {epoch + 1}, batch {b + 1}"
        x, y, w = self._check(*split_batch(batch, where), where)
        rows = x.shape[0]
        if rows < self.batch_size and not self.exact_last:  # one program for all batches
            x, y, w = (self._pad(a, self.batch_size) for a in (x, y, w))
            rows = self.batch_size
        if self.mesh is None:
            return (x, y, w), rows
        if self.processes > 1:
            local = self.mesh.local_mesh.size
            if rows % local:
                raise ValueError(f"{where}: each process's part of a batch must divide by its "
                                 f"{local} devices of the mesh, got {rows} rows")
            sharding = _parallel.batch_sharding(self.mesh)
            arrays = tuple(jax.make_array_from_process_local_data(sharding, np.asarray(a))
                           for a in (x, y, w))
            return arrays, arrays[0].shape[0]
        d = _parallel.num_shards(self.mesh)
        arrays = tuple(self._pad(a, -(-rows // d) * d) for a in (x, y, w))
        return tuple(_parallel.shard_batch(arrays, self.mesh)), rows

    # -- one epoch ------------------------------------------------------------------------

    def run(self, state, key, active, on_step: Callable[[int], None] | None = None,
            epoch: int = 0):
        del key  # the source orders its own batches
        if self.mesh is not None:
            state, active = _parallel.replicate((state, active), self.mesh)
        if epoch == 0 and self._epoch0 is not None:
            it, self._epoch0 = self._epoch0, None
        else:
            it = epoch_batches(self.source, epoch, self.where)
        collected = []
        for b in itertools.count():
            try:
                batch = next(it)
            except StopIteration:
                break
            arrays, n = self._prepare(batch, epoch, b)
            state, m, active = self._step(state, *arrays, active, n)
            collected.append(m)
            if on_step is not None:
                on_step(1)
        if not collected:
            raise ValueError(f"{self.where}: the batch source gave no batch for epoch "
                             f"{epoch + 1}")
        return state, stack_metrics(collected), active

    def cache_sizes(self) -> dict[str, int]:
        """How many programs the step holds (1 when every batch has ``batch_size`` rows or
        the network does not mix the batch)."""
        return {"step": self._step._cache_size()}
