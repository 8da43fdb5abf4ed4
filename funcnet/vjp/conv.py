"""Backward rules of :mod:`funcnet.ops.conv`: conv2d, extract_patches, locally connected.

For ``y[n,i,j,o] = sum_{k,l,c} w[k,l,c,o] xp[n, i s + k d, j s + l d, c] + b[o]``:

- input gradient: ``dxp[n,r,q,c] = sum_{i s + k d = r, j s + l d = q} g[n,i,j,o] w[k,l,c,o]``,
  a *correlation of the flipped kernel with the upstream gradient dilated by the
  stride* (the stride becomes holes in ``g``, the dilation stays on the kernel), over the
  padded input, whose padding is then cropped off;
- kernel gradient: ``dw[k,l,c,o] = sum_{n,i,j} xp[n, i s + k d, j s + l d, c] g[n,i,j,o]``,
  a *correlation of the input with the upstream gradient* (the gradient is the kernel,
  dilated by the stride; the output steps by the dilation);
- bias gradient: ``db[o] = sum_{n,i,j} g[n,i,j,o]``.

Each is one ``lax.conv_general_dilated`` with the right dimension numbers. A one-channel
input (the first layer of an image network) is faster as ``KH * KW`` shifted
multiply-adds, which XLA fuses into one loop; see ``BENCHMARKS.md``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from funcnet import ops
from funcnet.ops import conv as _conv
from funcnet.vjp._common import (
    Geometry,
    Rule,
    crop_input,
    make_geometry,
    pad_input,
    scatter_windows,
    window_slices,
)

DN = _conv.DIMENSION_NUMBERS


def conv_geometry(x_shape, window, stride, padding, dilation, where) -> Geometry:
    stride, dilation, pads = _conv._conv_geometry(x_shape, window, stride, padding, dilation, where)
    return make_geometry(x_shape[1:3], window, stride, dilation, pads)


# ---------------------------------------------------------------------------------------
# conv2d
# ---------------------------------------------------------------------------------------


class Conv2dResiduals(NamedTuple):
    x: jax.Array  # (N, H, W, C_in), unpadded
    w: jax.Array  # (KH, KW, C_in, C_out)
    b: jax.Array | None  # (C_out,) or None
    geom: Geometry  # static


def _shifted_mac(x: jax.Array, w: jax.Array, geom: Geometry) -> jax.Array:
    """Forward of a one-input-channel conv as ``sum_{k,l} slice_{k,l}(xp) * w[k,l,0,:]``."""
    xp = pad_input(x, geom)
    kw = geom.window[1]
    y = None
    for i, part in enumerate(window_slices(xp, geom)):
        term = part * w[i // kw, i % kw, 0]
        y = term if y is None else y + term
    return y


def conv2d_fwd(
    x: jax.Array,
    w: jax.Array,
    b: jax.Array | None = None,
    stride: Any = 1,
    padding: Any = "VALID",
    dilation: Any = 1,
):
    """``(conv2d(x, w, b, ...), residuals)``; validates as :func:`funcnet.ops.conv2d`."""
    stride, dilation, pads = _conv.check_conv2d(x, w, b, stride, padding, dilation)
    geom = make_geometry(x.shape[1:3], w.shape[:2], stride, dilation, pads)
    if x.shape[3] == 1:  # one input channel: shifted multiply-adds beat lax here
        y = _shifted_mac(x, w, geom)
        y = y if b is None else y + b
    else:
        y = ops.conv2d(x, w, b, stride, pads, dilation)
    return y, Conv2dResiduals(x, w, b, geom)


#: Kernels with at most this many taps take the matmul + scatter input gradient.
SCATTER_MAX_TAPS = 25


def conv2d_input_grad(res: Conv2dResiduals, g: jax.Array) -> jax.Array:
    """``dL/dx``, ``(N, H, W, C_in)``; the faster of two exact formulations per shape."""
    if res.geom.window[0] * res.geom.window[1] <= SCATTER_MAX_TAPS:
        return input_grad_scatter(res, g)
    return input_grad_correlation(res, g)


def input_grad_scatter(res: Conv2dResiduals, g: jax.Array) -> jax.Array:
    """``dL/dx`` as one matmul ``g w[k,l]^T`` for all taps, scattered back per tap.

    ``dxp[n, i s + k d, j s + l d, c] += sum_o g[n,i,j,o] w[k,l,c,o]``. On XLA:CPU this
    beats the transposed convolution for small kernels (LeNet: 2.0 vs 4.4 ms).
    """
    geom = res.geom
    kh, kw, c_in, c_out = res.w.shape
    taps = jnp.einsum("nijo,pco->nijpc", g, res.w.reshape(kh * kw, c_in, c_out))
    parts = [taps[:, :, :, p] for p in range(kh * kw)]
    return crop_input(scatter_windows(parts, geom), geom)


def input_grad_correlation(res: Conv2dResiduals, g: jax.Array) -> jax.Array:
    """``dL/dx`` as a correlation of the flipped kernel with ``g`` dilated by the stride."""
    geom = res.geom
    hp, wp = geom.padded_hw
    pads = []
    for axis in range(2):
        k_eff = (geom.window[axis] - 1) * geom.dilation[axis] + 1
        reach = (geom.out_hw[axis] - 1) * geom.stride[axis] + k_eff  # last padded pixel read
        extra = (hp, wp)[axis] - reach  # padded pixels past the last window: gradient 0
        lo, hi = geom.pads[axis]
        # A full correlation pads k_eff - 1 on both sides; cropping the input's padding
        # off at the same time makes these negative where the padding exceeds that.
        pads.append((k_eff - 1 - lo, k_eff - 1 + extra - hi))
    w_flipped = jnp.swapaxes(res.w[::-1, ::-1], 2, 3)  # (KH, KW, C_out, C_in)
    return lax.conv_general_dilated(
        g,
        w_flipped,
        window_strides=(1, 1),
        padding=pads,
        lhs_dilation=geom.stride,
        rhs_dilation=geom.dilation,
        dimension_numbers=DN,
    )


def conv2d_kernel_grad(res: Conv2dResiduals, g: jax.Array) -> jax.Array:
    """``dL/dw``, ``(KH, KW, C_in, C_out)``: correlation of the input with ``g``."""
    # (im2col + einsum measured 1.5-4x slower on XLA:CPU for LeNet's shapes.)
    geom = res.geom
    pads = []
    for axis in range(2):
        k_eff = (geom.window[axis] - 1) * geom.dilation[axis] + 1
        reach = (geom.out_hw[axis] - 1) * geom.stride[axis] + k_eff
        extra = geom.padded_hw[axis] - reach
        lo, hi = geom.pads[axis]
        pads.append((lo, hi - extra))
    # Batch axis of x becomes the contracted feature axis, its channels the "batch".
    return lax.conv_general_dilated(
        res.x,
        g,
        window_strides=geom.dilation,
        padding=pads,
        rhs_dilation=geom.stride,
        dimension_numbers=("CHWN", "IHWO", "HWNC"),
    )


def conv2d_bwd(res: Conv2dResiduals, g: jax.Array):
    """``(dL/dx, dL/dw, dL/db)`` for upstream ``g`` of shape ``(N, H_out, W_out, C_out)``."""
    db = None if res.b is None else jnp.sum(g, axis=(0, 1, 2))
    return conv2d_input_grad(res, g), conv2d_kernel_grad(res, g), db


# ---------------------------------------------------------------------------------------
# extract_patches and locally connected
# ---------------------------------------------------------------------------------------


class PatchesResiduals(NamedTuple):
    geom: Geometry  # static; the backward pass needs no arrays


def _patches_geometry(x, window, stride, padding, dilation):
    window = tuple(int(k) for k in ((window, window) if isinstance(window, int) else window))
    return conv_geometry(x.shape, window, stride, padding, dilation, "extract_patches")


def extract_patches_fwd(x: jax.Array, window: Any, stride: Any, padding: Any, dilation: Any = 1):
    """``(extract_patches(x, ...), residuals)``: patches ``(N, H_out, W_out, KH, KW, C)``."""
    p = ops.extract_patches(x, window, stride, padding, dilation)
    geom = _patches_geometry(x, window, stride, padding, dilation)
    return p, PatchesResiduals(geom)


def patches_input_grad(geom: Geometry, dp: jax.Array) -> jax.Array:
    """Scatter-add patch gradients ``(N, H_out, W_out, KH, KW, C)`` back onto the input."""
    kh, kw = geom.window
    parts = [dp[:, :, :, k, l, :] for k in range(kh) for l in range(kw)]
    return crop_input(scatter_windows(parts, geom), geom)


def extract_patches_bwd(res: PatchesResiduals, g: jax.Array):
    """``(dL/dx,)``: each input pixel collects the gradient of every patch it appears in."""
    return (patches_input_grad(res.geom, g),)


class LocallyConnectedResiduals(NamedTuple):
    patches: jax.Array  # (N, H_out, W_out, KH, KW, C_in)
    w: jax.Array  # (H_out, W_out, KH, KW, C_in, C_out)
    b: jax.Array | None
    geom: Geometry


def locally_connected2d_fwd(
    x: jax.Array,
    w: jax.Array,
    b: jax.Array | None = None,
    stride: Any = 1,
    padding: Any = "VALID",
    dilation: Any = 1,
):
    """``(locally_connected2d(x, w, b, ...), residuals)``."""
    stride, dilation, pads = _conv.check_locally_connected2d(x, w, b, stride, padding, dilation)
    geom = make_geometry(x.shape[1:3], w.shape[2:4], stride, dilation, pads)
    p = ops.extract_patches(x, geom.window, stride, pads, dilation)  # once: output and residual
    return _conv.locally_connected_from_patches(p, w, b), LocallyConnectedResiduals(p, w, b, geom)


def locally_connected2d_bwd(res: LocallyConnectedResiduals, g: jax.Array):
    """``(dL/dx, dL/dw, dL/db)``: per-position dense layers, then the patch scatter.

    ``dw[i,j,k,l,c,o] = sum_n p[n,i,j,k,l,c] g[n,i,j,o]``,
    ``dp[n,i,j,k,l,c] = sum_o g[n,i,j,o] w[i,j,k,l,c,o]``, ``db[i,j,o] = sum_n g[n,i,j,o]``.
    """
    hi = lax.Precision.HIGHEST
    dw = jnp.einsum("nijklc,nijo->ijklco", res.patches, g, precision=hi)
    dp = jnp.einsum("nijo,ijklco->nijklc", g, res.w, precision=hi)
    db = None if res.b is None else jnp.sum(g, axis=0)
    return patches_input_grad(res.geom, dp), dw, db


RULES = {
    ops.conv2d: Rule(conv2d_fwd, conv2d_bwd, ("x", "w", "b")),
    ops.extract_patches: Rule(extract_patches_fwd, extract_patches_bwd, ("x",)),
    ops.locally_connected2d: Rule(
        locally_connected2d_fwd, locally_connected2d_bwd, ("x", "w", "b")
    ),
}
