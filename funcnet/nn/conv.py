"""Convolution (cross-correlation, grouped or not) and the locally connected layer.

Both follow the lecture's correlation ``h[m, n] = sum_{k,l} f[k, l] I[m + k, n + l]``
(no kernel flip), summed over input channels, one output map per filter. Layout: inputs
and outputs NHWC; conv kernels HWIO.

The backward rules, for
``y[n,i,j,o] = sum_{k,l,c} w[k,l,c,o] xp[n, i s + k d, j s + l d, c] + b[o]``:

- input gradient: ``dxp[n,r,q,c] = sum_{i s + k d = r, j s + l d = q} g[n,i,j,o] w[k,l,c,o]``,
  a *correlation of the flipped kernel with the upstream gradient dilated by the
  stride* (the stride becomes holes in ``g``, the dilation stays on the kernel), over the
  padded input, whose padding is then cropped off;
- kernel gradient: ``dw[k,l,c,o] = sum_{n,i,j} xp[n, i s + k d, j s + l d, c] g[n,i,j,o]``,
  a *correlation of the input with the upstream gradient* (the gradient is the kernel,
  dilated by the stride; the output steps by the dilation);
- bias gradient: ``db[o] = sum_{n,i,j} g[n,i,j,o]``.

Each is one ``lax.conv_general_dilated`` with the right dimension numbers: the plain
formulations. Beside them, for the shapes where XLA:CPU runs those badly (few input
channels), exact second formulations of the same sums, chosen per shape by
:func:`forward_path`, :func:`input_grad_path` and :func:`kernel_grad_path` (each says
what was measured):

- *banded matmul* (forward and input gradient): each kernel row placed at every output
  column of a row makes a banded matrix ``B``; the correlation is then one matmul of
  the input rows an output row reads with ``B``, and the input gradient one matmul of
  ``g`` with ``B^T`` whose rows are added back in place;
- *row by row* (input gradient): one matmul ``g w[k]^T`` per kernel row, its taps
  shifted into place and added (the plain scatter of all taps,
  :func:`input_grad_scatter`, decomposed into two 1-D steps);
- *in pieces* (kernel gradient): the batch sum split into partial sums over pieces
  of 16 examples, each a correlation that XLA:CPU runs on its faster kernel.

:func:`plain_formulations` turns the second formulations off (for exporters).

A grouped convolution (``groups=G``) is ``G`` independent convolutions on channel
slices: its rule applies the rule above to each group and concatenates.
"""

from __future__ import annotations

import contextlib
import dataclasses
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
)
from funcnet.nn.base import (
    DEFAULT_B_INIT,
    DEFAULT_W_INIT,
    RF,
    Initializer,
    Layer,
    Rule,
    Shape,
    check_bool,
    check_init_fn,
    check_param_dtype,
)

# ---------------------------------------------------------------------------------------
# The ops
# ---------------------------------------------------------------------------------------

DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")


def _conv_geometry(x_shape, window, stride, padding, dilation, where):
    stride = _checks.ntuple(stride, 2, "stride", where)
    dilation = _checks.ntuple(dilation, 2, "dilation", where)
    padding = geo.normalize_padding(padding, 2, where)
    pads = geo.resolve_padding(padding, x_shape[1:3], window, stride, dilation)
    geo.check_window_fits(x_shape[1:3], window, pads, where, dilation)
    return stride, dilation, pads


_PLAIN = {"on": False}


def formulations_key() -> bool:
    """Whether :func:`plain_formulations` is on: part of the cache key of every compiled
    program whose trace picks a convolution's formulation (eager ops and forward passes,
    fit's step bodies), so a program traced with one choice never serves the other."""
    return _PLAIN["on"]


@compiled_when_eager(formulations_key)
def conv2d(
    x: jax.Array,
    w: jax.Array,
    b: jax.Array | None = None,
    stride: Any = 1,
    padding: Any = "VALID",
    dilation: Any = 1,
    groups: int = 1,
) -> jax.Array:
    """2-D cross-correlation with several input channels and several filters.

    ``y[n, i, j, o] = sum_{k, l, c} w[k, l, c, o] xp[n, i*s + k*d, j*s + l*d, c] + b[o]``
    where ``xp`` is ``x`` padded, ``s`` the stride and ``d`` the dilation. With
    ``groups = G`` the channels split into ``G`` groups and output channel ``o`` only sees
    the input channels of its group (``c`` runs over ``C_in / G`` of them); ``G = C_in``
    is a depthwise convolution.

    Args:
      x: ``(N, H, W, C_in)`` input.
      w: ``(KH, KW, C_in / G, C_out)`` kernel (HWIO).
      b: ``(C_out,)`` bias, or ``None``.
      stride: positive int or pair (rows, cols).
      padding: ``"VALID"``, ``"SAME"``, an int, two ints, or two ``(low, high)`` pairs.
      dilation: positive int or pair; the kernel taps are ``d`` pixels apart.
      groups: ``G``, dividing both ``C_in`` and ``C_out``.

    Returns:
      ``(N, H_out, W_out, C_out)`` with
      ``H_out = floor((H + pad_lo + pad_hi - ((KH - 1) d + 1)) / s) + 1`` (same for W),
      in the promoted dtype of ``x`` and ``w``.
    """
    x, w, b = _arrays("conv2d", x=x, w=w, b=b)
    stride, dilation, pads = check_conv2d(x, w, b, stride, padding, dilation, groups)
    x, w = _promote(x, w)
    geom = make_geometry(x.shape[1:3], w.shape[:2], stride, dilation, pads, groups)
    return _conv2d(x, w, b, geom)


def _conv2d(x: jax.Array, w: jax.Array, b: jax.Array | None, geom: Geometry) -> jax.Array:
    """:func:`conv2d` of checked, promoted arrays, in the formulation :func:`forward_path`
    picks (inference, autodiff and the hand rule's forward pass alike)."""
    if forward_path(w.shape, geom) == "banded":
        y = forward_banded(x, w, geom)
    else:
        y = lax.conv_general_dilated(
            x,
            w,
            window_strides=geom.stride,
            padding=geom.pads,
            rhs_dilation=geom.dilation,
            dimension_numbers=DIMENSION_NUMBERS,
            feature_group_count=geom.groups,
        )
    return y if b is None else y + b


_WHAT = {"x": "input x", "w": "kernel w", "b": "bias b"}


def _arrays(where: str, **arrays: Any) -> list:
    """The arguments as arrays of real numbers (``None`` kept), else a ``TypeError``."""
    out = []
    for name, a in arrays.items():
        if a is not None or name != "b":
            a = _checks.as_array(a, _WHAT[name], where)
            _checks.check_real(a, _WHAT[name], where)
        out.append(a)
    return out


def _promote(x: jax.Array, w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``x`` and ``w`` in one dtype (``lax`` refuses mixed ones; e.g. a bfloat16 input)."""
    dtype = jnp.result_type(x.dtype, w.dtype)
    return x.astype(dtype), w.astype(dtype)


def check_conv2d(x, w, b, stride, padding, dilation, groups=1):
    """Validate :func:`conv2d`'s arguments; ``(stride, dilation, pads)`` normalised."""
    where = "conv2d"
    _checks.check_rank(x.shape, 4, "input x", where, "N, H, W, C")
    _checks.check_rank(w.shape, 4, "kernel w", where, "KH, KW, C_in / groups, C_out")
    groups = _checks.positive_int(groups, "groups", where)
    if min(w.shape) == 0:
        raise ValueError(f"{where}: kernel w must have no empty axis (KH, KW, C_in / groups, "
                         f"C_out all >= 1), got shape {w.shape}")
    if x.shape[3] != w.shape[2] * groups:
        raise ValueError(
            f"{where}: input x has {x.shape[3]} channels (shape {x.shape}) but kernel w "
            f"expects {w.shape[2] * groups} (w shape {w.shape}, HWIO, groups={groups})"
        )
    if w.shape[3] % groups:
        raise ValueError(
            f"{where}: the kernel's {w.shape[3]} output channels do not divide into "
            f"groups={groups}"
        )
    if b is not None and b.shape != (w.shape[3],):
        raise ValueError(f"{where}: expected bias b of shape ({w.shape[3]},), got {b.shape}")
    return _conv_geometry(x.shape, w.shape[:2], stride, padding, dilation, where)


@compiled_when_eager(formulations_key)
def extract_patches(
    x: jax.Array, window: tuple[int, int], stride: Any, padding: Any, dilation: Any = 1
) -> jax.Array:
    """Every (dilated) window of ``x``: ``(N, H_out, W_out, KH, KW, C)``.

    ``p[n, i, j, k, l, c] = xp[n, i*s + k*d, j*s + l*d, c]`` with ``xp`` the padded input.
    """
    where = "extract_patches"
    (x,) = _arrays(where, x=x)
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


@compiled_when_eager(formulations_key)
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
    x, w, b = _arrays("locally_connected2d", x=x, w=w, b=b)
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
    out_hw = geo.conv_output_size(x.shape[1:3], window, stride, pads, dilation)
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



# ---------------------------------------------------------------------------------------
# Their rules
# ---------------------------------------------------------------------------------------


DN = DIMENSION_NUMBERS


def conv_geometry(x_shape, window, stride, padding, dilation, where) -> Geometry:
    stride, dilation, pads = _conv_geometry(x_shape, window, stride, padding, dilation, where)
    return make_geometry(x_shape[1:3], window, stride, dilation, pads)


# ---------------------------------------------------------------------------------------
# conv2d
# ---------------------------------------------------------------------------------------


class Conv2dResiduals(NamedTuple):
    x: jax.Array  # (N, H, W, C_in), unpadded
    w: jax.Array  # (KH, KW, C_in, C_out)
    b: jax.Array | None  # (C_out,) or None
    geom: Geometry  # static


@contextlib.contextmanager
def plain_formulations():
    """Within this block, convolutions trace as ``lax.conv_general_dilated`` only.

    For exporters that map JAX primitives to another format's operators
    (:mod:`funcnet.onnx`: a ``Conv`` node, not the banded matmul's gathers and reshapes).
    The results are the same sums either way.
    """
    before = _PLAIN["on"]
    _PLAIN["on"] = True
    try:
        yield
    finally:
        _PLAIN["on"] = before


def forward_path(w_shape: tuple[int, ...], geom: Geometry) -> str:
    """Which formulation :func:`conv2d` and :func:`conv2d_fwd` take for this kernel and
    geometry (``"lax"`` inside :func:`plain_formulations`).

    - ``"banded"`` (:func:`forward_banded`) for an ungrouped convolution of a
      one-channel input (the first layer of an image network). ``lax``'s convolution
      does not reach XLA:CPU's fast kernels with one input channel (LeNet-5's conv1,
      28x28x1 -> 28x28x6, 5x5, batch 128: 15 ms alone on 2 loaded cores, against 2.0 ms
      banded). The 25 shifted multiply-adds used before are cheaper alone (1.0 ms) but
      XLA fuses them into every consumer and recomputes them there: in the LeNet-5 step
      the max-pool backward pass's search for each window's first maximum took 8.6 ms
      of 25 ms with them, 0.9-1.2 ms reading the materialised banded product; the
      whole step went from 28.6 to 23.4 ms (same run, medians of 12 rounds, the band
      in one block).
      Stride 1 only: a strided first layer reads fewer pixels per output and ``lax``
      is faster alone (96x96x1 -> 48x48x32, 7x7, stride 2, batch 8: 1.2 ms against
      2.4 banded; stride 1, 64x64x1 -> 16 channels, 3x3: 5.0 against 1.7).
    - ``"lax"`` (``lax.conv_general_dilated``) otherwise: with a few input channels XLA
      hands it to its fast path (LeNet-5's conv2: 0.3-1.1 ms in the step).

    ``conv2d`` itself (inference, :func:`funcnet.train.evaluate`, autodiff) takes the
    same path: evaluating LeNet-5 on 10,000 images went from 558-681 ms to 251-291 ms.
    Finite inputs give the same sums either way. A non-finite input pixel differs: the
    band's zeros multiply it too (``0 * inf = nan``), so an ``inf`` or ``nan`` reaches
    every output of its block, not only the outputs whose window holds it (as with
    Winograd-type kernels in other libraries). :func:`plain_formulations` gives the
    exact propagation (e.g. to map receptive fields by poisoning pixels).
    """
    one_channel = w_shape[2] == 1 and geom.groups == 1
    fast = one_channel and geom.stride == (1, 1) and not _PLAIN["on"]
    return "banded" if fast else "lax"


#: Output columns per block of the banded matmuls (see :func:`forward_banded`).
BAND_BLOCK = 4


def _blocks(geom: Geometry, block: int) -> tuple[int, int]:
    """``(number of blocks, input columns one block reads)`` for ``block`` output columns."""
    n_blocks = -(-geom.out_hw[1] // block)
    span = (block - 1) * geom.stride[1] + (geom.window[1] - 1) * geom.dilation[1] + 1
    return n_blocks, span


def _band(geom: Geometry, block: int, dtype) -> jax.Array:
    """``S[q, j, l] = 1`` where column ``q`` of a block is tap ``l`` of its output column ``j``."""
    _, span = _blocks(geom, block)
    q = np.arange(span)[:, None, None]
    j = np.arange(block)[None, :, None]
    l = np.arange(geom.window[1])[None, None, :]
    return jnp.asarray(q == j * geom.stride[1] + l * geom.dilation[1], dtype)


def _banded_kernel(w: jax.Array, geom: Geometry, block: int) -> jax.Array:
    """``B[(k, q, c), (j, o)] = w[k, l, c, o]`` where ``q = j s + l d``, else 0."""
    kh, _, c, o = w.shape
    band = jnp.einsum("qjl,klco->kqcjo", _band(geom, block, w.dtype), w)
    return band.reshape(kh * band.shape[1] * c, block * o)


def _kernel_rows(x: jax.Array, geom: Geometry, block: int) -> jax.Array:
    """``r[n, i, b, (k, q, c)] = xp[n, i s + k d, b J s + q, c]``, ``(N, H_out, nb, KH span C)``.

    The input pixels the ``J = block`` output columns of block ``b`` of output row ``i``
    read: ``KH`` rows of ``span`` columns. Columns past the padded input are zeros; they
    only feed output columns past ``W_out``, which are cropped.
    """
    n_blocks, span = _blocks(geom, block)
    xp = pad_input(x, geom)
    n, _, wp, c = xp.shape
    need = (n_blocks - 1) * block * geom.stride[1] + span
    if need > wp:
        xp = jnp.pad(xp, ((0, 0), (0, 0), (0, need - wp), (0, 0)))
    (s0, s1), d0, oh = geom.stride, geom.dilation[0], geom.out_hw[0]
    rows = []
    for k in range(geom.window[0]):
        row = xp[:, k * d0 : k * d0 + (oh - 1) * s0 + 1 : s0]
        starts = range(0, n_blocks * block * s1, block * s1)
        blocks = jnp.stack([row[:, :, q : q + span] for q in starts], axis=2)
        rows.append(blocks.reshape(n, oh, n_blocks, span * c))
    return jnp.concatenate(rows, axis=-1)


def forward_banded(x: jax.Array, w: jax.Array, geom: Geometry) -> jax.Array:
    """The correlation as one matmul of input rows with a banded kernel matrix (no bias).

    Output columns go in blocks of ``J =`` :data:`BAND_BLOCK`: ``y[n, i, (b, j), o] =
    sum_p r[n, i, b, p] B[p, (j, o)]``, ``r`` the input pixels block ``b`` of output row
    ``i`` reads (:func:`_kernel_rows`) and ``B`` each kernel row placed at each of the
    ``J`` columns (:func:`_banded_kernel`; the same for every block). Exact: the zeros
    of ``B`` add exact zeros. Blocks keep that zero padding small whatever the image
    width (LeNet-5's conv1 alone: 0.8 ms in blocks of 4 columns, 1.8 ms in one block of
    28; in the whole step the two are alike).
    """
    o, (oh, ow), block = w.shape[3], geom.out_hw, BAND_BLOCK
    n_blocks, _ = _blocks(geom, block)
    y = _kernel_rows(x, geom, block) @ _banded_kernel(w, geom, block)
    return y.reshape(x.shape[0], oh, n_blocks * block, o)[:, :, :ow]


def conv2d_fwd(
    x: jax.Array,
    w: jax.Array,
    b: jax.Array | None = None,
    stride: Any = 1,
    padding: Any = "VALID",
    dilation: Any = 1,
    groups: int = 1,
):
    """``(conv2d(x, w, b, ...), residuals)``; validates as :func:`conv2d`."""
    x, w, b = _arrays("conv2d", x=x, w=w, b=b)
    stride, dilation, pads = check_conv2d(x, w, b, stride, padding, dilation, groups)
    x, w = _promote(x, w)
    geom = make_geometry(x.shape[1:3], w.shape[:2], stride, dilation, pads, groups)
    return _conv2d(x, w, b, geom), Conv2dResiduals(x, w, b, geom)


def _groups(res: Conv2dResiduals, g: jax.Array):
    """Per group: ``(residuals, g)`` of an ungrouped convolution on its channel slices."""
    n_groups = res.geom.groups
    c_in, c_out = res.x.shape[3] // n_groups, res.w.shape[3] // n_groups
    geom = dataclasses.replace(res.geom, groups=1)
    for i in range(n_groups):
        xi = res.x[..., i * c_in : (i + 1) * c_in]
        wi = res.w[..., i * c_out : (i + 1) * c_out]
        yield Conv2dResiduals(xi, wi, None, geom), g[..., i * c_out : (i + 1) * c_out]


def input_grad_path(w_shape: tuple[int, ...], geom: Geometry) -> str:
    """Which formulation :func:`conv2d_input_grad` takes for this (ungrouped) kernel.

    Measured on 2 loaded cores (load 2.8-4), medians, ``experiments/bench_rules.py``:

    - ``"correlation"`` (:func:`input_grad_correlation`, the plain rule) from
      :data:`FEW_CHANNELS` input channels on: as fast as the others at 8 channels
      (7x7, stride 2: 7.6 ms against 7.5 row by row) and much faster with more (3x3,
      32 channels, 32x32, batch 32: 8.1 against 37 row by row; 5x5, 64 channels: 9.7
      against 18.9).
    - with fewer input channels a convolution with so few output features runs badly on
      XLA:CPU; matmuls that contract ``C_out`` do better:

      - ``"banded"`` (:func:`input_grad_banded`) when the output is at most
        ``2 KW`` columns wide, so that the banded matrix is at most about half zeros.
        LeNet-5's conv2 (14x14x6 <- 10x10x16, 5x5, batch 128), in the whole training
        step: 18.8 ms against 24.3 for the row-by-row form; alone 2.9 ms against 3.7
        (row-by-row), 7.1 (one matmul + 2-D scatter) and 8.5 (correlation). In the step
        its result is the output of a matmul, which XLA materialises; the shifts and
        adds of the other forms are fused into the max-pool backward pass below and
        recomputed for each of the pool window's pixels.
      - ``"rows"`` (:func:`input_grad_rows`) for wider outputs, where the band would be
        mostly zeros (32x32x3, 3x3: 2.1 ms against 4.5 banded, 4.5 correlation; 64x64x4,
        5x5: 7.4 against 18 and 12).
    """
    _, kw, c_in, _ = w_shape
    if c_in >= FEW_CHANNELS:
        return "correlation"
    return "banded" if geom.out_hw[1] <= 2 * kw else "rows"


#: Inputs with fewer channels than this take a matmul form of the input gradient.
FEW_CHANNELS = 8


def _conv_cotangent(res: Conv2dResiduals, g: jax.Array) -> jax.Array:
    """``g`` in the dtype of the convolution itself (that of ``x`` and ``w``): a bias of a
    wider dtype (a float32 ``b`` on bfloat16 ``x`` and ``w``) widens the output and so
    ``g``, which ``lax``'s convolutions would refuse next to ``w``."""
    dtype = jnp.result_type(res.x.dtype, res.w.dtype)
    return g if g.dtype == dtype else g.astype(dtype)


def conv2d_input_grad(res: Conv2dResiduals, g: jax.Array) -> jax.Array:
    """``dL/dx``, ``(N, H, W, C_in)``; the formulation :func:`input_grad_path` picks."""
    g = _conv_cotangent(res, g)
    if res.geom.groups > 1:
        return jnp.concatenate([conv2d_input_grad(r, gi) for r, gi in _groups(res, g)], axis=3)
    return INPUT_GRADS[input_grad_path(res.w.shape, res.geom)](res, g)


def input_grad_scatter(res: Conv2dResiduals, g: jax.Array) -> jax.Array:
    """``dL/dx`` as one matmul ``g w[k,l]^T`` for all taps, scattered back per tap.

    ``dxp[n, i s + k d, j s + l d, c] += sum_o g[n,i,j,o] w[k,l,c,o]``. The plain form
    of :func:`input_grad_rows` (same sums, one 2-D scatter of all ``KH KW`` taps).
    """
    geom = res.geom
    kh, kw, c_in, c_out = res.w.shape
    taps = jnp.einsum("nijo,pco->nijpc", g, res.w.reshape(kh * kw, c_in, c_out))
    parts = [taps[:, :, :, p] for p in range(kh * kw)]
    return crop_input(scatter_windows(parts, geom), geom)


def _place(part: jax.Array, axis: int, start: int, stride: int, size: int) -> jax.Array:
    """``part`` written at positions ``start + i * stride`` of an axis of length ``size``."""
    config = [(0, 0, 0)] * 4
    config[axis] = (start, size - start - (part.shape[axis] - 1) * stride - 1, stride - 1)
    return lax.pad(part, jnp.zeros((), part.dtype), config)


def input_grad_rows(res: Conv2dResiduals, g: jax.Array) -> jax.Array:
    """``dL/dx`` of :func:`input_grad_scatter`, summed one kernel row at a time.

    For each kernel row ``k``: ``t[n,i,j,l,c] = sum_o g[n,i,j,o] w[k,l,c,o]`` (one
    matmul), its taps placed along W at columns ``j s + l d`` and summed, the row placed
    along H at rows ``i s + k d``. The same products and sums as the scatter, but each
    matmul result is ``KH`` times smaller and each add is a 1-D shift of it, which
    XLA:CPU fuses into one pass over cache-sized arrays.
    """
    geom = res.geom
    (s0, s1), (d0, d1) = geom.stride, geom.dilation
    hp, wp = geom.padded_hw
    dxp = None
    for k in range(geom.window[0]):
        t = jnp.einsum("nijo,lco->nijlc", g, res.w[k])
        row = None
        for l in range(geom.window[1]):
            part = _place(t[:, :, :, l], 2, l * d1, s1, wp)
            row = part if row is None else row + part
        part = _place(row, 1, k * d0, s0, hp)
        dxp = part if dxp is None else dxp + part
    return crop_input(dxp, geom)


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


def input_grad_banded(res: Conv2dResiduals, g: jax.Array) -> jax.Array:
    """``dL/dx`` through :func:`forward_banded`'s matmul, all columns in one block.

    ``dr[n, i, (k, q, c)] = sum_{j, o} g[n, i, j, o] B[(k, q, c), (j, o)]`` is the gradient
    of the input rows output row ``i`` read (``B`` for ``J = W_out``, so that the blocks
    do not overlap); row ``k`` of it goes back to padded input row ``i s + k d``.
    """
    geom = res.geom
    kh, _, c, _ = res.w.shape
    n, oh, ow, o = g.shape
    hp, wp = geom.padded_hw
    _, span = _blocks(geom, ow)
    d_rows = g.reshape(n, oh, ow * o) @ _banded_kernel(res.w, geom, ow).T
    d_rows = jnp.pad(d_rows.reshape(n, oh, kh, span, c),
                     ((0, 0), (0, 0), (0, 0), (0, wp - span), (0, 0)))
    dxp = None
    for k in range(kh):
        part = _place(d_rows[:, :, k], 1, k * geom.dilation[0], geom.stride[0], hp)
        dxp = part if dxp is None else dxp + part
    return crop_input(dxp, geom)


#: The exact formulations of the input gradient, by the names :func:`input_grad_path` gives.
INPUT_GRADS = {
    "rows": input_grad_rows,
    "scatter": input_grad_scatter,
    "correlation": input_grad_correlation,
    "banded": input_grad_banded,
}


#: Examples per piece of :func:`kernel_grad_chunked` (see :func:`kernel_grad_path`).
KERNEL_GRAD_CHUNK = 16
#: :func:`kernel_grad_path` keeps one correlation beyond this many pieces.
KERNEL_GRAD_MAX_CHUNKS = 32


def kernel_grad_path(w_shape: tuple[int, ...], n: Any, dtype: Any) -> str:
    """Which formulation :func:`conv2d_kernel_grad` takes for an (ungrouped) kernel
    ``w_shape`` and a batch of ``n`` examples of ``dtype``.

    The kernel gradient is a correlation whose contracted "feature" axis is the batch.
    XLA:CPU (jax 0.10) hands a float convolution to its YNNPACK library when its input or
    output feature axis is longer than 16, else to its Eigen kernel; for these
    correlations YNNPACK is the slower of the two (LeNet-5 at batch 128 alone, 2
    cores: conv2's kernel gradient 3.1 ms whole, 1.1 ms as 8 pieces of 16 examples;
    conv1's 2.7 ms against 1.5 ms).

    - ``"chunked"`` (:func:`kernel_grad_chunked`): on the CPU backend, for float32 /
      float64 kernels of at most 16 output channels and batches of more than
      :data:`KERNEL_GRAD_CHUNK` examples (and at most :data:`KERNEL_GRAD_MAX_CHUNKS`
      pieces of them). The LeNet-5 hand-rule step, batch 128, same process, medians of
      12 interleaved rounds: 9.9-10.0 ms -> 8.2-8.6 ms (pieces of 32, which YNNPACK
      takes again: 8.2-9.0; of 8: 8.5).
    - ``"lax"`` (:func:`kernel_grad_correlation`, one correlation) otherwise: other
      backends, wider outputs (YNNPACK takes every piece anyway), small batches, and
      inside :func:`plain_formulations`.
    """
    fits = (w_shape[3] <= 16 and jnp.dtype(dtype) in (jnp.float32, jnp.float64)
            and isinstance(n, int) and KERNEL_GRAD_CHUNK < n
            and -(-n // KERNEL_GRAD_CHUNK) <= KERNEL_GRAD_MAX_CHUNKS)
    if fits and not _PLAIN["on"] and jax.default_backend() == "cpu":
        return "chunked"
    return "lax"


def conv2d_kernel_grad(res: Conv2dResiduals, g: jax.Array) -> jax.Array:
    """``dL/dw``, ``(KH, KW, C_in, C_out)``; the formulation :func:`kernel_grad_path` picks."""
    # im2col + einsum measured 1.5-4x slower on XLA:CPU for LeNet's shapes, and the
    # banded matmul of forward_banded (dB = r^T g) no faster in the LeNet-5 step.
    g = _conv_cotangent(res, g)
    if res.geom.groups > 1:
        return jnp.concatenate([conv2d_kernel_grad(r, gi) for r, gi in _groups(res, g)], axis=3)
    path = kernel_grad_path(res.w.shape, res.x.shape[0], res.x.dtype)
    return KERNEL_GRADS[path](res, g)


def kernel_grad_chunked(res: Conv2dResiduals, g: jax.Array) -> jax.Array:
    """:func:`kernel_grad_correlation` summed over pieces of :data:`KERNEL_GRAD_CHUNK`
    examples: the same products, the batch sum split into partial sums."""
    n, size = res.x.shape[0], KERNEL_GRAD_CHUNK
    dw = None
    for start in range(0, n, size):
        piece = res._replace(x=res.x[start : start + size])
        part = kernel_grad_correlation(piece, g[start : start + size])
        dw = part if dw is None else dw + part
    return dw


def kernel_grad_correlation(res: Conv2dResiduals, g: jax.Array) -> jax.Array:
    """``dL/dw`` as one correlation of the input with ``g`` (ungrouped)."""
    geom = res.geom
    pads = []
    for axis in range(2):
        k_eff = (geom.window[axis] - 1) * geom.dilation[axis] + 1
        reach = (geom.out_hw[axis] - 1) * geom.stride[axis] + k_eff
        extra = geom.padded_hw[axis] - reach
        lo, hi = geom.pads[axis]
        pads.append((lo, hi - extra))
    # The batch axis of x becomes the contracted feature axis, its channels the "batch",
    # by explicit transposes into the canonical NHWC / HWIO / NHWC form. Given the same
    # correlation as dimension numbers ("CHWN", "IHWO", "HWNC"), XLA:CPU makes that
    # rewrite itself in a lone step, but not inside a scanned epoch's while loop, where
    # the non-canonical convolution ran on a slow generic loop: LeNet-5's scanned
    # hand-rule epoch took 36-42 ms per step against 8.3-11.8 looped; 8.7 against 8.8
    # in this form.
    out = lax.conv_general_dilated(
        jnp.transpose(res.x, (3, 1, 2, 0)),  # (C_in, H, W, N)
        jnp.transpose(g, (1, 2, 0, 3)),  # (H_out, W_out, N, C_out)
        window_strides=geom.dilation,
        padding=pads,
        rhs_dilation=geom.stride,
        dimension_numbers=DIMENSION_NUMBERS,
    )  # (C_in, KH, KW, C_out)
    return jnp.transpose(out, (1, 2, 0, 3))


#: The exact formulations of the kernel gradient, by the names :func:`kernel_grad_path` gives.
KERNEL_GRADS = {"lax": kernel_grad_correlation, "chunked": kernel_grad_chunked}


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
    p = extract_patches(x, window, stride, padding, dilation)
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
    stride, dilation, pads = check_locally_connected2d(x, w, b, stride, padding, dilation)
    geom = make_geometry(x.shape[1:3], w.shape[2:4], stride, dilation, pads)
    p = extract_patches(x, geom.window, stride, pads, dilation)  # once: output and residual
    return locally_connected_from_patches(p, w, b), LocallyConnectedResiduals(p, w, b, geom)


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
    conv2d: Rule(conv2d_fwd, conv2d_bwd, ("x", "w", "b")),
    extract_patches: Rule(extract_patches_fwd, extract_patches_bwd, ("x",)),
    locally_connected2d: Rule(
        locally_connected2d_fwd, locally_connected2d_bwd, ("x", "w", "b")
    ),
}



# ---------------------------------------------------------------------------------------
# The layers
# ---------------------------------------------------------------------------------------

# Locally connected kernels (H_out, W_out, KH, KW, C_in, C_out): fan-in is KH * KW * C_in.
LOCAL_W_INIT: Initializer = jax.nn.initializers.lecun_normal(
    in_axis=(2, 3, 4), out_axis=5, batch_axis=(0, 1)
)


def real_taps(n_in: int, n_out: int, k: int, s: int, d: int, lo: int) -> int:
    """Kernel taps, summed over the ``n_out`` outputs of one axis, on real input pixels."""
    total = 0
    for i in range(n_out):
        first = i * s - lo
        total += sum(1 for t in range(k) if 0 <= first + t * d < n_in)
    return total


@dataclasses.dataclass(frozen=True, repr=False)
class _Windowed(Layer):
    """Shared geometry of conv-like layers on NHWC inputs."""

    convolutional = True

    features: int
    kernel_size: Any
    stride: Any = 1
    padding: Any = "VALID"
    dilation: Any = 1
    use_bias: bool = True
    w_init: Initializer = DEFAULT_W_INIT
    b_init: Initializer = DEFAULT_B_INIT
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        where = type(self).__name__
        set_ = object.__setattr__
        set_(self, "features", _checks.positive_int(self.features, "features", where))
        set_(self, "kernel_size", _checks.ntuple(self.kernel_size, 2, "kernel_size", where))
        set_(self, "stride", _checks.ntuple(self.stride, 2, "stride", where))
        set_(self, "dilation", _checks.ntuple(self.dilation, 2, "dilation", where))
        set_(self, "padding", geo.normalize_padding(self.padding, 2, where))
        check_bool(self.use_bias, "use_bias", where)
        check_init_fn(self.w_init, "w_init", where)
        check_init_fn(self.b_init, "b_init", where)
        check_param_dtype(self.param_dtype, where)

    def pads(self, input_shape: Shape) -> geo.PadPairs:
        """Explicit ``((top, bottom), (left, right))`` padding for this input."""
        return geo.resolve_padding(
            self.padding, input_shape[:2], self.kernel_size, self.stride, self.dilation
        )

    def output_shape(self, input_shape: Shape) -> Shape:
        where = repr(self)
        shape = _checks.input_shape_tuple(input_shape, where)
        _checks.check_rank(shape, 3, "input_shape", where, "H, W, C; no batch dimension")
        pads = self.pads(shape)
        geo.check_window_fits(shape[:2], self.kernel_size, pads, where, self.dilation)
        out = geo.conv_output_size(shape[:2], self.kernel_size, self.stride, pads, self.dilation)
        return (*out, self.features)

    def _taps(self, input_shape: Shape) -> int:
        out = self.output_shape(input_shape)
        pads = self.pads(input_shape)
        taps = 1
        for ax in range(2):
            taps *= real_taps(input_shape[ax], out[ax], self.kernel_size[ax], self.stride[ax],
                              self.dilation[ax], pads[ax][0])
        return taps

    def receptive_field(self, input_shape: Shape, rf: RF) -> RF:
        k_eff = geo.effective_window(self.kernel_size, self.dilation)
        return rf.window(k_eff, self.stride, self.pads(input_shape))


@dataclasses.dataclass(frozen=True, repr=False)
class Conv(_Windowed):
    """2-D convolution (cross-correlation, as the lecture) with ``features`` filters.

    Params: ``w`` of shape ``(KH, KW, C_in / groups, features)`` (HWIO), ``b`` of shape
    ``(features,)``. Input ``(N, H, W, C_in)`` -> ``(N, H_out, W_out, features)``.
    Padding: ``"VALID"``, ``"SAME"``, an int, two ints or two ``(low, high)`` pairs.
    ``groups=G`` splits the channels into ``G`` independent convolutions (AlexNet's two
    towers: ``G = 2``; depthwise: ``G = C_in``); ``G`` must divide ``C_in`` and
    ``features``. An input of another floating dtype than the params (bfloat16,
    float16) is computed in the promoted dtype.

    FLOPs: ``2 * (C_in / G) * features`` per kernel tap that lands on a real input pixel
    (taps on the zero padding are not counted, as XLA does not count them), plus one add
    per output for the bias.
    """

    groups: int = 1

    def __post_init__(self):
        super().__post_init__()
        where = type(self).__name__
        object.__setattr__(self, "groups", _checks.positive_int(self.groups, "groups", where))
        if self.features % self.groups:
            raise ValueError(
                f"{where}: features={self.features} is not divisible by groups={self.groups}"
            )

    def output_shape(self, input_shape: Shape) -> Shape:
        out = super().output_shape(input_shape)
        if input_shape[2] % self.groups:
            raise ValueError(
                f"{self!r}: the input's {input_shape[2]} channels are not divisible by "
                f"groups={self.groups} (input shape {tuple(input_shape)})"
            )
        return out

    def param_specs(self, input_shape: Shape) -> dict[str, Shape]:
        self.output_shape(input_shape)
        specs = {"w": (*self.kernel_size, tuple(input_shape)[2] // self.groups, self.features)}
        if self.use_bias:
            specs["b"] = (self.features,)
        return specs

    def _hyper(self):
        return {"stride": self.stride, "padding": self.padding, "dilation": self.dilation,
                "groups": self.groups}

    def forward(self, params, state, x, *, key=None, train=False):
        return conv2d(x, params["w"], params.get("b"), **self._hyper()), state

    def fwd(self, params, state, x, *, key=None, train=False):
        y, res = conv2d_fwd(x, params["w"], params.get("b"), **self._hyper())
        return y, state, res

    def bwd(self, res, g, need_dx):
        dw = conv2d_kernel_grad(res, g)
        dx = conv2d_input_grad(res, g) if need_dx else None
        grads = {"w": dw} if res.b is None else {"w": dw, "b": jnp.sum(g, axis=(0, 1, 2))}
        return dx, grads

    def flops(self, input_shape: Shape) -> tuple[int, int]:
        out = self.output_shape(input_shape)
        bias = out[0] * out[1] * self.features if self.use_bias else 0
        per_tap = 2 * (input_shape[2] // self.groups) * self.features
        return self._taps(input_shape) * per_tap + bias, 0


@dataclasses.dataclass(frozen=True, repr=False)
class LocallyConnected(_Windowed):
    """Sparse interactions without parameter sharing: an own filter at each output position.

    Params: ``w`` of shape ``(H_out, W_out, KH, KW, C_in, features)``, ``b`` of shape
    ``(H_out, W_out, features)``. Shapes otherwise as :class:`Conv`. Default ``w_init``
    is LeCun-normal with fan-in ``KH * KW * C_in``. FLOPs are counted as for ``Conv``
    (the maths, not the patch-extraction implementation, which XLA counts as more).
    """

    w_init: Initializer = LOCAL_W_INIT

    def param_specs(self, input_shape: Shape) -> dict[str, Shape]:
        out = self.output_shape(input_shape)
        c_in = tuple(input_shape)[2]
        specs = {"w": (out[0], out[1], *self.kernel_size, c_in, self.features)}
        if self.use_bias:
            specs["b"] = out
        return specs

    def forward(self, params, state, x, *, key=None, train=False):
        y = locally_connected2d(
            x, params["w"], params.get("b"), self.stride, self.padding, self.dilation
        )
        return y, state

    def fwd(self, params, state, x, *, key=None, train=False):
        y, res = locally_connected2d_fwd(
            x, params["w"], params.get("b"), self.stride, self.padding, self.dilation
        )
        return y, state, res

    def bwd(self, res, g, need_dx):
        dx, dw, db = locally_connected2d_bwd(res, g)
        return (dx if need_dx else None), ({"w": dw} if db is None else {"w": dw, "b": db})

    def flops(self, input_shape: Shape) -> tuple[int, int]:
        out = self.output_shape(input_shape)
        bias = out[0] * out[1] * self.features if self.use_bias else 0
        return self._taps(input_shape) * 2 * input_shape[2] * self.features + bias, 0
