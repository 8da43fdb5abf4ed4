"""Shared pieces of the hand-written rules: the rule record, static residual fields, and
the two window primitives every windowed backward pass is built from.

A windowed op (conv, locally connected, pooling) reads, for each window offset
``(k, l)``, the strided slice ``xp[:, k d : k d + (H_out - 1) s + 1 : s, ...]`` of the
padded input. Its backward pass writes each offset's contribution back to the same
strided positions and sums; :func:`window_slices` and :func:`scatter_windows` are that
pair (one is the transpose of the other), written with ``lax.slice`` / ``lax.pad`` so
XLA fuses the whole sum into one loop without a scatter.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax


class Rule(NamedTuple):
    """A hand-written rule pair in the ``jax.custom_vjp`` convention.

    ``fwd`` has the op's signature and returns ``(out, residuals)``; ``bwd(residuals, g)``
    returns one cotangent per name in ``diff`` (``None`` for an absent or integer
    argument). Every other argument of ``fwd`` is a static hyper-parameter.
    """

    fwd: Callable[..., tuple[Any, Any]]
    bwd: Callable[[Any, Any], tuple]
    diff: tuple[str, ...]


def static(cls):
    """Register a frozen dataclass as a static pytree node (no leaves).

    Residual NamedTuples keep hyper-parameters (stride, pads, axis, ...) in such fields,
    so the residuals stay a valid ``custom_vjp`` pytree of arrays while ``bwd`` still
    sees plain Python ints for shapes.
    """
    cls = dataclasses.dataclass(frozen=True)(cls)
    return jax.tree_util.register_static(cls)


@static
class Geometry:
    """Window geometry of a conv-like or pooling op on an NHWC input."""

    in_hw: tuple[int, int]
    window: tuple[int, int]
    stride: tuple[int, int]
    dilation: tuple[int, int]
    pads: tuple[tuple[int, int], tuple[int, int]]
    out_hw: tuple[int, int]

    @property
    def padded_hw(self) -> tuple[int, int]:
        return tuple(n + lo + hi for n, (lo, hi) in zip(self.in_hw, self.pads, strict=True))

    @property
    def tiles(self) -> bool:
        """Windows are non-overlapping and adjacent (stride == window, no dilation)."""
        return self.stride == self.window and self.dilation == (1, 1)


def make_geometry(in_hw, window, stride, dilation, pads) -> Geometry:
    out_hw = tuple(
        (n + lo + hi - ((k - 1) * d + 1)) // s + 1
        for n, (lo, hi), k, s, d in zip(in_hw, pads, window, stride, dilation, strict=True)
    )
    return Geometry(
        tuple(in_hw), tuple(window), tuple(stride), tuple(dilation), tuple(pads), out_hw
    )


def pad_input(x: jax.Array, geom: Geometry, value: float = 0.0) -> jax.Array:
    (t, b), (l, r) = geom.pads
    if t == b == l == r == 0:
        return x
    return lax.pad(x, jnp.asarray(value, x.dtype), ((0, 0, 0), (t, b, 0), (l, r, 0), (0, 0, 0)))


def crop_input(dxp: jax.Array, geom: Geometry) -> jax.Array:
    """Drop the padding again: the gradient w.r.t. the unpadded input."""
    (t, _), (l, _) = geom.pads
    h, w = geom.in_hw
    if dxp.shape[1:3] == (h, w):
        return dxp
    return dxp[:, t : t + h, l : l + w, :]


def window_slices(xp: jax.Array, geom: Geometry) -> list[jax.Array]:
    """``[xp[:, k d :: s, l d :: s, :] cropped to (H_out, W_out)]`` for ``k, l`` row-major."""
    (s0, s1), (d0, d1), (oh, ow) = geom.stride, geom.dilation, geom.out_hw
    n, c = xp.shape[0], xp.shape[3]
    out = []
    for k in range(geom.window[0]):
        for l in range(geom.window[1]):
            start = (0, k * d0, l * d1, 0)
            limit = (n, k * d0 + (oh - 1) * s0 + 1, l * d1 + (ow - 1) * s1 + 1, c)
            out.append(lax.slice(xp, start, limit, (1, s0, s1, 1)))
    return out


def scatter_windows(parts: list[jax.Array], geom: Geometry) -> jax.Array:
    """Transpose of :func:`window_slices`: sum each part back into the padded input.

    ``parts[k * KW + l]`` has shape ``(N, H_out, W_out, C)``; the result has the padded
    input's shape ``(N, H + pads, W + pads, C)``.
    """
    (s0, s1), (d0, d1), (oh, ow) = geom.stride, geom.dilation, geom.out_hw
    hp, wp = geom.padded_hw
    zero = jnp.zeros((), parts[0].dtype)
    total = None
    i = 0
    for k in range(geom.window[0]):
        for l in range(geom.window[1]):
            top, left = k * d0, l * d1
            bottom = hp - top - (oh - 1) * s0 - 1
            right = wp - left - (ow - 1) * s1 - 1
            config = ((0, 0, 0), (top, bottom, s0 - 1), (left, right, s1 - 1), (0, 0, 0))
            placed = lax.pad(parts[i], zero, config)
            total = placed if total is None else total + placed
            i += 1
    return total


def tile_view(xp: jax.Array, geom: Geometry) -> jax.Array:
    """For tiling windows: ``(N, H_out, PH, W_out, PW, C)`` view of the padded input.

    Rows and columns past the last full window are never read by the op, so they are
    cropped here and get a zero gradient from :func:`untile`.
    """
    (ph, pw), (oh, ow) = geom.window, geom.out_hw
    n, c = xp.shape[0], xp.shape[3]
    xp = xp[:, : oh * ph, : ow * pw, :]
    return xp.reshape(n, oh, ph, ow, pw, c)


def untile(d6: jax.Array, geom: Geometry) -> jax.Array:
    """Transpose of :func:`tile_view` followed by the crop of the padding."""
    n, oh, ph, ow, pw, c = d6.shape
    d = d6.reshape(n, oh * ph, ow * pw, c)
    hp, wp = geom.padded_hw
    if (hp, wp) != (oh * ph, ow * pw):
        d = jnp.pad(d, ((0, 0), (0, hp - oh * ph), (0, wp - ow * pw), (0, 0)))
    return crop_input(d, geom)


def sum_to_batchless(g: jax.Array, ndim_keep: int) -> jax.Array:
    """Sum ``g`` over its leading axes, keeping the trailing ``ndim_keep`` (bias grads)."""
    axes = tuple(range(g.ndim - ndim_keep))
    return jnp.sum(g, axis=axes) if axes else g
