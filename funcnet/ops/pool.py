"""Pooling over space (max, average, L2 / Lp) and over features (L2, max = maxout).

Spatial pools act on NHWC inputs over ``lax.reduce_window``; the window slides over H and
W with the given stride (default: the window, i.e. non-overlapping pools, as PyTorch).
The lecture's definitions, for a window ``N(x, y)``:

- max:     ``h(x, y) = max_{N(x, y)} h'``
- average: ``h(x, y) = 1/K sum_{N(x, y)} h'``
- L2:      ``h(x, y) = sqrt(sum_{N(x, y)} h'^2)``
- L2 over features: ``h_j(x, y) = sqrt(sum_{k in N(j)} h'_k(x, y)^2)``

Padding: max pool pads with ``-inf`` (a pad never wins); sum-based pools pad with 0.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from funcnet import _checks


def pool_geometry(x_shape, window, stride, padding, where):
    """Normalise (window, stride, padding) for an NHWC input and resolve explicit pads."""
    _checks.check_rank(x_shape, 4, "input x", where, "N, H, W, C")
    window = _checks.ntuple(window, 2, "window", where)
    stride = window if stride is None else _checks.ntuple(stride, 2, "stride", where)
    padding = _checks.normalize_padding(padding, 2, where)
    pads = _checks.resolve_padding(padding, x_shape[1:3], window, stride)
    _checks.check_window_fits(x_shape[1:3], window, pads, where)
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
    _checks.check_floating(x, "input x", where)
    window, stride, pads = pool_geometry(x.shape, window, stride, padding, where)
    return _reduce(x, -jnp.inf, lax.max, window, stride, pads)


def sum_pool(x: jax.Array, window: Any, stride: Any = None, padding: Any = "VALID") -> jax.Array:
    """Sum over each window (zero padding); shapes as :func:`max_pool`."""
    where = "sum_pool"
    _checks.check_floating(x, "input x", where)
    window, stride, pads = pool_geometry(x.shape, window, stride, padding, where)
    return _reduce(x, 0.0, lax.add, window, stride, pads)


def window_counts(
    spatial: tuple[int, int], window: Any, stride: Any, pads: Any, dtype=jnp.float32
) -> jax.Array:
    """``(1, H_out, W_out, 1)`` number of real (non-pad) input pixels in each window."""
    ones = jnp.ones((1, *spatial, 1), dtype)
    return _reduce(ones, 0.0, lax.add, window, stride, pads)


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
    if isinstance(p, bool) or not isinstance(p, int | float) or not (1 <= p < float("inf")):
        raise ValueError(f"{where}: p must be a finite number >= 1, got {p!r}")
    return float(p)


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
    _checks.check_floating(x, "input x", where)
    window, stride, pads = pool_geometry(x.shape, window, stride, padding, where)
    powered = x * x if p == 2 else jnp.abs(x) ** p
    return _safe_root(_reduce(powered, 0.0, lax.add, window, stride, pads), p)


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
    _checks.check_floating(x, "input x", where)
    g = _feature_groups(x, group_size, where)
    return _safe_root(jnp.sum(g * g, axis=-1), 2)


def feature_max_pool(x: jax.Array, group_size: int) -> jax.Array:
    """Max over groups of features (maxout): ``h_j = max_{k in N(j)} h'_k``.

    Groups as :func:`feature_l2_pool`. Returns ``(..., C // group_size)``.
    """
    where = "feature_max_pool"
    _checks.check_floating(x, "input x", where)
    return jnp.max(_feature_groups(x, group_size, where), axis=-1)
