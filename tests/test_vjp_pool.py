"""Hand rules of the pools: == jax.vjp, == central differences; ties and zero windows."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from funcnet import gradcheck, ops, vjp
from funcnet.vjp import pool as vpool

VJP_TOL = 1e-10  # float64, same formula up to summation order
FD_TOL = 1e-6  # central differences, h = 1e-6


def _assert_rule(report):
    assert report.forward < VJP_TOL, report
    assert max(report.vs_autodiff.values()) < VJP_TOL, report
    assert max(report.vs_custom_vjp.values()) < VJP_TOL, report
    assert max(report.vs_finite_diff.values()) < FD_TOL, report


def _distinct(shape, seed=0):
    """Values without ties (a permutation, scaled), so the argmax of a window is unique."""
    rng = np.random.default_rng(seed)
    n = int(np.prod(shape))
    return jax.device_put(rng.permutation(n).reshape(shape) / n - 0.5 + 0.01 * rng.random(shape))


GRID = [
    # window, stride, padding  (tiling ones take the reshape fast path)
    ((2, 2), None, "VALID"),
    ((2, 2), None, "SAME"),
    ((3, 3), (1, 1), "SAME"),
    ((2, 3), (3, 2), ((1, 0), (0, 2))),
    ((4, 4), (3, 3), "SAME"),
]
IDS = [f"w{w}-s{s}-{p}".replace(" ", "") for w, s, p in GRID]
POOLS = {
    "max": (ops.max_pool, {}),
    "sum": (ops.sum_pool, {}),
    "avg_incl": (ops.avg_pool, {"count_include_pad": True}),
    "avg_excl": (ops.avg_pool, {"count_include_pad": False}),
    "l2": (ops.l2_pool, {}),
    "lp3": (ops.lp_pool, {"p": 3.0}),
    "lp1.5": (ops.lp_pool, {"p": 1.5}),
}


@pytest.mark.parametrize("kind", ["max", "avg_incl", "avg_excl", "l2", "lp3"])
@pytest.mark.parametrize("window,stride,padding", GRID, ids=IDS)
def test_pool_rule_matches_autodiff_and_differences(kind, window, stride, padding):
    op, extra = POOLS[kind]
    with jax.enable_x64(True):
        x = _distinct((2, 7, 8, 2))
        report = gradcheck.check_rule(
            op, (x,), {"window": window, "stride": stride, "padding": padding, **extra}
        )
    _assert_rule(report)


@pytest.mark.slow  # many random geometries; CI runs the slow tier
@settings(max_examples=8, deadline=None)
@given(
    h=st.integers(2, 8), w=st.integers(2, 8), ph=st.integers(1, 3), pw=st.integers(1, 3),
    sh=st.integers(1, 3), sw=st.integers(1, 3), pad=st.sampled_from(["VALID", "SAME", 1]),
    kind=st.sampled_from(list(POOLS)),
)
def test_pool_rule_on_random_geometries(h, w, ph, pw, sh, sw, pad, kind):
    extra_pad = 2 if pad == 1 else 0
    if ph > h + extra_pad or pw > w + extra_pad or (pad == 1 and (ph < 2 or pw < 2)):
        return  # window does not fit (or a pad as large as the window: all-pad windows)
    op, extra = POOLS[kind]
    with jax.enable_x64(True):
        x = _distinct((2, h, w, 2), seed=h * 10 + w)
        report = gradcheck.check_rule(
            op, (x,), {"window": (ph, pw), "stride": (sh, sw), "padding": pad, **extra}
        )
    _assert_rule(report)


@pytest.mark.parametrize("kind", ["feature_l2", "feature_max"])
@pytest.mark.parametrize("group", [1, 2, 3])
def test_feature_pool_rules(kind, group):
    op = {"feature_l2": ops.feature_l2_pool, "feature_max": ops.feature_max_pool}[kind]
    with jax.enable_x64(True):
        x = _distinct((2, 3, 2, 6), seed=group)
        report = gradcheck.check_rule(op, (x,), {"group_size": group})
    _assert_rule(report)


@pytest.mark.parametrize("window,stride", [((2, 2), None), ((3, 3), (1, 1))],
                         ids=["tiling", "overlapping"])
def test_max_pool_tie_goes_to_the_first_element_in_row_major_order(window, stride):
    # A constant window: every element ties. The pinned convention: the top-left one (the
    # first in row-major order) receives the whole gradient, as jax.vjp and PyTorch.
    with jax.enable_x64(True):
        x = jnp.ones((1, 4, 4, 1))
        y, res = vpool.max_pool_fwd(x, window, stride)
        g = jnp.ones(y.shape)
        (dx,) = vpool.max_pool_bwd(res, g)
        (ref,) = jax.vjp(lambda x: ops.max_pool(x, window, stride), x)[1](g)
    dx = np.asarray(dx[0, :, :, 0])
    if stride is None:
        expected = np.zeros((4, 4))
        expected[::2, ::2] = 1.0
    else:  # window (i, j) of a 4x4 input with 3x3 windows starts at (i, j): its first
        expected = np.zeros((4, 4))
        expected[:2, :2] = 1.0
    np.testing.assert_array_equal(dx, expected)
    np.testing.assert_array_equal(dx, ref[0, :, :, 0])


def test_max_pool_tie_between_two_elements_picks_the_upper_left():
    with jax.enable_x64(True):
        x = jnp.array([[0.0, 5.0], [5.0, 1.0]]).reshape(1, 2, 2, 1)
        y, res = vpool.max_pool_fwd(x, 2)
        (dx,) = vpool.max_pool_bwd(res, jnp.full(y.shape, 3.0))
    np.testing.assert_array_equal(dx[0, :, :, 0], [[0.0, 3.0], [0.0, 0.0]])


def test_feature_max_pool_tie_goes_to_the_first_feature():
    x = jnp.array([[1.0, 2.0, 2.0, 4.0, 4.0, 4.0]])
    _, res = vpool.feature_max_pool_fwd(x, 3)
    (dx,) = vpool.feature_max_pool_bwd(res, jnp.array([[1.0, 1.0]]))
    np.testing.assert_array_equal(dx, [[0.0, 1.0, 0.0, 1.0, 0.0, 0.0]])


@pytest.mark.parametrize("op", [ops.l2_pool, ops.feature_l2_pool, "lp3"], ids=["l2", "feat", "lp3"])
def test_l2_pool_gradient_on_an_all_zero_window_is_zero_not_nan(op):
    x = jnp.zeros((1, 4, 4, 2)).at[0, 0, 0, 0].set(3.0)
    if op == "lp3":
        f = vjp.manual(ops.lp_pool)
        dx = jax.grad(lambda x: jnp.sum(f(x, 3.0, 2)))(x)
    elif op is ops.feature_l2_pool:
        dx = jax.grad(lambda x: jnp.sum(vjp.manual(op)(x, 2)))(x)
    else:
        dx = jax.grad(lambda x: jnp.sum(vjp.manual(op)(x, 2)))(x)
    assert np.all(np.isfinite(dx))
    assert dx[0, 0, 0, 0] == 1.0  # the one non-zero window: d|x|/dx = 1
    assert np.count_nonzero(dx) == 1


def test_avg_pool_count_include_pad_changes_the_divisor_at_the_border():
    x = jnp.zeros((1, 3, 3, 1))
    g = jnp.ones((1, 2, 2, 1))
    for include, corner in [(True, 1 / 4), (False, 1 / 1)]:
        _, res = vpool.avg_pool_fwd(x, 2, 2, ((1, 0), (1, 0)), include)
        (dx,) = vpool.avg_pool_bwd(res, g)
        # The top-left window holds one real pixel and three pads.
        assert float(dx[0, 0, 0, 0]) == corner


def test_tiling_fast_path_ignores_rows_past_the_last_window():
    with jax.enable_x64(True):
        x = _distinct((1, 5, 5, 1))
        y, res = vpool.max_pool_fwd(x, 2)
        (dx,) = vpool.max_pool_bwd(res, jnp.ones(y.shape))
        dx = np.asarray(dx)
    assert res.geom.tiles
    assert np.all(dx[0, 4, :, 0] == 0) and np.all(dx[0, :, 4, 0] == 0)
    assert float(np.sum(dx)) == 4.0
