"""Convolution (cross-correlation) and its unshared cousin, the locally connected layer.

Both follow the lecture's correlation ``h[m, n] = sum_{k,l} f[k, l] I[m + k, n + l]``
(no kernel flip), summed over input channels, one output map per filter. Layout: inputs
and outputs NHWC; conv kernels HWIO.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from funcnet import _checks

DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")


def _conv_geometry(x_shape, window, stride, padding, dilation, where):
    stride = _checks.ntuple(stride, 2, "stride", where)
    dilation = _checks.ntuple(dilation, 2, "dilation", where)
    padding = _checks.normalize_padding(padding, 2, where)
    pads = _checks.resolve_padding(padding, x_shape[1:3], window, stride, dilation)
    _checks.check_window_fits(x_shape[1:3], window, pads, where, dilation)
    return stride, dilation, pads


def conv2d(
    x: jax.Array,
    w: jax.Array,
    b: jax.Array | None = None,
    stride: Any = 1,
    padding: Any = "VALID",
    dilation: Any = 1,
) -> jax.Array:
    """2-D cross-correlation with several input channels and several filters.

    ``y[n, i, j, o] = sum_{k, l, c} w[k, l, c, o] xp[n, i*s + k*d, j*s + l*d, c] + b[o]``
    where ``xp`` is ``x`` padded, ``s`` the stride and ``d`` the dilation.

    Args:
      x: ``(N, H, W, C_in)`` input.
      w: ``(KH, KW, C_in, C_out)`` kernel (HWIO).
      b: ``(C_out,)`` bias, or ``None``.
      stride: positive int or pair (rows, cols).
      padding: ``"VALID"``, ``"SAME"``, an int, two ints, or two ``(low, high)`` pairs.
      dilation: positive int or pair; the kernel taps are ``d`` pixels apart.

    Returns:
      ``(N, H_out, W_out, C_out)`` with
      ``H_out = floor((H + pad_lo + pad_hi - ((KH - 1) d + 1)) / s) + 1`` (same for W).
    """
    stride, dilation, pads = check_conv2d(x, w, b, stride, padding, dilation)
    y = lax.conv_general_dilated(
        x,
        w,
        window_strides=stride,
        padding=pads,
        rhs_dilation=dilation,
        dimension_numbers=DIMENSION_NUMBERS,
    )
    return y if b is None else y + b


def check_conv2d(x, w, b, stride, padding, dilation):
    """Validate :func:`conv2d`'s arguments; ``(stride, dilation, pads)`` normalised."""
    where = "conv2d"
    _checks.check_rank(x.shape, 4, "input x", where, "N, H, W, C")
    _checks.check_rank(w.shape, 4, "kernel w", where, "KH, KW, C_in, C_out")
    if x.shape[3] != w.shape[2]:
        raise ValueError(
            f"{where}: input x has {x.shape[3]} channels (shape {x.shape}) but kernel w "
            f"expects {w.shape[2]} (w shape {w.shape}, HWIO)"
        )
    if b is not None and b.shape != (w.shape[3],):
        raise ValueError(f"{where}: expected bias b of shape ({w.shape[3]},), got {b.shape}")
    return _conv_geometry(x.shape, w.shape[:2], stride, padding, dilation, where)


def extract_patches(
    x: jax.Array, window: tuple[int, int], stride: Any, padding: Any, dilation: Any = 1
) -> jax.Array:
    """Every (dilated) window of ``x``: ``(N, H_out, W_out, KH, KW, C)``.

    ``p[n, i, j, k, l, c] = xp[n, i*s + k*d, j*s + l*d, c]`` with ``xp`` the padded input.
    """
    where = "extract_patches"
    _checks.check_rank(x.shape, 4, "input x", where, "N, H, W, C")
    window = _checks.ntuple(window, 2, "window", where)
    stride, dilation, pads = _conv_geometry(x.shape, window, stride, padding, dilation, where)
    p = lax.conv_general_dilated_patches(
        x,
        filter_shape=window,
        window_strides=stride,
        padding=pads,
        rhs_dilation=dilation,
        dimension_numbers=DIMENSION_NUMBERS,
        precision=lax.Precision.HIGHEST,
    )
    # Feature axis comes out channel-major: (C, KH, KW).
    n, oh, ow, _ = p.shape
    p = p.reshape(n, oh, ow, x.shape[3], window[0], window[1])
    return jnp.transpose(p, (0, 1, 2, 4, 5, 3))


def locally_connected2d(
    x: jax.Array,
    w: jax.Array,
    b: jax.Array | None = None,
    stride: Any = 1,
    padding: Any = "VALID",
    dilation: Any = 1,
) -> jax.Array:
    """Sparse interactions without parameter sharing: a separate filter per output position.

    ``y[n, i, j, o] = sum_{k, l, c} w[i, j, k, l, c, o] xp[n, i*s + k*d, j*s + l*d, c]
    + b[i, j, o]``: a convolution whose kernel depends on the output position ``(i, j)``.

    Args:
      x: ``(N, H, W, C_in)`` input.
      w: ``(H_out, W_out, KH, KW, C_in, C_out)`` one HWIO kernel per output position.
      b: ``(H_out, W_out, C_out)`` bias, or ``None``.
      stride, padding, dilation: as in :func:`conv2d`; they determine ``H_out, W_out``,
        which must match ``w``.

    Returns:
      ``(N, H_out, W_out, C_out)``.
    """
    stride, dilation, pads = check_locally_connected2d(x, w, b, stride, padding, dilation)
    p = extract_patches(x, w.shape[2:4], stride, pads, dilation)
    return locally_connected_from_patches(p, w, b)


def check_locally_connected2d(x, w, b, stride, padding, dilation):
    """Validate :func:`locally_connected2d`'s arguments; ``(stride, dilation, pads)``."""
    where = "locally_connected2d"
    _checks.check_rank(x.shape, 4, "input x", where, "N, H, W, C")
    _checks.check_rank(w.shape, 6, "kernel w", where, "H_out, W_out, KH, KW, C_in, C_out")
    if x.shape[3] != w.shape[4]:
        raise ValueError(
            f"{where}: input x has {x.shape[3]} channels (shape {x.shape}) but kernel w "
            f"expects {w.shape[4]} (w shape {w.shape})"
        )
    window = w.shape[2:4]
    stride, dilation, pads = _conv_geometry(x.shape, window, stride, padding, dilation, where)
    out_hw = _checks.conv_output_size(x.shape[1:3], window, stride, pads, dilation)
    if tuple(w.shape[:2]) != out_hw:
        raise ValueError(
            f"{where}: this input, window, stride and padding give {out_hw} output "
            f"positions but w has kernels for {tuple(w.shape[:2])}"
        )
    if b is not None and b.shape != (*out_hw, w.shape[5]):
        raise ValueError(
            f"{where}: expected bias b of shape {(*out_hw, w.shape[5])}, got {b.shape}"
        )
    return stride, dilation, pads


def locally_connected_from_patches(p: jax.Array, w: jax.Array, b: jax.Array | None) -> jax.Array:
    """``y[n,i,j,o] = sum_{k,l,c} p[n,i,j,k,l,c] w[i,j,k,l,c,o] + b[i,j,o]``."""
    y = jnp.einsum("nijklc,ijklco->nijo", p, w)
    return y if b is None else y + b
