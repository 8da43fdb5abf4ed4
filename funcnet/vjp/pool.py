"""Backward rules of :mod:`funcnet.ops.pool`.

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
goes through :func:`~funcnet.vjp._common.scatter_windows`, which is exact for all.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from funcnet import ops
from funcnet.ops import pool as _pool
from funcnet.vjp._common import (
    Geometry,
    Rule,
    crop_input,
    make_geometry,
    pad_input,
    scatter_windows,
    static,
    tile_view,
    untile,
    window_slices,
)


def pool_geometry(x_shape, window, stride, padding, where) -> Geometry:
    window, stride, pads = _pool.pool_geometry(x_shape, window, stride, padding, where)
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
    geom = pool_geometry(x.shape, window, stride, padding, "max_pool")
    _pool._checks.check_floating(x, "input x", "max_pool")
    if geom.tiles:
        y = jnp.max(tile_view(pad_input(x, geom, -jnp.inf), geom), axis=(2, 4))
    else:
        y = ops.max_pool(x, geom.window, geom.stride, geom.pads)
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
    geom = pool_geometry(x.shape, window, stride, padding, where)
    return SumPoolResiduals(AvgMeta(geom, divisor))


def sum_pool_fwd(x: jax.Array, window: Any, stride: Any = None, padding: Any = "VALID"):
    """``(sum_pool(x, ...), residuals)``."""
    y = ops.sum_pool(x, window, stride, padding)
    return y, _sum_residuals(x, window, stride, padding, "sum_pool", "one")


def avg_pool_fwd(
    x: jax.Array,
    window: Any,
    stride: Any = None,
    padding: Any = "VALID",
    count_include_pad: bool = True,
):
    """``(avg_pool(x, ...), residuals)``."""
    y = ops.avg_pool(x, window, stride, padding, count_include_pad)
    divisor = "window" if count_include_pad else "count"
    return y, _sum_residuals(x, window, stride, padding, "avg_pool", divisor)


def sum_pool_bwd(res: SumPoolResiduals, g: jax.Array):
    """``(dL/dx,)``: every pixel of a window gets ``g / K`` of that window."""
    geom, divisor = res.meta.geom, res.meta.divisor
    if divisor == "window":
        g = g / (geom.window[0] * geom.window[1])
    elif divisor == "count":
        g = g / _pool.window_counts(geom.in_hw, geom.window, geom.stride, geom.pads, g.dtype)
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
    y = ops.lp_pool(x, p, window, stride, padding)
    p = _pool._check_p(p, "lp_pool")
    geom = pool_geometry(x.shape, window, stride, padding, "lp_pool")
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
    y = ops.feature_l2_pool(x, group_size)
    return y, FeaturePoolResiduals(x, y)


def feature_l2_pool_bwd(res: FeaturePoolResiduals, g: jax.Array):
    """``(dL/dx,)``: ``dx_k = g_j x_k / y_j`` for ``k`` in group ``j`` (0 if ``y_j = 0``)."""
    xg = _groups(res.x, res.y)
    dx = _root_coef(res.y, g, 2)[..., None] * xg
    return (dx.reshape(res.x.shape),)


def feature_max_pool_fwd(x: jax.Array, group_size: int):
    """``(feature_max_pool(x, group_size), residuals)``."""
    y = ops.feature_max_pool(x, group_size)
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
    ops.max_pool: Rule(max_pool_fwd, max_pool_bwd, ("x",)),
    ops.sum_pool: Rule(sum_pool_fwd, sum_pool_bwd, ("x",)),
    ops.avg_pool: Rule(avg_pool_fwd, avg_pool_bwd, ("x",)),
    ops.lp_pool: Rule(lp_pool_fwd, lp_pool_bwd, ("x",)),
    ops.l2_pool: Rule(l2_pool_fwd, l2_pool_bwd, ("x",)),
    ops.feature_l2_pool: Rule(feature_l2_pool_fwd, feature_l2_pool_bwd, ("x",)),
    ops.feature_max_pool: Rule(feature_max_pool_fwd, feature_max_pool_bwd, ("x",)),
}
