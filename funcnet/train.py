"""Training: jit-compiled train steps, whole-epoch compiled loops, ``fit``, ``evaluate``.

The lecture's algorithm is the plainest case of :func:`make_step`: with
``optax.sgd(alpha)``, an L2 regularizer ``Omega`` with weight ``lam`` and one example per
step it is exactly

    ``theta <- theta + alpha * Delta``,  ``Delta = -grad l(theta) - lam * grad Omega(theta)``.

Mini-batches (the loss is the mean over the batch) and any optax optimizer (momentum,
Adam, schedules) are the general case.

Two ways to run an epoch, giving the same parameters for the same key:

- ``"loop"``: a Python loop over one jitted step per mini-batch;
- ``"scan"``: the whole epoch as one compiled program, a ``lax.scan`` over the batches of
  a device-resident, shuffled-on-device copy of the data.

``epoch_mode="auto"`` (the default of :func:`fit`) picks ``"loop"`` for networks with a
convolution and ``"scan"`` otherwise; BENCHMARKS.md has the measurements behind it.

Gradients come from ``grad=``: ``"autodiff"`` (``jax.value_and_grad``) is built in; other
modes plug in through :data:`GRAD_MODES` (or a callable) with the signature
``value_and_grad(net, loss_fn) -> f(params, x, y) -> (loss, grads)``, ``loss_fn(outputs,
y) -> scalar`` (the mean over the batch).
"""

from __future__ import annotations

import math
import operator
import os
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from funcnet import checkpoint as _ckpt
from funcnet import data as _data
from funcnet import losses as _losses
from funcnet import vjp as _vjp
from funcnet.nn.base import Layer, iter_layers

Loss = Callable[[jax.Array, jax.Array], jax.Array]
ValueAndGrad = Callable[[Any, Loss], Callable[[Any, jax.Array, Any], tuple[jax.Array, Any]]]

EPOCH_MODES = ("auto", "loop", "scan")


class TrainState(NamedTuple):
    """What a train step carries: ``params``, optax ``opt_state``, ``step`` (int32 scalar)
    and the network's ``model_state`` (BatchNorm's running statistics; ``{}``-like and
    empty for a network without state)."""

    params: Any
    opt_state: Any
    step: jax.Array
    model_state: Any = ()


class NonFiniteLossError(FloatingPointError):
    """Training met a NaN / inf loss. ``state`` holds the last finite parameters.

    Attributes: ``epoch`` and ``step`` (1-based, within the epoch), ``global_step``
    (0-based count of updates applied before it), ``value`` (the loss), ``state`` (the
    :class:`TrainState` before the bad step) and ``history`` (completed epochs).
    """

    def __init__(self, message, *, epoch, step, global_step, value, state, history):
        super().__init__(message)
        self.epoch, self.step, self.global_step = epoch, step, global_step
        self.value, self.state, self.history = value, state, history


class FitResult(NamedTuple):
    """What :func:`fit` returns."""

    params: Any
    state: TrainState
    history: dict[str, list]
    stop_reason: str  # "epochs", "loss_threshold" or "patience"

    @property
    def model_state(self) -> Any:
        """The network's state after training (pass it to ``evaluate`` / ``predict``)."""
        return self.state.model_state


# ---------------------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------------------


def autodiff_value_and_grad(net: Any, loss_fn: Loss):
    """``f(params, x, y) -> (loss_fn(net.apply(params, x), y), d loss / d params)`` by autodiff."""

    def f(params, x, y):
        return jax.value_and_grad(lambda p: loss_fn(net.apply(p, x), y))(params)

    return f


def autodiff_value_and_grad_with_state(net: Any, loss_fn: Loss):
    """``f(params, state, x, y, key=None, train=True) -> (loss, grads, new_state, outputs)``
    by autodiff: the twin of :func:`funcnet.vjp.value_and_grad_with_state`."""

    def f(params, state, x, y, key=None, train=True):
        def objective(p):
            out, new_state = net.apply_with_state(p, state, x, key=key, train=train)
            return loss_fn(out, y), (new_state, out)

        (loss, (new_state, out)), grads = jax.value_and_grad(objective, has_aux=True)(params)
        return loss, grads, new_state, out

    return f


# name -> value_and_grad(net, loss_fn). "manual" back-propagates with the hand-written
# rules of funcnet.vjp (layer by layer, the loss and the regularizer included).
GRAD_MODES: dict[str, ValueAndGrad] = {
    "autodiff": autodiff_value_and_grad,
    "manual": _vjp.value_and_grad,
}


def resolve_grad(grad: str | ValueAndGrad) -> ValueAndGrad:
    """The ``value_and_grad(net, loss_fn)`` factory for ``grad`` (a name or a callable)."""
    if isinstance(grad, str):
        if grad not in GRAD_MODES:
            raise ValueError(
                f"grad must be one of {sorted(GRAD_MODES)} (or a callable "
                f"value_and_grad(net, loss_fn)), got {grad!r}"
            )
        return GRAD_MODES[grad]
    if callable(grad):
        return grad
    raise TypeError(
        f"grad must be one of {sorted(GRAD_MODES)} or a callable value_and_grad(net, loss_fn), "
        f"got {grad!r}"
    )


def weighted_loss(loss_fn: Loss) -> Loss:
    """``loss_fn`` with per-example weights: ``f(outputs, (y, w)) = sum_i w_i l_i / sum_i w_i``.

    ``l_i = loss_fn(outputs[i:i+1], y[i:i+1])``. Weights 0 mark padding (the last partial
    batch of an epoch is padded to full size so the step never recompiles).
    """

    def f(outputs, yw):
        y, w = yw
        per_example = jax.vmap(lambda o, t: loss_fn(o[None], t[None]))(outputs, y)
        return jnp.sum(w * per_example) / jnp.sum(w)

    f.base_loss = loss_fn  # lets a grad mode recognise the loss it wraps
    return f


def _correct(outputs: jax.Array, y: jax.Array) -> jax.Array:
    """Per-example 0/1 correctness for integer labels or one-hot targets, else zeros."""
    if outputs.ndim == 2 and jnp.issubdtype(y.dtype, jnp.integer) and y.ndim == 1:
        return (jnp.argmax(outputs, axis=-1) == y).astype(outputs.dtype)
    if outputs.ndim == 2 and y.shape == outputs.shape and outputs.shape[1] > 1:
        return (jnp.argmax(outputs, axis=-1) == jnp.argmax(y, axis=-1)).astype(outputs.dtype)
    return jnp.zeros(outputs.shape[:1], outputs.dtype)


def _has_accuracy(out_shape: tuple[int, ...], y: np.ndarray) -> bool:
    if len(out_shape) != 1:
        return False
    if np.issubdtype(y.dtype, np.integer) and y.ndim == 1:
        return True
    return y.ndim == 2 and y.shape[1] == out_shape[0] and out_shape[0] > 1


# ---------------------------------------------------------------------------------------
# Train state and step
# ---------------------------------------------------------------------------------------


def _check_optimizer(optimizer: Any) -> None:
    if not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
        raise TypeError(
            "optimizer must be an optax.GradientTransformation (e.g. optax.sgd(0.1)), "
            f"got {optimizer!r}"
        )


def init_state(
    params: Any, optimizer: optax.GradientTransformation, model_state: Any = ()
) -> TrainState:
    """A :class:`TrainState` at step 0 for ``params``, ``optimizer`` and the network's
    ``model_state`` (``net.init_state(input_shape)``; leave it out for a network
    without state).

    Arrays are copied, so donating the state to a step never deletes the caller's arrays.
    """
    _check_optimizer(optimizer)
    params = jax.tree_util.tree_map(lambda a: jnp.array(a, copy=True), params)
    model_state = jax.tree_util.tree_map(lambda a: jnp.array(a, copy=True), model_state)
    return TrainState(params, optimizer.init(params), jnp.zeros((), jnp.int32), model_state)


def step_keys(seed: Any) -> jax.Array:
    """The root of the per-step keys of a run with ``seed``: step ``t`` draws its Dropout
    masks from ``fold_in(step_keys(seed), t)`` (a function of the step count, so a resumed
    run draws the same keys). Independent of the shuffling keys ``fold_in(key(seed), epoch)``.
    """
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        raise TypeError(f"seed must be an int, got {seed!r}")
    return jax.random.fold_in(jax.random.key(int(seed)), 2**31 - 1)


def _check_lam(regularizer: Any, lam: Any) -> float:
    if isinstance(lam, bool) or not isinstance(lam, int | float) or not math.isfinite(lam):
        raise TypeError(f"lam must be a finite non-negative number, got {lam!r}")
    if lam < 0:
        raise ValueError(f"lam must be a finite non-negative number, got {lam!r}")
    if regularizer is not None and not callable(regularizer):
        raise TypeError(
            f"regularizer must be a function params -> Omega (e.g. funcnet.regularizers.l2), "
            f"got {regularizer!r}"
        )
    if lam > 0 and regularizer is None:
        raise ValueError(f"lam={lam} needs a regularizer (e.g. funcnet.regularizers.l2)")
    return float(lam)


def _make_update(net, loss_fn, optimizer, regularizer, lam, grad, seed=0):
    """The un-jitted step body shared by :func:`make_step`, the loop and the scanned epoch.

    ``update(state, x, y, w, active) -> (state, metrics, active)``. ``w=None`` uses
    ``loss_fn`` as given (the batch mean); otherwise per-example weights. With ``active``
    (a bool scalar) the update is applied only while ``active`` and the objective is finite;
    ``active`` then becomes False for good, freezing the last finite state.
    """
    if not callable(loss_fn):
        raise TypeError(f"loss must be a function (outputs, y) -> scalar, got {loss_fn!r}")
    _check_optimizer(optimizer)
    lam = _check_lam(regularizer, lam)
    factory = resolve_grad(grad)
    manual = factory is _vjp.value_and_grad
    wloss = weighted_loss(loss_fn)
    if factory is autodiff_value_and_grad or manual:
        # one forward pass (training mode, state and key threaded) gives the loss, the
        # gradient, the new state and the outputs for the accuracy
        with_state = (_vjp.value_and_grad_with_state if manual
                      else autodiff_value_and_grad_with_state)
        vg_plain, vg_weighted = with_state(net, loss_fn), with_state(net, wloss)
    else:  # other plug-in modes only return (loss, grads), for nets without state
        vg_plain, vg_weighted = factory(net, loss_fn), factory(net, wloss)
    if manual and regularizer in _vjp.regularizers.GRADS:
        reg_value_and_grad = _vjp.regularizer_value_and_grad(regularizer)
    elif regularizer is not None:
        reg_value_and_grad = jax.value_and_grad(regularizer)
    root = step_keys(seed)

    def value_and_grad(state, x, y, w):
        yw = y if w is None else (y, w)
        vg = vg_plain if w is None else vg_weighted
        if factory is autodiff_value_and_grad or manual:
            key = jax.random.fold_in(root, state.step)
            return vg(state.params, state.model_state, x, yw, key, True)
        loss, grads = vg(state.params, x, yw)
        return loss, grads, state.model_state, net.apply(state.params, x)

    def update(state, x, y, w=None, active=None):
        loss, grads, model_state, out = value_and_grad(state, x, y, w)
        if not jax.tree_util.tree_leaves(state.model_state):
            model_state = state.model_state  # a stateless net: keep the carry's structure
        objective = loss
        if regularizer is not None and lam != 0.0:
            omega, omega_grads = reg_value_and_grad(state.params)
            grads = jax.tree_util.tree_map(lambda g, r: g + lam * r, grads, omega_grads)
            objective = loss + lam * omega
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new = TrainState(params, opt_state, state.step + 1, model_state)
        correct = _correct(out, y)
        if w is None:
            metrics = {"loss": loss, "objective": objective,
                       "correct": jnp.sum(correct), "count": jnp.asarray(correct.size, loss.dtype)}
        else:
            metrics = {"loss": loss, "objective": objective,
                       "correct": jnp.sum(w * correct), "count": jnp.sum(w)}
        if active is not None:
            # One fused reduction: any NaN / inf in a gradient makes the sum non-finite.
            gsum = sum((jnp.sum(g) for g in jax.tree_util.tree_leaves(grads)), jnp.zeros(()))
            finite = jnp.logical_and(jnp.isfinite(objective), jnp.isfinite(gsum))
            metrics["finite"] = finite
            active = jnp.logical_and(active, finite)
            new = jax.tree_util.tree_map(lambda a, b: jnp.where(active, a, b), new, state)
        return new, metrics, active

    return update


def make_step(
    net: Any,
    loss: Loss,
    optimizer: optax.GradientTransformation,
    *,
    regularizer: Callable[[Any], jax.Array] | None = None,
    lam: float = 0.0,
    grad: str | ValueAndGrad = "autodiff",
    donate: bool = True,
    seed: int = 0,
) -> Callable:
    """A jit-compiled train step ``step(state, x, y, weights=None) -> (state, metrics)``.

    The step minimises ``loss(net.apply(params, x), y) + lam * regularizer(params)`` with
    one ``optimizer`` update; ``state`` is a :class:`TrainState` (see :func:`init_state`)
    and its buffers are donated (``donate=False`` keeps them valid after the call).

    Args:
      net: a network (``apply(params, x)``), e.g. :class:`funcnet.Serial`.
      loss: ``loss(outputs, y) -> scalar``, the mean over the batch.
      optimizer: an optax ``GradientTransformation``.
      regularizer: ``Omega(params) -> scalar`` (e.g. :func:`funcnet.regularizers.l2`).
      lam: its weight ``lambda >= 0``.
      grad: ``"autodiff"`` (``jax.value_and_grad``), ``"manual"`` (the hand-written rules
        of :mod:`funcnet.vjp`: explicit back-propagation layer by layer, loss and
        regularizer included), or a callable
        ``value_and_grad(net, loss) -> f(params, x, y) -> (loss, grads)``.
      donate: donate the incoming state's buffers to the result.
      seed: the root of the per-step keys (Dropout): step ``t`` uses
        ``fold_in(step_keys(seed), t)`` with ``t = state.step``, a fresh key every step.

    The step runs the network in training mode and threads its state: the returned
    ``state.model_state`` holds BatchNorm's updated running statistics.

    The returned step takes ``x`` ``(B, ...)``, ``y`` ``(B, ...)`` and optional per-example
    ``weights`` ``(B,)`` (0 marks padding) and returns ``metrics`` with scalars ``loss``
    (data loss), ``objective`` (loss + lam * Omega), ``correct`` (weighted count of
    correct argmax predictions; 0 when not a classification) and ``count`` (sum of weights).
    """
    update = _make_update(net, loss, optimizer, regularizer, lam, grad, seed)

    def step(state, x, y, weights=None):
        new, metrics, _ = update(state, x, y, weights)
        return new, metrics

    return jax.jit(step, donate_argnums=(0,) if donate else ())


# ---------------------------------------------------------------------------------------
# Epochs
# ---------------------------------------------------------------------------------------


def epoch_batches(
    key: jax.Array, n: int, batch_size: int, shuffle: bool = True
) -> tuple[jax.Array, jax.Array]:
    """Example indices and weights of one epoch: ``(num_batches, batch_size)`` each.

    A permutation of ``range(n)`` (``jax.random.permutation(key, n)``; identity if not
    ``shuffle``) cut into batches; the last is padded with index 0 and weight 0.
    """
    nb = -(-n // batch_size)
    pad = nb * batch_size - n
    order = jax.random.permutation(key, n) if shuffle else jnp.arange(n)
    idx = jnp.concatenate([order.astype(jnp.int32), jnp.zeros(pad, jnp.int32)])
    w = jnp.concatenate([jnp.ones(n, jnp.float32), jnp.zeros(pad, jnp.float32)])
    return idx.reshape(nb, batch_size), w.reshape(nb, batch_size)


def epoch_key(seed_key: jax.Array, epoch: int) -> jax.Array:
    """The shuffling key of ``epoch`` (0-based): ``fold_in(seed_key, epoch)``; resumable."""
    return jax.random.fold_in(seed_key, epoch)


class EpochRunner:
    """Runs epochs of ``update`` over device-resident ``(x, y)`` in ``"loop"`` or ``"scan"`` mode.

    ``run(state, key, active) -> (state, metrics, active)`` with ``metrics`` a dict of
    ``(num_batches,)`` arrays. Both modes draw the same batches for the same key and apply
    the same step body; each compiles once (later epochs and the padded last batch reuse it).
    """

    def __init__(self, update, x, y, batch_size: int, mode: str, shuffle: bool = True):
        if mode not in ("loop", "scan"):
            raise ValueError(f"epoch mode must be 'loop' or 'scan', got {mode!r}")
        self.mode = mode
        self.x, self.y = x, y
        self.n = int(x.shape[0])
        self.batch_size = batch_size
        self.num_batches = -(-self.n // batch_size)
        n, bs = self.n, batch_size
        w_dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32

        def batches(key):
            idx, w = epoch_batches(key, n, bs, shuffle)
            return idx, w.astype(w_dtype)

        def gather(x, y, idx, w, i):
            ib = idx[i]
            return x[ib], y[ib], w[i]

        def one_step(state, x, y, idx, w, i, active):
            xb, yb, wb = gather(x, y, idx, w, i)
            return update(state, xb, yb, wb, active)

        def scan_epoch(state, x, y, key, active):
            idx, w = batches(key)

            def body(carry, i):
                state, active = carry
                state, metrics, active = one_step(state, x, y, idx, w, i, active)
                return (state, active), metrics

            (state, active), metrics = jax.lax.scan(
                body, (state, active), jnp.arange(idx.shape[0])
            )
            return state, metrics, active

        self._batches = jax.jit(batches)
        self._step = jax.jit(one_step, donate_argnums=(0,))
        self._epoch = jax.jit(scan_epoch, donate_argnums=(0,))
        self._steps = [jnp.asarray(i, jnp.int32) for i in range(self.num_batches)]

    def run(self, state, key, active, on_step: Callable[[int], None] | None = None):
        if self.mode == "scan":
            state, metrics, active = self._epoch(state, self.x, self.y, key, active)
            if on_step is not None:
                on_step(self.num_batches)
            return state, metrics, active
        idx, w = self._batches(key)
        collected = []
        for i in self._steps:
            state, m, active = self._step(state, self.x, self.y, idx, w, i, active)
            collected.append(m)
            if on_step is not None:
                on_step(1)
        metrics = {k: jnp.stack([m[k] for m in collected]) for k in collected[0]}
        return state, metrics, active

    def cache_sizes(self) -> dict[str, int]:
        """How many programs each jitted function holds (1 each after any number of epochs)."""
        return {"step": self._step._cache_size(), "epoch": self._epoch._cache_size()}


def has_conv(net: Any) -> bool:
    """Whether ``net`` contains a convolution-like layer (one that says it is
    ``convolutional``; subclasses of ``Conv`` included)."""
    if not isinstance(net, Layer):
        return False
    return any(layer.convolutional for layer in iter_layers(net))


def choose_epoch_mode(net: Any, mode: str = "auto") -> str:
    """Resolve ``"auto"``: ``"loop"`` for nets with convolutions, else ``"scan"``.

    Measured on XLA:CPU (BENCHMARKS.md): the scanned epoch is faster for dense networks
    (no per-step dispatch) but slower for convolutions, whose weight-gradient
    convolutions inside the scan's while-loop body are compiled to a slower kernel.
    """
    if mode not in EPOCH_MODES:
        raise ValueError(f"epoch_mode must be one of {EPOCH_MODES}, got {mode!r}")
    if mode != "auto":
        return mode
    return "loop" if has_conv(net) else "scan"


# ---------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------


class _ProgramCache:
    """Compiled programs keyed by the *identity* of the network and loss (never by
    equality: two custom layers that compare equal may still compute different things).
    Holds a reference to each key so an id is never reused while its entry lives."""

    def __init__(self, size: int = 64):
        self.size, self.entries = size, {}

    def get(self, build, *objs):
        key = tuple(id(o) for o in objs)
        hit = self.entries.get(key)
        if hit is not None:
            return hit[1]
        if len(self.entries) >= self.size:
            self.entries.pop(next(iter(self.entries)))
        fn = build(*objs)
        self.entries[key] = (objs, fn)
        return fn


_PROGRAMS = _ProgramCache()


def _eval_fn(net, loss_fn):
    return _PROGRAMS.get(_build_eval_fn, net, loss_fn)


def _build_eval_fn(net, loss_fn):
    wloss = weighted_loss(loss_fn)

    def run(params, model_state, x, y, idx, w):
        def body(acc, i):
            ib, wb = idx[i], w[i]
            out, _ = net.apply_with_state(params, model_state, x[ib])
            loss = wloss(out, (y[ib], wb))
            count = jnp.sum(wb)
            return (acc[0] + loss * count, acc[1] + jnp.sum(wb * _correct(out, y[ib])),
                    acc[2] + count), None

        zero = jnp.zeros((), w.dtype)
        (tot, cor, cnt), _ = jax.lax.scan(body, (zero, zero, zero), jnp.arange(idx.shape[0]))
        return tot / cnt, cor / cnt

    return jax.jit(run)


def _predict_fn(net):
    return _PROGRAMS.get(_build_predict_fn, net)


def _build_predict_fn(net):
    def run(params, model_state, x, idx):
        return jax.lax.map(lambda ib: net.apply_with_state(params, model_state, x[ib])[0], idx)

    return jax.jit(run)


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a positive int, got {value!r}")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be a positive int, got {value!r}") from None
    if value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value}")
    return value


def _num_classes(net: Any, x: np.ndarray) -> int | None:
    try:
        out = tuple(net.output_shape(tuple(x.shape[1:])))
    except (ValueError, TypeError) as e:
        raise ValueError(f"the network does not accept inputs of shape {x.shape[1:]}: {e}") from e
    return out[-1] if len(out) == 1 else None


def _takes_integers(net: Any) -> bool:
    return isinstance(net, Layer) and net.takes_integers()


def _model_state(net: Any, state: Any, input_shape, where: str) -> Any:
    """``state`` checked against the network's, or its initial state when ``None``."""
    if state is None:
        return net.init_state(tuple(input_shape))
    check_params(net, state, input_shape, where, what="state")
    return state


def check_params(
    net: Any, params: Any, input_shape: tuple[int, ...], where: str = "fit", what: str = "params"
) -> None:
    """Raise ``ValueError`` if ``params`` do not fit ``net`` for inputs of ``input_shape``.

    Uses ``net.param_shapes(input_shape)`` (no allocation) where the network has it.
    """
    shapes = getattr(net, "param_shapes" if what == "params" else "state_shapes", None)
    if shapes is None:
        return
    expected = shapes(tuple(input_shape))
    e_leaves, e_def = jax.tree_util.tree_flatten_with_path(expected)
    g_leaves, g_def = jax.tree_util.tree_flatten_with_path(params)
    if e_def != g_def:
        raise ValueError(
            f"{where}: {what} do not have the network's structure for inputs of shape "
            f"{tuple(input_shape)}: expected {e_def}, got {g_def}"
        )
    for (path, e), (_, g) in zip(e_leaves, g_leaves, strict=True):
        if tuple(jnp.shape(g)) != tuple(e.shape):
            raise ValueError(
                f"{where}: {what}{jax.tree_util.keystr(path)} has shape {tuple(jnp.shape(g))}, "
                f"the network expects {tuple(e.shape)} for inputs of shape {tuple(input_shape)}"
            )


def evaluate(
    net: Any,
    params: Any,
    x: Any,
    y: Any,
    *,
    loss: Loss = _losses.softmax_cross_entropy,
    batch_size: int = 1024,
    state: Any = None,
) -> tuple[float, float | None]:
    """``(mean loss, accuracy)`` of ``net`` with ``params`` over ``(x, y)``, in batches.

    Evaluation mode: Dropout is off and BatchNorm uses the running statistics in
    ``state`` (the network's state, e.g. ``fit(...).model_state``; default
    ``net.init_state``).

    Accuracy is the fraction of argmax predictions equal to the integer labels (or to the
    argmax of one-hot targets); ``None`` when ``y`` is neither.
    """
    batch_size = _positive_int(batch_size, "evaluate: batch_size")
    x, y = _data.check_dataset(x, y, _num_classes(net, np.asarray(x)), where="evaluate",
                               integer_x=_takes_integers(net))
    out_shape = tuple(net.output_shape(tuple(x.shape[1:])))
    bs = min(batch_size, x.shape[0])
    idx, w = epoch_batches(jax.random.key(0), x.shape[0], bs, shuffle=False)
    state = _model_state(net, state, x.shape[1:], "evaluate")
    mean_loss, acc = _eval_fn(net, loss)(params, state, jnp.asarray(x), jnp.asarray(y), idx,
                                         w.astype(x.dtype))
    return float(mean_loss), (float(acc) if _has_accuracy(out_shape, y) else None)


def predict(
    net: Any, params: Any, x: Any, *, batch_size: int = 1024, state: Any = None
) -> jax.Array:
    """The network's outputs ``(N, ...)`` in evaluation mode, in batches of ``batch_size``.

    ``state``: the network's state (BatchNorm's running statistics), default
    ``net.init_state``.
    """
    batch_size = _positive_int(batch_size, "predict: batch_size")
    x = jnp.asarray(x)
    n = x.shape[0]
    bs = min(batch_size, n)
    idx, _ = epoch_batches(jax.random.key(0), n, bs, shuffle=False)
    state = _model_state(net, state, x.shape[1:], "predict")
    out = _predict_fn(net)(params, state, x, idx)
    return out.reshape(-1, *out.shape[2:])[:n]


# ---------------------------------------------------------------------------------------
# fit
# ---------------------------------------------------------------------------------------


def _epoch_summary(metrics: dict[str, np.ndarray]) -> tuple[float, float]:
    count = metrics["count"]
    total = float(np.sum(count))
    return float(np.sum(metrics["loss"] * count) / total), float(np.sum(metrics["correct"]) / total)


def fit(
    net: Any,
    params: Any,
    x: Any,
    y: Any,
    *,
    loss: Loss = _losses.softmax_cross_entropy,
    optimizer: optax.GradientTransformation | None = None,
    epochs: int = 10,
    batch_size: int = 32,
    regularizer: Callable[[Any], jax.Array] | None = None,
    lam: float = 0.0,
    validation_data: tuple[Any, Any] | None = None,
    seed: int = 0,
    shuffle: bool = True,
    loss_threshold: float | None = None,
    patience: int | None = None,
    restore_best: bool = False,
    epoch_mode: str = "auto",
    grad: str | ValueAndGrad = "autodiff",
    progress: bool = True,
    checkpoint: str | os.PathLike | None = None,
    resume: bool = False,
    state: TrainState | None = None,
    model_state: Any = None,
) -> FitResult:
    """Train ``net`` from ``params`` on ``(x, y)`` for up to ``epochs`` epochs.

    Everything is validated before the first step: ``x`` ``(N, ...)`` floating and finite,
    ``y`` ``(N,)`` integer labels in ``[0, K)`` (``K`` = the network's outputs) or floating
    targets with ``N`` rows, and the same for ``validation_data``.

    Each epoch shuffles with ``fold_in(key(seed), epoch)``, runs ``ceil(N / batch_size)``
    steps (the last batch padded with zero-weight examples: one compiled step for all), and
    appends to the history: ``loss`` / ``accuracy`` (running means over the epoch's
    steps), ``val_loss`` / ``val_accuracy`` (after the epoch, when ``validation_data`` is
    given) and ``time`` (seconds). Accuracy is ``None`` for non-classification targets.

    Stopping: after ``epochs``; when the epoch's training loss is ``<= loss_threshold``
    (the lecture's rule, "stop when the loss is small enough"); or when ``val_loss`` has not
    improved for ``patience`` epochs (``restore_best`` then returns the best parameters).
    A non-finite loss (or gradient) raises :class:`NonFiniteLossError` naming the epoch and
    step; its ``state`` holds the last finite parameters (updates stop at the bad step).

    Args:
      net, params: the network and its initial parameters (not modified).
      loss: ``loss(outputs, y)``, the batch mean; default softmax cross-entropy.
      optimizer: optax optimizer; default ``optax.sgd(0.1)``.
      regularizer, lam: ``lam * regularizer(params)`` is added to the loss.
      epoch_mode: ``"auto"``, ``"loop"`` (Python loop over a jitted step) or ``"scan"``
        (one compiled program per epoch); see :func:`choose_epoch_mode`.
      grad: gradient mode, see :func:`make_step`.
      progress: show a tqdm progress bar.
      checkpoint: file to save ``{"state": TrainState}`` (and the history in the
        metadata) after every epoch, atomically.
      resume: continue from ``checkpoint`` if it exists (bitwise the same result as an
        uninterrupted run with the same arguments).
      state: start from this :class:`TrainState` instead of ``init_state(params, ...)``.
      model_state: the network's initial state (default ``net.init_state``).

    Training runs the network in training mode (Dropout with a fresh key every step,
    ``fold_in(step_keys(seed), step)``; BatchNorm with batch statistics, its running
    statistics threaded through every step and kept in ``state.model_state``);
    validation runs in evaluation mode with those running statistics.

    Returns:
      :class:`FitResult` ``(params, state, history, stop_reason)``.
    """
    optimizer = optax.sgd(0.1) if optimizer is None else optimizer
    _check_optimizer(optimizer)
    if isinstance(epochs, bool) or not isinstance(epochs, int | np.integer):
        raise TypeError(f"fit: epochs must be a non-negative int, got {epochs!r}")
    if epochs < 0:
        raise ValueError(f"fit: epochs must be a non-negative int, got {epochs!r}")
    epochs = int(epochs)
    batch_size = _positive_int(batch_size, "fit: batch_size")
    if patience is not None:
        patience = _positive_int(patience, "fit: patience")
        if validation_data is None:
            raise ValueError("fit: patience needs validation_data")
    if loss_threshold is not None and not isinstance(loss_threshold, int | float):
        raise TypeError(f"fit: loss_threshold must be a number or None, got {loss_threshold!r}")
    if resume and checkpoint is None:
        raise ValueError("fit: resume=True needs a checkpoint path")
    mode = choose_epoch_mode(net, epoch_mode)

    x_np = np.asarray(x)
    x_np, y_np = _data.check_dataset(x_np, y, _num_classes(net, x_np), where="fit: training data",
                                     integer_x=_takes_integers(net))
    if validation_data is not None:
        if not isinstance(validation_data, tuple | list) or len(validation_data) != 2:
            raise TypeError("fit: validation_data must be a pair (x_val, y_val)")
        xv, yv = _data.check_dataset(
            np.asarray(validation_data[0]), validation_data[1],
            _num_classes(net, np.asarray(validation_data[0])), where="fit: validation_data",
            integer_x=_takes_integers(net),
        )
    out_shape = tuple(net.output_shape(tuple(x_np.shape[1:])))
    check_params(net, params if state is None else state.params, x_np.shape[1:])
    if state is None:
        model_state = _model_state(net, model_state, x_np.shape[1:], "fit")
    else:
        _check_train_state(state)
        _model_state(net, state.model_state, x_np.shape[1:], "fit")
    with_acc = _has_accuracy(out_shape, y_np)

    update = _make_update(net, loss, optimizer, regularizer, lam, grad, seed)
    bs = min(batch_size, x_np.shape[0])
    runner = EpochRunner(update, jnp.asarray(x_np), jnp.asarray(y_np), bs, mode, shuffle)

    state = init_state(params, optimizer, model_state) if state is None else state
    history: dict[str, list] = {"loss": [], "accuracy": [], "val_loss": [], "val_accuracy": [],
                                "time": []}
    start = 0
    if resume and os.path.exists(os.fspath(checkpoint)):
        restored, meta = _ckpt.restore(checkpoint, {"state": state})
        state = restored["state"]
        start = int(meta["epoch"])
        history = {k: list(v) for k, v in meta["history"].items()}

    seed_key = jax.random.key(seed)
    best = (math.inf, None, 0)  # (val loss, params copy, epochs since improvement)
    stop_reason = "epochs"
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=(epochs - start) * runner.num_batches, unit="step",
                   desc=f"fit {mode}", leave=True)
    try:
        for epoch in range(start, epochs):
            t0 = time.perf_counter()
            active = jnp.asarray(True)
            state, metrics, active = runner.run(
                state, epoch_key(seed_key, epoch), active,
                on_step=(bar.update if bar is not None else None),
            )
            metrics = jax.device_get(metrics)
            if not bool(active):
                _raise_non_finite(epoch, metrics, state, history, runner)
            train_loss, train_acc = _epoch_summary(metrics)
            history["loss"].append(train_loss)
            history["accuracy"].append(train_acc if with_acc else None)
            if validation_data is not None:
                vl, va = evaluate(net, state.params, xv, yv, loss=loss, state=state.model_state)
                history["val_loss"].append(vl)
                history["val_accuracy"].append(va)
            history["time"].append(time.perf_counter() - t0)
            if bar is not None:
                post = {"loss": f"{train_loss:.4f}"}
                if with_acc:
                    post["acc"] = f"{train_acc:.4f}"
                if validation_data is not None:
                    post["val_loss"] = f"{history['val_loss'][-1]:.4f}"
                    if with_acc:
                        post["val_acc"] = f"{history['val_accuracy'][-1]:.4f}"
                bar.set_postfix(post, refresh=False)
                bar.set_description(f"fit {mode} epoch {epoch + 1}/{epochs}")
            if checkpoint is not None:
                _ckpt.save(checkpoint, {"state": state},
                           metadata={"epoch": epoch + 1, "history": history, "seed": seed})
            if loss_threshold is not None and train_loss <= loss_threshold:
                stop_reason = "loss_threshold"
                break
            if patience is not None:
                vl = history["val_loss"][-1]
                if vl < best[0]:
                    keep = (jax.tree_util.tree_map(lambda a: jnp.array(a, copy=True), state.params)
                            if restore_best else None)
                    best = (vl, keep, 0)
                else:
                    best = (best[0], best[1], best[2] + 1)
                    if best[2] >= patience:
                        stop_reason = "patience"
                        break
    finally:
        if bar is not None:
            bar.close()
    params_out = state.params
    if stop_reason == "patience" and restore_best and best[1] is not None:
        params_out = best[1]
    return FitResult(params_out, state, history, stop_reason)


def _check_train_state(state: Any) -> None:
    if not isinstance(state, TrainState):
        raise TypeError(
            f"fit: state must be a funcnet.train.TrainState (init_state(params, optimizer, "
            f"model_state)), got {type(state).__name__}; pass parameters as params"
        )


def _raise_non_finite(epoch, metrics, state, history, runner):
    bad = np.flatnonzero(~metrics["finite"])
    i = int(bad[0]) if bad.size else 0
    value = float(metrics["objective"][i])
    global_step = int(state.step)
    raise NonFiniteLossError(
        f"fit: non-finite loss or gradient (loss {value}) at epoch {epoch + 1}, step {i + 1} "
        f"of {runner.num_batches} (after {global_step} updates); training stopped and the "
        f"last finite parameters are kept in the error's .state (check the data for NaN / "
        f"inf or huge values, and the learning rate)",
        epoch=epoch + 1, step=i + 1, global_step=global_step, value=value, state=state,
        history=history,
    )
