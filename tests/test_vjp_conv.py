"""Hand rules of conv2d, extract_patches and locally connected: == jax.vjp, == differences."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from funcnet import gradcheck, ops
from funcnet.vjp import conv as vconv

# manual vs jax.vjp: both are exact formulas in float64; they differ only by summation
# order, i.e. a few ulps of the largest entry (relative error is normalised per leaf).
VJP_TOL = 1e-10
# central differences with h = 1e-6 in float64: truncation ~h^2 f''' plus rounding
# ~eps/h ~ 1e-10; 1e-6 is the bound.
FD_TOL = 1e-6


def _assert_rule(report):
    assert report.forward < VJP_TOL, report
    assert report.vs_autodiff and max(report.vs_autodiff.values()) < VJP_TOL, report
    assert max(report.vs_custom_vjp.values()) < VJP_TOL, report
    if report.vs_finite_diff:
        assert max(report.vs_finite_diff.values()) < FD_TOL, report


def _arrays(seed, *shapes):
    rng = np.random.default_rng(seed)
    return [jax.device_put(rng.standard_normal(s)) for s in shapes]


GRID = [
    # (H, W, C_in), (KH, KW, C_out), stride, padding, dilation
    ((7, 8, 2), (3, 3, 3), 1, "VALID", 1),
    ((7, 8, 2), (3, 2, 3), 2, "SAME", 1),
    ((9, 7, 1), (2, 3, 2), 3, 1, 1),
    ((8, 8, 2), (3, 3, 2), 1, "SAME", 2),
    ((9, 9, 2), (2, 2, 3), (3, 2), ((2, 0), (1, 3)), (2, 1)),
    ((7, 7, 1), (5, 5, 3), 1, "SAME", 1),  # LeNet's first layer: the banded forward
    ((9, 8, 2), (6, 5, 2), 1, 2, 1),  # 2 input channels, 30 taps: the banded input grad
]
IDS = [f"in{i}-k{k}-s{s}-p{p}-d{d}".replace(" ", "") for i, k, s, p, d in GRID]


@pytest.mark.parametrize("in_shape,k_shape,stride,padding,dilation", GRID, ids=IDS)
def test_conv2d_rule_matches_autodiff_and_differences(in_shape, k_shape, stride, padding,
                                                      dilation):
    with jax.enable_x64(True):
        x, w, b = _arrays(0, (2, *in_shape), (k_shape[0], k_shape[1], in_shape[2], k_shape[2]),
                          (k_shape[2],))
        report = gradcheck.check_rule(
            ops.conv2d, (x, w, b), {"stride": stride, "padding": padding, "dilation": dilation}
        )
    _assert_rule(report)


@pytest.mark.slow  # many random geometries; CI runs the slow tier
@settings(max_examples=8, deadline=None)
@given(
    h=st.integers(3, 9), w=st.integers(3, 9), c=st.integers(1, 3), o=st.integers(1, 3),
    kh=st.integers(1, 4), kw=st.integers(1, 4), s=st.integers(1, 3), d=st.integers(1, 2),
    pad=st.sampled_from(["VALID", "SAME", 1, ((0, 2), (1, 0))]), bias=st.booleans(),
)
def test_conv2d_rule_on_random_geometries(h, w, c, o, kh, kw, s, d, pad, bias):
    k_eff = ((kh - 1) * d + 1, (kw - 1) * d + 1)
    # padding added per axis (SAME always fits the window); ((0, 2), (1, 0)): 2 rows, 1 column
    extra = {"VALID": (0, 0), "SAME": (k_eff[0], k_eff[1]), 1: (2, 2)}.get(pad, (2, 1))
    if k_eff[0] > h + extra[0] or k_eff[1] > w + extra[1]:
        return  # the window does not fit; ops reject it (tested in test_errors)
    with jax.enable_x64(True):
        x, kern, b = _arrays(h * 100 + w, (2, h, w, c), (kh, kw, c, o), (o,))
        report = gradcheck.check_rule(
            ops.conv2d, (x, kern, b if bias else None),
            {"stride": s, "padding": pad, "dilation": d},
        )
    _assert_rule(report)


def test_both_input_gradient_formulations_agree():
    with jax.enable_x64(True):
        x, w = _arrays(3, (2, 9, 8, 3), (3, 4, 3, 2))
        for stride, pad, dil in [(1, "SAME", 1), (2, 1, 2), (3, "VALID", 1)]:
            y, res = vconv.conv2d_fwd(x, w, None, stride, pad, dil)
            g = jax.device_put(np.random.default_rng(1).standard_normal(y.shape))
            a = jax.jit(vconv.input_grad_scatter)(res, g)  # compiled: one program each
            b = jax.jit(vconv.input_grad_correlation)(res, g)
            assert gradcheck.relative_error(a, b) < VJP_TOL


def test_conv2d_input_gradient_is_flipped_kernel_over_dilated_upstream():
    # One pixel of upstream gradient at output (1, 1), stride 2: it lands on the input
    # window starting at (2, 2) as the kernel itself (correlation's transpose).
    with jax.enable_x64(True):
        x = jnp.zeros((1, 6, 6, 1))
        w = jnp.arange(1.0, 10.0).reshape(3, 3, 1, 1)
        y, res = vconv.conv2d_fwd(x, w, None, 2, "VALID")
        g = jnp.zeros(y.shape).at[0, 1, 1, 0].set(1.0)
        dx = vconv.conv2d_bwd(res, g)[0][0, :, :, 0]
    expected = np.zeros((6, 6))
    expected[2:5, 2:5] = np.arange(1.0, 10.0).reshape(3, 3)
    np.testing.assert_array_equal(dx, expected)


@pytest.mark.parametrize(
    "window,stride,padding,dilation",
    [((2, 2), 1, "VALID", 1), ((3, 2), 2, "SAME", 1), ((2, 3), (1, 3), 1, 2)],
    ids=["k2-s1-valid", "k3x2-s2-same", "k2x3-s1x3-p1-d2"],
)
def test_extract_patches_rule(window, stride, padding, dilation):
    with jax.enable_x64(True):
        (x,) = _arrays(4, (2, 7, 8, 2))
        report = gradcheck.check_rule(
            ops.extract_patches, (x,),
            {"window": window, "stride": stride, "padding": padding, "dilation": dilation},
        )
    _assert_rule(report)


@pytest.mark.parametrize(
    "stride,padding,dilation,bias",
    [(1, 1, 2, False), ((2, 3), "SAME", 1, True)],
    ids=["s1-p1-d2-nobias", "s2x3-same"],
)
def test_locally_connected_rule(stride, padding, dilation, bias):
    with jax.enable_x64(True):
        (x,) = _arrays(5, (2, 6, 7, 2))
        geom = vconv.conv_geometry(x.shape, (3, 2), stride, padding, dilation, "test")
        oh, ow = geom.out_hw
        w, b = _arrays(6, (oh, ow, 3, 2, 2, 3), (oh, ow, 3))
        report = gradcheck.check_rule(
            ops.locally_connected2d, (x, w, b if bias else None),
            {"stride": stride, "padding": padding, "dilation": dilation},
        )
    _assert_rule(report)


def test_manual_conv_trains_under_jit_and_vmap():
    with jax.enable_x64(True):
        from funcnet import vjp

        x, w = _arrays(7, (3, 2, 6, 6, 1), (3, 3, 1, 2))
        conv = vjp.manual(ops.conv2d)

        def loss(w, x):
            return jnp.sum(conv(x, w, None, 2, "SAME") ** 2)

        per_example = jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0)))(w, x)
        expected = jax.vmap(jax.grad(lambda w, x: jnp.sum(ops.conv2d(x, w, None, 2, "SAME") ** 2)),
                            in_axes=(None, 0))(w, x)
    assert gradcheck.relative_error(per_example, expected) < VJP_TOL
