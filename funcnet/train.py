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

``epoch_mode="auto"`` (the default of :func:`fit`) picks ``"scan"``, except ``"loop"``
for a network with a convolution trained by autodiff (:func:`choose_epoch_mode`;
BENCHMARKS.md has the measurements behind it).

Gradients come from ``grad=``: ``"auto"`` (the default, :func:`choose_grad`: the hand
rules for convolutional networks, where they are faster, else autodiff), ``"autodiff"``
(``jax.value_and_grad``) and ``"manual"`` (:mod:`funcnet.vjp`) are built in; other
modes plug in through :data:`GRAD_MODES` (or a callable) with the signature
``value_and_grad(net, loss_fn) -> f(params, x, y) -> (loss, grads)``, ``loss_fn(outputs,
y) -> scalar`` (the mean over the batch).

``devices=`` on :func:`fit`, :func:`make_step`, :func:`evaluate` and :func:`predict` runs
them data-parallel (:mod:`funcnet.parallel`): batches sharded along a mesh's data axis,
everything else replicated, one compiled program, the results of one device.
"""

from __future__ import annotations

import functools
import math
import numbers
import os
import tempfile
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from funcnet import _checks
from funcnet import checkpoint as _ckpt
from funcnet import data as _data
from funcnet import losses as _losses
from funcnet import parallel as _parallel
from funcnet import precision as _precision
from funcnet import streaming as _stream
from funcnet import vjp as _vjp
from funcnet.cache import ProgramCache as _ProgramCache
from funcnet.nn import conv as _conv
from funcnet.nn.base import Layer, _hashable, iter_layers, mixes_batch

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
    """Training met a NaN / inf loss or update. ``state`` holds the last finite parameters:
    training stops at the first step whose objective or updated state (parameters,
    optimizer state, the network's state) is not finite, e.g. a float16 update that
    overflows although the loss and the gradient are finite. A non-finite gradient shows
    in the updated state (unless the optimizer discards it on purpose, e.g.
    ``optax.apply_if_finite``).

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


def choose_grad(net: Any, grad: str | ValueAndGrad = "auto") -> str | ValueAndGrad:
    """Resolve ``grad="auto"`` (the default of :func:`make_step` and :func:`fit`): the
    hand-written rules (``"manual"``) for a network with a convolution, autodiff otherwise.

    Measured on XLA:CPU (BENCHMARKS.md, "LeNet-5 train step: second formulations"): with
    the conv rules' per-shape formulations the hand-rule step takes 0.46-0.60x the
    autodiff step for LeNet-5, 0.53-0.58x for the digits CNN and 0.54-0.56x for a small
    VGG-style net; for dense networks the two are even (the MLP: 1.16 vs 1.12 ms), and
    autodiff is kept. Both give the same gradients (tested in float64); ``grad="autodiff"``
    or ``"manual"`` picks one explicitly.
    """
    if isinstance(grad, str) and grad == "auto":
        return "manual" if has_conv(net) else "autodiff"
    return grad


def resolve_grad(grad: str | ValueAndGrad, net: Any = None) -> ValueAndGrad:
    """The ``value_and_grad(net, loss_fn)`` factory for ``grad`` (a name or a callable).

    ``"auto"`` depends on the network (:func:`choose_grad`): pass it as ``net``.
    """
    if isinstance(grad, str) and grad == "auto":
        if net is None:
            raise ValueError(
                f"grad='auto' picks the gradient from the network (choose_grad): pass "
                f"net=, or one of {sorted(GRAD_MODES)}"
            )
        grad = choose_grad(net, grad)
    if isinstance(grad, str):
        if grad not in GRAD_MODES:
            raise ValueError(
                f"grad must be one of {sorted(GRAD_MODES)} (or 'auto', or a callable "
                f"value_and_grad(net, loss_fn)), got {grad!r}"
            )
        return GRAD_MODES[grad]
    if callable(grad):
        return grad
    raise TypeError(
        f"grad must be one of {sorted(GRAD_MODES)} or a callable value_and_grad(net, loss_fn) "
        f"(or 'auto'), got {grad!r}"
    )


def weighted_loss(loss_fn: Loss, *, where: str = "weighted_loss") -> Loss:
    """``loss_fn`` with per-example weights: ``f(outputs, (y, w)) = sum_i w_i l_i / sum_i w_i``.

    ``l_i = loss_fn(outputs[i:i+1], y[i:i+1])``. Weights 0 mark padding (the last partial
    batch of an epoch is padded to full size so the step never recompiles).
    ``loss_fn`` must return a scalar (checked when traced: a per-example loss, the optax
    convention, raises a ``TypeError`` naming ``loss``).
    """
    check = not _has_rule(loss_fn)  # funcnet's own losses are batch means by construction

    def one(o, t):
        value = loss_fn(o[None], t[None])
        if check:
            _check_loss_value(value, loss_fn, o[None], where)
        return value

    def f(outputs, yw):
        y, w = yw
        try:
            per_example = jax.vmap(one)(outputs, y)
        except (ValueError, TypeError):  # said for the batch, if the loss refuses it too
            _checks.check_batch_loss(loss_fn, outputs, y, where)
            raise
        return jnp.sum(w * per_example) / jnp.sum(w)

    f.base_loss = loss_fn  # lets a grad mode recognise the loss it wraps
    f.where = where  # and name the caller in its errors
    return f


def _has_rule(loss_fn: Any) -> bool:
    """Whether ``loss_fn`` is one of funcnet's losses with a hand rule (a batch mean)."""
    try:
        return loss_fn in _vjp.RULES
    except TypeError:  # unhashable callable
        return False


def _loss_name(loss_fn: Any) -> str:
    return getattr(loss_fn, "__name__", None) or type(loss_fn).__name__


class LossError(TypeError):
    """A loss that breaks the contract ``loss(outputs, y) -> floating scalar`` (e.g. a
    per-example loss returning shape ``(B,)``); raised when the step is traced, before any
    step runs. ``detail`` is the message without the caller's name in front."""

    def __init__(self, where: str, detail: str):
        super().__init__(f"{where}: {detail}")
        self.detail = detail


def _check_loss_value(value: Any, loss_fn: Any, outputs: Any, where: str) -> None:
    """``value = loss_fn(outputs, y)`` must be a floating scalar (shapes are static: this
    runs when the step is traced, before any step is run)."""
    if isinstance(value, float):
        return
    shape, dtype = getattr(value, "shape", None), getattr(value, "dtype", None)
    name = _loss_name(loss_fn)
    if shape is None or dtype is None:
        raise LossError(where, f"loss must return a scalar array (the mean over the batch), "
                                f"but {name} returned {type(value).__name__}")
    if tuple(shape) != ():
        n = jnp.shape(outputs)[0] if jnp.ndim(outputs) else 1
        raise LossError(
            where,
            f"loss must return a scalar (the mean over the batch), but {name} returned "
            f"shape {tuple(shape)} for a batch of {n} (outputs of shape "
            f"{tuple(jnp.shape(outputs))}); a per-example loss (the optax convention) would "
            f"scale the loss and the gradients by the batch size: pass "
            f"loss=lambda o, y: jnp.mean({name}(o, y))",
        )
    if not jnp.issubdtype(dtype, jnp.floating):
        raise LossError(where, f"loss must return a floating scalar, but {name} returned "
                                f"dtype {dtype}")


def _scalar_loss(loss_fn: Loss, where: str) -> Loss:
    """``loss_fn`` checked to return a scalar when traced (funcnet's own losses as they are,
    so that the hand rules still recognise them)."""
    if _has_rule(loss_fn):
        return loss_fn

    def checked(outputs, y):
        value = loss_fn(outputs, y)
        _check_loss_value(value, loss_fn, outputs, where)
        return value

    checked.__wrapped__ = loss_fn
    return checked


def _correct(outputs: jax.Array, y: jax.Array) -> jax.Array:
    """Per-example 0/1 correctness for integer labels or one-hot targets, else zeros."""
    if outputs.ndim == 2 and jnp.issubdtype(y.dtype, jnp.integer) and y.ndim == 1:
        return (jnp.argmax(outputs, axis=-1) == y).astype(outputs.dtype)
    if outputs.ndim == 2 and y.shape == outputs.shape and outputs.shape[1] > 1:
        return (jnp.argmax(outputs, axis=-1) == jnp.argmax(y, axis=-1)).astype(outputs.dtype)
    return jnp.zeros(outputs.shape[:1], outputs.dtype)


def _are_labels(outputs: Any, y: Any) -> bool:
    """Static: ``y`` holds integer class labels ``(B,)`` for outputs ``(B, K)``."""
    return (jnp.ndim(outputs) == 2 and jnp.ndim(y) == 1
            and jnp.issubdtype(jnp.result_type(y), jnp.integer))


def _has_accuracy(out_shape: tuple[int, ...], y: np.ndarray) -> bool:
    """Whether ``y`` (host values) are class targets for outputs of ``out_shape``: integer
    labels ``(N,)``, or rows of ``K`` class probabilities (one-hot or soft: in ``[0, 1]``,
    each row summing to 1). Other targets (regression) have no accuracy."""
    if len(out_shape) != 1:
        return False
    if np.issubdtype(y.dtype, np.integer) and y.ndim == 1:
        return True
    if not (y.ndim == 2 and y.shape[1] == out_shape[0] and out_shape[0] > 1):
        return False
    v = np.asarray(y, np.float64)
    return bool(np.all((v >= 0) & (v <= 1)) and np.allclose(v.sum(axis=1), 1.0, atol=1e-3))


# ---------------------------------------------------------------------------------------
# Argument checks (every error names the argument, what was expected and what was given)
# ---------------------------------------------------------------------------------------


def _check_optimizer(optimizer: Any, where: str = "optimizer") -> None:
    if (isinstance(optimizer, type) or not callable(getattr(optimizer, "init", None))
            or not callable(getattr(optimizer, "update", None))):
        raise TypeError(
            f"{where}: optimizer must be an optax.GradientTransformation (e.g. "
            f"optax.sgd(0.1)), got {optimizer!r}"
        )


def _check_seed(seed: Any, where: str) -> int:
    """``seed`` as a Python int in ``[-2**63, 2**63)`` (what ``jax.random.key`` takes)."""
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        raise TypeError(f"{where}: seed must be an int, got {seed!r}")
    seed = int(seed)
    if not -(2**63) <= seed < 2**63:
        raise ValueError(f"{where}: seed must be an int in [-2**63, 2**63), got {seed}")
    return seed


def _check_bool(value: Any, name: str, where: str) -> bool:
    if not isinstance(value, bool | np.bool_):
        raise TypeError(f"{where}: {name} must be True or False, got {value!r}")
    return bool(value)


def _as_array(value: Any, name: str, where: str) -> Any:
    """``value`` as an array (jax arrays as they are, anything else through numpy), with
    a named error for what numpy cannot make a numeric array of (ragged lists, objects).
    A big-endian numpy array (``read_idx(mmap=True)``) comes back in native byte order."""
    if isinstance(value, jax.Array | np.ndarray):
        return _data._native(value)
    if value is None:
        raise TypeError(f"{where}: {name} must be an array, got None")
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError) as e:
        raise TypeError(
            f"{where}: {name} must be an array (or a nested list of numbers of one shape), "
            f"got {type(value).__name__} that numpy cannot convert ({e})"
        ) from None
    if arr.dtype == object:
        raise TypeError(
            f"{where}: {name} must be a numeric array, got {type(value).__name__} of "
            f"objects (e.g. ragged lists or None)"
        )
    return _data._native(arr)


def _not_a_train_state(value: Any, name: str, where: str) -> TypeError:
    got = type(value).__name__
    hint = " (it looks like parameters: make a state with init_state(params, optimizer))"
    return TypeError(
        f"{where}: {name} must be a funcnet.train.TrainState (init_state(params, optimizer, "
        f"model_state)), got {got}{hint if not isinstance(value, TrainState) else ''}"
    )


def _check_leaves(tree: Any, name: str, where: str) -> None:
    """Every leaf of ``tree`` is a numeric array or number (not a string, an object...)."""
    if isinstance(tree, TrainState):
        raise TypeError(
            f"{where}: {name} must be the parameters (a pytree of arrays), got a TrainState; "
            f"pass state.params"
        )
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        dtype = getattr(leaf, "dtype", None)
        ok = (isinstance(leaf, int | float | complex) if dtype is None
              else (jnp.issubdtype(dtype, jnp.number) or jnp.issubdtype(dtype, jnp.bool_)))
        if not ok:
            raise TypeError(
                f"{where}: {name}{jax.tree_util.keystr(path)} must be a numeric array, got "
                f"{type(leaf).__name__} {leaf!r:.60}"
            )


# ---------------------------------------------------------------------------------------
# Train state and step
# ---------------------------------------------------------------------------------------


def init_state(
    params: Any, optimizer: optax.GradientTransformation, model_state: Any = ()
) -> TrainState:
    """A :class:`TrainState` at step 0 for ``params``, ``optimizer`` and the network's
    ``model_state`` (``net.init_state(input_shape)``; leave it out for a network
    without state).

    Arrays are copied, so donating the state to a step never deletes the caller's arrays.
    """
    _check_optimizer(optimizer, "init_state")
    _check_leaves(params, "params", "init_state")
    _check_leaves(model_state, "model_state", "init_state")
    leaves = jax.tree_util.tree_leaves((params, model_state))
    if _on_one_device(leaves) and _hashable(optimizer):
        # one compiled program (cached per optimizer and shapes) instead of one per leaf
        # shape for the copies and the optimizer's zeros
        return _fresh_state_program(optimizer, params, model_state)
    return _fresh_state(optimizer, params, model_state)


def _fresh_state(optimizer, params, model_state):
    """:func:`init_state` of checked arguments; ``jnp.array(copy=True)`` makes new buffers
    also where ``jit`` would hand an input back as its output."""
    params = jax.tree_util.tree_map(lambda a: jnp.array(a, copy=True), params)
    model_state = jax.tree_util.tree_map(lambda a: jnp.array(a, copy=True), model_state)
    return TrainState(params, optimizer.init(params), jnp.zeros((), jnp.int32), model_state)


_fresh_state_program = jax.jit(_fresh_state, static_argnums=0)


def _on_one_device(leaves) -> bool:
    """Whether the leaves' arrays are all on one device or on the host (not on a mesh:
    the optimizer's zeros made in a program would not take the parameters' sharding)."""
    devices = set()
    for a in leaves:
        if isinstance(a, jax.Array) and not isinstance(a, jax.core.Tracer):
            devices |= a.sharding.device_set
    return len(devices) <= 1


def step_keys(seed: Any) -> jax.Array:
    """The root of the per-step keys of a run with ``seed``: step ``t`` draws its Dropout
    masks from ``fold_in(step_keys(seed), t)`` (a function of the step count, so a resumed
    run draws the same keys). Independent of the shuffling keys ``fold_in(key(seed), epoch)``.
    """
    seed = _check_seed(seed, "step_keys")
    return jax.random.fold_in(jax.random.key(seed), 2**31 - 1)


def _all_finite(*trees: Any) -> jax.Array:
    """One boolean scalar: every floating element of ``trees`` is finite (one reduction
    per leaf; exact, unlike a running sum, which can overflow for finite float16 values)."""
    flags = [jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree_util.tree_leaves(trees)
             if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)]
    out = jnp.asarray(True)
    for flag in flags:
        out = jnp.logical_and(out, flag)
    return out


GUARDS = ("loss", "full")


def _make_update(net, loss_fn, optimizer, regularizer, lam, grad, seed=0, where="make_step",
                 guard="loss", check_labels=False, precision=None):
    """The un-jitted step body shared by :func:`make_step`, the loop and the scanned epoch.

    ``update(state, x, y, w, active) -> (state, metrics, active)``. ``w=None`` uses
    ``loss_fn`` as given (the batch mean); otherwise per-example weights. With ``active``
    (a bool scalar) the update is applied only while ``active`` and the step is finite;
    ``active`` then becomes False for good, freezing the last good state. ``guard``
    says what must be finite: ``"loss"`` the objective (a scalar: free), ``"full"`` the
    objective and everything the step keeps (parameters, optimizer state, the network's
    state: one reduction per leaf, about one more pass over the state per step). A
    non-finite gradient shows in the updated state, unless the optimizer discards it on
    purpose (``optax.zero_nans``, ``optax.apply_if_finite``). ``fit`` steps with
    ``"loss"``, checks the whole state once per epoch and replays a failed epoch with
    ``"full"``. ``check_labels`` (``make_step``): integer labels ``(B,)`` outside
    ``[0, K)`` for outputs ``(B, K)`` make the step not apply and its loss NaN (under
    ``jit`` an out-of-range label otherwise gives a NaN loss with a finite gradient, or,
    for a negative one, silently the class ``K + label``). ``precision``: mixed
    precision (:mod:`funcnet.precision`; ``None`` off), for ``grad="autodiff"`` and
    ``"manual"``; with a loss scale (float16) the step's finiteness includes the
    gradients, so an overflowing scaled gradient makes the step not apply.
    """
    if guard not in GUARDS:
        raise ValueError(f"{where}: guard must be one of {GUARDS}, got {guard!r}")
    _checks.check_loss_fn(loss_fn, where)
    _check_optimizer(optimizer, where)
    lam = _checks.check_lam(regularizer, lam, where)
    grad = choose_grad(net, grad)
    try:
        factory = resolve_grad(grad)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{where}: {e}") from None
    root = step_keys(_check_seed(seed, where))
    policy = _precision.get_policy(precision, where)
    manual = factory is _vjp.value_and_grad
    plain, wloss = _scalar_loss(loss_fn, where), weighted_loss(loss_fn, where=where)
    if factory is autodiff_value_and_grad or manual:
        # one forward pass (training mode, state and key threaded) gives the loss, the
        # gradient, the new state and the outputs for the accuracy
        if policy is None:
            with_state = (_vjp.value_and_grad_with_state if manual
                          else autodiff_value_and_grad_with_state)
            vg_plain, vg_weighted = with_state(net, plain), with_state(net, wloss)
        else:  # the same, the network cast to the compute dtype and the loss scaled
            mixed = (_vjp.value_and_grad_with_state if manual
                     else _precision.autodiff_value_and_grad_with_state)
            vg_plain = mixed(net, plain, precision=policy)
            vg_weighted = mixed(net, wloss, precision=policy)
    elif policy is not None:
        raise ValueError(
            f"{where}: precision={precision!r} needs grad='autodiff' or grad='manual' (a "
            f"custom grad callable computes its own loss, which mixed precision cannot "
            f"cast), got grad={grad!r}"
        )
    else:  # other plug-in modes only return (loss, grads), for nets without state
        random = [layer for layer in iter_layers(net) if layer.stochastic] \
            if isinstance(net, Layer) else []
        if random:
            raise ValueError(
                f"{where}: a custom grad callable value_and_grad(net, loss)(params, x, y) gets "
                f"no PRNG key and runs the network in evaluation mode, so {random[0]!r} would "
                f"never drop anything; use grad='autodiff' or grad='manual' (they thread the "
                f"key and the training mode)")
        vg_plain, vg_weighted = factory(net, plain), factory(net, wloss)
    if manual and regularizer in _vjp.regularizers.GRADS:
        reg_value_and_grad = _vjp.regularizer_value_and_grad(regularizer)
    elif regularizer is not None:
        reg_value_and_grad = jax.value_and_grad(regularizer)

    def value_and_grad(state, x, y, w):
        yw = y if w is None else (y, w)
        vg = vg_plain if w is None else vg_weighted
        if factory is autodiff_value_and_grad or manual:
            key = jax.random.fold_in(root, state.step)
            return vg(state.params, state.model_state, x, yw, key, True)
        if jax.tree_util.tree_leaves(state.model_state):  # known once traced
            raise ValueError(
                f"{where}: a custom grad callable value_and_grad(net, loss)(params, x, y) gets "
                f"no network state, so the network's state (e.g. BatchNorm's running "
                f"statistics) would never be updated; use grad='autodiff' or grad='manual'")
        loss, grads = vg(state.params, x, yw)
        return loss, grads, state.model_state, net.apply(state.params, x)

    def update(state, x, y, w=None, active=None):
        if policy is not None:  # at trace time: the float32 master parameters
            _precision.check_params(policy, state.params, where)
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
            finite = jnp.isfinite(objective)
            if check_labels and _are_labels(out, y):
                in_range = jnp.all((y >= 0) & (y < out.shape[-1]))
                finite = jnp.logical_and(finite, in_range)
                nan = jnp.asarray(jnp.nan, loss.dtype)
                metrics["loss"] = jnp.where(in_range, loss, nan)
                metrics["objective"] = jnp.where(in_range, objective, nan)
            if policy is not None and policy.checks_gradients:
                # a scaled float16 gradient overflows with a finite loss: skip the step
                finite = jnp.logical_and(finite, _all_finite(grads))
            if guard == "full":
                # a finite gradient can still overflow the update (float16 parameters)
                finite = jnp.logical_and(finite, _all_finite(params, opt_state, model_state))
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
    grad: str | ValueAndGrad = "auto",
    donate: bool = True,
    seed: int = 0,
    devices: Any = None,
    precision: Any = None,
) -> Callable:
    """A jit-compiled train step ``step(state, x, y, weights=None) -> (state, metrics)``.

    The step minimises ``loss(net.apply(params, x), y) + lam * regularizer(params)`` with
    one ``optimizer`` update; ``state`` is a :class:`TrainState` (see :func:`init_state`)
    and its buffers are donated (``donate=False`` keeps them valid after the call).

    Args:
      net: a network (``apply(params, x)``), e.g. :class:`funcnet.Serial`.
      loss: ``loss(outputs, y) -> scalar``, the mean over the batch (a per-example loss
        such as ``optax.softmax_cross_entropy_with_integer_labels`` raises a ``TypeError``
        when the step is traced: wrap it, ``lambda o, y: jnp.mean(...)``).
      optimizer: an optax ``GradientTransformation``.
      regularizer: ``Omega(params) -> scalar`` (e.g. :func:`funcnet.regularizers.l2`).
      lam: its weight ``lambda >= 0``.
      grad: ``"auto"`` (default: ``"manual"`` for a network with a convolution, where it
        is the faster, else ``"autodiff"``; :func:`choose_grad`), ``"autodiff"``
        (``jax.value_and_grad``), ``"manual"`` (the hand-written rules of
        :mod:`funcnet.vjp`: explicit back-propagation layer by layer, loss and
        regularizer included), or a callable
        ``value_and_grad(net, loss) -> f(params, x, y) -> (loss, grads)``.
      donate: donate the incoming state's buffers to the result.
      seed: the root of the per-step keys (Dropout): step ``t`` uses
        ``fold_in(step_keys(seed), t)`` with ``t = state.step``, a fresh key every step.
      devices: ``None`` (one device), ``"all"``, a sequence of devices or a
        ``jax.sharding.Mesh`` with a ``"data"`` axis (:func:`funcnet.parallel.data_mesh`):
        the batch is sharded along the data axis, the state replicated (the returned state
        is too), and the step is one program whose result is that of one device. A batch
        that does not divide by the devices travels padded with zero rows, which the
        program cuts off before computing anything (see :func:`fit`); ``step.jitted``
        then takes ``(state, x, y, weights, n)``: the padded batch and its size ``n``.
      precision: mixed precision (:mod:`funcnet.precision`). ``None`` (default): off,
        everything in the parameters' dtype. ``"bfloat16"`` / ``"bf16"``: inside the step
        the float32 parameters and a floating ``x`` are cast to bfloat16, the network's
        forward and backward pass (autodiff's or the hand rules, ``grad="manual"``) run
        in bfloat16, its output is cast to float32 for the loss, and the gradients come
        back in float32 for the optimizer; ``state.params``, ``state.opt_state`` and
        ``state.model_state`` (BatchNorm's statistics, computed in float32) stay float32.
        ``"float16"`` / ``"fp16"``: the same in float16 with a static loss scale of
        ``2**15`` (the loss is multiplied by it before the backward pass and the float32
        gradients divided by it); a step whose scaled gradient is not finite (an
        overflow) is not applied: the incoming state comes back unchanged, ``state.step``
        included. A :class:`funcnet.precision.Policy` sets the dtypes and the loss scale
        (``Policy(jnp.float16, loss_scale=2.0**10)``); the parameters must be float32
        (its ``param_dtype``). Needs ``grad="autodiff"`` or ``"manual"``.

    The step runs the network in training mode and threads its state: the returned
    ``state.model_state`` holds BatchNorm's updated running statistics.

    The returned step takes ``x`` ``(B, ...)``, ``y`` ``(B, ...)`` and optional per-example
    ``weights`` ``(B,)`` (0 marks padding) and returns ``metrics`` with scalars ``loss``
    (data loss), ``objective`` (loss + lam * Omega), ``correct`` (weighted count of
    correct argmax predictions; 0 when not a classification) and ``count`` (sum of weights).

    Checks, in a thin Python wrapper before the compiled step (no device work, no host
    sync): ``state`` is a :class:`TrainState`; ``x`` fits the parameters; ``y`` and
    ``weights`` have ``B`` rows; integer labels held on the host (numpy arrays, lists) lie
    in ``[0, K)`` for a network with ``K`` outputs. Labels already on the device are not
    copied back to be checked (that would stall every step); inside the compiled step, a
    step with an integer label outside ``[0, K)`` or a non-finite objective is not
    applied: the incoming state comes back unchanged (``state.step`` included) and
    ``metrics["loss"]`` is NaN. (The updated state is not checked step by step, which
    would cost a pass over it every step; :func:`fit` checks it.) ``step.jitted`` is the
    compiled step without the wrapper.
    """
    where = "make_step"
    _check_bool(donate, "donate", where)
    mesh = None if devices is None else _parallel.data_mesh(devices, where)
    update = _make_update(net, loss, optimizer, regularizer, lam, grad, seed, where,
                          check_labels=True, precision=precision)

    def step(state, x, y, weights=None):
        new, metrics, _ = update(state, x, y, weights, jnp.asarray(True))
        del metrics["finite"]
        return new, metrics

    donate_argnums = (0,) if donate else ()
    if mesh is None:
        jitted = jax.jit(step, donate_argnums=donate_argnums)
    else:
        def sharded_step(state, x, y, weights, n):
            # n: the batch without the transport padding, which no layer ever sees
            batch = _parallel.constrain_batch((x[:n], y[:n], None if weights is None
                                               else weights[:n]), mesh)
            return step(state, *batch)

        jitted = jax.jit(sharded_step, static_argnums=4, donate_argnums=donate_argnums,
                         out_shardings=_parallel.replicated(mesh))
    checked_shapes: dict[Any, int | None] = {}  # x.shape[1:] -> K (output width) or None

    def checked_step(state, x, y, weights=None):
        if not isinstance(state, TrainState):
            raise _not_a_train_state(state, "state", "make_step step")
        x = _as_array(x, "x", "make_step step")
        y = _as_array(y, "y", "make_step step")
        if x.ndim < 1 or y.ndim < 1:
            raise ValueError(
                f"make_step step: x and y must be batched arrays (B, ...), got shapes "
                f"{x.shape} and {y.shape}"
            )
        n = x.shape[0]
        if y.shape[0] != n:
            raise ValueError(
                f"make_step step: y must have one row per example of x, got {y.shape[0]} "
                f"rows (y shape {y.shape}) for x of shape {x.shape}"
            )
        if weights is not None:
            weights = _as_array(weights, "weights", "make_step step")
            if weights.shape != (n,):
                raise ValueError(
                    f"make_step step: weights must have shape (B,) = ({n},), one per example "
                    f"of x {x.shape}, got shape {weights.shape}"
                )
        key = tuple(x.shape[1:])
        if key not in checked_shapes:
            checked_shapes[key] = _step_input_check(net, state, x)
        k = checked_shapes[key]
        if k is not None and y.ndim == 1 and not isinstance(y, jax.Array):
            if np.issubdtype(y.dtype, np.integer) and y.size:
                lo, hi = int(y.min()), int(y.max())
                if lo < 0 or hi >= k:
                    raise ValueError(
                        f"make_step step: y: integer labels must lie in [0, {k}) for a "
                        f"network with {k} outputs, got values in [{lo}, {hi}]"
                    )
        if mesh is None:
            return jitted(state, x, y, weights)
        batch = [None if a is None else _parallel.pad_rows(a, _parallel.num_shards(mesh))
                 for a in (x, y, weights)]
        return jitted(_parallel.replicate(state, mesh), *_parallel.shard_batch(batch, mesh), n)

    checked_step.jitted = jitted
    checked_step.lower = jitted.lower
    checked_step._cache_size = jitted._cache_size
    checked_step.__wrapped__ = step
    checked_step.__doc__ = ("step(state, x, y, weights=None) -> (state, metrics): the train "
                            "step of make_step, its arguments checked before the compiled step")
    return checked_step


def _step_input_check(net: Any, state: TrainState, x: Any) -> int | None:
    """Once per input shape: the parameters fit ``x``; the output width for integer labels."""
    in_shape = tuple(x.shape[1:])
    out = None
    if hasattr(net, "output_shape"):
        try:
            out = tuple(net.output_shape(in_shape))
        except (ValueError, TypeError) as e:
            raise ValueError(
                f"make_step step: x of shape {x.shape}: the network does not accept inputs "
                f"of shape {in_shape}: {e}"
            ) from None
    _check_x_fits(net, state.params, x, "make_step step")
    return out[-1] if out is not None and len(out) == 1 else None


# ---------------------------------------------------------------------------------------
# Epochs
# ---------------------------------------------------------------------------------------


def epoch_batches(
    key: jax.Array, n: int, batch_size: int, shuffle: bool = True
) -> tuple[jax.Array, jax.Array]:
    """Example indices and weights of one epoch: ``(num_batches, batch_size)`` each.

    A permutation of ``range(n)`` (``jax.random.permutation(key, n)``; identity if not
    ``shuffle``) cut into batches; the last is padded with index 0 and weight 0.
    ``n = 0`` gives ``(0, batch_size)`` arrays.
    """
    where = "epoch_batches"
    if isinstance(n, bool) or not isinstance(n, int | np.integer):
        raise TypeError(f"{where}: n must be a non-negative int, got {n!r}")
    n = int(n)
    if n < 0:
        raise ValueError(f"{where}: n must be a non-negative int, got {n}")
    batch_size = _checks.positive_int(batch_size, "batch_size", where)
    shuffle = _check_bool(shuffle, "shuffle", where)
    if shuffle and not _is_key(key):
        raise TypeError(
            f"{where}: key must be a JAX PRNG key (jax.random.key(seed)), got "
            f"{type(key).__name__} {key!r:.40}"
        )
    nb = -(-n // batch_size)
    pad = nb * batch_size - n
    if not shuffle and not isinstance(key, jax.core.Tracer):
        # index arithmetic: built on the host, nothing to compile
        idx = np.concatenate([np.arange(n, dtype=np.int32), np.zeros(pad, np.int32)])
        w = np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)])
        return jax.device_put((idx.reshape(nb, batch_size), w.reshape(nb, batch_size)))
    order = jax.random.permutation(key, n) if shuffle else jnp.arange(n)
    idx = jnp.concatenate([order.astype(jnp.int32), jnp.zeros(pad, jnp.int32)])
    w = jnp.concatenate([jnp.ones(n, jnp.float32), jnp.zeros(pad, jnp.float32)])
    return idx.reshape(nb, batch_size), w.reshape(nb, batch_size)


def _is_key(key: Any) -> bool:
    if not isinstance(key, jax.Array):
        return False
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return True
    return key.dtype == jnp.uint32 and key.shape == (2,)  # a raw jax.random.PRNGKey


def epoch_key(seed_key: jax.Array, epoch: int) -> jax.Array:
    """The shuffling key of ``epoch`` (0-based): ``fold_in(seed_key, epoch)``; resumable."""
    return jax.random.fold_in(seed_key, epoch)


def _weighted_batches(key, n, bs, shuffle, w_dtype):
    idx, w = epoch_batches(key, n, bs, shuffle)
    return idx, w.astype(w_dtype)


@functools.lru_cache(maxsize=16)
def _batch_program(n, bs, shuffle, mesh, w_dtype):
    """The jitted ``batches(key) -> (idx, w)`` of an epoch run step by step (a looped
    epoch, a scanned one's partial last batch): it depends on the batching alone, so fits
    of other networks, optimizers or seeds on as many examples share it (the scanned
    epoch traces :func:`_weighted_batches` into its own program)."""
    on_mesh = {} if mesh is None else {"out_shardings": _parallel.replicated(mesh)}

    def batches(key):
        return _weighted_batches(key, n, bs, shuffle, w_dtype)

    return jax.jit(batches, **on_mesh)


def _epoch_programs(update, n, bs, shuffle, mesh, last, w_dtype):
    """:class:`EpochRunner`'s jitted ``(batches, one_step, scan_epoch)`` for the step body
    ``update`` on ``n`` examples in batches of ``bs``, ``last`` the size of a partial last
    batch run at its true size (else 0)."""
    n_scanned = -(-n // bs) - (1 if last else 0)

    def gather(x, y, idx, w, i):
        ib = idx[i]
        return _parallel.constrain_batch((x[ib], y[ib], w[i]), mesh)

    def one_step(state, x, y, idx, w, i, active):
        xb, yb, wb = gather(x, y, idx, w, i)
        return update(state, xb, yb, wb, active)

    def scan_epoch(state, x, y, key, active):
        idx, w = _weighted_batches(key, n, bs, shuffle, w_dtype)

        def body(carry, i):
            state, active = carry
            state, metrics, active = one_step(state, x, y, idx, w, i, active)
            return (state, active), metrics

        (state, active), metrics = jax.lax.scan(
            body, (state, active), jnp.arange(n_scanned)
        )
        return state, metrics, active

    # with a mesh, whatever comes out is replicated, so the next call's inputs match
    on_mesh = {} if mesh is None else {"out_shardings": _parallel.replicated(mesh)}
    return (_batch_program(n, bs, shuffle, mesh, w_dtype),
            jax.jit(one_step, donate_argnums=(0,), **on_mesh),
            jax.jit(scan_epoch, donate_argnums=(0,), **on_mesh))


class EpochRunner:
    """Runs epochs of ``update`` over device-resident ``(x, y)`` in ``"loop"`` or ``"scan"`` mode.

    ``run(state, key, active) -> (state, metrics, active)`` with ``metrics`` a dict of
    ``(num_batches,)`` arrays. Both modes draw the same batches for the same key and apply
    the same step body; each compiles once (later epochs and the padded last batch reuse it).

    ``exact_last=True`` (``fit`` sets it for a network that :func:`~funcnet.nn.base.mixes_batch`,
    i.e. has BatchNorm) runs a partial last batch at its true size, through a second
    program of the step, instead of padding it with zero-weight rows: such a layer's batch
    statistics would include the padding. The scanned epoch then scans the full batches
    and runs that one after the scan.

    With a ``mesh`` (:mod:`funcnet.parallel`) the data and the state are kept whole on
    every device of the mesh, and each gathered batch is sharded along the data axis:
    every device gathers and computes its rows of the batch, and XLA inserts the
    all-reduces. The results are those of one device.
    """

    def __init__(self, update, x, y, batch_size: int, mode: str, shuffle: bool = True,
                 mesh=None, exact_last: bool = False):
        if mode not in ("loop", "scan"):
            raise ValueError(f"epoch mode must be 'loop' or 'scan', got {mode!r}")
        self.mode, self.shuffle, self.mesh = mode, shuffle, mesh
        if mesh is not None:  # device to device; a shuffled batch is then gathered locally
            x, y = _parallel.replicate((x, y), mesh)
        self.x, self.y = x, y
        self.n = int(x.shape[0])
        self.batch_size = batch_size
        self.num_batches = -(-self.n // batch_size)
        n, bs = self.n, batch_size
        # the size of a partial last batch run at its true size, else 0
        self.last = last = n % bs if exact_last else 0
        w_dtype = jnp.dtype(x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32)
        # the programs of an earlier runner with the same step body (fit's are cached per
        # configuration, see _fit_update) and batching
        self._batches, self._step, self._epoch = _RUNNER_PROGRAMS.get(
            lambda u: _epoch_programs(u, n, bs, shuffle, mesh, last, w_dtype),
            update, values=(n, bs, shuffle, mesh, last, w_dtype))
        self._steps = [jax.device_put(np.int32(i)) for i in range(self.num_batches)]

    def with_update(self, update) -> EpochRunner:
        """The same data and batching with another step body (fit's full-guard replay)."""
        return EpochRunner(update, self.x, self.y, self.batch_size, self.mode, self.shuffle,
                           self.mesh, exact_last=bool(self.last))

    def run(self, state, key, active, on_step: Callable[[int], None] | None = None,
            epoch: int | None = None):
        del epoch  # the key orders the batches
        if self.mesh is not None:  # a no-op for arrays already replicated on the mesh
            state, key, active = _parallel.replicate((state, key, active), self.mesh)
        scanned = None
        if self.mode == "scan":
            state, scanned, active = self._epoch(state, self.x, self.y, key, active)
            if on_step is not None:
                on_step(self.num_batches - (1 if self.last else 0))
            if not self.last:
                return state, scanned, active
            steps = []
        else:
            steps = self._steps[:-1] if self.last else self._steps
        idx, w = self._batches(key)
        collected = []
        for i in steps:
            state, m, active = self._step(state, self.x, self.y, idx, w, i, active)
            collected.append(m)
            if on_step is not None:
                on_step(1)
        if self.last:  # the partial last batch at its true size (a second program)
            r = self.last
            state, m, active = self._step(state, self.x, self.y, idx[-1:, :r], w[-1:, :r],
                                          self._steps[0], active)
            collected.append(m)
            if on_step is not None:
                on_step(1)
        return state, _stream.stack_metrics(collected, scanned), active

    def cache_sizes(self) -> dict[str, int]:
        """How many programs each jitted function holds (1 each after any number of epochs)."""
        return {"step": self._step._cache_size(), "epoch": self._epoch._cache_size()}


def has_conv(net: Any) -> bool:
    """Whether ``net`` contains a convolution-like layer (one that says it is
    ``convolutional``; subclasses of ``Conv`` included)."""
    if not isinstance(net, Layer):
        return False
    return any(layer.convolutional for layer in iter_layers(net))


def choose_epoch_mode(net: Any, mode: str = "auto", grad: str | ValueAndGrad = "auto") -> str:
    """Resolve ``"auto"``: ``"scan"`` (one compiled program per epoch, no per-step
    dispatch), except ``"loop"`` for a network with a convolution trained by autodiff
    (or a custom ``grad``).

    Measured on XLA:CPU (BENCHMARKS.md, "Issue 13, session 2026-12-03 (2)"): with the hand rules
    (``grad="manual"``, the default for convolutional networks) the scanned epoch is
    as fast as the loop or faster (LeNet-5 7.7 vs 8.9 ms per step, a small ResNet 123 vs
    142), the conv rules' kernel gradient being written in the canonical layout. JAX's
    own derivative of a convolution is not: inside the scan's while loop XLA:CPU
    compiles it to a generic kernel, 3-20x slower than the loop (LeNet-5 48 vs 17 ms,
    a small VGG-style net 1355 vs 67 ms). Dense networks scan faster either way.
    """
    if mode not in EPOCH_MODES:
        raise ValueError(f"epoch_mode must be one of {EPOCH_MODES}, got {mode!r}")
    if mode != "auto":
        return mode
    if not has_conv(net):
        return "scan"
    grad = choose_grad(net, grad)
    factory = GRAD_MODES.get(grad) if isinstance(grad, str) else grad
    return "scan" if factory is _vjp.value_and_grad else "loop"


# ---------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------


_PROGRAMS = _ProgramCache()
_RUNNER_PROGRAMS = _ProgramCache(16)  # EpochRunner's, per step body and batching
_UPDATES = _ProgramCache(16)  # fit's step bodies, per configuration


def _fit_update(update_args: tuple, update_kw: dict, guard: str = "loss") -> Callable:
    """``_make_update(*update_args, guard=guard, **update_kw)``, the same object for the
    same configuration, so that a later ``fit`` of the same network, loss and optimizer
    runs the programs an earlier one compiled (as Keras reuses its train function).

    Keyed by the *identity* of the network, loss, optimizer, regularizer and a callable
    ``grad`` (equality cannot vouch for what they compute) and by the value of the rest,
    including :func:`funcnet.nn.conv.plain_formulations`, which changes what is traced.
    Values that cannot be hashed (a wrong argument) skip the cache and meet the checks.
    """
    net, loss, optimizer, regularizer, lam, grad, seed, where = update_args
    objs = (net, loss, optimizer, regularizer, None if isinstance(grad, str) else grad)
    values = (lam, grad if isinstance(grad, str) else None, seed, where, guard,
              tuple(sorted(update_kw.items())), _conv.formulations_key())
    try:
        hash(values)
    except TypeError:
        return _make_update(*update_args, guard=guard, **update_kw)
    return _UPDATES.get(lambda *_: _make_update(*update_args, guard=guard, **update_kw),
                        *objs, values=values)


def _eval_fn(net, loss_fn, mesh=None):
    return _PROGRAMS.get(_build_eval_fn, net, loss_fn, mesh)


def _build_eval_fn(net, loss_fn, mesh=None):
    wloss = weighted_loss(loss_fn, where="evaluate")

    def run(params, model_state, x, y, idx, w):
        def body(acc, i):
            ib = idx[i]
            xb, yb, wb = _parallel.constrain_batch((x[ib], y[ib], w[i]), mesh)
            out, _ = net.apply_with_state(params, model_state, xb)
            loss = wloss(out, (yb, wb))
            count = jnp.sum(wb)
            return (acc[0] + loss * count, acc[1] + jnp.sum(wb * _correct(out, yb)),
                    acc[2] + count), None

        zero = jnp.zeros((), w.dtype)
        (tot, cor, cnt), _ = jax.lax.scan(body, (zero, zero, zero), jnp.arange(idx.shape[0]))
        return tot / cnt, cor / cnt

    return jax.jit(run)


def _eval_batches(n: int, batch_size: int, x_dtype: Any) -> tuple[jax.Array, jax.Array]:
    """Unshuffled batches for evaluation; weights in at least float32 (integer ids for an
    Embedding-first network, half-precision inputs: the sums stay exact)."""
    idx, w = epoch_batches(jax.random.key(0), n, min(batch_size, n), shuffle=False)
    w_dtype = (jnp.promote_types(x_dtype, jnp.float32)
               if jnp.issubdtype(x_dtype, jnp.floating) else jnp.float32)
    return idx, w.astype(w_dtype)


def _predict_fn(net, mesh=None):
    return _PROGRAMS.get(_build_predict_fn, net, mesh)


def _build_predict_fn(net, mesh=None):
    def one(params, model_state, xb):
        return net.apply_with_state(params, model_state, _parallel.constrain_batch(xb, mesh))[0]

    def run(params, model_state, x, idx):
        out = jax.lax.map(lambda ib: one(params, model_state, x[ib]), idx)
        return out.reshape(-1, *out.shape[2:])[:x.shape[0]]  # the batches' rows, unpadded

    return jax.jit(run)


def _output_shape(net: Any, x: Any, where: str, name: str = "x") -> tuple[int, ...] | None:
    """The network's unbatched output shape for ``x`` (``None`` for a network that does
    not say), with an error naming ``x`` when the network does not take its shape."""
    if not hasattr(net, "output_shape"):
        return None
    try:
        return tuple(net.output_shape(tuple(x.shape[1:])))
    except (ValueError, TypeError) as e:
        raise ValueError(
            f"{where}: {name} has shape {tuple(x.shape)}: the network does not accept inputs "
            f"of shape {tuple(x.shape[1:])}: {e}"
        ) from None


def _num_classes(net: Any, x: Any, where: str = "fit", name: str = "x") -> int | None:
    out = _output_shape(net, x, where, name)
    return out[-1] if out is not None and len(out) == 1 else None


def _takes_integers(net: Any) -> bool:
    return isinstance(net, Layer) and net.takes_integers()


def _check_last_batch(net: Any, params: Any, model_state: Any, x: np.ndarray, bs: int,
                      where: str) -> None:
    """A network that mixes the batch (BatchNorm) runs an epoch's last partial batch at
    its true size: when that is one row, trace (no computation) its training forward pass
    on it before the first step, so a batch it refuses (BatchNorm over features needs more
    than one row) is an error naming ``batch_size`` now, not after an epoch of steps."""
    last = x.shape[0] % bs
    if last != 1 or not mixes_batch(net):
        return
    rows = jax.ShapeDtypeStruct((last, *x.shape[1:]), x.dtype)
    try:
        jax.eval_shape(lambda p, s, xb: net.apply_with_state(
            p, s, xb, key=jax.random.key(0), train=True), params, model_state, rows)
    except (ValueError, TypeError) as e:
        raise ValueError(
            f"{where}: the last batch of each epoch has {last} row(s) ({x.shape[0]} examples, "
            f"batch_size={bs}), which the network refuses in training: {e}; choose a "
            f"batch_size that leaves more (or none)") from e


def _model_state(net: Any, state: Any, input_shape, where: str) -> Any:
    """``state`` checked against the network's, or its initial state when ``None`` (or an
    empty pytree for a network without state)."""
    if isinstance(state, TrainState):
        raise TypeError(
            f"{where}: state is the network's state (e.g. fit(...).model_state), got a "
            f"TrainState; pass its .model_state"
        )
    if state is None or (not jax.tree_util.tree_leaves(state) and hasattr(net, "has_state")
                         and not net.has_state(tuple(input_shape))):
        return net.init_state(tuple(input_shape))
    check_params(net, state, input_shape, where, what="state")
    return state


def _child(node: Any, key: Any) -> Any:
    if isinstance(key, jax.tree_util.DictKey):
        return node[key.key]
    if isinstance(key, jax.tree_util.SequenceKey):
        if not isinstance(node, list | tuple):
            raise LookupError(key)
        return node[key.idx]
    if isinstance(key, jax.tree_util.GetAttrKey):
        return getattr(node, key.name)
    raise LookupError(key)


def _structure_problem(expected: Any, got: Any, what: str, input_shape) -> str:
    """Where ``got`` departs from the structure ``expected`` (a missing entry, a Python
    list where an array belongs, ...), in words."""
    if isinstance(got, TrainState) and what == "params":
        return "params is a TrainState; pass state.params (or give fit the state as state=)"
    for path, e in jax.tree_util.tree_flatten_with_path(expected)[0]:
        node = got
        for depth, key in enumerate(path):
            try:
                node = _child(node, key)
            except (LookupError, TypeError, AttributeError):
                return (f"{what}{jax.tree_util.keystr(path[:depth + 1])} is missing (the "
                        f"network for inputs of shape {tuple(input_shape)} has "
                        f"{jax.tree_util.tree_structure(expected)})")
        if isinstance(node, list | tuple | dict):
            return (f"{what}{jax.tree_util.keystr(path)} is a Python "
                    f"{type(node).__name__}, expected an array of shape {tuple(e.shape)}; "
                    f"convert it with jnp.asarray (or make {what} with net.init)")
    hint = ""
    if type(got) is not type(expected):
        hint = (f" ({what} is a {type(got).__name__}, the network's are a "
                f"{type(expected).__name__}, as net.init returns)")
    return (f"{what} do not have the network's structure for inputs of shape "
            f"{tuple(input_shape)}: expected {jax.tree_util.tree_structure(expected)}, got "
            f"{jax.tree_util.tree_structure(got)}{hint}")


def _params_problem(net: Any, tree: Any, input_shape, what: str) -> str | None:
    shapes = getattr(net, "param_shapes" if what == "params" else "state_shapes", None)
    if shapes is None:
        return None
    expected = shapes(tuple(input_shape))
    e_leaves, e_def = jax.tree_util.tree_flatten_with_path(expected)
    g_leaves, g_def = jax.tree_util.tree_flatten_with_path(tree)
    if e_def != g_def:
        return _structure_problem(expected, tree, what, input_shape)
    for (path, e), (_, g) in zip(e_leaves, g_leaves, strict=True):
        if isinstance(g, str | bytes) or (not hasattr(g, "shape")
                                          and not isinstance(g, numbers.Number)):
            return (f"{what}{jax.tree_util.keystr(path)} must be an array of shape "
                    f"{tuple(e.shape)}, got {type(g).__name__}")
        if tuple(jnp.shape(g)) != tuple(e.shape):
            return (f"{what}{jax.tree_util.keystr(path)} has shape {tuple(jnp.shape(g))}, "
                    f"the network expects {tuple(e.shape)} for inputs of shape "
                    f"{tuple(input_shape)}")
    return None


def check_params(
    net: Any, params: Any, input_shape: tuple[int, ...], where: str = "fit", what: str = "params"
) -> None:
    """Raise ``ValueError`` if ``params`` do not fit ``net`` for inputs of ``input_shape``
    (``TypeError`` for a :class:`TrainState` given as parameters).

    Uses ``net.param_shapes(input_shape)`` (no allocation) where the network has it.
    """
    if what not in ("params", "state"):
        raise ValueError(f"check_params: what must be 'params' or 'state', got {what!r}")
    if isinstance(params, TrainState) and what == "params":
        raise TypeError(
            f"{where}: params is a TrainState; pass state.params (or give fit the state as "
            f"state=)"
        )
    problem = _params_problem(net, params, input_shape, what)
    if problem is not None:
        raise ValueError(f"{where}: {problem}")


def _check_x_fits(net: Any, params: Any, x: Any, where: str, name: str = "x") -> None:
    """``params`` fit inputs shaped like ``x``; else an error naming ``x`` and its shape."""
    if isinstance(params, TrainState):
        raise TypeError(f"{where}: params is a TrainState; pass state.params")
    problem = _params_problem(net, params, x.shape[1:], "params")
    if problem is not None:
        raise ValueError(
            f"{where}: {name} of shape {tuple(x.shape)} does not fit the parameters: {problem}"
        )


def _checked_data(net: Any, x: Any, y: Any, mesh: Any, where: str) -> tuple[Any, Any]:
    """``(x, y)`` validated by :func:`funcnet.data.check_dataset` (as numpy arrays); with a
    ``mesh``, an ``x`` already on devices is checked there and stays there (no copy
    through the host)."""
    num_classes, integer_x = _num_classes(net, x, where), _takes_integers(net)
    if mesh is not None and isinstance(x, jax.Array):
        return _parallel.check_dataset_on_device(x, y, num_classes, where, integer_x)
    return _data.check_dataset(np.asarray(x), y, num_classes, where=where, integer_x=integer_x)


def _check_input_dtype(net: Any, x: Any, where: str, name: str = "x") -> None:
    if isinstance(net, Layer):
        _data.check_x_dtype(x.dtype, _takes_integers(net), where, name)


def evaluate(
    net: Any,
    params: Any,
    x: Any,
    y: Any,
    *,
    loss: Loss = _losses.softmax_cross_entropy,
    batch_size: int = 1024,
    state: Any = None,
    devices: Any = None,
) -> tuple[float, float | None]:
    """``(mean loss, accuracy)`` of ``net`` with ``params`` over ``(x, y)``, in batches.

    Evaluation mode: Dropout is off and BatchNorm uses the running statistics in
    ``state`` (the network's state, e.g. ``fit(...).model_state``; default
    ``net.init_state``).

    Accuracy is the fraction of argmax predictions equal to the integer labels (or to the
    argmax of class-probability targets: one-hot or soft rows in ``[0, 1]`` summing to 1);
    ``None`` when ``y`` is neither (regression targets). ``x`` and ``y`` are
    validated as in :func:`fit` (an empty data set is an error: its mean is undefined).

    ``devices``: as in :func:`fit`; each batch is sharded along the data axis.
    """
    where = "evaluate"
    batch_size = _checks.positive_int(batch_size, "batch_size", "evaluate")
    mesh = None if devices is None else _parallel.data_mesh(devices, where)
    _checks.check_loss_fn(loss, where)
    _check_leaves(params, "params", where)
    x, y = _as_array(x, "x", where), _as_array(y, "y", where)
    x, y = _checked_data(net, x, y, mesh, where)
    out_shape = _output_shape(net, x, where)
    _check_x_fits(net, params, x, where)
    state = _model_state(net, state, x.shape[1:], where)
    idx, w = _eval_batches(x.shape[0], batch_size, x.dtype)
    args = (params, state, _checks.on_device(x), _checks.on_device(y), idx, w)
    if mesh is not None:
        args = _parallel.replicate(args, mesh)
    mean_loss, acc = _eval_fn(net, loss, mesh)(*args)
    with_acc = out_shape is not None and _has_accuracy(out_shape, y)
    return float(mean_loss), (float(acc) if with_acc else None)


def predict(
    net: Any, params: Any, x: Any, *, batch_size: int = 1024, state: Any = None,
    devices: Any = None,
) -> jax.Array:
    """The network's outputs ``(N, ...)`` in evaluation mode, in batches of ``batch_size``.

    ``state``: the network's state (BatchNorm's running statistics), default
    ``net.init_state``. An empty batch ``x`` of shape ``(0, *input_shape)`` gives an empty
    ``(0, *output_shape)`` array (no example, no output) after the same checks.
    ``devices``: as in :func:`fit`; each batch is sharded along the data axis.
    """
    where = "predict"
    batch_size = _checks.positive_int(batch_size, "batch_size", "predict")
    mesh = None if devices is None else _parallel.data_mesh(devices, where)
    _check_leaves(params, "params", where)
    x = _as_array(x, "x", where)
    if x.ndim < 1:
        raise ValueError(f"{where}: x must be a batch (N, ...), got shape {tuple(x.shape)}")
    _check_input_dtype(net, x, where)
    _output_shape(net, x, where)
    _check_x_fits(net, params, x, where)
    state = _model_state(net, state, x.shape[1:], where)
    x = _checks.on_device(x)
    n = x.shape[0]
    if n == 0:
        spec = jax.eval_shape(lambda p, s, xb: net.apply_with_state(p, s, xb)[0], params, state,
                              jax.ShapeDtypeStruct((1, *x.shape[1:]), x.dtype))
        return jnp.zeros((0, *spec.shape[1:]), spec.dtype)
    idx, _ = epoch_batches(jax.random.key(0), n, min(batch_size, n), shuffle=False)
    args = (params, state, x, idx)
    if mesh is not None:
        args = _parallel.replicate(args, mesh)
    return _predict_fn(net, mesh)(*args)


# ---------------------------------------------------------------------------------------
# fit
# ---------------------------------------------------------------------------------------


def _epoch_summary(metrics: dict[str, np.ndarray]) -> tuple[float, float]:
    count = metrics["count"]
    total = float(np.sum(count))
    return float(np.sum(metrics["loss"] * count) / total), float(np.sum(metrics["correct"]) / total)


def _check_checkpoint(path: Any, where: str) -> str:
    """``path`` names a file that can be written (its folder exists and takes a new file):
    checked by creating and removing a probe file, before any training."""
    if not isinstance(path, str | os.PathLike):
        raise TypeError(f"{where}: checkpoint must be a file path (str or os.PathLike), "
                        f"got {path!r}")
    path = os.fsdecode(os.fspath(path))
    if not path:
        raise ValueError(f"{where}: checkpoint must be a file path, got ''")
    if os.path.isdir(path):
        raise ValueError(f"{where}: checkpoint must be a file path, got the folder {path!r}")
    if os.path.exists(path) and not os.path.isfile(path):
        raise ValueError(f"{where}: checkpoint {path!r} exists and is not a regular file")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        what = "is not a folder" if os.path.exists(directory) else "does not exist"
        raise ValueError(f"{where}: checkpoint {path!r}: its folder {directory!r} {what}")
    try:
        fd, probe = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.",
                                     suffix=".probe")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise ValueError(
            f"{where}: checkpoint {path!r}: cannot write in its folder {directory!r} "
            f"({e.strerror or e})"
        ) from None
    return path


_HISTORY = ("loss", "accuracy", "val_loss", "val_accuracy", "time")
_FIT_KEYS = ("epoch", "history", "seed")  # what every checkpoint of fit's metadata has


def _fit_metadata(path: str) -> tuple[dict | None, str | None]:
    """``(metadata, None)`` when ``path`` is a checkpoint that :func:`fit` wrote, else
    ``(None, what it is instead)``; reads the manifest only."""
    try:
        meta = _ckpt.read_metadata(path)
    except _ckpt.CheckpointError as e:
        msg, prefix = str(e), f"checkpoint {path!r}: "
        return None, msg[len(prefix):] if msg.startswith(prefix) else msg
    what = ("fit's metadata: the epochs done ('epoch'), the 'history' and the 'seed'; a file "
            "of checkpoint.save has only the metadata given to it")
    if not isinstance(meta, dict):
        got = "no metadata" if meta is None else f"metadata of type {type(meta).__name__}"
        return None, f"it has {got}, not {what}"
    missing = [k for k in _FIT_KEYS if k not in meta]
    if missing:
        return None, (f"its metadata has no {', '.join(map(repr, missing))} (keys "
                      f"{sorted(meta)}), not {what}")
    epoch, history = meta["epoch"], meta["history"]
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        return None, f"its metadata's 'epoch' must be a count of epochs >= 0, got {epoch!r}"
    lengths = (None if not isinstance(history, dict) or
               any(not isinstance(history.get(k), list) for k in _HISTORY)
               else {k: len(history[k]) for k in _HISTORY})
    if (lengths is None or any(lengths[k] != epoch for k in ("loss", "accuracy", "time"))
            or lengths["val_loss"] != lengths["val_accuracy"]
            or lengths["val_loss"] > epoch):
        got = (f"lists of lengths {lengths}" if lengths is not None else
               f"the keys {sorted(history)}" if isinstance(history, dict) else
               type(history).__name__)
        return None, (f"its metadata's 'history' must hold the lists {list(_HISTORY)} of its "
                      f"{epoch} epochs (val_* at most as long), got {got}")
    return meta, None


def _existing_checkpoint(path: str, resume: bool, where: str) -> dict | None:
    """Before training, what ``fit(checkpoint=path)`` finds there: with ``resume``, fit's
    metadata of the checkpoint to continue from (``None`` when there is no file yet);
    without, ``None`` once it is sure the file it will replace is one of fit's own
    checkpoints (or empty), never a file of the user's (a data set, a checkpoint.save)."""
    if not os.path.exists(path) or (not resume and os.path.getsize(path) == 0):
        return None
    meta, problem = _fit_metadata(path)
    if problem is None:
        return meta if resume else None
    if resume:
        raise ValueError(f"{where}: resume=True: checkpoint {path!r} is not a checkpoint that "
                         f"fit wrote: {problem}; resume from a file of fit(checkpoint=...)")
    raise ValueError(f"{where}: checkpoint {path!r} exists and is not a checkpoint that fit "
                     f"wrote ({problem}); fit would replace it after the first epoch: give "
                     f"another path (resume=False replaces only fit's own checkpoints)")


def _examples(x: Any, x_np: Any, streaming: bool) -> int | None:
    """The number of training examples, where known (arrays, ``ArrayBatches``)."""
    if not streaming:
        return int(x_np.shape[0])
    return x.n if isinstance(x, _data.ArrayBatches) else None


def _shuffles(x: Any, shuffle: bool, streaming: bool) -> bool | None:
    """Whether the training data are shuffled, where known (arrays, ``ArrayBatches``)."""
    if not streaming:
        return shuffle
    return x.shuffle if isinstance(x, _data.ArrayBatches) else None


def _check_resume_settings(path: str, saved: dict, given: dict, where: str) -> None:
    """The settings that make the run (seed, batching, validation) are those the
    checkpoint's run had; a setting the checkpoint does not store, or that neither run
    knows (the examples of a generator), is not compared."""
    stored = dict(saved.get("settings") or {}, seed=saved["seed"])

    def show(name, v):
        if name == "validation_examples":
            return "none" if v is None else f"{v} examples"
        return repr(v)

    diffs = []
    for name, v in given.items():
        if name not in stored:
            continue
        s = stored[name]
        known = name == "validation_examples" or (s is not None and v is not None)
        if known and s != v:
            arg = "validation_data" if name == "validation_examples" else name
            diffs.append(f"{arg}: {show(name, s)} in the checkpoint, {show(name, v)} given")
    if diffs:
        raise ValueError(
            f"{where}: resume=True: checkpoint {path!r} was written by a run with other "
            f"settings ({'; '.join(diffs)}); a resumed run must continue the same run (its "
            f"history and stopping rules over the same data): give the same arguments, or "
            f"start a new run (resume=False, or another checkpoint path)")


def _saved_stopping(saved: dict) -> tuple[float, int, int | None]:
    """``(best val_loss, epochs since it, its epoch (1-based) or None)`` of a checkpoint's
    run: as stored, or (a checkpoint of an older fit) counted again from its history as
    the epoch loop counts them."""
    if "since_best" in saved:
        best = saved.get("best_loss")
        return (math.inf if best is None else float(best)), int(saved["since_best"]), (
            saved.get("best_epoch"))
    best, since, epoch = math.inf, 0, None
    for i, v in enumerate(saved["history"]["val_loss"]):
        if v is not None and v < best:
            best, since, epoch = v, 0, i + 1
        else:
            since += 1
    return best, since, epoch


def _check_train_state(state: Any, optimizer: Any, where: str = "fit") -> TrainState:
    """``state`` is a :class:`TrainState` whose optimizer state fits ``optimizer``; returned
    as a copy (``fit`` donates its buffers; the caller's stay valid) with an int32 step."""
    if not isinstance(state, TrainState):
        raise _not_a_train_state(state, "state", where)
    step = state.step
    if (isinstance(step, bool) or jnp.ndim(step) != 0
            or not jnp.issubdtype(jnp.result_type(step), jnp.integer)):
        raise TypeError(f"{where}: state.step must be an integer scalar, got {step!r:.60}")
    _check_leaves(state.params, "state.params", where)
    expected = jax.tree_util.tree_structure(jax.eval_shape(optimizer.init, state.params))
    got = jax.tree_util.tree_structure(state.opt_state)
    if expected != got:
        raise ValueError(
            f"{where}: state.opt_state does not match the optimizer: expected {expected}, "
            f"got {got}; make the state with init_state(params, optimizer)"
        )
    state = _copy(state)
    return state._replace(step=jnp.asarray(state.step, jnp.int32))


class _Validation(NamedTuple):
    x: jax.Array
    y: jax.Array
    idx: jax.Array
    w: jax.Array
    with_acc: bool


def _check_validation(net, validation_data, loss, params, model_state, x_train, where):
    """Everything about ``validation_data`` before the first step: a pair, shapes, dtypes,
    labels, that the parameters fit it, and that the loss takes it (the evaluation
    program is traced, not run)."""
    vwhere = f"{where}: validation_data"
    if not isinstance(validation_data, tuple | list) or len(validation_data) != 2:
        raise TypeError(f"{vwhere} must be a pair (x_val, y_val), got "
                        f"{type(validation_data).__name__} {validation_data!r:.60}")
    xv = np.asarray(_as_array(validation_data[0], "x_val", vwhere))
    yv = _as_array(validation_data[1], "y_val", vwhere)
    xv, yv = _data.check_dataset(xv, yv, _num_classes(net, xv, vwhere, "x_val"), where=vwhere,
                                 integer_x=_takes_integers(net))
    if xv.ndim != x_train.ndim:
        raise ValueError(f"{vwhere}: x_val must have the rank of x, {x_train.shape}, got shape "
                         f"{xv.shape}")
    out_shape = _output_shape(net, xv, vwhere, "x_val")
    _check_x_fits(net, params, xv, vwhere, "x_val")
    check_params(net, model_state, xv.shape[1:], vwhere, what="state")
    xd, yd = _checks.on_device(xv), _checks.on_device(yv)
    idx, w = _eval_batches(xv.shape[0], 1024, xv.dtype)
    try:
        jax.eval_shape(_eval_fn(net, loss), params, model_state, xd, yd, idx, w)
    except LossError as e:
        raise LossError(where, e.detail) from None
    except (TypeError, ValueError) as e:
        raise (TypeError if isinstance(e, TypeError) else ValueError)(
            f"{vwhere}: x_val {xv.shape} / y_val {yv.shape} do not fit the network and the "
            f"loss: {e}"
        ) from None
    return _Validation(xd, yd, idx, w, out_shape is not None and _has_accuracy(out_shape, yv))


def fit(
    net: Any,
    params: Any,
    x: Any,
    y: Any = None,
    *,
    loss: Loss = _losses.softmax_cross_entropy,
    optimizer: optax.GradientTransformation | None = None,
    epochs: int = 10,
    batch_size: int | None = None,
    regularizer: Callable[[Any], jax.Array] | None = None,
    lam: float = 0.0,
    validation_data: tuple[Any, Any] | None = None,
    seed: int = 0,
    shuffle: bool = True,
    loss_threshold: float | None = None,
    patience: int | None = None,
    restore_best: bool = False,
    epoch_mode: str = "auto",
    grad: str | ValueAndGrad = "auto",
    progress: bool = True,
    checkpoint: str | os.PathLike | None = None,
    resume: bool = False,
    state: TrainState | None = None,
    model_state: Any = None,
    devices: Any = None,
    precision: Any = None,
) -> FitResult:
    """Train ``net`` from ``params`` on ``(x, y)`` for up to ``epochs`` epochs.

    Everything is validated before the first step: ``x`` ``(N, ...)`` floating and finite
    (integer ids for an Embedding-first network), ``y`` ``(N,)`` integer labels in
    ``[0, K)`` (``K`` = the network's outputs) or floating targets with ``N`` rows, the
    same for ``validation_data`` (whose evaluation is traced up front, so a mismatch with
    the network or the loss shows before training), the parameters against the network,
    every option's type and range, and that ``checkpoint`` can be written. ``loss`` must
    return a scalar (checked when the step is traced, before it runs).

    Each epoch shuffles with ``fold_in(key(seed), epoch)``, runs ``ceil(N / batch_size)``
    steps (the last batch padded with zero-weight examples, one compiled step for all;
    for a network with BatchNorm it runs at its true size instead, see below), and
    appends to the history: ``loss`` / ``accuracy`` (running means over the epoch's
    steps), ``val_loss`` / ``val_accuracy`` (after the epoch, when ``validation_data`` is
    given) and ``time`` (seconds). Accuracy is ``None`` for targets that are neither
    integer labels nor rows of class probabilities (regression).
    A later ``fit`` of the same network, loss and optimizer *objects* with the same
    settings and data shapes runs the programs this one compiled (16 configurations are
    kept); a new optimizer object, even an equal one, compiles afresh.

    Stopping: after ``epochs``; when the epoch's training loss is ``<= loss_threshold``
    (the lecture's rule, "stop when the loss is small enough"); or when ``val_loss`` has not
    improved for ``patience`` epochs.
    A non-finite loss or update (gradient, overflow) raises :class:`NonFiniteLossError`
    naming the epoch and step; its ``state`` holds the last finite parameters (updates
    stop at the bad step). Each step checks its objective (free); the whole state is
    checked once per epoch, and an epoch that left a non-finite state with finite losses
    is run again from its start (fit keeps a copy of the state at the start of each
    epoch), checking every step's state, to find the bad step.

    ``restore_best=True`` (needs ``validation_data``) returns the parameters of the epoch
    with the lowest ``val_loss`` however the run ends (``patience``, ``loss_threshold`` or
    the last epoch): asking for the best gives the best, not only after an early stop as
    Keras' ``EarlyStopping(restore_best_weights=True)`` does. As there, the model is
    restored (``params`` and ``state.params``, with the network's state of that epoch in
    ``state.model_state``) while ``state.opt_state`` and ``state.step`` stay those of the
    last epoch; the checkpoint file holds the last epoch's state and, with
    ``restore_best=True``, the best epoch's parameters and network state too, so a resumed
    run returns the best of all its epochs, as the uninterrupted run does.

    Data: arrays ``x`` and ``y``, held on the device for the whole run (``batch_size``
    default 32), or a *batch source* given as ``x`` without ``y`` (:mod:`funcnet.streaming`):
    a callable ``epoch -> iterable of (x, y) batches`` or a re-iterable, e.g.
    :class:`funcnet.data.ArrayBatches` over memory-mapped files (only about one batch in
    memory; the same training as the arrays, bitwise) or a generator with the user's own
    augmentation. The source sets the batch size (its first batch's rows); each batch is
    checked as it arrives (an error names the epoch and the batch), a short batch is
    padded with weight-0 rows (true size with BatchNorm), and the epoch runs as a loop.
    The source orders its own batches: ``shuffle`` applies to arrays only, and ``seed``
    then sets Dropout's keys (give ``ArrayBatches`` the same seed to shuffle as ``fit``).

    Several processes (``jax.distributed.initialize``, ``devices="all"`` or a mesh over
    every process's devices): every process calls ``fit`` with the same arguments and
    gives either the whole data set as host arrays (each process then reads only its
    rows of every batch, :class:`~funcnet.data.ArrayBatches` with ``process=``) or a
    batch source of its own part of every global batch; the training is that of one
    process on the global batches.

    Args:
      net, params: the network and its initial parameters (not modified).
      loss: ``loss(outputs, y)``, the batch mean; default softmax cross-entropy. ``fit``
        (and :func:`evaluate`) apply it to each example and average with the examples'
        weights (padding rows weigh 0), so it must be a mean of per-example terms: a loss
        of the whole batch (RMSE, a contrastive or batch-statistics loss) would train as
        the mean of its one-example values; train such a loss with :func:`make_step`.
      optimizer: optax optimizer; default ``optax.sgd(0.1)``.
      regularizer, lam: ``lam * regularizer(params)`` is added to the loss.
      epoch_mode: ``"auto"``, ``"loop"`` (Python loop over a jitted step) or ``"scan"``
        (one compiled program per epoch); see :func:`choose_epoch_mode`.
      grad: gradient mode, see :func:`make_step`.
      progress: show a tqdm progress bar (a scanned epoch advances it once per epoch).
      checkpoint: file to save ``{"state": TrainState}`` (with ``restore_best=True`` also
        ``"best"``: the best epoch's ``params`` and ``model_state``) after every epoch,
        atomically; its folder must exist and be writable. The metadata holds the epochs
        done, the history, the seed, the settings ``resume`` compares and what the stopping
        rules need (``best_loss``, ``since_best``, ``best_epoch``, ``stop_reason``: None
        while the run goes on). A file already there must be a checkpoint that ``fit``
        wrote, which a run with ``resume=False`` replaces (an empty file too); any other
        file (a data set, a ``checkpoint.save`` of the user's) is refused before training,
        so nothing the user saved is overwritten.
      resume: continue from ``checkpoint`` if it exists: bitwise the same result as an
        uninterrupted run with the same arguments (parameters, history, stop reason),
        ``patience`` and ``restore_best`` included (their best ``val_loss`` and its
        parameters come from the checkpoint). The stopping rules are first applied to the
        checkpoint's last epoch with this call's ``patience`` and ``loss_threshold``: a run
        that stopped early is returned as it ended, without training, unless these now let
        it go on; one that ran all its epochs continues to a larger ``epochs``. Refused
        before training: a file that ``fit`` did not write (no fit metadata); settings other
        than the checkpoint's run's (``seed``, the batch size, the number of examples and
        ``shuffle`` where known, the epoch mode ``"loop"`` / ``"scan"``, and
        ``validation_data``: present or not and its number of examples; a run validates from
        its first epoch or never, so its history lines up and ``patience`` counts every
        epoch); ``restore_best=True`` on a checkpoint written without it. ``epochs``,
        ``patience`` and ``loss_threshold`` may change; the optimizer and the network must
        fit the stored state (checked by :func:`funcnet.checkpoint.restore`), the rest
        (learning rate, loss) is not checked.
      state: start from this :class:`TrainState` instead of ``init_state(params, ...)``
        (copied: the caller's arrays stay valid); ``params`` is then ignored and
        ``model_state`` must be left out (the state carries its own). With ``resume`` and
        an existing checkpoint the run continues from the checkpoint's state; ``state``
        (like ``params``) then only gives the structure the checkpoint must match.
      model_state: the network's initial state (default ``net.init_state``).
      devices: ``None`` (one device), ``"all"`` (every device), a sequence of
        devices, or a ``jax.sharding.Mesh`` with a ``"data"`` axis: data-parallel
        training, below.
      precision: mixed precision, as in :func:`make_step` (``"bfloat16"``: the network
        runs forward and backward in bfloat16, the parameters, the optimizer state and
        BatchNorm's statistics stay float32). With float16's loss scale a step whose
        scaled gradient overflows is not applied, and ``fit`` then stops with
        :class:`NonFiniteLossError` (the last finite state kept): lower the scale
        (``precision.Policy(jnp.float16, loss_scale=...)``) or use bfloat16.

    Training runs the network in training mode (Dropout with a fresh key every step,
    ``fold_in(step_keys(seed), step)``; BatchNorm with batch statistics, its running
    statistics threaded through every step and kept in ``state.model_state``);
    validation runs in evaluation mode with those running statistics.

    Several devices (``devices=``, :mod:`funcnet.parallel`): the data set is put whole on
    every device of the mesh once, device to device (an ``x`` already on devices, e.g.
    from ``parallel.shard_batch``, is validated where it lives, never copied through the
    host); the parameters, the optimizer state and the network's state are replicated;
    each step gathers its shuffled batch and shards it along the data axis, so every
    device gathers and computes its own rows, and XLA all-reduces the gradient, the
    metrics and BatchNorm's statistics: one compiled step, as on one device. The
    returned state is replicated on the mesh. The result is that of one device (up to
    float rounding) for any number of devices: a batch that does not divide by the
    devices is split unevenly (XLA pads the last device's part internally and leaves the
    padding out of every sum and mean), so no layer ever sees a row that one device would
    not see. BatchNorm's batch statistics are those of the whole global batch, not of a
    device's part.

    BatchNorm and the last partial batch: padding rows (copies of example 0 with weight 0)
    carry no loss and no gradient, but BatchNorm's training mode would compute its batch
    mean and variance over them too. So for a network with a layer that says it
    ``mixes_batch`` (BatchNorm), the last partial batch runs at its true size through a
    second compiled program of the step (one more compilation per ``fit``, none per
    epoch); other networks keep the padding and a single program. A last batch of one
    example is then refused by BatchNorm over features, as in PyTorch, before the first
    step (a ``ValueError`` naming ``batch_size``).

    Returns:
      :class:`FitResult` ``(params, state, history, stop_reason)``.
    """
    where = "fit"
    optimizer = optax.sgd(0.1) if optimizer is None else optimizer
    _check_optimizer(optimizer, where)
    _checks.check_loss_fn(loss, where)
    if isinstance(epochs, bool) or not isinstance(epochs, int | np.integer):
        raise TypeError(f"fit: epochs must be a non-negative int, got {epochs!r}")
    if epochs < 0:
        raise ValueError(f"fit: epochs must be a non-negative int, got {epochs!r}")
    epochs = int(epochs)
    if batch_size is not None:
        batch_size = _checks.positive_int(batch_size, "batch_size", "fit")
    seed = _check_seed(seed, where)
    shuffle = _check_bool(shuffle, "shuffle", where)
    progress = _check_bool(progress, "progress", where)
    restore_best = _check_bool(restore_best, "restore_best", where)
    resume = _check_bool(resume, "resume", where)
    if patience is not None:
        patience = _checks.positive_int(patience, "patience", "fit")
        if validation_data is None:
            raise ValueError("fit: patience needs validation_data")
    if restore_best and validation_data is None:
        raise ValueError("fit: restore_best=True needs validation_data (the best epoch is the "
                         "one with the lowest val_loss)")
    if loss_threshold is not None:
        if isinstance(loss_threshold, bool) or not isinstance(loss_threshold, numbers.Real):
            raise TypeError(
                f"fit: loss_threshold must be a number or None, got {loss_threshold!r}")
        if math.isnan(loss_threshold):
            raise ValueError(f"fit: loss_threshold must be a number or None, got {loss_threshold}")
    if resume and checkpoint is None:
        raise ValueError("fit: resume=True needs a checkpoint path")
    mode = choose_epoch_mode(net, epoch_mode, grad)
    mesh = None if devices is None else _parallel.data_mesh(devices, where)
    streaming = y is None
    if streaming:
        _stream.check_source(x, where)
        if epoch_mode == "scan":
            raise ValueError("fit: epoch_mode='scan' needs the data set as arrays (x, y); a "
                             "batch source runs the loop (epoch_mode='auto' or 'loop')")
        mode = "loop"
    elif _stream.is_source(x) and not isinstance(x, list | tuple):
        raise TypeError(f"fit: x is a batch source ({type(x).__name__}); give it without y "
                        f"(its batches carry the labels), or give x and y as arrays")
    saved = None  # fit's metadata of the checkpoint to resume from
    if checkpoint is not None:
        checkpoint = _check_checkpoint(checkpoint, where)
        saved = _existing_checkpoint(checkpoint, resume, where)
    if state is not None:
        if model_state is not None:
            raise ValueError("fit: give model_state or state, not both (a TrainState carries "
                             "its own model_state)")
        state = _check_train_state(state, optimizer, where)
    update_args = (net, loss, optimizer, regularizer, lam, grad, seed, where)
    # labels of batches already on devices are checked in the step (not on the host)
    update_kw = {"precision": _precision.get_policy(precision, where),
                 "check_labels": streaming}
    update = _fit_update(update_args, update_kw)

    source, first_it = None, None
    if streaming:  # the first batch stands in for the data set in the checks below
        (xb, yb, _), first_it = _stream.first_batch(x, where)
        x_np, y_np = _checked_data(net, _as_array(xb, "x", "fit: epoch 1, batch 1"),
                                   _as_array(yb, "y", "fit: epoch 1, batch 1"), None,
                                   "fit: epoch 1, batch 1")
        if batch_size is not None and batch_size != x_np.shape[0]:
            raise ValueError(f"fit: batch_size={batch_size}, but the batch source's first "
                             f"batch has {x_np.shape[0]} rows; leave batch_size out (the "
                             f"source sets it)")
        source = x
    else:
        x_np, y_np = _checked_data(net, _as_array(x, "x", "fit: training data"),
                                   _as_array(y, "y", "fit: training data"), mesh,
                                   "fit: training data")  # numpy, or on devices with a mesh
        batch_size = 32 if batch_size is None else batch_size
        if mesh is not None and jax.process_count() > 1:
            # every process holds the data set and reads its own rows of every batch
            count, bs = jax.process_count(), min(batch_size, x_np.shape[0])
            if bs % count:
                raise ValueError(f"fit: batch_size={bs} must divide by the {count} processes "
                                 f"(each takes batch_size / {count} rows of every batch)")
            if mixes_batch(net) and x_np.shape[0] % bs:
                raise ValueError(
                    f"fit: with {count} processes, a network with BatchNorm needs a data set "
                    f"size that divides by batch_size: {x_np.shape[0]} examples leave a last "
                    f"batch of {x_np.shape[0] % bs}, which the processes cannot split into "
                    f"equal parts without padding rows that BatchNorm would see")
            if isinstance(x_np, jax.Array):
                raise ValueError("fit: with several processes, give x and y as host arrays "
                                 "(the whole data set in every process) or a batch source of "
                                 "each process's part (data.ArrayBatches(process=...))")
            source = _data.ArrayBatches(x_np, y_np, bs, shuffle=shuffle, seed=seed,
                                        process=(jax.process_index(), count))
            mode = "loop"
    out_shape = _output_shape(net, x_np, where)
    if state is None:
        _check_leaves(params, "params", where)
        check_params(net, params, x_np.shape[1:])
        model_state = _model_state(net, model_state, x_np.shape[1:], where)
    else:
        check_params(net, state.params, x_np.shape[1:], "fit: state")
        _model_state(net, state.model_state, x_np.shape[1:], "fit: state")
    with_acc = out_shape is not None and _has_accuracy(out_shape, y_np)
    val = None
    if validation_data is not None:
        val = _check_validation(net, validation_data, loss,
                                params if state is None else state.params,
                                model_state if state is None else state.model_state,
                                x_np, where)

    if source is not None:
        runner = _stream.StreamRunner(
            update, source, x_np.shape[0] if streaming else source.batch_size
            // jax.process_count(), x_like=x_np, y_like=y_np,
            num_classes=_num_classes(net, x_np, where), integer_x=_takes_integers(net),
            mesh=mesh, exact_last=mixes_batch(net), where=where, epoch0=first_it)
        bs = x_np.shape[0] if streaming else source.batch_size  # the global batch
    else:
        bs = min(batch_size, x_np.shape[0])
        _check_last_batch(net, params if state is None else state.params,
                          model_state if state is None else state.model_state, x_np, bs,
                          where)
        runner = EpochRunner(update, _checks.on_device(x_np), _checks.on_device(y_np), bs,
                             mode, shuffle, mesh, exact_last=mixes_batch(net))
    if val is not None and mesh is not None:
        val = val._replace(**_parallel.replicate(
            {"x": val.x, "y": val.y, "idx": val.idx, "w": val.w}, mesh))

    state = init_state(params, optimizer, model_state) if state is None else state
    history: dict[str, list] = {k: [] for k in _HISTORY}
    # what a resumed run must share with the run that wrote the checkpoint
    settings = {"batch_size": int(bs), "examples": _examples(x, x_np, streaming),
                "shuffle": _shuffles(x, shuffle, streaming), "epoch_mode": mode,
                "validation_examples": None if val is None else int(val.x.shape[0])}
    start, stop_reason = 0, "epochs"
    best_loss, best_model, since_best = math.inf, None, 0  # best val loss, its model, epochs
    best_epoch = None
    if saved is not None:
        validated = len(saved["history"]["val_loss"])
        if validated not in (0, saved["epoch"]):  # an older fit let validation start late
            raise ValueError(
                f"{where}: resume=True: checkpoint {checkpoint!r} validated {validated} of its "
                f"{saved['epoch']} epochs (validation_data added when it was resumed by an "
                f"older fit), so its history cannot line up with this run's; start a new "
                f"run (resume=False, or another checkpoint path)")
        _check_resume_settings(checkpoint, saved, dict(settings, seed=seed), where)
        best_loss, since_best, best_epoch = _saved_stopping(saved)
        if restore_best and best_epoch is not None and not saved.get("best_saved", False):
            raise ValueError(
                f"{where}: resume=True with restore_best=True: checkpoint {checkpoint!r} holds "
                f"no best parameters (its run had restore_best=False), so the best of its "
                f"{saved['epoch']} epochs (epoch {best_epoch}) is lost; resume with "
                f"restore_best=False, or start a new run")
        template = {"state": state}
        if saved.get("best_saved", False):
            template["best"] = {"params": state.params, "model_state": state.model_state}
        restored, _ = _ckpt.restore(checkpoint, template)
        state = restored["state"]
        if restore_best and "best" in restored:
            best_model = (restored["best"]["params"], restored["best"]["model_state"])
        start = saved["epoch"]
        history = {k: list(saved["history"][k]) for k in _HISTORY}
        # a run that stopped early stays stopped if its rule, with this call's values,
        # still says stop (the same values: as the run ended); else it trains on
        last_loss = history["loss"][-1] if history["loss"] else None
        if loss_threshold is not None and last_loss is not None \
                and last_loss <= loss_threshold:
            stop_reason = "loss_threshold"
        elif patience is not None and history["val_loss"] and since_best >= patience:
            stop_reason = "patience"
    end = epochs if stop_reason == "epochs" else start

    seed_key = jax.random.key(seed)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        per_epoch = runner.num_batches
        bar = tqdm(total=None if per_epoch is None else max(end - start, 0) * per_epoch,
                   unit="step", desc=f"fit {mode}", leave=True,
                   disable=jax.process_index() != 0)  # one bar for several processes
    try:
        for epoch in range(start, end):
            t0 = time.perf_counter()
            start_state = _copy(state)  # the runner donates its input; kept for a replay
            active = _device_true()
            state, metrics, active = runner.run(
                state, epoch_key(seed_key, epoch), active,
                on_step=(bar.update if bar is not None else None), epoch=epoch,
            )
            metrics = jax.device_get(metrics)
            if not bool(active) or not bool(_state_finite(state)):
                _non_finite_epoch(epoch, metrics, state, start_state, history, runner,
                                  (update_args, update_kw), epoch_key(seed_key, epoch))
            train_loss, train_acc = _epoch_summary(metrics)
            history["loss"].append(train_loss)
            history["accuracy"].append(train_acc if with_acc else None)
            if val is not None:
                vl, va = _eval_fn(net, loss, mesh)(state.params, state.model_state, val.x,
                                                   val.y, val.idx, val.w)
                vl = float(vl)
                history["val_loss"].append(vl)
                history["val_accuracy"].append(float(va) if val.with_acc else None)
                if vl < best_loss:
                    best_loss, since_best, best_epoch = vl, 0, epoch + 1
                    if restore_best:  # copies: the state's buffers are donated next epoch
                        best_model = _copy((state.params, state.model_state))
                else:
                    since_best += 1
            history["time"].append(time.perf_counter() - t0)
            if bar is not None:
                post = {"loss": f"{train_loss:.4f}"}
                if with_acc:
                    post["acc"] = f"{train_acc:.4f}"
                if val is not None:
                    post["val_loss"] = f"{history['val_loss'][-1]:.4f}"
                    if val.with_acc:
                        post["val_acc"] = f"{history['val_accuracy'][-1]:.4f}"
                bar.set_postfix(post, refresh=False)
                bar.set_description(f"fit {mode} epoch {epoch + 1}/{epochs}")
            if loss_threshold is not None and train_loss <= loss_threshold:
                stop_reason = "loss_threshold"
            elif patience is not None and since_best >= patience:
                stop_reason = "patience"
            if checkpoint is not None:
                tree = {"state": state}
                if restore_best and best_model is not None:
                    tree["best"] = {"params": best_model[0], "model_state": best_model[1]}
                _ckpt.save(checkpoint, tree, metadata={
                    "epoch": epoch + 1, "history": history, "seed": seed, "settings": settings,
                    "best_loss": None if best_epoch is None else best_loss,
                    "since_best": since_best, "best_epoch": best_epoch,
                    "stop_reason": None if stop_reason == "epochs" else stop_reason,
                    "best_saved": "best" in tree})
            if stop_reason != "epochs":
                break
    finally:
        if bar is not None:
            bar.close()
    if restore_best and best_model is not None:
        state = state._replace(params=best_model[0], model_state=best_model[1])
    return FitResult(state.params, state, history, stop_reason)


def _copy(tree: Any) -> Any:
    """Fresh buffers of ``tree``'s arrays, same shardings and committedness: a device-side
    copy (``jnp.array(a, copy=True)`` would compile a program per shape and dtype)."""
    def one(a):
        if isinstance(a, jax.Array) and not isinstance(a, jax.core.Tracer):
            if a.is_fully_addressable:  # keeps an uncommitted array uncommitted
                return jax.device_put(a, may_alias=False)
            # an array across processes: each process copies its own shards
            return jax.device_put(a, a.sharding, may_alias=False)
        return jnp.array(a, copy=True)

    return jax.tree_util.tree_map(one, tree)


_state_finite = jax.jit(_all_finite)


def _device_true() -> jax.Array:
    """A fresh device ``True`` (``jnp.asarray(True)`` compiles a program to make one)."""
    return jax.device_put(np.asarray(True))


def _non_finite_epoch(epoch, metrics, state, start_state, history, runner, update_args, key):
    """The epoch met a non-finite objective or left a non-finite state: raise
    :class:`NonFiniteLossError` with the last finite state. When the state the cheap
    per-step guard kept is not finite (a finite loss with an overflowing update), the
    epoch is run again from its (finite) start with the full guard, which checks the
    whole updated state at every step and stops at the first bad one."""
    if not bool(_state_finite(state)):
        args, kw = update_args
        full = runner.with_update(_fit_update(args, kw, guard="full"))
        replayed, replay_metrics, active = full.run(_copy(start_state), key, _device_true(),
                                                    epoch=epoch)
        if not bool(active) and bool(_state_finite(replayed)):
            state, metrics = replayed, jax.device_get(replay_metrics)
        else:  # cannot happen with a deterministic step; the epoch's start is finite
            state = start_state
            metrics = dict(metrics, finite=np.zeros_like(metrics["finite"]))
    _raise_non_finite(epoch, metrics, state, history, runner,
                      update_args[1].get("precision"))


def _raise_non_finite(epoch, metrics, state, history, runner, policy=None):
    bad = np.flatnonzero(~metrics["finite"])
    i = int(bad[0]) if bad.size else 0
    value = float(metrics["objective"][i])
    global_step = int(state.step)
    scale = None if policy is None else policy.loss_scale
    if scale is not None and scale != 1 and np.isfinite(value):
        # a finite loss whose scaled gradient is not: the loss scale overflowed
        hint = (f"the loss is finite, so the gradient of the loss times the loss scale "
                f"{scale:g} overflowed {jnp.dtype(policy.compute_dtype).name}: lower the "
                f"scale (precision.Policy({jnp.dtype(policy.compute_dtype).name}, "
                f"loss_scale=...)), or use bfloat16")
    else:
        hint = "check the data for NaN / inf or huge values, and the learning rate"
    raise NonFiniteLossError(
        f"fit: non-finite loss, gradient or update (loss {value}) at epoch {epoch + 1}, "
        f"step {i + 1} of {len(metrics['finite'])} (after {global_step} updates); training "
        f"stopped and the last finite parameters are kept in the error's .state ({hint})",
        epoch=epoch + 1, step=i + 1, global_step=global_step, value=value, state=state,
        history=history,
    )
