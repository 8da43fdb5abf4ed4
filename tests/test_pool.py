"""Spatial and feature pooling against numpy loops, conventions at the edges."""

import draw
import jax
import jax.numpy as jnp
import numpy as np
import numpy_ref as ref
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import funcnet as fn
from funcnet import ops

GRID = [
    # window, stride, padding
    ((2, 2), None, "VALID"),
    ((3, 3), (1, 1), "SAME"),
    ((3, 2), (2, 1), "SAME"),
    ((3, 3), (2, 2), 1),
    ((2, 3), (3, 2), ((1, 0), (0, 2))),
    ((4, 4), (3, 3), "SAME"),
]
IDS = [f"w{w}-s{s}-{p}" for w, s, p in GRID]


def _pads(x_shape, window, stride, padding):
    stride = window if stride is None else stride
    if padding == "VALID":
        return ((0, 0), (0, 0)), stride
    if padding == "SAME":
        return tuple(
            ref.same_pads(n, k, s) for n, k, s in zip(x_shape[1:3], window, stride)
        ), stride
    if isinstance(padding, int):
        return ((padding, padding),) * 2, stride
    return padding, stride


@pytest.fixture
def x():
    return np.random.default_rng(0).standard_normal((2, 7, 8, 3))


@pytest.mark.parametrize("window,stride,padding", GRID, ids=IDS)
def test_max_pool_matches_loops(x, window, stride, padding):
    pads, s = _pads(x.shape, window, stride, padding)
    with jax.enable_x64(True):
        y = ops.max_pool(jnp.asarray(x), window, stride, padding)
    np.testing.assert_array_equal(y, ref.pool(x, window, s, pads, "max"))


@pytest.mark.parametrize("count_include_pad", [True, False], ids=["incl_pad", "excl_pad"])
@pytest.mark.parametrize("window,stride,padding", GRID, ids=IDS)
def test_avg_pool_matches_loops(x, window, stride, padding, count_include_pad):
    pads, s = _pads(x.shape, window, stride, padding)
    with jax.enable_x64(True):
        y = ops.avg_pool(jnp.asarray(x), window, stride, padding, count_include_pad)
    expected = ref.pool(x, window, s, pads, "avg", count_include_pad)
    np.testing.assert_allclose(y, expected, rtol=1e-12)


def test_count_include_pad_changes_only_windows_touching_padding():
    x = jnp.ones((1, 4, 4, 1))
    incl = ops.avg_pool(x, 3, 1, "SAME", count_include_pad=True)[0, :, :, 0]
    excl = ops.avg_pool(x, 3, 1, "SAME", count_include_pad=False)[0, :, :, 0]
    np.testing.assert_allclose(excl, 1.0)  # the mean of ones is one
    np.testing.assert_allclose(incl[0, 0], 4 / 9)  # a corner sees 4 real pixels of 9
    np.testing.assert_allclose(incl[0, 1], 6 / 9)
    np.testing.assert_allclose(incl[1:3, 1:3], 1.0)


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0])
@pytest.mark.parametrize("window,stride,padding", GRID, ids=IDS)
def test_lp_pool_matches_loops(x, window, stride, padding, p):
    pads, s = _pads(x.shape, window, stride, padding)
    with jax.enable_x64(True):
        y = ops.lp_pool(jnp.asarray(x), p, window, stride, padding)
        if p == 2.0:
            np.testing.assert_array_equal(y, ops.l2_pool(jnp.asarray(x), window, stride, padding))
    np.testing.assert_allclose(y, ref.pool(x, window, s, pads, "lp", p=p), rtol=1e-12)


@settings(max_examples=15, deadline=None)
@given(
    h=st.integers(2, 9),
    w=st.integers(2, 9),
    k=st.integers(1, 3),
    s=st.integers(1, 3),
    same=st.booleans(),
    kind=st.sampled_from(["max", "avg", "avg_excl", "lp"]),
    seed=st.integers(0, 2**16),
)
def test_pools_match_loops_on_random_shapes(h, w, k, s, same, kind, seed):
    x = np.random.default_rng(seed).standard_normal((1, h, w, 2))
    padding = "SAME" if same else "VALID"
    window, stride = (min(k, h), min(k, w)), (s, s)
    pads, _ = _pads(x.shape, window, stride, padding)
    with jax.enable_x64(True):
        xj = jnp.asarray(x)
        if kind == "max":
            y, e = (
                ops.max_pool(xj, window, stride, padding),
                ref.pool(x, window, stride, pads, "max"),
            )
        elif kind == "lp":
            y = ops.l2_pool(xj, window, stride, padding)
            e = ref.pool(x, window, stride, pads, "lp")
        else:
            incl = kind == "avg"
            y = ops.avg_pool(xj, window, stride, padding, incl)
            e = ref.pool(x, window, stride, pads, "avg", incl)
    np.testing.assert_allclose(y, e, rtol=1e-12)


def test_max_pool_padding_never_wins():
    x = -jnp.ones((1, 3, 3, 1))  # every real value is below the zero a naive pad would add
    y = ops.max_pool(x, 2, 1, "SAME")
    np.testing.assert_array_equal(y, -1.0)


def test_l2_pool_zero_window_value_and_gradient_are_zero_not_nan():
    x = jnp.zeros((1, 4, 4, 1)).at[0, 0, 0, 0].set(3.0).at[0, 0, 1, 0].set(4.0)
    y = ops.l2_pool(x, 2)
    np.testing.assert_allclose(y[0, :, :, 0], [[5.0, 0.0], [0.0, 0.0]])
    g = jax.grad(lambda x: ops.l2_pool(x, 2).sum())(x)
    assert np.all(np.isfinite(g))
    np.testing.assert_allclose(g[0, 0, 0, 0], 3 / 5)  # d sqrt(a^2+b^2)/da = a / norm
    np.testing.assert_allclose(g[0, 2:, 2:, 0], 0.0)
    g3 = jax.grad(lambda x: ops.lp_pool(x, 3, 2).sum())(jnp.zeros((1, 2, 2, 1)))
    np.testing.assert_array_equal(g3, 0.0)


@pytest.mark.parametrize("group_size", [1, 2, 3, 6])
@pytest.mark.parametrize("kind", ["max", "l2"])
def test_feature_pools_match_loops(group_size, kind):
    x = np.random.default_rng(1).standard_normal((2, 3, 4, 6))
    op = ops.feature_max_pool if kind == "max" else ops.feature_l2_pool
    with jax.enable_x64(True):
        y = op(jnp.asarray(x), group_size)
    assert y.shape == (2, 3, 4, 6 // group_size)
    np.testing.assert_allclose(y, ref.feature_pool(x, group_size, kind), rtol=1e-12)


def test_feature_l2_pool_on_dense_features_and_zero_group_gradient():
    x = jnp.array([[3.0, 4.0, 0.0, 0.0]])
    np.testing.assert_allclose(ops.feature_l2_pool(x, 2), [[5.0, 0.0]])
    g = jax.grad(lambda x: ops.feature_l2_pool(x, 2).sum())(x)
    np.testing.assert_allclose(g, [[0.6, 0.8, 0.0, 0.0]])


def test_pool_layers_wrap_the_ops():
    x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 6, 6, 4)), jnp.float32)
    cases = [
        (fn.MaxPool(2), ops.max_pool(x, 2)),
        (fn.AvgPool(3, 1, "SAME", count_include_pad=False), ops.avg_pool(x, 3, 1, "SAME", False)),
        (fn.L2Pool(2, 1), ops.l2_pool(x, 2, 1)),
        (fn.LpPool(3, p=3), ops.lp_pool(x, 3, 3)),
        (fn.FeatureL2Pool(2), ops.feature_l2_pool(x, 2)),
        (fn.FeatureMaxPool(4), ops.feature_max_pool(x, 4)),
    ]
    for layer, expected in cases:
        np.testing.assert_array_equal(layer.apply({}, x), expected, err_msg=repr(layer))


def test_pool_default_stride_is_the_window():
    assert fn.MaxPool(3).stride == (3, 3)
    assert fn.MaxPool(3).output_shape((9, 9, 1)) == (3, 3, 1)
    assert fn.MaxPool(3, stride=1).output_shape((9, 9, 1)) == (7, 7, 1)


POOL_OPS = [
    ("max", lambda x: ops.max_pool(x, 2)),
    ("max_same_overlap", lambda x: ops.max_pool(x, 3, 1, "SAME")),
    ("avg", lambda x: ops.avg_pool(x, 2, 1, "SAME", count_include_pad=False)),
    ("sum", lambda x: ops.sum_pool(x, 2)),
    ("l2", lambda x: ops.l2_pool(x, 3, 2, "SAME")),
    ("lp3", lambda x: ops.lp_pool(x, 3, 2)),
    ("feature_l2", lambda x: ops.feature_l2_pool(x, 2)),
    ("feature_max", lambda x: ops.feature_max_pool(x, 2)),
]


@pytest.mark.parametrize("name,op", POOL_OPS, ids=[n for n, _ in POOL_OPS])
def test_pools_differentiate_under_jit_as_eagerly(name, op):
    # Regression: a traced init value made jax.grad of max_pool fail under jit.
    x = draw.normal((2, 6, 6, 4))

    def f(x):
        return jnp.sum(op(x) ** 2)

    eager = jax.grad(f)(x)
    jitted = jax.jit(jax.grad(f))(x)
    assert np.all(np.isfinite(jitted))
    np.testing.assert_allclose(jitted, eager, rtol=1e-5, atol=1e-6)
    assert np.any(jitted != 0)


def test_max_pool_gradient_routes_to_the_max_under_jit():
    x = jnp.array([[1.0, 5.0, 2.0, 0.0], [3.0, 4.0, 9.0, 1.0]]).reshape(1, 2, 4, 1)
    g = jax.jit(jax.grad(lambda x: ops.max_pool(x, 2).sum()))(x)
    np.testing.assert_array_equal(g[0, :, :, 0], [[0, 1, 0, 0], [0, 0, 1, 0]])
