"""Dropout: the op's rule (== jax.vjp, == differences), the layer in both modes, its rule."""

import math

import draw
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import funcnet
from funcnet import gradcheck, losses
from funcnet import vjp as fvjp
from funcnet.nn.base import rule_forward
from funcnet.nn.dropout import (
    RULES,
    Dropout,
    DropoutResiduals,
    dropout,
    dropout_bwd,
    dropout_fwd,
    dropout_mask,
)
from funcnet.vjp import table

VJP_TOL = 1e-12  # float64, the same formula
FD_TOL = 1e-8  # central differences of a linear function: exact up to rounding


def _x(shape, seed=0, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)


# ---------------------------------------------------------------------------------------
# The op and its rule
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("mask_shape", [(3, 4, 5), (3, 1, 5)], ids=["full", "shared"])
def test_rule_matches_vjp_and_differences(mask_shape):
    with jax.enable_x64(True):
        x = _x((3, 4, 5), dtype=jnp.float64)
        g = _x((3, 4, 5), seed=1, dtype=jnp.float64)
        mask = dropout_mask(jax.random.key(0), mask_shape, 0.3)
        y, res = dropout_fwd(x, mask, 0.3)
        assert isinstance(res, DropoutResiduals)
        np.testing.assert_array_equal(y, dropout(x, mask, 0.3))
        np.testing.assert_array_equal(y, jnp.where(mask, x / 0.7, 0.0))
        (mine,) = dropout_bwd(res, g)
        (ref,) = jax.vjp(lambda x: dropout(x, mask, 0.3), x)[1](g)
        fd = gradcheck.numerical_grad(lambda x: jnp.sum(dropout(x, mask, 0.3) * g), x)
        assert mine.shape == x.shape and mine.dtype == jnp.float64
        assert gradcheck.relative_error(mine, ref) < VJP_TOL
        assert gradcheck.relative_error(mine, fd) < FD_TOL
        np.testing.assert_array_equal(mine == 0, jnp.broadcast_to(~mask, x.shape))


def test_rule_in_the_table_convention(monkeypatch):
    """Through gradcheck.check_rule (jax.vjp, jax.custom_vjp, differences) as the table will."""
    monkeypatch.setitem(table.RULES, dropout, RULES[dropout])
    with jax.enable_x64(True):
        x = _x((2, 6), dtype=jnp.float64)
        mask = dropout_mask(jax.random.key(3), (2, 6), 0.5)
        report = gradcheck.check_rule(dropout, (x,), {"mask": mask, "rate": 0.5})
    assert report.forward < VJP_TOL, report
    assert report.vs_autodiff["x"] < VJP_TOL, report
    assert report.vs_custom_vjp["x"] < VJP_TOL, report
    assert report.vs_finite_diff["x"] < FD_TOL, report


def test_mask_draws_keep_probability():
    mask = dropout_mask(jax.random.key(0), (100, 100), 0.25)
    assert mask.dtype == jnp.bool_ and mask.shape == (100, 100)
    assert abs(float(jnp.mean(mask)) - 0.75) < 3 * math.sqrt(0.25 * 0.75 / 1e4)


def test_op_validates_its_arguments():
    x = jnp.ones((2, 3))
    with pytest.raises(TypeError, match="dropout: mask must be boolean"):
        dropout(x, jnp.ones((2, 3)), 0.5)
    with pytest.raises(ValueError, match=r"dropout: mask of shape \(2, 2\)"):
        dropout(x, jnp.ones((2, 2), bool), 0.5)
    with pytest.raises(ValueError, match=r"dropout: rate must be a float in \[0, 1\)"):
        dropout(x, jnp.ones((2, 3), bool), 1.0)


# ---------------------------------------------------------------------------------------
# The layer
# ---------------------------------------------------------------------------------------


def test_eval_mode_is_the_identity_without_a_key():
    x = _x((4, 5))
    layer = Dropout(0.5)
    np.testing.assert_array_equal(layer.apply({}, x), x)
    np.testing.assert_array_equal(layer.apply({}, x, key=jax.random.key(0)), x)
    # rate 0 is the identity in training too, and needs no key
    np.testing.assert_array_equal(Dropout(0.0).apply({}, x, train=True), x)
    assert layer.init(jax.random.key(0), (5,)) == {}
    assert layer.init_state((5,)) == {}


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.8])
def test_train_mode_drops_about_rate_and_scales_survivors(rate):
    n = 10_000
    x = jnp.abs(_x((2, n // 2))) + 0.1  # nonzero, so a zero output is a dropped unit
    y = Dropout(rate).apply({}, x, key=jax.random.key(1), train=True)
    dropped = np.asarray(y == 0)
    assert abs(dropped.mean() - rate) < 3 * math.sqrt(rate * (1 - rate) / n)
    np.testing.assert_allclose(
        np.asarray(y)[~dropped], np.asarray(x)[~dropped] / (1 - rate), rtol=1e-6
    )
    # the mean is preserved in expectation: E[y] = x, on ones sd(mean) = sqrt(p/(1-p)/n)
    ones = Dropout(rate).apply({}, jnp.ones((1, n)), key=jax.random.key(2), train=True)
    assert abs(float(jnp.mean(ones)) - 1.0) < 3 * math.sqrt(rate / (1 - rate) / n)


def test_keys_decide_the_mask():
    x = jnp.ones((4, 64))
    layer = Dropout(0.5)
    a = layer.apply({}, x, key=jax.random.key(0), train=True)
    b = layer.apply({}, x, key=jax.random.key(1), train=True)
    again = layer.apply({}, x, key=jax.random.key(0), train=True)
    assert not np.array_equal(a == 0, b == 0)
    np.testing.assert_array_equal(a, again)
    raw = layer.apply({}, x, key=jax.random.PRNGKey(0), train=True)  # a legacy uint32 key
    assert raw.shape == x.shape


def test_layer_rule_matches_forward_and_vjp():
    layer = Dropout(0.4)
    x, g, k = _x((3, 4, 5)), _x((3, 4, 5), seed=1), jax.random.key(7)
    y, state, res = layer.fwd({}, {}, x, key=k, train=True)
    np.testing.assert_array_equal(y, layer.forward({}, {}, x, key=k, train=True)[0])
    assert state == {}
    dx, dparams = layer.bwd(res, g, True)
    (ref,) = jax.vjp(lambda x: layer.forward({}, {}, x, key=k, train=True)[0], x)[1](g)
    np.testing.assert_allclose(dx, ref, rtol=1e-6)
    assert dparams == {}
    assert layer.bwd(res, g, False)[0] is None
    # evaluation: the identity both ways
    y, _, res = layer.fwd({}, {}, x, key=None, train=False)
    np.testing.assert_array_equal(y, x)
    np.testing.assert_array_equal(layer.bwd(res, g, True)[0], g)
    assert type(layer).has_hand_rule()


def test_training_without_a_key_names_the_layer():
    x = jnp.ones((2, 3))
    with pytest.raises(ValueError, match=r"Dropout\(0\.5\): training mode .* needs a PRNG key"):
        Dropout(0.5).apply({}, x, train=True)
    with pytest.raises(ValueError, match=r"Dropout\(0\.5\).*key=jax\.random\.key"):
        rule_forward(Dropout(0.5), {}, {}, x, key=None, train=True)
    net = funcnet.Serial([funcnet.Dense(3), Dropout(0.5)])
    params = draw.params(net, (3,))
    with pytest.raises(ValueError, match=r"Dropout\(0\.5\).*needs a PRNG key"):
        net.apply(params, x, train=True)


@pytest.mark.parametrize(
    "rate,err",
    [
        (-0.1, ValueError),
        (1.0, ValueError),
        (1.5, ValueError),
        (float("nan"), ValueError),
        ("0.5", TypeError),
        (True, TypeError),
        (None, TypeError),
    ],
    ids=["negative", "one", "above-one", "nan", "str", "bool", "none"],
)
def test_bad_rates_name_the_layer(rate, err):
    with pytest.raises(err, match=r"^Dropout: rate must be a float in \[0, 1\)"):
        Dropout(rate)


def test_rate_is_normalised_to_float():
    assert Dropout(0).rate == 0.0 and isinstance(Dropout(0).rate, float)
    assert Dropout(np.float32(0.25)).rate == 0.25
    assert repr(Dropout(0.5)) == "Dropout(0.5)"
    assert hash(Dropout(0.5)) == hash(Dropout(0.5))


def test_spatial_dropout_shares_the_mask_along_broadcast_dims():
    layer = Dropout(0.5, broadcast_dims=(0, 1))  # (H, W, C): drop whole channels
    assert repr(layer) == "Dropout(0.5, broadcast_dims=(0, 1))"
    x = jnp.ones((4, 3, 5, 8))
    assert layer.mask_shape(x.shape) == (4, 1, 1, 8)
    y = np.asarray(layer.apply({}, x, key=jax.random.key(0), train=True))
    per_channel = y.reshape(4, 15, 8)
    assert np.all(per_channel == per_channel[:, :1, :])  # one draw per (example, channel)
    assert set(np.unique(y)) == {0.0, 2.0}
    # negative axes count from the end; the rule uses the same shared mask
    neg = Dropout(0.5, broadcast_dims=(-3, -2))
    k, g = jax.random.key(0), _x(x.shape)
    np.testing.assert_array_equal(neg.apply({}, x, key=k, train=True), y)
    _, _, res = neg.fwd({}, {}, x, key=k, train=True)
    (ref,) = jax.vjp(lambda x: neg.forward({}, {}, x, key=k, train=True)[0], x)[1](g)
    np.testing.assert_allclose(neg.bwd(res, g, True)[0], ref, rtol=1e-6)


def test_bad_broadcast_dims_name_the_layer():
    with pytest.raises(TypeError, match=r"^Dropout: broadcast_dims must be a tuple of ints"):
        Dropout(0.5, broadcast_dims=(0.5,))
    with pytest.raises(ValueError, match=r"^Dropout: broadcast_dims has repeated axes"):
        Dropout(0.5, broadcast_dims=(1, 1))
    with pytest.raises(ValueError, match=r"Dropout\(0\.5, broadcast_dims=\(2,\)\): .*out of range"):
        Dropout(0.5, broadcast_dims=(2,)).output_shape((3, 4))
    with pytest.raises(ValueError, match="name the same axis twice"):
        Dropout(0.5, broadcast_dims=(0, -2)).apply({}, jnp.ones((1, 3, 4)))


def test_under_jit_with_train_static():
    layer = Dropout(0.3)
    x, k = _x((8, 16)), jax.random.key(5)
    train_fn = jax.jit(lambda x, k: layer.apply({}, x, key=k, train=True))
    eval_fn = jax.jit(lambda x: layer.apply({}, x))
    np.testing.assert_array_equal(train_fn(x, k), layer.apply({}, x, key=k, train=True))
    np.testing.assert_array_equal(eval_fn(x), x)


def test_hand_backprop_through_a_network_matches_autodiff():
    net = funcnet.Serial([funcnet.Dense(6), Dropout(0.5), funcnet.Dense(3)])
    params = draw.params(net, (4,))
    x, y, k = _x((5, 4)), jnp.array([0, 1, 2, 0, 1]), jax.random.key(9)
    hand = fvjp.value_and_grad_with_state(net, losses.softmax_cross_entropy)
    loss, grads, _, _ = jax.jit(hand, static_argnums=5)(params, {}, x, y, k, True)
    ref_loss, ref = jax.jit(
        jax.value_and_grad(
            lambda p: losses.softmax_cross_entropy(net.apply(p, x, key=k, train=True), y)
        )
    )(params)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(ref)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_metadata():
    layer = Dropout(0.5)
    assert Dropout.stochastic and layer.stochastic
    assert layer.output_shape((3, 4)) == (3, 4)
    assert layer.flops((3, 4)) == (24, 0)  # a multiply and a select per element
    assert Dropout(0.0).flops((3, 4)) == (0, 0)
    rf = funcnet.nn.base.RF.start((3,))
    assert layer.receptive_field((3, 4), rf) is rf
