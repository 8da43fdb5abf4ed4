"""The lecture's scalar gates, each with its hand-written rule, for the worked examples.

==========  ===================  ======================================================
gate        forward              backward (upstream ``g``) — the slides' pattern
==========  ===================  ======================================================
add         ``x + y``            ``(g, g)``: the *distributor*
copy        ``x -> (x, x)``      ``g1 + g2``: fan-out is a gradient *adder*
multiply    ``x y``              ``(g y, g x)``: the *swap multiplier*
maximum     ``max(x, y)``        ``(g, 0)`` if ``x >= y`` else ``(0, g)``: the *router*
exp         ``e^x``              ``g e^x``
reciprocal  ``1 / x``            ``-g / x^2``
add_const   ``c + x``            ``g`` for ``x`` (and ``g`` for ``c``)
scale       ``a x``              ``g a`` for ``x`` (and ``g x`` for ``a``)
sigmoid     ``1 / (1 + e^-x)``   ``g sigma (1 - sigma)``
==========  ===================  ======================================================

Ties in ``maximum`` go to the first argument. They work elementwise on arrays too.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from funcnet.nn.base import Rule


def add(x, y):
    return x + y


def copy(x):
    return x, x


def multiply(x, y):
    return x * y


def maximum(x, y):
    return jnp.maximum(x, y)


def exp(x):
    return jnp.exp(x)


def reciprocal(x):
    return 1.0 / x


def add_const(x, c):
    return c + x


def scale(x, a):
    return a * x


def sigmoid(x):
    return jax.nn.sigmoid(x)


class NoResiduals(NamedTuple):
    pass


class XY(NamedTuple):
    x: jax.Array
    y: jax.Array


class Out(NamedTuple):
    out: jax.Array


class In(NamedTuple):
    x: jax.Array


def add_fwd(x, y):
    return add(x, y), NoResiduals()


def add_bwd(res, g):
    """Distributor: both inputs get the upstream gradient unchanged."""
    return g, g


def copy_fwd(x):
    return copy(x), NoResiduals()


def copy_bwd(res, g):
    """Adder: the gradients of the two copies add up. ``g`` is a pair ``(g1, g2)``."""
    g1, g2 = g
    return (g1 + g2,)


def multiply_fwd(x, y):
    return multiply(x, y), XY(x, y)


def multiply_bwd(res, g):
    """Swap multiplier: each input gets ``g`` times the *other* input."""
    return g * res.y, g * res.x


def maximum_fwd(x, y):
    return maximum(x, y), XY(x, y)


def maximum_bwd(res, g):
    """Router: the larger input (the first on a tie) gets ``g``, the other 0."""
    first = res.x >= res.y
    zero = jnp.zeros_like(g)
    return jnp.where(first, g, zero), jnp.where(first, zero, g)


def exp_fwd(x):
    y = exp(x)
    return y, Out(y)


def exp_bwd(res, g):
    return (g * res.out,)


def reciprocal_fwd(x):
    return reciprocal(x), In(x)


def reciprocal_bwd(res, g):
    return (-g / (res.x * res.x),)


def add_const_fwd(x, c):
    return add_const(x, c), NoResiduals()


def add_const_bwd(res, g):
    return g, g


def scale_fwd(x, a):
    return scale(x, a), XY(x, a)


def scale_bwd(res, g):
    return g * res.y, g * res.x


def sigmoid_fwd(x):
    y = sigmoid(x)
    return y, Out(y)


def sigmoid_bwd(res, g):
    return (g * res.out * (1.0 - res.out),)


RULES = {
    add: Rule(add_fwd, add_bwd, ("x", "y")),
    copy: Rule(copy_fwd, copy_bwd, ("x",)),
    multiply: Rule(multiply_fwd, multiply_bwd, ("x", "y")),
    maximum: Rule(maximum_fwd, maximum_bwd, ("x", "y")),
    exp: Rule(exp_fwd, exp_bwd, ("x",)),
    reciprocal: Rule(reciprocal_fwd, reciprocal_bwd, ("x",)),
    add_const: Rule(add_const_fwd, add_const_bwd, ("x", "c")),
    scale: Rule(scale_fwd, scale_bwd, ("x", "a")),
    sigmoid: Rule(sigmoid_fwd, sigmoid_bwd, ("x",)),
}
