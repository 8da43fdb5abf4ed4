"""Losses, each the mean over the batch of a per-example loss.

The per-example loss sums over every non-batch axis, so a single-output network gets
exactly the lecture's ``J`` per example. Axis 0 is the batch.

==================  ==========================================  ===================
loss                per example                                 lecture
==================  ==========================================  ===================
quadratic           ``1/2 sum (y - y*)^2``                      ``J = 1/2 (y-y*)^2``
binary CE           ``-sum [y* log y + (1-y*) log(1-y)]``       sign dropped there
softmax CE          ``-sum_k y*_k log softmax(z)_k``            NLL of the softmax
==================  ==========================================  ===================

The backward rules: each loss is the batch mean of a per-example sum, so every gradient
carries a ``1 / N`` (``N`` = size of axis 0).

==========================  ===============================  ===========================
loss                        ``dL/dy`` (per element, x N)     ``dL/dtarget`` (x N)
==========================  ===============================  ===========================
quadratic                   ``y - y*``                       ``-(y - y*)``
binary CE (probabilities)   ``-y*/y + (1 - y*)/(1 - y)``     ``-log y + log(1 - y)``
binary CE (logits ``z``)    ``sigma(z) - y*``                ``-z``
softmax CE (logits ``z``)   ``softmax(z) sum(y*) - y*``      ``-log_softmax(z)``
==========================  ===============================  ===========================

The lecture's table gives the binary-CE derivative without its signs; these are the
derivatives of the loss that is minimised. With integer labels the softmax-CE target
term ``y*`` is ``onehot(labels)`` and the labels get no gradient (``None``).
Binary CE clamps each log at -100 (as the forward); where the clamp is active the
derivative of that term is 0 (the forward computes the clamp with the double-``where``
trick, so ``jax.grad`` agrees with the rule and stays finite at ``p`` exactly 0 or 1).

Inputs are validated before any work: arrays of real numbers (not complex), matching
shapes; probabilities and binary / soft targets in ``[0, 1]`` and integer labels in
``[0, K)`` when their values are concrete (under ``jit`` or ``grad`` they are not
known, and are not checked). Called outside a trace, a loss checks its inputs and then
computes as one compiled program (cached per shapes and dtypes), not operation by operation.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from funcnet import _checks
from funcnet._eager import compiled_when_eager
from funcnet.nn.base import Rule

# PyTorch's BCELoss clamps log(p) at -100 so that p exactly 0 or 1 gives a finite loss.
LOG_CLAMP = -100.0


def _batch_mean(per_element: jax.Array) -> jax.Array:
    if per_element.ndim == 0:
        return per_element
    return jnp.mean(jnp.sum(per_element.reshape(per_element.shape[0], -1), axis=1))


def _pair(a, b, names: tuple[str, str], where: str):
    """``(a, b)`` as arrays of real numbers of the same shape, else an error naming them."""
    a = _checks.as_array(a, names[0], where)
    b = _checks.as_array(b, names[1], where)
    _checks.check_real(a, names[0], where)
    _checks.check_real(b, names[1], where)
    _same_shape(a, b, names, where)
    return a, b


def _same_shape(a, b, names: tuple[str, str], where: str) -> None:
    if jnp.shape(a) != jnp.shape(b):
        raise ValueError(
            f"{where}: {names[0]} and {names[1]} must have the same shape, got "
            f"{jnp.shape(a)} and {jnp.shape(b)}"
        )


def quadratic(y: jax.Array, target: jax.Array) -> jax.Array:
    """Quadratic loss ``J = 1/2 (y - y*)^2``, summed per example, mean over the batch.

    Its derivative is ``dJ/dy = y - y*`` (per example). ``y`` and ``target``: same shape
    ``(N, ...)``.
    """
    y, target = _pair(y, target, ("y", "target"), "quadratic")
    return _quadratic(y, target)


@compiled_when_eager()
def _quadratic(y, target):
    d = y - target
    return _batch_mean(0.5 * d * d)


def binary_cross_entropy(p: jax.Array, target: jax.Array) -> jax.Array:
    """Cross-entropy of probabilities: ``J = -[y* log y + (1 - y*) log(1 - y)]``.

    The lecture's table writes this without the leading minus sign; that is the
    log-likelihood, which training would *maximise*. This is the correct loss (its
    negative), so ``dJ/dy = -y*/y + (1 - y*)/(1 - y)``.

    ``p`` in ``[0, 1]`` and ``target`` in ``[0, 1]``, same shape ``(N, ...)``. Each log is
    clamped at ``-100`` (as PyTorch's ``BCELoss``), so probabilities of exactly 0 or 1
    give a finite loss, and a gradient that is finite too (0 for a clamped term, as the
    hand rule). Concrete ``p`` or ``target`` outside ``[0, 1]`` (logits passed by
    mistake) raise a ``ValueError``. Prefer :func:`binary_cross_entropy_with_logits` on
    logits.
    """
    where = "binary_cross_entropy"
    p, target = _pair(p, target, ("p", "target"), where)
    _checks.check_in_unit_interval(
        p, "p (probabilities; for logits use binary_cross_entropy_with_logits)", where
    )
    _checks.check_in_unit_interval(target, "target", where)
    return _binary_cross_entropy(p, target)


@compiled_when_eager()
def _binary_cross_entropy(p, target):
    log_p, log_1mp = _clamped_logs(p)
    return _batch_mean(-(target * log_p + (1.0 - target) * log_1mp))


def _clamped_logs(p: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``max(log p, -100)`` and ``max(log(1 - p), -100)`` with finite gradients.

    Where a log is clamped its derivative is 0, as in the hand rule. A plain
    ``maximum(log p, -100)`` is not enough for ``jax.grad``: at ``p = 0`` the derivative
    of ``log`` is ``inf`` and the chain rule's ``0 * inf`` is NaN, even where the term's
    weight (``target`` or ``1 - target``) is 0. So the log is taken of a safe value
    where it would be clamped (the double-``where`` trick).
    """
    p = jnp.asarray(p)
    if not jnp.issubdtype(p.dtype, jnp.floating):
        p = p.astype(jnp.result_type(float))
    clamp = jnp.asarray(LOG_CLAMP, p.dtype)
    one, zero = jnp.ones((), p.dtype), jnp.zeros((), p.dtype)
    live_p = jnp.log(lax.stop_gradient(p)) > clamp  # the rule's masks, exactly
    live_1mp = jnp.log1p(-lax.stop_gradient(p)) > clamp
    log_p = jnp.where(live_p, jnp.log(jnp.where(live_p, p, one)), clamp)
    log_1mp = jnp.where(live_1mp, jnp.log1p(-jnp.where(live_1mp, p, zero)), clamp)
    return log_p, log_1mp


def binary_cross_entropy_with_logits(logits: jax.Array, target: jax.Array) -> jax.Array:
    """:func:`binary_cross_entropy` of ``sigmoid(logits)``, computed stably.

    ``max(z, 0) - z y* + log(1 + exp(-|z|))``: finite for logits of any magnitude.
    ``target`` (hard or soft labels) must lie in ``[0, 1]`` (a ``ValueError`` when
    concrete).
    """
    where = "binary_cross_entropy_with_logits"
    logits, target = _pair(logits, target, ("logits", "target"), where)
    _checks.check_in_unit_interval(target, "target", where)
    return _binary_cross_entropy_with_logits(logits, target)


@compiled_when_eager()
def _binary_cross_entropy_with_logits(logits, target):
    return _batch_mean(optax.sigmoid_binary_cross_entropy(logits, target))


def _check_integer_labels(labels, num_classes: int, where: str) -> None:
    if isinstance(labels, jax.core.Tracer):
        return  # values unknown under tracing; train.fit validates labels up front
    arr = np.asarray(labels)
    if arr.size and (arr.min() < 0 or arr.max() >= num_classes):
        raise ValueError(
            f"{where}: integer labels must lie in [0, {num_classes}), got values in "
            f"[{arr.min()}, {arr.max()}]"
        )


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Cross-entropy of ``softmax(logits)`` against labels: ``-sum_k y*_k log y_k``.

    Args:
      logits: ``(N, K)`` unnormalised scores (finite for magnitudes of 1e4 and more: it
        works through ``log_softmax``).
      labels: ``(N,)`` integer class indices in ``[0, K)``, or ``(N, K)`` one-hot /
        probability targets (floating).

    Returns:
      The mean over the batch. Its gradient w.r.t. the logits is
      ``(softmax(z) - onehot) / N``.
    """
    where = "softmax_cross_entropy"
    logits = _checks.as_array(logits, "logits", where)
    labels = _checks.as_array(labels, "labels", where)
    _checks.check_floating(logits, "logits", where)
    _checks.check_rank(jnp.shape(logits), 2, "logits", where, "N, K")
    labels_dtype = jnp.result_type(labels)
    if jnp.issubdtype(labels_dtype, jnp.integer):
        if jnp.shape(labels) != jnp.shape(logits)[:1]:
            raise ValueError(
                f"{where}: integer labels must have shape (N,) = {jnp.shape(logits)[:1]} "
                f"for logits of shape {jnp.shape(logits)}, got {jnp.shape(labels)}"
            )
        _check_integer_labels(labels, jnp.shape(logits)[1], where)
        return _softmax_cross_entropy(logits, labels, integer=True)
    if jnp.issubdtype(labels_dtype, jnp.floating):
        _same_shape(logits, labels, ("logits", "one-hot labels"), where)
        _checks.check_in_unit_interval(labels, "one-hot (or probability) labels", where)
        return _softmax_cross_entropy(logits, labels, integer=False)
    raise TypeError(
        f"{where}: labels must be integer class indices or floating one-hot targets, "
        f"got dtype {labels_dtype}"
    )


@compiled_when_eager()
def _softmax_cross_entropy(logits, labels, integer: bool):
    if integer:
        per_example = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    else:
        per_example = optax.softmax_cross_entropy(logits, labels)
    return jnp.mean(per_example)



# ---------------------------------------------------------------------------------------
# Their rules
# ---------------------------------------------------------------------------------------


def _per_example_scale(y: jax.Array) -> float:
    return 1.0 if y.ndim == 0 else 1.0 / y.shape[0]


class PairResiduals(NamedTuple):
    y: jax.Array
    target: jax.Array


def quadratic_fwd(y: jax.Array, target: jax.Array):
    """``(quadratic(y, target), residuals)``."""
    return quadratic(y, target), PairResiduals(y, target)


def quadratic_bwd(res: PairResiduals, g: jax.Array):
    """``(g (y - y*) / N, -g (y - y*) / N)``."""
    d = (res.y - res.target) * (g * _per_example_scale(res.y))
    return d, -d


def binary_cross_entropy_fwd(p: jax.Array, target: jax.Array):
    """``(binary_cross_entropy(p, target), residuals)``."""
    return binary_cross_entropy(p, target), PairResiduals(p, target)


def binary_cross_entropy_bwd(res: PairResiduals, g: jax.Array):
    """``(dL/dp, dL/dtarget)``; a term whose log is clamped contributes 0."""
    p, t = res.y, res.target
    scale = g * _per_example_scale(p)
    log_p, log_1mp = jnp.log(p), jnp.log1p(-p)
    live_p, live_1mp = log_p > LOG_CLAMP, log_1mp > LOG_CLAMP
    zero = jnp.zeros((), p.dtype)
    dp = jnp.where(live_p, -t / p, zero) + jnp.where(live_1mp, (1.0 - t) / (1.0 - p), zero)
    clamp = jnp.asarray(LOG_CLAMP, p.dtype)
    dt = -jnp.where(live_p, log_p, clamp) + jnp.where(live_1mp, log_1mp, clamp)
    return dp * scale, dt * scale


def binary_cross_entropy_with_logits_fwd(logits: jax.Array, target: jax.Array):
    """``(binary_cross_entropy_with_logits(logits, target), residuals)``."""
    return binary_cross_entropy_with_logits(logits, target), PairResiduals(logits, target)


def binary_cross_entropy_with_logits_bwd(res: PairResiduals, g: jax.Array):
    """``((sigma(z) - y*) g / N, -z g / N)``."""
    scale = g * _per_example_scale(res.y)
    return (jax.nn.sigmoid(res.y) - res.target) * scale, -res.y * scale


class SoftmaxCEResiduals(NamedTuple):
    log_probs: jax.Array  # (N, K) log_softmax(logits)
    labels: jax.Array  # (N,) int or (N, K) float


def softmax_cross_entropy_fwd(logits: jax.Array, labels: jax.Array):
    """``(softmax_cross_entropy(logits, labels), residuals)``."""
    loss = softmax_cross_entropy(logits, labels)
    return loss, SoftmaxCEResiduals(jax.nn.log_softmax(logits, axis=-1), labels)


def softmax_cross_entropy_bwd(res: SoftmaxCEResiduals, g: jax.Array):
    """``((softmax - onehot) g / N, dL/dlabels)``; integer labels get ``None``."""
    log_probs, labels = res.log_probs, res.labels
    scale = g / log_probs.shape[0]
    probs = jnp.exp(log_probs)
    if jnp.issubdtype(labels.dtype, jnp.integer):
        onehot = labels[:, None] == jnp.arange(log_probs.shape[1])
        return (probs - onehot.astype(probs.dtype)) * scale, None
    dz = probs * jnp.sum(labels, axis=1, keepdims=True) - labels
    return dz * scale, -log_probs * scale


RULES = {
    quadratic: Rule(quadratic_fwd, quadratic_bwd, ("y", "target")),
    binary_cross_entropy: Rule(
        binary_cross_entropy_fwd, binary_cross_entropy_bwd, ("p", "target")
    ),
    binary_cross_entropy_with_logits: Rule(
        binary_cross_entropy_with_logits_fwd, binary_cross_entropy_with_logits_bwd,
        ("logits", "target"),
    ),
    softmax_cross_entropy: Rule(
        softmax_cross_entropy_fwd, softmax_cross_entropy_bwd, ("logits", "labels")
    ),
}

