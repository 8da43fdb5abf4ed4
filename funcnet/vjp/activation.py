"""Backward rules of :mod:`funcnet.ops.activation`.

=============  ==============================================  ========================
op             forward                                         ``dL/dx``
=============  ==============================================  ========================
sigmoid        ``s = 1 / (1 + e^-x)``                          ``g s (1 - s)``
tanh           ``t = tanh x``                                  ``g (1 - t^2)``
relu           ``max(0, x)``                                   ``g [x > 0]`` (0 at 0)
softmax        ``y = e^x / sum e^x``                           ``y (g - sum(g y))``
log_softmax    ``z = x - logsumexp x``                         ``g - e^z sum(g)``
=============  ==============================================  ========================

The softmax Jacobian is ``dy_k/dx_l = y_k (delta_kl - y_l)``; contracted with ``g`` it is
the vector formula above, so no ``K x K`` matrix is built.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from funcnet import ops
from funcnet.vjp._common import Rule, static


class OutputResiduals(NamedTuple):
    y: jax.Array  # the output: sigmoid, tanh, softmax and log-softmax need only that


class InputResiduals(NamedTuple):
    x: jax.Array


@static
class Axis:
    axis: int


class AxisResiduals(NamedTuple):
    y: jax.Array
    axis: Axis


def sigmoid_fwd(x: jax.Array):
    """``(sigma(x), residuals)``."""
    y = ops.sigmoid(x)
    return y, OutputResiduals(y)


def sigmoid_bwd(res: OutputResiduals, g: jax.Array):
    """``(g sigma (1 - sigma),)``."""
    return (g * res.y * (1 - res.y),)


def tanh_fwd(x: jax.Array):
    """``(tanh(x), residuals)``."""
    y = ops.tanh(x)
    return y, OutputResiduals(y)


def tanh_bwd(res: OutputResiduals, g: jax.Array):
    """``(g (1 - tanh^2),)``."""
    return (g * (1 - res.y * res.y),)


def relu_fwd(x: jax.Array):
    """``(relu(x), residuals)``."""
    return ops.relu(x), InputResiduals(x)


def relu_bwd(res: InputResiduals, g: jax.Array):
    """``(g [x > 0],)``: the derivative at exactly 0 is 0, as ``jax.nn.relu``."""
    return (jnp.where(res.x > 0, g, jnp.zeros((), g.dtype)),)


def softmax_fwd(x: jax.Array, axis: int = -1):
    """``(softmax(x, axis), residuals)``."""
    y = ops.softmax(x, axis=axis)
    return y, AxisResiduals(y, Axis(axis))


def softmax_bwd(res: AxisResiduals, g: jax.Array):
    """``(y (g - sum(g y)),)`` along the softmax axis."""
    y, axis = res.y, res.axis.axis
    return (y * (g - jnp.sum(g * y, axis=axis, keepdims=True)),)


def log_softmax_fwd(x: jax.Array, axis: int = -1):
    """``(log_softmax(x, axis), residuals)``."""
    z = ops.log_softmax(x, axis=axis)
    return z, AxisResiduals(z, Axis(axis))


def log_softmax_bwd(res: AxisResiduals, g: jax.Array):
    """``(g - softmax(x) sum(g),)`` along the axis; ``softmax = exp(log_softmax)``."""
    z, axis = res.y, res.axis.axis
    return (g - jnp.exp(z) * jnp.sum(g, axis=axis, keepdims=True),)


RULES = {
    ops.sigmoid: Rule(sigmoid_fwd, sigmoid_bwd, ("x",)),
    ops.tanh: Rule(tanh_fwd, tanh_bwd, ("x",)),
    ops.relu: Rule(relu_fwd, relu_bwd, ("x",)),
    ops.softmax: Rule(softmax_fwd, softmax_bwd, ("x",)),
    ops.log_softmax: Rule(log_softmax_fwd, log_softmax_bwd, ("x",)),
}
