"""Normalization: batch norm, layer norm and local response norm (AlexNet's LRN).

With ``x_hat = (x - mu) / sigma``, ``sigma = sqrt(var + epsilon)``, the normalizing layers
output ``y = scale * x_hat + bias``; they differ in the axes the statistics run over:

==================  ==========================================  ==========================
op                  statistics over                             learned ``(C,)`` params
==================  ==========================================  ==========================
batch_norm_train    every axis but the last (batch and space)   ``scale``, ``bias``
batch_norm_eval     none: the running ``mean`` / ``var`` given  ``scale``, ``bias``
layer_norm          the last axis of each example               ``scale``, ``bias``
local_response_norm a window of ``size`` neighbouring channels  none
==================  ==========================================  ==========================

The backward rules, derived by hand through the statistics (means over the normalized
axes, ``n`` elements each):

- **batch norm (training)**: ``dx = (scale / sigma) (g - mean(g) - x_hat mean(g x_hat))``,
  ``dscale = sum(g x_hat)``, ``dbias = sum(g)``: the two means are the gradient flowing
  back through ``mu`` and through ``sigma``.
- **batch norm (evaluation)**: an affine map, ``dx = g scale / sigma``; ``mean`` and
  ``var`` get ``-sum(g) scale / sigma`` and ``-sum(g x_hat) scale / (2 sigma^2)``.
- **layer norm**: the training formula with ``gs = g scale`` in place of ``g`` (the
  scale varies along the normalized axis): ``dx = (gs - mean(gs) - x_hat mean(gs x_hat))
  / sigma``; ``dscale``, ``dbias`` summed over every leading axis.
- **LRN**: ``d = k + alpha/size S``, ``y = x d^-beta``: ``dx_c = g_c d_c^-beta -
  (2 alpha beta / size) x_c sum_{j: c in window(j)} g_j x_j d_j^(-beta-1)``; the sum over
  the windows containing ``c`` is the window sum with its two pads swapped.

Absent ``scale`` / ``bias`` (``None``) are 1 and 0, and their gradients are ``None``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from funcnet import _checks
from funcnet._eager import compiled_when_eager
from funcnet.nn.base import (
    RF,
    Layer,
    OpLayer,
    Rule,
    Shape,
    check_bool,
    check_param_dtype,
    downcast,
    static,
    upcast,
)

# ---------------------------------------------------------------------------------------
# Validation of the hyper-parameters (shared by the ops and the layers)
# ---------------------------------------------------------------------------------------


def _real(value: Any, name: str, where: str, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{where}: {name} must be {what}, got {value!r}")
    return float(value)


def _positive(value: Any, name: str, where: str) -> float:
    out = _real(value, name, where, "a positive number")
    if not out > 0 or not math.isfinite(out):
        raise ValueError(f"{where}: {name} must be a positive number, got {value!r}")
    return out


def _non_negative(value: Any, name: str, where: str) -> float:
    out = _real(value, name, where, "a number >= 0")
    if not out >= 0 or not math.isfinite(out):
        raise ValueError(f"{where}: {name} must be a number >= 0, got {value!r}")
    return out


def _unit_interval(value: Any, name: str, where: str) -> float:
    out = _real(value, name, where, "a number in [0, 1]")
    if not 0.0 <= out <= 1.0:
        raise ValueError(f"{where}: {name} must be a number in [0, 1], got {value!r}")
    return out


def _check_input(x: Any, min_rank: int, layout: str, where: str) -> None:
    _checks.check_floating(x, "input x", where)
    if x.ndim < min_rank:
        raise ValueError(
            f"{where}: expected an input x of rank >= {min_rank} ({layout}), got shape "
            f"{x.shape}"
        )


def _check_channel_vectors(x: jax.Array, where: str, **vectors: jax.Array | None) -> None:
    """Every given vector has shape ``(C,)``, ``C = x.shape[-1]``."""
    for name, v in vectors.items():
        if v is not None and tuple(jnp.shape(v)) != (x.shape[-1],):
            raise ValueError(
                f"{where}: expected {name} of shape ({x.shape[-1]},) (the last axis of x, "
                f"shape {x.shape}), got {tuple(jnp.shape(v))}"
            )


def _affine(x_hat: jax.Array, scale: jax.Array | None, bias: jax.Array | None) -> jax.Array:
    """``scale * x_hat + bias``, skipping an absent (``None``) scale or bias."""
    y = x_hat if scale is None else x_hat * scale
    return y if bias is None else y + bias


def _leading_sum(a: jax.Array) -> jax.Array:
    """``(..., C) -> (C,)``: the sum over every axis but the last."""
    return jnp.sum(a.reshape(-1, a.shape[-1]), axis=0)


def _as(grad: jax.Array | None, like: jax.Array | None) -> jax.Array | None:
    """A cotangent in its primal's dtype (``None`` for an absent argument)."""
    return None if like is None else grad.astype(jnp.result_type(like))


# ---------------------------------------------------------------------------------------
# The batch-norm ops
# ---------------------------------------------------------------------------------------


def batch_moments(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-channel batch mean and *biased* variance over every axis but the last.

    Args:
      x: ``(N, ..., C)``.

    Returns:
      ``(mean, var)``, each ``(C,)``: ``mu = mean(x)``, ``var = mean((x - mu)^2)``
      (two passes, which stays accurate when ``|mu| >> sigma``); in float32 for a
      bfloat16 / float16 ``x`` (mixed precision: the statistics are never low-precision).
    """
    axes = tuple(range(x.ndim - 1))
    x = upcast(x)
    mean = jnp.mean(x, axis=axes)
    var = jnp.mean(jnp.square(x - mean), axis=axes)
    return mean, var


@compiled_when_eager()
def batch_norm_train(
    x: jax.Array,
    scale: jax.Array | None = None,
    bias: jax.Array | None = None,
    epsilon: float = 1e-5,
) -> jax.Array:
    """Batch normalization with the batch's own statistics (training mode).

    Args:
      x: ``(N, ..., C)``: ``(N, C)`` features or ``(N, H, W, C)`` images.
      scale: ``(C,)`` or ``None`` (1).
      bias: ``(C,)`` or ``None`` (0).
      epsilon: added to the variance, ``> 0``.

    Returns:
      ``(N, ..., C)``: ``y = scale (x - mu) / sqrt(var + epsilon) + bias``, with ``mu`` and
      the biased ``var`` per channel over every axis but the last (:func:`batch_moments`).
      A bfloat16 / float16 ``x`` is normalized in float32 and ``y`` keeps its dtype
      (promoted with ``scale`` and ``bias``), as Flax's ``BatchNorm``.
    """
    where = "batch_norm_train"
    _check_input(x, 2, "N, ..., C", where)
    _check_channel_vectors(x, where, scale=scale, bias=bias)
    epsilon = _positive(epsilon, "epsilon", where)
    mean, var = batch_moments(x)
    y = _affine((upcast(x) - mean) * lax.rsqrt(var + epsilon), upcast(scale), upcast(bias))
    return downcast(y, x, scale, bias)


@compiled_when_eager()
def batch_norm_eval(
    x: jax.Array,
    mean: jax.Array,
    var: jax.Array,
    scale: jax.Array | None = None,
    bias: jax.Array | None = None,
    epsilon: float = 1e-5,
) -> jax.Array:
    """Batch normalization with given (running) statistics (evaluation mode).

    Args:
      x: ``(N, ..., C)``.
      mean, var: ``(C,)`` statistics to normalize with.
      scale: ``(C,)`` or ``None`` (1).
      bias: ``(C,)`` or ``None`` (0).
      epsilon: added to the variance, ``> 0``.

    Returns:
      ``(N, ..., C)``: ``y = x a + b`` with the folded per-channel ``a = scale /
      sqrt(var + epsilon)``, ``b = bias - mean a`` (two FLOPs per element). A bfloat16 /
      float16 ``x`` is normalized in float32 and ``y`` keeps its dtype (promoted with
      ``scale`` and ``bias``; the statistics, kept in float32, do not widen it).
    """
    where = "batch_norm_eval"
    _check_input(x, 1, "N, ..., C", where)
    _check_channel_vectors(x, where, mean=mean, var=var, scale=scale, bias=bias)
    epsilon = _positive(epsilon, "epsilon", where)
    mean = upcast(mean)
    a = _affine(lax.rsqrt(upcast(var) + epsilon), upcast(scale), None)
    b = -mean * a if bias is None else upcast(bias) - mean * a
    return downcast(upcast(x) * a + b, x, scale, bias)


# ---------------------------------------------------------------------------------------
# Their rules
# ---------------------------------------------------------------------------------------


class BatchNormTrainResiduals(NamedTuple):
    x_hat: jax.Array  # (N, ..., C) the normalized input
    rstd: jax.Array  # (C,) 1 / sqrt(var + epsilon)
    mean: jax.Array  # (C,) batch mean, for the layer's running update
    var: jax.Array  # (C,) biased batch variance, for the layer's running update
    scale: jax.Array | None  # (C,) or None
    bias: jax.Array | None  # (C,) or None: its presence decides whether dbias is returned


def batch_norm_train_fwd(
    x: jax.Array,
    scale: jax.Array | None = None,
    bias: jax.Array | None = None,
    epsilon: float = 1e-5,
):
    """``(y, residuals)`` of :func:`batch_norm_train`; ``y`` is ``(N, ..., C)``."""
    where = "batch_norm_train"
    _check_input(x, 2, "N, ..., C", where)
    _check_channel_vectors(x, where, scale=scale, bias=bias)
    epsilon = _positive(epsilon, "epsilon", where)
    mean, var = batch_moments(x)
    rstd = lax.rsqrt(var + epsilon)
    x_hat = (upcast(x) - mean) * rstd
    y = downcast(_affine(x_hat, upcast(scale), upcast(bias)), x, scale, bias)
    return y, BatchNormTrainResiduals(downcast(x_hat, x), rstd, mean, var, scale, bias)


def affine_param_grads(x_hat: jax.Array, g: jax.Array, scale, bias):
    """``(dscale, dbias)``: ``sum(g x_hat)`` and ``sum(g)`` over every axis but the last,
    ``(C,)`` each (``None`` for an absent one); summed in float32 for a low-precision
    ``g``, returned in the dtype of ``scale`` / ``bias``."""
    g = upcast(g)
    return _as(_leading_sum(g * upcast(x_hat)), scale), _as(_leading_sum(g), bias)


def batch_norm_train_input_grad(res: BatchNormTrainResiduals, g: jax.Array) -> jax.Array:
    """``dx = (scale / sigma) (g - mean(g) - x_hat mean(g x_hat))``: ``(N, ..., C)``."""
    n = math.prod(g.shape[:-1])
    a = _affine(res.rstd, upcast(res.scale), None)
    g, x_hat = upcast(g), upcast(res.x_hat)  # float32 sums for a low-precision g
    mean_g = _leading_sum(g) / n
    mean_gx = _leading_sum(g * x_hat) / n
    return (a * (g - mean_g - x_hat * mean_gx)).astype(res.x_hat.dtype)


def batch_norm_train_bwd(res: BatchNormTrainResiduals, g: jax.Array):
    """``(dx, dscale, dbias)`` for upstream ``g`` of shape ``(N, ..., C)``."""
    dscale, dbias = affine_param_grads(res.x_hat, g, res.scale, res.bias)
    return batch_norm_train_input_grad(res, g), dscale, dbias


class BatchNormEvalResiduals(NamedTuple):
    x: jax.Array  # (N, ..., C)
    mean: jax.Array  # (C,)
    rstd: jax.Array  # (C,) 1 / sqrt(var + epsilon)
    var: jax.Array  # (C,) kept for its dtype (dvar's)
    scale: jax.Array | None  # (C,) or None
    bias: jax.Array | None  # (C,) or None


def batch_norm_eval_fwd(
    x: jax.Array,
    mean: jax.Array,
    var: jax.Array,
    scale: jax.Array | None = None,
    bias: jax.Array | None = None,
    epsilon: float = 1e-5,
):
    """``(y, residuals)`` of :func:`batch_norm_eval`; ``y`` is ``(N, ..., C)``."""
    y = batch_norm_eval(x, mean, var, scale, bias, epsilon)
    rstd = lax.rsqrt(upcast(var) + _positive(epsilon, "epsilon", "batch_norm_eval"))
    return y, BatchNormEvalResiduals(x, mean, rstd, var, scale, bias)


def batch_norm_eval_bwd(res: BatchNormEvalResiduals, g: jax.Array):
    """``(dx, dmean, dvar, dscale, dbias)`` for upstream ``g`` of shape ``(N, ..., C)``.

    ``dx = g a`` (``a = scale / sigma``), ``dmean = -a sum(g)``,
    ``dvar = -scale / (2 sigma^2) sum(g x_hat)``, ``dscale = sum(g x_hat)``,
    ``dbias = sum(g)``.
    """
    a = _affine(res.rstd, upcast(res.scale), None)
    x_hat = (upcast(res.x) - upcast(res.mean)) * res.rstd
    g = upcast(g)
    sum_g = _leading_sum(g)
    sum_gx = _leading_sum(g * x_hat)
    dx = (g * a).astype(res.x.dtype)
    dmean = _as(-a * sum_g, res.mean)
    dvar = _as(-0.5 * a * res.rstd * sum_gx, res.var)
    return dx, dmean, dvar, _as(sum_gx, res.scale), _as(sum_g, res.bias)


# ---------------------------------------------------------------------------------------
# Layer norm: the op and its rule
# ---------------------------------------------------------------------------------------


@compiled_when_eager()
def layer_norm(
    x: jax.Array,
    scale: jax.Array | None = None,
    bias: jax.Array | None = None,
    epsilon: float = 1e-5,
) -> jax.Array:
    """Layer normalization: each position normalized over its last axis.

    Args:
      x: ``(..., C)``; every leading axis (batch, space) is kept apart.
      scale: ``(C,)`` or ``None`` (1).
      bias: ``(C,)`` or ``None`` (0).
      epsilon: added to the variance, ``> 0``.

    Returns:
      ``(..., C)``: ``y = scale (x - mu) / sqrt(var + epsilon) + bias``, ``mu`` and the
      biased ``var`` over the last axis (PyTorch's ``nn.LayerNorm(C)``, Flax's
      ``LayerNorm``). A bfloat16 / float16 ``x`` is normalized in float32 and ``y`` keeps
      its dtype (promoted with ``scale`` and ``bias``), as Flax's ``LayerNorm``.
    """
    where = "layer_norm"
    _check_input(x, 1, "..., C", where)
    _check_channel_vectors(x, where, scale=scale, bias=bias)
    epsilon = _positive(epsilon, "epsilon", where)
    x32 = upcast(x)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = _affine((x32 - mean) * lax.rsqrt(var + epsilon), upcast(scale), upcast(bias))
    return downcast(y, x, scale, bias)


class LayerNormResiduals(NamedTuple):
    x_hat: jax.Array  # (..., C)
    rstd: jax.Array  # (..., 1)
    scale: jax.Array | None  # (C,) or None
    bias: jax.Array | None  # (C,) or None


def layer_norm_fwd(
    x: jax.Array,
    scale: jax.Array | None = None,
    bias: jax.Array | None = None,
    epsilon: float = 1e-5,
):
    """``(y, residuals)`` of :func:`layer_norm`; ``y`` is ``(..., C)``."""
    where = "layer_norm"
    _check_input(x, 1, "..., C", where)
    _check_channel_vectors(x, where, scale=scale, bias=bias)
    epsilon = _positive(epsilon, "epsilon", where)
    x32 = upcast(x)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    rstd = lax.rsqrt(var + epsilon)
    x_hat = (x32 - mean) * rstd
    y = downcast(_affine(x_hat, upcast(scale), upcast(bias)), x, scale, bias)
    return y, LayerNormResiduals(downcast(x_hat, x), rstd, scale, bias)


def layer_norm_input_grad(res: LayerNormResiduals, g: jax.Array) -> jax.Array:
    """``dx = (gs - mean(gs) - x_hat mean(gs x_hat)) / sigma``, ``gs = g scale``: ``(..., C)``."""
    gs = _affine(upcast(g), upcast(res.scale), None)  # float32 for a low-precision g
    x_hat = upcast(res.x_hat)
    mean_gs = jnp.mean(gs, axis=-1, keepdims=True)
    mean_gsx = jnp.mean(gs * x_hat, axis=-1, keepdims=True)
    return (res.rstd * (gs - mean_gs - x_hat * mean_gsx)).astype(res.x_hat.dtype)


def layer_norm_bwd(res: LayerNormResiduals, g: jax.Array):
    """``(dx, dscale, dbias)`` for upstream ``g`` of shape ``(..., C)``."""
    dscale, dbias = affine_param_grads(res.x_hat, g, res.scale, res.bias)
    return layer_norm_input_grad(res, g), dscale, dbias


# ---------------------------------------------------------------------------------------
# Local response normalization: the op and its rule
# ---------------------------------------------------------------------------------------


def _window_sum(u: jax.Array, lo: int, hi: int) -> jax.Array:
    """``s_c = sum_{c' = c - lo}^{c + hi} u_{c'}`` over the last axis, zero outside."""
    ones = (1,) * u.ndim
    return lax.reduce_window(
        u, np.array(0, u.dtype), lax.add, (*ones[:-1], lo + hi + 1), ones,
        [(0, 0)] * (u.ndim - 1) + [(lo, hi)],
    )


def _lrn_hyper(size, alpha, beta, k, where):
    return (
        _checks.positive_int(size, "size", where),
        _non_negative(alpha, "alpha", where),
        _non_negative(beta, "beta", where),
        _positive(k, "k", where),
    )


def _lrn_denominator(x: jax.Array, size: int, alpha: float, k: float) -> jax.Array:
    """``d_c = k + alpha / size * sum_{c' in window(c)} x_{c'}^2``; PyTorch's window:
    ``size // 2`` channels before ``c``, ``(size - 1) // 2`` after."""
    return k + (alpha / size) * _window_sum(jnp.square(x), size // 2, (size - 1) // 2)


@compiled_when_eager()
def local_response_norm(
    x: jax.Array, size: int = 5, alpha: float = 1e-4, beta: float = 0.75, k: float = 2.0
) -> jax.Array:
    """Local response normalization across channels (AlexNet), PyTorch's convention.

    Args:
      x: ``(..., C)``, channels last (any rank).
      size: channels in the window (a positive int).
      alpha, beta: ``>= 0``; k: ``> 0`` (so the denominator is never 0).

    Returns:
      ``(..., C)``: ``y_c = x_c / (k + alpha/size sum_{c' in window(c)} x_{c'}^2)^beta``,
      the window ``[c - size//2, c + (size-1)//2]`` clipped to the channels.
    """
    where = "local_response_norm"
    _check_input(x, 1, "..., C", where)
    size, alpha, beta, k = _lrn_hyper(size, alpha, beta, k, where)
    return x * _lrn_denominator(x, size, alpha, k) ** -beta


@static
class LrnMeta:
    size: int
    alpha: float
    beta: float


class LrnResiduals(NamedTuple):
    x: jax.Array  # (..., C)
    d: jax.Array  # (..., C) the denominator before the power
    meta: LrnMeta


def local_response_norm_fwd(
    x: jax.Array, size: int = 5, alpha: float = 1e-4, beta: float = 0.75, k: float = 2.0
):
    """``(y, residuals)`` of :func:`local_response_norm`; ``y`` is ``(..., C)``."""
    where = "local_response_norm"
    _check_input(x, 1, "..., C", where)
    size, alpha, beta, k = _lrn_hyper(size, alpha, beta, k, where)
    d = _lrn_denominator(x, size, alpha, k)
    return x * d**-beta, LrnResiduals(x, d, LrnMeta(size, alpha, beta))


def local_response_norm_bwd(res: LrnResiduals, g: jax.Array):
    """``(dx,)``: ``g_c d_c^-beta - (2 alpha beta / size) x_c sum_{j: c in window(j)}
    g_j x_j d_j^(-beta-1)``, shape ``(..., C)``.

    ``c`` lies in ``window(j) = [j - lo, j + hi]`` iff ``j`` lies in ``[c - hi, c + lo]``:
    the transposed window sum swaps the pads.
    """
    size, alpha, beta = res.meta.size, res.meta.alpha, res.meta.beta
    d_pow = res.d**-beta
    back = _window_sum(g * res.x * d_pow / res.d, (size - 1) // 2, size // 2)
    dx = g * d_pow - (2 * alpha * beta / size) * res.x * back
    return (dx.astype(res.x.dtype),)


RULES = {
    batch_norm_train: Rule(batch_norm_train_fwd, batch_norm_train_bwd, ("x", "scale", "bias")),
    batch_norm_eval: Rule(
        batch_norm_eval_fwd, batch_norm_eval_bwd, ("x", "mean", "var", "scale", "bias")
    ),
    layer_norm: Rule(layer_norm_fwd, layer_norm_bwd, ("x", "scale", "bias")),
    local_response_norm: Rule(local_response_norm_fwd, local_response_norm_bwd, ("x",)),
}


# ---------------------------------------------------------------------------------------
# The layers
# ---------------------------------------------------------------------------------------


def _feature_shape(layer: Layer, input_shape: Shape) -> Shape:
    """A validated unbatched shape ``(..., C)`` of rank >= 1."""
    shape = _checks.input_shape_tuple(input_shape, repr(layer))
    if not shape:
        raise ValueError(
            f"{layer!r}: expected an input shape (..., C) of rank >= 1 with the features "
            f"last (e.g. (C,) or (H, W, C); no batch dimension), got {shape}"
        )
    return shape


def _affine_specs(layer: Layer, input_shape: Shape) -> dict[str, Shape]:
    channels = _feature_shape(layer, input_shape)[-1]
    specs = {}
    if layer.use_scale:
        specs["scale"] = (channels,)
    if layer.use_bias:
        specs["bias"] = (channels,)
    return specs


def _affine_initializers():
    return {"scale": jax.nn.initializers.ones, "bias": jax.nn.initializers.zeros}


def _affine_grads(dscale, dbias) -> dict[str, jax.Array]:
    grads = {"scale": dscale, "bias": dbias}
    return {name: v for name, v in grads.items() if v is not None}


@dataclasses.dataclass(frozen=True, repr=False)
class _AffineNorm(Layer):
    """What BatchNorm and LayerNorm share: ``epsilon``, an optional learned affine map
    ``y = scale * x_hat + bias`` over the last axis (params ``scale`` ones and ``bias``
    zeros, each ``(C,)``), and the input check."""

    epsilon: float = 1e-5
    use_scale: bool = True
    use_bias: bool = True
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        where = type(self).__name__
        object.__setattr__(self, "epsilon", _positive(self.epsilon, "epsilon", where))
        check_bool(self.use_scale, "use_scale", where)
        check_bool(self.use_bias, "use_bias", where)
        check_param_dtype(self.param_dtype, where)

    def output_shape(self, input_shape: Shape) -> Shape:
        return _feature_shape(self, input_shape)

    def param_specs(self, input_shape: Shape) -> dict[str, Shape]:
        return _affine_specs(self, input_shape)

    def initializers(self):
        return _affine_initializers()


@dataclasses.dataclass(frozen=True, repr=False)
class BatchNorm(_AffineNorm):
    """Batch normalization over every axis but the last (Ioffe & Szegedy, 2015).

    Input ``(N, ..., C)`` -> output ``(N, ..., C)``: ``(N, C)`` features or ``(N, H, W,
    C)`` NHWC images, one mean and variance per channel ``C``.
    ``y = scale (x - mu) / sqrt(var + epsilon) + bias``.

    Params: ``scale`` ``(C,)`` (ones; absent if ``use_scale=False``), ``bias`` ``(C,)``
    (zeros; absent if ``use_bias=False``). State: running ``mean`` ``(C,)`` (zeros) and
    ``var`` ``(C,)`` (ones), never differentiated.

    PyTorch's convention (``nn.BatchNorm2d``): in training (``train=True``) the layer
    normalizes with the batch mean and the *biased* batch variance, and returns the
    running statistics updated as ``running = (1 - momentum) running + momentum stat``,
    with the *unbiased* batch variance ``var n / (n - 1)`` (``n = N * H * W``; ``n = 1``
    is refused). Flax's ``momentum`` is ``1 -`` this one. In evaluation (``train=False``)
    it normalizes with the running statistics and returns the state unchanged.

    FLOPs (evaluation, one example of ``E`` elements and ``C`` channels): the folded
    ``y = x a + b`` is 2 per element, plus folding ``a = scale / sqrt(var + epsilon)``,
    ``b = bias - mean a`` once: ``var + epsilon``, ``mean a`` and the subtraction (3),
    times ``scale`` (1 if ``use_scale``) per channel, and one ``rsqrt`` per channel as
    a transcendental (this agrees with XLA's cost analysis). Training costs more and is
    not what this reports: mean, centring, square, variance, normalizing, ~``6 E`` (XLA
    recomputes the centring in a second fusion) plus ``2 E`` for scale and bias.

    Receptive field: per element, so the field is kept; it is the field *per example*
    (in training each output also depends on every other example of the batch).
    """

    mixes_batch: ClassVar[bool] = True  # batch statistics in training

    momentum: float = 0.1

    def __post_init__(self):
        super().__post_init__()
        where = type(self).__name__
        object.__setattr__(self, "momentum", _unit_interval(self.momentum, "momentum", where))

    def state_specs(self, input_shape: Shape) -> dict[str, Shape]:
        channels = _feature_shape(self, input_shape)[-1]
        return {"mean": (channels,), "var": (channels,)}

    def init_state(self, input_shape: Shape) -> dict[str, jax.Array]:
        """Running ``mean`` zeros and ``var`` ones, each ``(C,)``."""
        shapes = self.state_shapes(input_shape)
        return {
            "mean": jnp.zeros(shapes["mean"].shape, shapes["mean"].dtype),
            "var": jnp.ones(shapes["var"].shape, shapes["var"].dtype),
        }

    def running_update(self, state, mean: jax.Array, var: jax.Array, x_shape: Shape):
        """``(1 - momentum) running + momentum stat``, with the unbiased variance; state
        keeps its dtype."""
        n = math.prod(x_shape[:-1])
        if n < 2:
            raise ValueError(
                f"{self!r}: training needs more than one value per channel to estimate the "
                f"variance, got an input of shape {tuple(x_shape)}"
            )
        m = self.momentum
        stats = {"mean": mean, "var": var * (n / (n - 1))}
        return {
            name: lax.stop_gradient((1 - m) * state[name] + m * stats[name]).astype(
                state[name].dtype
            )
            for name in ("mean", "var")
        }

    def forward(self, params, state, x, *, key=None, train=False):
        scale, bias = params.get("scale"), params.get("bias")
        if not train:
            y = batch_norm_eval(x, state["mean"], state["var"], scale, bias, self.epsilon)
            return y, state
        y = batch_norm_train(x, scale, bias, self.epsilon)
        # the same moments batch_norm_train computes; jit's CSE computes them once
        return y, self.running_update(state, *batch_moments(x), x.shape)

    # the layer rule: the op rule of the mode; the state is carried, never differentiated
    def fwd(self, params, state, x, *, key=None, train=False):
        scale, bias = params.get("scale"), params.get("bias")
        if not train:
            y, res = batch_norm_eval_fwd(x, state["mean"], state["var"], scale, bias,
                                         self.epsilon)
            return y, state, res
        y, res = batch_norm_train_fwd(x, scale, bias, self.epsilon)
        return y, self.running_update(state, res.mean, res.var, x.shape), res

    def bwd(self, res, g, need_dx):
        if isinstance(res, BatchNormTrainResiduals):
            grads = affine_param_grads(res.x_hat, g, res.scale, res.bias)
            dx = batch_norm_train_input_grad(res, g) if need_dx else None
            return dx, _affine_grads(*grads)
        x_hat = (upcast(res.x) - upcast(res.mean)) * res.rstd
        grads = affine_param_grads(x_hat, g, res.scale, res.bias)
        a = _affine(res.rstd, upcast(res.scale), None)
        dx = (upcast(g) * a).astype(res.x.dtype) if need_dx else None
        return dx, _affine_grads(*grads)

    # metadata: the evaluation count, see the class docstring
    def flops(self, input_shape: Shape) -> tuple[int, int]:
        shape = self.output_shape(input_shape)
        channels = shape[-1]
        return 2 * math.prod(shape) + (3 + int(self.use_scale)) * channels, channels

    def receptive_field(self, input_shape: Shape, rf: RF) -> RF:
        return rf


@dataclasses.dataclass(frozen=True, repr=False)
class LayerNorm(_AffineNorm):
    """Layer normalization of each position over its last axis (Ba et al., 2016).

    Input ``(N, ..., C)`` -> output ``(N, ..., C)``, as PyTorch's
    ``nn.LayerNorm(normalized_shape=C)`` and Flax's ``LayerNorm``:
    ``y = scale (x - mu) / sqrt(var + epsilon) + bias`` with ``mu``, the biased ``var``
    over the ``C`` features of one position of one example. No state: training and
    evaluation are the same.

    Params: ``scale`` ``(C,)`` (ones), ``bias`` ``(C,)`` (zeros), each absent if its
    ``use_`` flag is ``False``.

    FLOPs per position (``P`` positions of ``C`` features per example): mean ``C``
    (``C - 1`` adds and a divide), centring ``C``, squares ``C``, variance ``C``,
    ``+ epsilon`` 1, normalizing ``C`` multiplies, ``C`` for the scale and ``C`` for the
    bias when present: ``5C + 1 (+ C + C)``; one ``rsqrt`` per position (transcendental).
    This is the maths: XLA:CPU recomputes the centring ``x - mu`` in two fusions, so its
    cost analysis reports about ``C`` more per position (~15% more at ``C = 6``).

    Receptive field: each output sees the features of its own position (as ``Dense``):
    kept on a grid, the whole input once flattened.
    """


    def forward(self, params, state, x, *, key=None, train=False):
        return layer_norm(x, params.get("scale"), params.get("bias"), self.epsilon), state

    # the layer rule: the op rule, the first layer skipping dx
    def fwd(self, params, state, x, *, key=None, train=False):
        y, res = layer_norm_fwd(x, params.get("scale"), params.get("bias"), self.epsilon)
        return y, state, res

    def bwd(self, res, g, need_dx):
        grads = affine_param_grads(res.x_hat, g, res.scale, res.bias)
        dx = layer_norm_input_grad(res, g) if need_dx else None
        return dx, _affine_grads(*grads)

    def flops(self, input_shape: Shape) -> tuple[int, int]:
        shape = self.output_shape(input_shape)
        positions, channels = math.prod(shape[:-1]), shape[-1]
        per_position = (5 + int(self.use_scale) + int(self.use_bias)) * channels + 1
        return positions * per_position, positions

    def receptive_field(self, input_shape: Shape, rf: RF) -> RF:
        return rf.per_position(input_shape)


@dataclasses.dataclass(frozen=True, repr=False)
class LocalResponseNorm(OpLayer):
    """Local response normalization across channels (AlexNet), PyTorch's convention.

    Input ``(N, ..., C)`` -> output ``(N, ..., C)``, channels last:
    ``y_c = x_c / (k + alpha/size sum_{c' in window(c)} x_{c'}^2)^beta``, the window of
    ``size`` channels ``[c - size//2, c + (size-1)//2]`` clipped to the channels (as
    ``torch.nn.LocalResponseNorm``, which pads ``size // 2`` before and
    ``(size - 1) // 2`` after). No params, no state. ``size`` a positive int; ``alpha``,
    ``beta >= 0``; ``k > 0``.

    FLOPs per element: square 1, window sum ``size - 1`` adds (taps on the zero padding
    included), ``alpha/size`` times 1, ``+ k`` 1, times ``x`` 1: ``size + 3``; the power
    ``d^-beta`` is one transcendental per element.

    Receptive field: kept on a grid (a window over channels, at one position); unknown
    once flattened (neighbouring features of a flat vector are no grid window).
    """

    size: int = 5
    alpha: float = 1e-4
    beta: float = 0.75
    k: float = 2.0
    op = staticmethod(local_response_norm)
    rule = RULES[local_response_norm]

    def __post_init__(self):
        hyper = _lrn_hyper(self.size, self.alpha, self.beta, self.k, type(self).__name__)
        for name, value in zip(("size", "alpha", "beta", "k"), hyper, strict=True):
            object.__setattr__(self, name, value)

    def output_shape(self, input_shape: Shape) -> Shape:
        return _feature_shape(self, input_shape)

    def hyper(self):
        return {"size": self.size, "alpha": self.alpha, "beta": self.beta, "k": self.k}

    def flops(self, input_shape: Shape) -> tuple[int, int]:
        elements = math.prod(self.output_shape(input_shape))
        return (self.size + 3) * elements, elements

    def receptive_field(self, input_shape: Shape, rf: RF) -> RF:
        if not rf.tracked or (rf.grid and len(input_shape) > 1):
            return rf
        return rf.unknown()
