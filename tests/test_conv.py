"""Convolution and locally connected ops: the lecture's box filter, sizes, numpy loops."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import numpy_ref as ref
import pytest

import funcnet as fn
from funcnet import ops

# The slide's 10x10 image (the text export garbles it; see the foundation issue).
SLIDE_IMAGE = np.zeros((10, 10))
SLIDE_IMAGE[2:7, 3:8] = 90
SLIDE_IMAGE[5, 4] = 0
SLIDE_IMAGE[8, 2] = 90

SLIDE_OUTPUT = np.array([
    [0, 10, 20, 30, 30, 30, 20, 10],
    [0, 20, 40, 60, 60, 60, 40, 20],
    [0, 30, 60, 90, 90, 90, 60, 30],
    [0, 30, 50, 80, 80, 90, 60, 30],
    [0, 30, 50, 80, 80, 90, 60, 30],
    [0, 20, 30, 50, 50, 60, 40, 20],
    [10, 20, 30, 30, 30, 30, 20, 10],
    [10, 10, 10, 0, 0, 0, 0, 0],
])  # fmt: skip


def test_slide_box_filter_gives_the_slide_table_exactly():
    x = jnp.asarray(SLIDE_IMAGE, jnp.float32)[None, :, :, None]
    w = jnp.full((3, 3, 1, 1), 1 / 9, jnp.float32)
    h = ops.conv2d(x, w, padding="VALID")
    assert h.shape == (1, 8, 8, 1)
    # The slide shows integers; the float32 sums differ from them by rounding only.
    np.testing.assert_array_equal(np.round(np.asarray(h[0, :, :, 0])), SLIDE_OUTPUT)
    np.testing.assert_allclose(h[0, :, :, 0], SLIDE_OUTPUT, atol=1e-4)


def test_box_filter_is_correlation_not_convolution():
    # An asymmetric kernel tells correlation from convolution: h[m,n] = sum f[k,l] I[m+k,n+l].
    x = jnp.arange(16.0).reshape(1, 4, 4, 1)
    f = jnp.zeros((2, 2, 1, 1)).at[0, 1, 0, 0].set(1.0)  # picks I[m, n+1]
    h = ops.conv2d(x, f)
    np.testing.assert_array_equal(h[0, :, :, 0], np.arange(16.0).reshape(4, 4)[:3, 1:])


PADDINGS = ["VALID", "SAME", 1, (2, 0), ((1, 2), (0, 3))]


def _pads(padding, size, k, s, d=1):
    if padding == "VALID":
        return ((0, 0), (0, 0))
    if padding == "SAME":
        return (ref.same_pads(size[0], k[0], s[0], d), ref.same_pads(size[1], k[1], s[1], d))
    if isinstance(padding, int):
        return ((padding, padding),) * 2
    if isinstance(padding[0], int):
        return tuple((p, p) for p in padding)
    return padding


@pytest.mark.parametrize("stride", [1, 3, (2, 1)], ids=lambda s: f"stride{s}")
@pytest.mark.parametrize("padding", PADDINGS, ids=lambda p: f"pad{p}")
@pytest.mark.parametrize("dilation", [1, 2], ids=lambda d: f"dil{d}")
def test_conv2d_matches_numpy_loops(stride, padding, dilation):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 9, 8, 3))
    w = rng.standard_normal((3, 2, 3, 4))
    b = rng.standard_normal(4)
    s = (stride, stride) if isinstance(stride, int) else stride
    d = (dilation, dilation)
    pads = _pads(padding, x.shape[1:3], w.shape[:2], s, dilation)
    with jax.enable_x64(True):
        y = ops.conv2d(jnp.asarray(x), jnp.asarray(w), jnp.asarray(b), stride, padding, dilation)
        np.testing.assert_allclose(y, ref.conv2d(x, w, b, s, pads, d), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("size,k,s", [(10, 3, 1), (10, 3, 3), (200, 10, 1), (7, 5, 3), (28, 5, 2)])
@pytest.mark.parametrize("padding", ["VALID", "SAME", 2])
def test_output_size_formula_for_stride_1_and_3(size, k, s, padding):
    layer = fn.Conv(1, k, stride=s, padding=padding)
    if padding == "VALID":
        expected = (size - k) // s + 1
    elif padding == "SAME":
        expected = -(-size // s)  # ceil(size / stride)
    else:
        expected = (size + 2 * padding - k) // s + 1
    assert layer.output_shape((size, size, 1)) == (expected, expected, 1)


def test_stride_3_on_7x7_picks_every_third_window():
    x = jnp.arange(49.0).reshape(1, 7, 7, 1)
    w = jnp.zeros((3, 3, 1, 1)).at[0, 0, 0, 0].set(1.0)  # top-left tap
    y = ops.conv2d(x, w, stride=3)
    assert y.shape == (1, 2, 2, 1)
    np.testing.assert_array_equal(y[0, :, :, 0], [[0, 3], [21, 24]])


@pytest.mark.parametrize(
    "stride,padding,dilation",
    list(itertools.product([1, 2], ["VALID", "SAME", 1], [1, 2])),
)
def test_locally_connected_matches_numpy_loops(stride, padding, dilation):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 7, 6, 2))
    layer = fn.LocallyConnected(3, (3, 2), stride=stride, padding=padding, dilation=dilation)
    with jax.enable_x64(True):
        params = {k: jax.device_put(rng.standard_normal(v.shape))
                  for k, v in layer.param_shapes(x.shape[1:]).items()}
        y = layer.apply(params, jnp.asarray(x))
        s, d = (stride, stride), (dilation, dilation)
        pads = _pads(padding, x.shape[1:3], (3, 2), s, dilation)
        expected = ref.locally_connected2d(
            x, np.asarray(params["w"]), np.asarray(params["b"]), s, pads, d
        )
        np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-12)


def test_locally_connected_with_shared_kernels_equals_conv():
    # Unshared weights that happen to be equal at every position give the convolution.
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((2, 6, 6, 2)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 3, 2, 4)), jnp.float32)
    conv = ops.conv2d(x, w, stride=1, padding="SAME")
    w_local = jnp.broadcast_to(w, (6, 6, 3, 3, 2, 4))
    local = ops.locally_connected2d(x, w_local, stride=1, padding="SAME")
    np.testing.assert_allclose(local, conv, rtol=1e-5, atol=1e-5)


def test_conv_many_channels_and_filters_sum_over_input_channels():
    # h_j = sum_k h_k * w_kj: with one-hot kernels each output map is one input map.
    x = jnp.asarray(np.random.default_rng(3).standard_normal((1, 5, 5, 3)), jnp.float32)
    w = jnp.zeros((1, 1, 3, 2)).at[0, 0, 2, 0].set(1.0).at[0, 0, 0, 1].set(1.0)
    w = w.at[0, 0, 1, 1].set(1.0)
    y = ops.conv2d(x, w)
    np.testing.assert_allclose(y[..., 0], x[..., 2])
    np.testing.assert_allclose(y[..., 1], x[..., 0] + x[..., 1], rtol=1e-6)
