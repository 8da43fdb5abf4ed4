"""Backward rules of :mod:`funcnet.losses`; each loss is the batch mean of a per-example
sum, so every gradient carries a ``1 / N`` (``N`` = size of axis 0).

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
derivative of that term is 0.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from funcnet import losses
from funcnet.vjp._common import Rule


def _per_example_scale(y: jax.Array) -> float:
    return 1.0 if y.ndim == 0 else 1.0 / y.shape[0]


class PairResiduals(NamedTuple):
    y: jax.Array
    target: jax.Array


def quadratic_fwd(y: jax.Array, target: jax.Array):
    """``(quadratic(y, target), residuals)``."""
    return losses.quadratic(y, target), PairResiduals(y, target)


def quadratic_bwd(res: PairResiduals, g: jax.Array):
    """``(g (y - y*) / N, -g (y - y*) / N)``."""
    d = (res.y - res.target) * (g * _per_example_scale(res.y))
    return d, -d


def binary_cross_entropy_fwd(p: jax.Array, target: jax.Array):
    """``(binary_cross_entropy(p, target), residuals)``."""
    return losses.binary_cross_entropy(p, target), PairResiduals(p, target)


def binary_cross_entropy_bwd(res: PairResiduals, g: jax.Array):
    """``(dL/dp, dL/dtarget)``; a term whose log is clamped contributes 0."""
    p, t = res.y, res.target
    scale = g * _per_example_scale(p)
    log_p, log_1mp = jnp.log(p), jnp.log1p(-p)
    live_p, live_1mp = log_p > losses.LOG_CLAMP, log_1mp > losses.LOG_CLAMP
    zero = jnp.zeros((), p.dtype)
    dp = jnp.where(live_p, -t / p, zero) + jnp.where(live_1mp, (1.0 - t) / (1.0 - p), zero)
    clamp = jnp.asarray(losses.LOG_CLAMP, p.dtype)
    dt = -jnp.where(live_p, log_p, clamp) + jnp.where(live_1mp, log_1mp, clamp)
    return dp * scale, dt * scale


def binary_cross_entropy_with_logits_fwd(logits: jax.Array, target: jax.Array):
    """``(binary_cross_entropy_with_logits(logits, target), residuals)``."""
    return losses.binary_cross_entropy_with_logits(logits, target), PairResiduals(logits, target)


def binary_cross_entropy_with_logits_bwd(res: PairResiduals, g: jax.Array):
    """``((sigma(z) - y*) g / N, -z g / N)``."""
    scale = g * _per_example_scale(res.y)
    return (jax.nn.sigmoid(res.y) - res.target) * scale, -res.y * scale


class SoftmaxCEResiduals(NamedTuple):
    log_probs: jax.Array  # (N, K) log_softmax(logits)
    labels: jax.Array  # (N,) int or (N, K) float


def softmax_cross_entropy_fwd(logits: jax.Array, labels: jax.Array):
    """``(softmax_cross_entropy(logits, labels), residuals)``."""
    loss = losses.softmax_cross_entropy(logits, labels)
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
    losses.quadratic: Rule(quadratic_fwd, quadratic_bwd, ("y", "target")),
    losses.binary_cross_entropy: Rule(
        binary_cross_entropy_fwd, binary_cross_entropy_bwd, ("p", "target")
    ),
    losses.binary_cross_entropy_with_logits: Rule(
        binary_cross_entropy_with_logits_fwd, binary_cross_entropy_with_logits_bwd,
        ("logits", "target"),
    ),
    losses.softmax_cross_entropy: Rule(
        softmax_cross_entropy_fwd, softmax_cross_entropy_bwd, ("logits", "labels")
    ),
}
