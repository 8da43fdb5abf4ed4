"""Window geometry, written once: padding, output sizes, and the strided window views.

Used by every windowed family (convolution, locally connected, pooling), by ``summary``
(receptive fields and FLOPs) and by the hand-written rules.

A windowed op (conv, locally connected, pooling) reads, for each window offset
``(k, l)``, the strided slice ``xp[:, k d : k d + (H_out - 1) s + 1 : s, ...]`` of the
padded input. Its backward pass writes each offset's contribution back to the same
strided positions and sums; :func:`window_slices` and :func:`scatter_windows` are that
pair (one is the transpose of the other), written with ``lax.slice`` / ``lax.pad`` so
XLA fuses the whole sum into one loop without a scatter.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from funcnet._checks import _is_int
from funcnet.nn.base import static

Padding = str | int | Sequence[int] | Sequence[tuple[int, int]]
PadPairs = tuple[tuple[int, int], ...]

PADDING_STRINGS = ("VALID", "SAME")


def normalize_padding(padding: Any, n: int, where: str) -> str | PadPairs:
    """Normalise padding to ``"VALID"``, ``"SAME"`` or ``n`` explicit (low, high) pairs.

    Accepted: ``"VALID"``/``"SAME"`` (any case), an int ``p`` (``p`` on every side), a
    sequence of ``n`` ints (symmetric per dimension), or ``n`` pairs ``(low, high)``.
    """
    if isinstance(padding, str):
        up = padding.upper()
        if up not in PADDING_STRINGS:
            raise ValueError(
                f"{where}: padding must be one of {PADDING_STRINGS}, an int, or {n} "
                f"(low, high) pairs, got {padding!r}"
            )
        return up
    bad = (
        f"{where}: padding must be one of {PADDING_STRINGS}, a non-negative int, "
        f"{n} ints, or {n} (low, high) pairs, got {padding!r}"
    )
    if _is_int(padding):
        p = operator.index(padding)
        if p < 0:
            raise ValueError(bad)
        return ((p, p),) * n
    if not isinstance(padding, Sequence) or len(padding) != n:
        raise ValueError(bad)
    pairs = []
    for item in padding:
        if _is_int(item):
            lo = hi = operator.index(item)
        elif isinstance(item, Sequence) and len(item) == 2 and all(_is_int(v) for v in item):
            lo, hi = (operator.index(v) for v in item)
        else:
            raise ValueError(bad)
        if lo < 0 or hi < 0:
            raise ValueError(bad)
        pairs.append((lo, hi))
    return tuple(pairs)


def effective_window(window: Sequence[int], dilation: Sequence[int]) -> tuple[int, ...]:
    """Spatial extent of a dilated window: ``(k - 1) * d + 1`` per dimension."""
    return tuple((k - 1) * d + 1 for k, d in zip(window, dilation, strict=True))


def resolve_padding(
    padding: str | PadPairs,
    in_spatial: Sequence[int],
    window: Sequence[int],
    stride: Sequence[int],
    dilation: Sequence[int] | None = None,
) -> PadPairs:
    """Explicit (low, high) pads for a normalised padding on a given input size.

    ``"SAME"`` follows XLA/TensorFlow: the output has ``ceil(in / stride)`` positions and
    the total padding ``max((out - 1) * stride + k_eff - in, 0)`` is split with the extra
    pixel (if odd) at the high end. ``"VALID"`` pads nothing.
    """
    if dilation is None:
        dilation = (1,) * len(window)
    k_eff = effective_window(window, dilation)
    if padding == "VALID":
        return tuple((0, 0) for _ in window)
    if padding == "SAME":
        pads = []
        for size, k, s in zip(in_spatial, k_eff, stride, strict=True):
            out = -(-size // s)
            total = max((out - 1) * s + k - size, 0)
            pads.append((total // 2, total - total // 2))
        return tuple(pads)
    return tuple(padding)


def conv_output_size(
    in_spatial: Sequence[int],
    window: Sequence[int],
    stride: Sequence[int],
    pads: PadPairs,
    dilation: Sequence[int] | None = None,
) -> tuple[int, ...]:
    """``floor((in + lo + hi - k_eff) / stride) + 1`` per spatial dimension."""
    if dilation is None:
        dilation = (1,) * len(window)
    k_eff = effective_window(window, dilation)
    return tuple(
        (size + lo + hi - k) // s + 1
        for size, (lo, hi), k, s in zip(in_spatial, pads, k_eff, stride, strict=True)
    )


def check_window_fits(
    in_spatial: Sequence[int],
    window: Sequence[int],
    pads: PadPairs,
    where: str,
    dilation: Sequence[int] | None = None,
) -> None:
    """Raise if the (dilated) window is larger than the padded input."""
    if dilation is None:
        dilation = (1,) * len(window)
    k_eff = effective_window(window, dilation)
    padded = tuple(size + lo + hi for size, (lo, hi) in zip(in_spatial, pads, strict=True))
    if any(k > p for k, p in zip(k_eff, padded, strict=True)):
        raise ValueError(
            f"{where}: window {tuple(k_eff)} (after dilation) is larger than the padded "
            f"input {padded} (input {tuple(in_spatial)}, padding {pads}); use a smaller "
            f"window or more padding"
        )



@static
class Geometry:
    """Window geometry of a conv-like or pooling op on an NHWC input."""

    in_hw: tuple[int, int]
    window: tuple[int, int]
    stride: tuple[int, int]
    dilation: tuple[int, int]
    pads: tuple[tuple[int, int], tuple[int, int]]
    out_hw: tuple[int, int]
    groups: int = 1  # feature groups of a grouped convolution

    @property
    def padded_hw(self) -> tuple[int, int]:
        return tuple(n + lo + hi for n, (lo, hi) in zip(self.in_hw, self.pads, strict=True))

    @property
    def tiles(self) -> bool:
        """Windows are non-overlapping and adjacent (stride == window, no dilation)."""
        return self.stride == self.window and self.dilation == (1, 1)


def make_geometry(in_hw, window, stride, dilation, pads, groups: int = 1) -> Geometry:
    out_hw = tuple(
        (n + lo + hi - ((k - 1) * d + 1)) // s + 1
        for n, (lo, hi), k, s, d in zip(in_hw, pads, window, stride, dilation, strict=True)
    )
    return Geometry(
        tuple(in_hw), tuple(window), tuple(stride), tuple(dilation), tuple(pads), out_hw,
        groups,
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
