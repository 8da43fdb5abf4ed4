"""Activations: elementwise (sigmoid, tanh, ReLU, any ``fn``) and the softmax family.

=============  ==============================================  ========================
op             forward                                         ``dL/dx``
=============  ==============================================  ========================
sigmoid        ``s = 1 / (1 + e^-x)``                          ``g s (1 - s)``
tanh           ``t = tanh x``                                  ``g (1 - t^2)``
relu           ``max(0, x)``                                   ``g [x > 0]`` (0 at 0)
gelu           ``x Phi(x)``                                    ``g (Phi(x) + x phi(x))``
gelu (tanh)    ``x (1 + tanh u) / 2``, ``u = c (x + a x^3)``    see :func:`gelu_bwd`
softmax        ``y = e^x / sum e^x``                           ``y (g - sum(g y))``
log_softmax    ``z = x - logsumexp x``                         ``g - e^z sum(g)``
=============  ==============================================  ========================

Conventions pinned by the tests: ``relu'(0) = 0`` (as ``jax.nn.relu``); softmax and
log-softmax act on ``axis=-1`` by default and are invariant to adding a constant. The
softmax Jacobian is ``dy_k/dx_l = y_k (delta_kl - y_l)``; contracted with ``g`` it is the
vector formula above, so no ``K x K`` matrix is built.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Callable
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp

from funcnet import _checks
from funcnet._eager import compiled_when_eager
from funcnet.nn.base import (
    RF,
    FallbackResiduals,
    Layer,
    OpLayer,
    Rule,
    Shape,
    downcast,
    static,
    upcast,
)

# ---------------------------------------------------------------------------------------
# The ops
# ---------------------------------------------------------------------------------------


def _input(x, where: str) -> jax.Array:
    x = _checks.as_array(x, "input x", where)
    _checks.check_floating(x, "input x", where)
    return x


def _axis(x: jax.Array, axis, where: str) -> int:
    if isinstance(axis, bool):
        raise TypeError(f"{where}: axis must be an int, got {axis!r}")
    try:
        axis = operator.index(axis)
    except TypeError:
        raise TypeError(f"{where}: axis must be an int, got {axis!r}") from None
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(
            f"{where}: axis {axis} is out of range for an input of shape {x.shape} "
            f"(rank {x.ndim})"
        )
    return axis


def sigmoid(x: jax.Array) -> jax.Array:
    """``sigma(x) = 1 / (1 + exp(-x))``; ``sigma' = sigma (1 - sigma)``."""
    return jax.nn.sigmoid(_input(x, "sigmoid"))


def tanh(x: jax.Array) -> jax.Array:
    """Hyperbolic tangent; ``tanh' = 1 - tanh^2``."""
    return jnp.tanh(_input(x, "tanh"))


def relu(x: jax.Array) -> jax.Array:
    """``max(0, x)``; its derivative at 0 is taken to be 0."""
    return jax.nn.relu(_input(x, "relu"))


def _approximate(value, where: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{where}: approximate must be True or False, got {value!r}")
    return value


_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_GELU_A = 0.044715  # the cubic coefficient of the tanh approximation


@compiled_when_eager()
def gelu(x: jax.Array, approximate: bool = False) -> jax.Array:
    """Gaussian error linear unit ``x Phi(x)`` (Hendrycks & Gimpel, 2016).

    ``approximate=False`` (default, as PyTorch's ``nn.GELU()`` and
    ``jax.nn.gelu(approximate=False)``): the exact ``x (1 + erf(x / sqrt 2)) / 2``.
    ``approximate=True``: ``x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) / 2`` (PyTorch's
    ``approximate="tanh"``, ``jax.nn.gelu``'s default). Shape-preserving.
    """
    x = _input(x, "gelu")
    return jax.nn.gelu(x, approximate=_approximate(approximate, "gelu"))


@compiled_when_eager()
def softmax(x: jax.Array, axis: int = -1) -> jax.Array:
    """``y_k = exp(b_k) / sum_l exp(b_l)`` along ``axis`` (computed shift-stably).

    A bfloat16 / float16 ``x`` is normalised in float32 and ``y`` keeps ``x``'s dtype
    (PyTorch's autocast runs softmax in float32 too)."""
    x = _input(x, "softmax")
    return downcast(jax.nn.softmax(upcast(x), axis=_axis(x, axis, "softmax")), x)


@compiled_when_eager()
def log_softmax(x: jax.Array, axis: int = -1) -> jax.Array:
    """``log softmax(x)`` along ``axis``, finite for logits of any magnitude (in float32
    for a bfloat16 / float16 ``x``, the result in ``x``'s dtype)."""
    x = _input(x, "log_softmax")
    return downcast(jax.nn.log_softmax(upcast(x), axis=_axis(x, axis, "log_softmax")), x)


# ---------------------------------------------------------------------------------------
# Their rules
# ---------------------------------------------------------------------------------------


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
    y = sigmoid(x)
    return y, OutputResiduals(y)


def sigmoid_bwd(res: OutputResiduals, g: jax.Array):
    """``(g sigma (1 - sigma),)``."""
    return (g * res.y * (1 - res.y),)


def tanh_fwd(x: jax.Array):
    """``(tanh(x), residuals)``."""
    y = tanh(x)
    return y, OutputResiduals(y)


def tanh_bwd(res: OutputResiduals, g: jax.Array):
    """``(g (1 - tanh^2),)``."""
    return (g * (1 - res.y * res.y),)


def relu_fwd(x: jax.Array):
    """``(relu(x), residuals)``."""
    return relu(x), InputResiduals(x)


def relu_bwd(res: InputResiduals, g: jax.Array):
    """``(g [x > 0],)``: the derivative at exactly 0 is 0, as ``jax.nn.relu``."""
    return (jnp.where(res.x > 0, g, jnp.zeros((), g.dtype)),)


@static
class GeluForm:
    approximate: bool


class GeluResiduals(NamedTuple):
    x: jax.Array
    form: GeluForm  # static: exact erf or tanh approximation


def gelu_fwd(x: jax.Array, approximate: bool = False):
    """``(gelu(x, approximate), residuals)``."""
    return gelu(x, approximate), GeluResiduals(x, GeluForm(approximate))


def gelu_bwd(res: GeluResiduals, g: jax.Array):
    """``(g gelu'(x),)``.

    Exact: ``gelu'(x) = Phi(x) + x phi(x)``, ``phi(x) = exp(-x^2 / 2) / sqrt(2 pi)``.
    Tanh form, ``t = tanh(u)``, ``u = c (x + a x^3)``, ``c = sqrt(2/pi)``, ``a = 0.044715``:
    ``gelu'(x) = (1 + t) / 2 + x (1 - t^2) c (1 + 3 a x^2) / 2``.
    """
    x = res.x
    if res.form.approximate:
        t = jnp.tanh(_SQRT_2_OVER_PI * (x + _GELU_A * x**3))
        d = 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * _SQRT_2_OVER_PI * (1 + 3 * _GELU_A * x * x)
    else:
        cdf = 0.5 * (1 + jax.lax.erf(x / math.sqrt(2.0)))
        pdf = jnp.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
        d = cdf + x * pdf
    return ((g * d).astype(x.dtype),)


def softmax_fwd(x: jax.Array, axis: int = -1):
    """``(softmax(x, axis), residuals)``."""
    y = softmax(x, axis=axis)
    return y, AxisResiduals(y, Axis(axis))


def softmax_bwd(res: AxisResiduals, g: jax.Array):
    """``(y (g - sum(g y)),)`` along the softmax axis (float32 inside for bfloat16)."""
    y, axis = upcast(res.y), res.axis.axis
    g32 = upcast(g)
    return (downcast(y * (g32 - jnp.sum(g32 * y, axis=axis, keepdims=True)), g, res.y),)


def log_softmax_fwd(x: jax.Array, axis: int = -1):
    """``(log_softmax(x, axis), residuals)``."""
    z = log_softmax(x, axis=axis)
    return z, AxisResiduals(z, Axis(axis))


def log_softmax_bwd(res: AxisResiduals, g: jax.Array):
    """``(g - softmax(x) sum(g),)`` along the axis; ``softmax = exp(log_softmax)``."""
    z, axis = upcast(res.y), res.axis.axis
    g32 = upcast(g)
    return (downcast(g32 - jnp.exp(z) * jnp.sum(g32, axis=axis, keepdims=True), g, res.y),)


RULES = {
    sigmoid: Rule(sigmoid_fwd, sigmoid_bwd, ("x",)),
    tanh: Rule(tanh_fwd, tanh_bwd, ("x",)),
    relu: Rule(relu_fwd, relu_bwd, ("x",)),
    gelu: Rule(gelu_fwd, gelu_bwd, ("x",)),
    softmax: Rule(softmax_fwd, softmax_bwd, ("x",)),
    log_softmax: Rule(log_softmax_fwd, log_softmax_bwd, ("x",)),
}



# ---------------------------------------------------------------------------------------
# The layers
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, repr=False)
class _Elementwise(OpLayer):
    """An elementwise op: the output unit sees what its input unit saw."""

    #: ``(FLOPs, transcendentals)`` per element (the counting convention of ``summary``).
    cost: ClassVar[tuple[int, int]] = (0, 0)

    def flops(self, input_shape: Shape) -> tuple[int, int]:
        n = math.prod(input_shape)
        return self.cost[0] * n, self.cost[1] * n

    def receptive_field(self, input_shape: Shape, rf: RF) -> RF:
        return rf


@dataclasses.dataclass(frozen=True, repr=False)
class Sigmoid(_Elementwise):
    """``1 / (1 + exp(-x))`` elementwise."""

    op = staticmethod(sigmoid)
    rule = RULES[sigmoid]
    cost = (3, 1)


@dataclasses.dataclass(frozen=True, repr=False)
class Tanh(_Elementwise):
    """``tanh(x)`` elementwise."""

    op = staticmethod(tanh)
    rule = RULES[tanh]
    cost = (0, 1)


@dataclasses.dataclass(frozen=True, repr=False)
class ReLU(_Elementwise):
    """``max(0, x)`` elementwise (derivative 0 at 0)."""

    op = staticmethod(relu)
    rule = RULES[relu]
    cost = (1, 0)


@dataclasses.dataclass(frozen=True, repr=False)
class GELU(_Elementwise):
    """``x Phi(x)`` elementwise: exact (erf, default, as PyTorch's ``nn.GELU()``) or, with
    ``approximate=True``, the tanh approximation (``jax.nn.gelu``'s default).

    FLOPs per element: exact ``x / sqrt 2``, ``1 +``, ``* x``, ``* 0.5``: 4 and one
    ``erf``; tanh form: ``x^3`` 2, ``* a`` 1, ``+ x`` 1, ``* c`` 1, ``1 +`` 1, ``* x`` 1,
    ``* 0.5`` 1: 8 and one ``tanh``.
    """

    approximate: bool = False
    op = staticmethod(gelu)
    rule = RULES[gelu]

    def __post_init__(self):
        _approximate(self.approximate, type(self).__name__)

    def hyper(self):
        return {"approximate": self.approximate}

    @property
    def cost(self) -> tuple[int, int]:  # type: ignore[override]
        return (8, 1) if self.approximate else (4, 1)


def _gelu_tanh_fwd(x: jax.Array):
    return gelu_fwd(x, approximate=True)


# Activation(fn) with one of these functions uses its hand rule; jax.nn.gelu's default is
# the tanh approximation, funcnet's gelu's the exact form.
_KNOWN: dict[Callable, Rule] = {
    relu: ReLU.rule,
    jax.nn.relu: ReLU.rule,
    sigmoid: Sigmoid.rule,
    jax.nn.sigmoid: Sigmoid.rule,
    tanh: Tanh.rule,
    jnp.tanh: Tanh.rule,
    gelu: GELU.rule,
    jax.nn.gelu: Rule(_gelu_tanh_fwd, gelu_bwd, ("x",)),
}


@dataclasses.dataclass(frozen=True, repr=False)
class Activation(Layer):
    """Any elementwise function ``fn(x)`` (shape-preserving), e.g. ``jax.nn.gelu``.

    Back-propagation uses the hand rule when ``fn`` is one of funcnet's activations (or
    its ``jax.nn`` twin) and otherwise ``jax.vjp`` of ``fn``: an arbitrary user function
    has no hand rule.
    """

    fn: Callable[[jax.Array], jax.Array]

    def __post_init__(self):
        if not callable(self.fn):
            raise TypeError(f"Activation: fn must be callable, got {self.fn!r}")

    def _checked(self, x, y):
        if jnp.shape(y) != x.shape:
            raise ValueError(
                f"{self!r}: fn must be elementwise (shape-preserving); it mapped {x.shape} "
                f"to {jnp.shape(y)}"
            )
        return y

    def forward(self, params, state, x, *, key=None, train=False):
        return self._checked(x, self.fn(x)), state

    def fwd(self, params, state, x, *, key=None, train=False):
        rule = _KNOWN.get(self.fn)
        if rule is not None:
            y, res = rule.fwd(x)
            return y, state, res
        y, vjp_fn = jax.vjp(self.fn, x)
        return self._checked(x, y), state, FallbackResiduals(vjp_fn)

    def bwd(self, res, g, need_dx):
        if not need_dx:
            return None, {}
        if isinstance(res, FallbackResiduals):
            return res.vjp_fn(g)[0], {}
        return _KNOWN[self.fn].bwd(res, g)[0], {}

    def receptive_field(self, input_shape: Shape, rf: RF) -> RF:
        return rf


@dataclasses.dataclass(frozen=True, repr=False)
class _AxisLayer(OpLayer):
    axis: int = -1

    def __post_init__(self):
        if isinstance(self.axis, bool):
            raise TypeError(f"{type(self).__name__}: axis must be an int, got {self.axis!r}")
        try:
            object.__setattr__(self, "axis", operator.index(self.axis))
        except TypeError:
            raise TypeError(
                f"{type(self).__name__}: axis must be an int, got {self.axis!r}"
            ) from None

    def batched_axis(self, shape: Shape) -> int:
        """The axis as a non-negative index into the batched input ``(N, *shape)``."""
        rank = len(shape) + 1
        ax = self.axis + rank if self.axis < 0 else self.axis
        if not 1 <= ax < rank:
            raise ValueError(
                f"{self!r}: axis {self.axis} is not a feature axis of a batched input of "
                f"shape (N, *{shape}) (axis 0, or {-rank}, is the batch)"
            )
        return ax

    def output_shape(self, input_shape: Shape) -> Shape:
        shape = super().output_shape(input_shape)
        _checks.check_features(shape, repr(self))
        self.batched_axis(shape)
        return shape

    def hyper(self):
        return {"axis": self.axis}

    def flops(self, input_shape: Shape) -> tuple[int, int]:
        n = math.prod(input_shape)
        return 4 * n, n

    def receptive_field(self, input_shape: Shape, rf: RF) -> RF:
        if not rf.tracked:
            return rf
        axis = self.batched_axis(input_shape) - 1
        if not rf.grid:
            return rf.whole()
        if axis < len(rf.extent) and len(input_shape) > 1 and axis != len(input_shape) - 1:
            return rf.whole([axis])
        return rf


@dataclasses.dataclass(frozen=True, repr=False)
class Softmax(_AxisLayer):
    """``y_k = exp(b_k) / sum_l exp(b_l)`` along ``axis`` (default the last)."""

    op = staticmethod(softmax)
    rule = RULES[softmax]


@dataclasses.dataclass(frozen=True, repr=False)
class LogSoftmax(_AxisLayer):
    """``log softmax`` along ``axis`` (default the last)."""

    op = staticmethod(log_softmax)
    rule = RULES[log_softmax]
