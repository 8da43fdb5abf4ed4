"""Pooling over space (max, average, L2 / Lp) and over features (L2, max = maxout).

Spatial pools act on NHWC inputs over ``lax.reduce_window``; the window slides over H and
W with the given stride (default: the window, i.e. non-overlapping pools, as PyTorch).
The lecture's definitions, for a window ``N(x, y)``:

- max:     ``h(x, y) = max_{N(x, y)} h'``
- average: ``h(x, y) = 1/K sum_{N(x, y)} h'``
- L2:      ``h(x, y) = sqrt(sum_{N(x, y)} h'^2)``
- L2 over features: ``h_j(x, y) = sqrt(sum_{k in N(j)} h'_k(x, y)^2)``

Padding: max pool pads with ``-inf`` (a pad never wins); sum-based pools pad with 0.

The backward rules:

- **max** routes ``g`` to the maximum of each window. *Ties*: the **first** maximal
  element of the window in row-major order (top-most, then left-most) gets all of ``g``,
  the others get 0. This is what ``jax.vjp`` of ``lax.reduce_window`` (XLA's
  select-and-scatter with ``>=``) and PyTorch's ``max_pool2d`` do; it is pinned by
  ``tests/test_vjp_pool.py``. An element that is the maximum of several overlapping
  windows collects the gradient of each.
- **feature max** (maxout) uses the same convention within a group (first feature of the
  group wins). ``jax.vjp`` of ``jnp.max`` instead *splits* ``g`` equally among tied
  elements, so the two differ only on exact ties.
- **sum / average** distribute ``g`` (divided by ``K``) to every input pixel of the
  window; ``K`` is the window size with ``count_include_pad=True`` and the number of real
  pixels in that window otherwise. Padding receives gradient that is dropped.
- **Lp**: ``dy/dx = sign(x) |x|^(p-1) / y^(p-1)``, ``x / y`` for ``p = 2``; on an all-zero
  window (``y = 0``) the gradient is 0, not NaN.
- **feature L2**: ``dh_j/dh'_k = h'_k / h_j`` for ``k`` in group ``j``, 0 where ``h_j = 0``.

Windows that tile the input (stride == window; VALID or padded) take a fast path: a
reshape to ``(N, H_out, PH, W_out, PW, C)`` and an elementwise mask, instead of the
scatter XLA:CPU would otherwise run. Any other geometry (overlapping windows, gaps)
goes through :func:`~funcnet.geometry.scatter_windows`, which is exact for all.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from funcnet import _checks
from funcnet import geometry as geo
from funcnet._eager import compiled_when_eager
from funcnet.geometry import (
    Geometry,
    crop_input,
    make_geometry,
    pad_input,
    scatter_windows,
    tile_view,
    untile,
    window_slices,
)
from funcnet.nn.base import RF, OpLayer, Rule, Shape, static

# ---------------------------------------------------------------------------------------
# The ops
# ---------------------------------------------------------------------------------------


def pool_geometry(x_shape, window, stride, padding, where):
    """Normalise (window, stride, padding) for an NHWC input and resolve explicit pads."""
    _checks.check_rank(x_shape, 4, "input x", where, "N, H, W, C")
    window = _checks.ntuple(window, 2, "window", where)
    stride = window if stride is None else _checks.ntuple(stride, 2, "stride", where)
    padding = geo.normalize_padding(padding, 2, where)
    pads = geo.resolve_padding(padding, x_shape[1:3], window, stride)
    if any(lo >= k or hi >= k for (lo, hi), k in zip(pads, window, strict=True)):
        # "SAME" never pads a whole window; explicit padding can
        raise ValueError(
            f"{where}: padding {pads} must be smaller than the window {window} on every "
            f"side (a window of padding alone has no input)"
        )
    geo.check_window_fits(x_shape[1:3], window, pads, where)
    return window, stride, pads


def _reduce(x, init, op, window, stride, pads):
    # The init value must be a concrete numpy scalar: JAX recognises max / add windows
    # (and so differentiates them) only when it can see the init is -inf / 0. A jnp
    # constant is traced under jit and turns max pooling into an undifferentiable
    # generic reduce_window.
    return lax.reduce_window(
        x,
        np.asarray(init, dtype=x.dtype),
        op,
        (1, *window, 1),
        (1, *stride, 1),
        ((0, 0), *pads, (0, 0)),
    )


@compiled_when_eager()
def max_pool(x: jax.Array, window: Any, stride: Any = None, padding: Any = "VALID") -> jax.Array:
    """Maximum over each window.

    Args:
      x: ``(N, H, W, C)``, floating.
      window: int or pair ``(PH, PW)``.
      stride: int or pair; ``None`` means ``window``.
      padding: ``"VALID"``, ``"SAME"``, int, two ints or two ``(low, high)`` pairs.

    Returns:
      ``(N, H_out, W_out, C)``, ``H_out = floor((H + pads - PH) / s) + 1``.
    """
    where = "max_pool"
    x = _checks.as_array(x, "input x", where)
    _checks.check_floating(x, "input x", where)
    window, stride, pads = pool_geometry(x.shape, window, stride, padding, where)
    return _reduce(x, -jnp.inf, lax.max, window, stride, pads)


@compiled_when_eager()
def sum_pool(x: jax.Array, window: Any, stride: Any = None, padding: Any = "VALID") -> jax.Array:
    """Sum over each window (zero padding); shapes as :func:`max_pool`."""
    where = "sum_pool"
    x = _checks.as_array(x, "input x", where)
    _checks.check_floating(x, "input x", where)
    window, stride, pads = pool_geometry(x.shape, window, stride, padding, where)
    return _reduce(x, 0.0, lax.add, window, stride, pads)


def window_counts(
    spatial: tuple[int, int], window: Any, stride: Any, pads: Any, dtype=jnp.float32
) -> jax.Array:
    """``(1, H_out, W_out, 1)`` number of real (non-pad) input pixels in each window."""
    ones = jnp.ones((1, *spatial, 1), dtype)
    return _reduce(ones, 0.0, lax.add, window, stride, pads)


@compiled_when_eager()
def avg_pool(
    x: jax.Array,
    window: Any,
    stride: Any = None,
    padding: Any = "VALID",
    count_include_pad: bool = True,
) -> jax.Array:
    """Mean over each window: ``1/K sum_{N(x,y)} h'``.

    ``count_include_pad`` decides ``K`` where a window overlaps the padding:
    ``True`` (the default, as PyTorch and Flax) divides by the full window size
    ``PH * PW``, counting pad pixels as zeros; ``False`` divides by the number of real
    input pixels in that window. Without padding the two agree.

    Shapes as :func:`max_pool`.
    """
    where = "avg_pool"
    if not isinstance(count_include_pad, bool):
        raise TypeError(
            f"{where}: count_include_pad must be True or False, got {count_include_pad!r}"
        )
    x = _checks.as_array(x, "input x", where)
    _checks.check_floating(x, "input x", where)
    window, stride, pads = pool_geometry(x.shape, window, stride, padding, where)
    total = _reduce(x, 0.0, lax.add, window, stride, pads)
    if count_include_pad:
        return total / (window[0] * window[1])
    return total / window_counts(x.shape[1:3], window, stride, pads, x.dtype)


def _safe_root(s: jax.Array, p: float) -> jax.Array:
    """``s ** (1/p)`` with value and gradient 0 where ``s == 0`` (double-``where``)."""
    positive = s > 0
    s_safe = jnp.where(positive, s, jnp.ones_like(s))
    root = jnp.sqrt(s_safe) if p == 2 else s_safe ** (1.0 / p)
    return jnp.where(positive, root, jnp.zeros_like(s))


def _check_p(p: Any, where: str) -> float:
    _checks.static_number(p, "p", where)
    if isinstance(p, bool | np.bool_) or not isinstance(p, numbers.Real) \
            or not (1 <= p < float("inf")):
        raise ValueError(f"{where}: p must be a finite number >= 1, got {p!r}")
    return float(p)


@compiled_when_eager()
def lp_pool(
    x: jax.Array, p: float, window: Any, stride: Any = None, padding: Any = "VALID"
) -> jax.Array:
    """Lp norm over each window: ``(sum_{N(x,y)} |h'|^p)^(1/p)``, zero padding.

    ``p >= 1``. On an all-zero window the output is 0 and so is its gradient (not NaN).
    ``p = 1`` is a sum of magnitudes, ``p = 2`` the lecture's L2 pooling. Shapes as
    :func:`max_pool`.
    """
    where = "lp_pool"
    p = _check_p(p, where)
    x = _checks.as_array(x, "input x", where)
    _checks.check_floating(x, "input x", where)
    window, stride, pads = pool_geometry(x.shape, window, stride, padding, where)
    powered = x * x if p == 2 else jnp.abs(x) ** p
    return _safe_root(_reduce(powered, 0.0, lax.add, window, stride, pads), p)


@compiled_when_eager()
def l2_pool(x: jax.Array, window: Any, stride: Any = None, padding: Any = "VALID") -> jax.Array:
    """``sqrt(sum_{N(x,y)} h'^2)`` over each window: :func:`lp_pool` with ``p = 2``."""
    return lp_pool(x, 2, window, stride, padding)


def _feature_groups(x: jax.Array, group_size: Any, where: str) -> jax.Array:
    group_size = _checks.positive_int(group_size, "group_size", where)
    if x.ndim < 1:
        raise ValueError(f"{where}: expected an input with a feature axis, got a scalar")
    c = x.shape[-1]
    if c % group_size:
        raise ValueError(
            f"{where}: the number of features (last axis) {c} is not divisible by "
            f"group_size {group_size} (input shape {x.shape})"
        )
    return x.reshape(*x.shape[:-1], c // group_size, group_size)


@compiled_when_eager()
def feature_l2_pool(x: jax.Array, group_size: int) -> jax.Array:
    """L2 pooling over features: ``h_j = sqrt(sum_{k in N(j)} h'_k^2)``.

    ``N(j)`` is the ``j``-th group of ``group_size`` consecutive features
    ``{j*g, ..., j*g + g - 1}``.

    Args:
      x: ``(..., C)`` with ``C`` divisible by ``group_size``.

    Returns:
      ``(..., C // group_size)``; 0 with gradient 0 on an all-zero group.
    """
    where = "feature_l2_pool"
    x = _checks.as_array(x, "input x", where)
    _checks.check_floating(x, "input x", where)
    g = _feature_groups(x, group_size, where)
    return _safe_root(jnp.sum(g * g, axis=-1), 2)


@compiled_when_eager()
def feature_max_pool(x: jax.Array, group_size: int) -> jax.Array:
    """Max over groups of features (maxout): ``h_j = max_{k in N(j)} h'_k``.

    Groups as :func:`feature_l2_pool`. Returns ``(..., C // group_size)``.
    """
    where = "feature_max_pool"
    x = _checks.as_array(x, "input x", where)
    _checks.check_floating(x, "input x", where)
    return jnp.max(_feature_groups(x, group_size, where), axis=-1)



# ---------------------------------------------------------------------------------------
# Their rules
# ---------------------------------------------------------------------------------------


def pool_geom(x_shape, window, stride, padding, where) -> Geometry:
    window, stride, pads = pool_geometry(x_shape, window, stride, padding, where)
    return make_geometry(x_shape[1:3], window, stride, (1, 1), pads)


def _spread(coef: jax.Array, geom: Geometry) -> jax.Array:
    """``dx[pixel] = sum over windows w containing pixel of coef[w]``; shape ``(N, H, W, C)``.

    ``coef`` is ``(N or 1, H_out, W_out, C or 1)`` and broadcasts.
    """
    if geom.tiles:
        n, oh, ow, c = coef.shape
        ph, pw = geom.window
        d6 = jnp.broadcast_to(coef[:, :, None, :, None, :], (n, oh, ph, ow, pw, c))
        return untile(d6, geom)
    parts = [coef] * (geom.window[0] * geom.window[1])
    return crop_input(scatter_windows(parts, geom), geom)


# ---------------------------------------------------------------------------------------
# max
# ---------------------------------------------------------------------------------------


class MaxPoolResiduals(NamedTuple):
    x: jax.Array  # (N, H, W, C)
    y: jax.Array  # (N, H_out, W_out, C): the window maxima
    geom: Geometry


def max_pool_fwd(x: jax.Array, window: Any, stride: Any = None, padding: Any = "VALID"):
    """``(max_pool(x, ...), residuals)``."""
    geom = pool_geom(x.shape, window, stride, padding, "max_pool")
    _checks.check_floating(x, "input x", "max_pool")
    if geom.tiles:
        y = jnp.max(tile_view(pad_input(x, geom, -jnp.inf), geom), axis=(2, 4))
    else:
        y = max_pool(x, geom.window, geom.stride, geom.pads)
    return y, MaxPoolResiduals(x, y, geom)


def max_pool_bwd(res: MaxPoolResiduals, g: jax.Array):
    """``(dL/dx,)``: ``g`` of each window goes to its first maximal element (row-major)."""
    geom = res.geom
    xp = pad_input(res.x, geom, -jnp.inf)
    ph, pw = geom.window
    if geom.tiles:
        t6 = tile_view(xp, geom)
        idx = jnp.arange(ph * pw, dtype=jnp.int32).reshape(1, 1, ph, 1, pw, 1)
        is_max = t6 == res.y[:, :, None, :, None, :]
        first = jnp.min(jnp.where(is_max, idx, ph * pw), axis=(2, 4), keepdims=True)
        d6 = jnp.where(idx == first, g[:, :, None, :, None, :], jnp.zeros((), g.dtype))
        return (untile(d6, geom),)
    zero = jnp.zeros((), g.dtype)
    taken = None
    parts = []
    for part in window_slices(xp, geom):  # row-major order over the window
        hit = part == res.y
        if taken is not None:
            hit = hit & ~taken
        taken = hit if taken is None else taken | hit
        parts.append(jnp.where(hit, g, zero))
    return (crop_input(scatter_windows(parts, geom), geom),)


# ---------------------------------------------------------------------------------------
# sum, average
# ---------------------------------------------------------------------------------------


@static
class AvgMeta:
    geom: Geometry
    divisor: str  # "one" (sum pool), "window", or "count"


class SumPoolResiduals(NamedTuple):
    meta: AvgMeta  # static: no arrays are needed, only the geometry


def _sum_residuals(x, window, stride, padding, where, divisor) -> SumPoolResiduals:
    geom = pool_geom(x.shape, window, stride, padding, where)
    return SumPoolResiduals(AvgMeta(geom, divisor))


def sum_pool_fwd(x: jax.Array, window: Any, stride: Any = None, padding: Any = "VALID"):
    """``(sum_pool(x, ...), residuals)``."""
    y = sum_pool(x, window, stride, padding)
    return y, _sum_residuals(x, window, stride, padding, "sum_pool", "one")


def avg_pool_fwd(
    x: jax.Array,
    window: Any,
    stride: Any = None,
    padding: Any = "VALID",
    count_include_pad: bool = True,
):
    """``(avg_pool(x, ...), residuals)``."""
    y = avg_pool(x, window, stride, padding, count_include_pad)
    divisor = "window" if count_include_pad else "count"
    return y, _sum_residuals(x, window, stride, padding, "avg_pool", divisor)


def sum_pool_bwd(res: SumPoolResiduals, g: jax.Array):
    """``(dL/dx,)``: every pixel of a window gets ``g / K`` of that window."""
    geom, divisor = res.meta.geom, res.meta.divisor
    if divisor == "window":
        g = g / (geom.window[0] * geom.window[1])
    elif divisor == "count":
        g = g / window_counts(geom.in_hw, geom.window, geom.stride, geom.pads, g.dtype)
    return (_spread(g, geom),)


avg_pool_bwd = sum_pool_bwd


# ---------------------------------------------------------------------------------------
# Lp, L2
# ---------------------------------------------------------------------------------------


@static
class LpMeta:
    geom: Geometry
    p: float


class LpPoolResiduals(NamedTuple):
    x: jax.Array
    y: jax.Array
    meta: LpMeta


def _root_coef(y: jax.Array, g: jax.Array, p: float) -> jax.Array:
    """``g / y^(p-1)`` where ``y > 0``, else 0 (an all-zero window or group)."""
    positive = y > 0
    y_safe = jnp.where(positive, y, jnp.ones_like(y))
    denom = y_safe if p == 2 else y_safe ** (p - 1.0)
    return jnp.where(positive, g / denom, jnp.zeros_like(g))


def _signed_power(x: jax.Array, p: float) -> jax.Array:
    """``d|x|^p/dx / p = sign(x) |x|^(p-1)`` (``x`` for ``p = 2``; 0 at 0 for ``p > 1``)."""
    if p == 2:
        return x
    if p == 1:
        return jnp.sign(x)
    return jnp.sign(x) * jnp.abs(x) ** (p - 1.0)


def lp_pool_fwd(x: jax.Array, p: float, window: Any, stride: Any = None, padding: Any = "VALID"):
    """``(lp_pool(x, p, ...), residuals)``."""
    y = lp_pool(x, p, window, stride, padding)
    p = _check_p(p, "lp_pool")
    geom = pool_geom(x.shape, window, stride, padding, "lp_pool")
    return y, LpPoolResiduals(x, y, LpMeta(geom, p))


def lp_pool_bwd(res: LpPoolResiduals, g: jax.Array):
    """``(dL/dx,)``: ``dx = sign(x)|x|^(p-1) * sum_windows g / y^(p-1)``."""
    p, geom = res.meta.p, res.meta.geom
    return (_spread(_root_coef(res.y, g, p), geom) * _signed_power(res.x, p),)


def l2_pool_fwd(x: jax.Array, window: Any, stride: Any = None, padding: Any = "VALID"):
    """``(l2_pool(x, ...), residuals)``."""
    return lp_pool_fwd(x, 2, window, stride, padding)


l2_pool_bwd = lp_pool_bwd


# ---------------------------------------------------------------------------------------
# feature pools
# ---------------------------------------------------------------------------------------


class FeaturePoolResiduals(NamedTuple):
    x: jax.Array  # (..., C)
    y: jax.Array  # (..., C // group_size)


def _groups(x: jax.Array, y: jax.Array) -> jax.Array:
    return x.reshape(*y.shape, x.shape[-1] // y.shape[-1])


def feature_l2_pool_fwd(x: jax.Array, group_size: int):
    """``(feature_l2_pool(x, group_size), residuals)``."""
    y = feature_l2_pool(x, group_size)
    return y, FeaturePoolResiduals(x, y)


def feature_l2_pool_bwd(res: FeaturePoolResiduals, g: jax.Array):
    """``(dL/dx,)``: ``dx_k = g_j x_k / y_j`` for ``k`` in group ``j`` (0 if ``y_j = 0``)."""
    xg = _groups(res.x, res.y)
    dx = _root_coef(res.y, g, 2)[..., None] * xg
    return (dx.reshape(res.x.shape),)


def feature_max_pool_fwd(x: jax.Array, group_size: int):
    """``(feature_max_pool(x, group_size), residuals)``."""
    y = feature_max_pool(x, group_size)
    return y, FeaturePoolResiduals(x, y)


def feature_max_pool_bwd(res: FeaturePoolResiduals, g: jax.Array):
    """``(dL/dx,)``: ``g_j`` goes to the first maximal feature of group ``j``."""
    xg = _groups(res.x, res.y)
    size = xg.shape[-1]
    idx = jnp.arange(size, dtype=jnp.int32)
    first = jnp.min(jnp.where(xg == res.y[..., None], idx, size), axis=-1, keepdims=True)
    dx = jnp.where(idx == first, g[..., None], jnp.zeros((), g.dtype))
    return (dx.reshape(res.x.shape),)


RULES = {
    max_pool: Rule(max_pool_fwd, max_pool_bwd, ("x",)),
    sum_pool: Rule(sum_pool_fwd, sum_pool_bwd, ("x",)),
    avg_pool: Rule(avg_pool_fwd, avg_pool_bwd, ("x",)),
    lp_pool: Rule(lp_pool_fwd, lp_pool_bwd, ("x",)),
    l2_pool: Rule(l2_pool_fwd, l2_pool_bwd, ("x",)),
    feature_l2_pool: Rule(feature_l2_pool_fwd, feature_l2_pool_bwd, ("x",)),
    feature_max_pool: Rule(feature_max_pool_fwd, feature_max_pool_bwd, ("x",)),
}



@compiled_when_eager()
def global_avg_pool(x: jax.Array) -> jax.Array:
    """Mean over every spatial axis: ``(N, ..., C) -> (N, C)`` (ResNet's and GoogLeNet's head)."""
    x = _checks.as_array(x, "input x", "global_avg_pool")
    if x.ndim < 3:
        raise ValueError(
            f"global_avg_pool: expected an input (N, ..., C) with spatial axes, got shape "
            f"{x.shape}"
        )
    _checks.check_floating(x, "input x", "global_avg_pool")
    return jnp.mean(x, axis=tuple(range(1, x.ndim - 1)))


@static
class SpatialShape:
    shape: tuple[int, ...]  # the input's spatial axes


class GlobalPoolResiduals(NamedTuple):
    spatial: SpatialShape


def global_avg_pool_fwd(x: jax.Array):
    """``(global_avg_pool(x), residuals)``: only the input's spatial shape is kept."""
    return global_avg_pool(x), GlobalPoolResiduals(SpatialShape(tuple(x.shape[1:-1])))


def global_avg_pool_bwd(res: GlobalPoolResiduals, g: jax.Array):
    """``(g / (H W))`` copied to every position: the average gate distributes the gradient."""
    spatial = res.spatial.shape
    scale = g / math.prod(spatial)
    return (jnp.broadcast_to(scale.reshape(g.shape[0], *(1,) * len(spatial), g.shape[1]),
                             (g.shape[0], *spatial, g.shape[1])),)


RULES[global_avg_pool] = Rule(global_avg_pool_fwd, global_avg_pool_bwd, ("x",))


# ---------------------------------------------------------------------------------------
# The layers
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, repr=False)
class _Pool(OpLayer):
    """Spatial pooling geometry: window, stride (default: the window), padding.

    Padding must be smaller than the window on every side: a window lying wholly in the
    padding would output ``-inf`` (max) or divide zero by zero (average).
    """

    window: Any
    stride: Any = None
    padding: Any = "VALID"

    def __post_init__(self):
        where = type(self).__name__
        window = _checks.ntuple(self.window, 2, "window", where)
        object.__setattr__(self, "window", window)
        stride = window if self.stride is None else self.stride
        object.__setattr__(self, "stride", _checks.ntuple(stride, 2, "stride", where))
        padding = geo.normalize_padding(self.padding, 2, where)
        if not isinstance(padding, str):
            for (lo, hi), k in zip(padding, window, strict=True):
                if lo >= k or hi >= k:
                    raise ValueError(
                        f"{where}: padding {padding} must be smaller than the window "
                        f"{window} on every side (a window of padding alone has no input)"
                    )
        object.__setattr__(self, "padding", padding)

    def __repr__(self) -> str:
        text = super().__repr__()
        # stride defaults to the window; don't print it when it is that default.
        return text.replace(f", stride={self.stride!r}", "") if self.stride == self.window else text

    def pads(self, input_shape: Shape) -> geo.PadPairs:
        return geo.resolve_padding(self.padding, input_shape[:2], self.window, self.stride)

    def output_shape(self, input_shape: Shape) -> Shape:
        where = repr(self)
        shape = _checks.input_shape_tuple(input_shape, where)
        _checks.check_rank(shape, 3, "input_shape", where, "H, W, C; no batch dimension")
        pads = self.pads(shape)
        geo.check_window_fits(shape[:2], self.window, pads, where)
        return (*geo.conv_output_size(shape[:2], self.window, self.stride, pads), shape[2])

    def hyper(self):
        return {"window": self.window, "stride": self.stride, "padding": self.padding}

    def receptive_field(self, input_shape: Shape, rf: RF) -> RF:
        return rf.window(self.window, self.stride, self.pads(input_shape))


@dataclasses.dataclass(frozen=True, repr=False)
class MaxPool(_Pool):
    """Max pooling ``h(x, y) = max_{N(x, y)} h'``; pads with ``-inf``. NHWC -> NHWC.

    FLOPs: ``PH * PW - 1`` comparisons per output.
    """

    op = staticmethod(max_pool)
    rule = RULES[max_pool]

    def flops(self, input_shape: Shape) -> tuple[int, int]:
        return (math.prod(self.window) - 1) * math.prod(self.output_shape(input_shape)), 0


@dataclasses.dataclass(frozen=True, repr=False)
class AvgPool(_Pool):
    """Average pooling ``1/K sum_{N(x, y)} h'``.

    ``count_include_pad=True`` (default) divides by the window size everywhere;
    ``False`` divides by the number of real input pixels in each window. FLOPs:
    ``PH * PW - 1`` adds and one divide per output.
    """

    count_include_pad: bool = True
    op = staticmethod(avg_pool)
    rule = RULES[avg_pool]

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.count_include_pad, bool):
            raise TypeError(
                f"AvgPool: count_include_pad must be True or False, got "
                f"{self.count_include_pad!r}"
            )

    def hyper(self):
        return {**super().hyper(), "count_include_pad": self.count_include_pad}

    def flops(self, input_shape: Shape) -> tuple[int, int]:
        return math.prod(self.window) * math.prod(self.output_shape(input_shape)), 0


@dataclasses.dataclass(frozen=True, repr=False)
class LpPool(_Pool):
    """Lp pooling ``(sum_{N(x, y)} |h'|^p)^(1/p)``, ``p >= 1``; 0 (and gradient 0) on zeros.

    FLOPs: ``|x|^p`` per input (a square for ``p = 2``, else abs + pow with one
    transcendental), the window sum, and a guarded root (3 ops + 1 transcendental).
    """

    p: float = 2.0
    op = staticmethod(lp_pool)
    rule = RULES[lp_pool]

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "p", _check_p(self.p, type(self).__name__))

    def hyper(self):
        return {"p": self.p, **super().hyper()}

    def flops(self, input_shape: Shape) -> tuple[int, int]:
        n_in, n_out = math.prod(input_shape), math.prod(self.output_shape(input_shape))
        p = getattr(self, "p", 2.0)
        power = n_in if p == 2 else 2 * n_in
        tr = n_out + (0 if p == 2 else n_in)
        return power + (math.prod(self.window) - 1) * n_out + 3 * n_out, tr


@dataclasses.dataclass(frozen=True, repr=False)
class L2Pool(_Pool):
    """L2 pooling ``sqrt(sum_{N(x, y)} h'^2)``; 0 (and gradient 0) on an all-zero window."""

    op = staticmethod(l2_pool)
    rule = RULES[l2_pool]
    flops = LpPool.flops


@dataclasses.dataclass(frozen=True, repr=False)
class _FeaturePool(OpLayer):
    """Pooling over groups of ``group_size`` consecutive features (last axis)."""

    group_size: int

    def __post_init__(self):
        where = type(self).__name__
        object.__setattr__(
            self, "group_size", _checks.positive_int(self.group_size, "group_size", where)
        )

    def output_shape(self, input_shape: Shape) -> Shape:
        shape = super().output_shape(input_shape)
        _checks.check_features(shape, repr(self))
        if shape[-1] % self.group_size:
            raise ValueError(
                f"{self!r}: the number of features (last axis) {shape[-1]} is not "
                f"divisible by group_size {self.group_size} (input shape {shape})"
            )
        return (*shape[:-1], shape[-1] // self.group_size)

    def hyper(self):
        return {"group_size": self.group_size}

    def receptive_field(self, input_shape: Shape, rf: RF) -> RF:
        if not rf.tracked or (rf.grid and len(input_shape) > 1):
            return rf
        return rf.unknown()


@dataclasses.dataclass(frozen=True, repr=False)
class FeatureL2Pool(_FeaturePool):
    """L2 pooling over features ``h_j = sqrt(sum_{k in N(j)} h'_k^2)``: ``C -> C / g``."""

    op = staticmethod(feature_l2_pool)
    rule = RULES[feature_l2_pool]

    def flops(self, input_shape: Shape) -> tuple[int, int]:
        n_in, n_out = math.prod(input_shape), math.prod(self.output_shape(input_shape))
        return n_in + (self.group_size - 1) * n_out + 3 * n_out, n_out


@dataclasses.dataclass(frozen=True, repr=False)
class FeatureMaxPool(_FeaturePool):
    """Maxout: max over groups of ``group_size`` consecutive features, ``C -> C / g``."""

    op = staticmethod(feature_max_pool)
    rule = RULES[feature_max_pool]

    def flops(self, input_shape: Shape) -> tuple[int, int]:
        return (self.group_size - 1) * math.prod(self.output_shape(input_shape)), 0


@dataclasses.dataclass(frozen=True, repr=False)
class GlobalAvgPool(OpLayer):
    """Mean over all spatial axes: ``(N, H, W, C) -> (N, C)``.

    FLOPs: one add per input element and one divide per output.
    """

    op = staticmethod(global_avg_pool)
    rule = RULES[global_avg_pool]

    def output_shape(self, input_shape: Shape) -> Shape:
        shape = super().output_shape(input_shape)
        if len(shape) < 2:
            raise ValueError(
                f"{self!r}: expected an input shape (..., C) with spatial axes (e.g. "
                f"H, W, C; no batch dimension), got {shape}"
            )
        return (shape[-1],)

    def flops(self, input_shape: Shape) -> tuple[int, int]:
        return math.prod(input_shape), 0

    def receptive_field(self, input_shape: Shape, rf: RF) -> RF:
        return rf.whole().flatten(input_shape) if rf.tracked else rf
