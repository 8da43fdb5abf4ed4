"""Hand rules of dense and the activations: == jax.vjp, == central differences."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from funcnet import gradcheck, ops, vjp

VJP_TOL = 1e-10
FD_TOL = 1e-6


def _assert_rule(report):
    assert report.forward < VJP_TOL, report
    assert max(report.vs_autodiff.values()) < VJP_TOL, report
    assert max(report.vs_custom_vjp.values()) < VJP_TOL, report
    assert max(report.vs_finite_diff.values()) < FD_TOL, report


@pytest.mark.parametrize(
    "op,static",
    [(ops.sigmoid, {}), (ops.tanh, {}), (ops.relu, {}), (ops.softmax, {}),
     (ops.softmax, {"axis": 1}), (ops.log_softmax, {}), (ops.log_softmax, {"axis": 0})],
    ids=["sigmoid", "tanh", "relu", "softmax", "softmax-axis1", "log_softmax",
         "log_softmax-axis0"],
)
def test_activation_rules(op, static):
    with jax.enable_x64(True):
        x = jax.device_put(np.random.default_rng(0).standard_normal((3, 4, 5)) * 2)
        _assert_rule(gradcheck.check_rule(op, (x,), static))


@pytest.mark.parametrize("x_shape,bias", [((4, 5), True), ((2, 3, 5), True), ((4, 5), False)],
                         ids=["2d", "3d", "nobias"])
def test_dense_rule(x_shape, bias):
    with jax.enable_x64(True):
        rng = np.random.default_rng(1)
        x, w, b = (jax.device_put(rng.standard_normal(s)) for s in (x_shape, (5, 3), (3,)))
        _assert_rule(gradcheck.check_rule(ops.dense, (x, w, b if bias else None)))


def test_relu_derivative_at_zero_is_zero_like_jax_nn_relu():
    x = jnp.array([-1.0, 0.0, 2.0])
    g = jax.grad(lambda x: jnp.sum(vjp.manual(ops.relu)(x)))(x)
    np.testing.assert_array_equal(g, [0.0, 0.0, 1.0])
    np.testing.assert_array_equal(g, jax.grad(lambda x: jnp.sum(jax.nn.relu(x)))(x))


def test_sigmoid_local_gradient_is_sigma_times_one_minus_sigma():
    # The slide: [upstream 1.00] x [(1 - 0.73)(0.73)] = 0.2 at x = 1.
    y, res = vjp.activation.sigmoid_fwd(jnp.asarray(1.0))
    (dx,) = vjp.activation.sigmoid_bwd(res, jnp.asarray(1.0))
    assert round(float(y), 2) == 0.73 and round(float(dx), 1) == 0.2


def test_softmax_rule_is_finite_for_huge_logits():
    x = jnp.array([[1e4, 0.0, -1e4]])
    for op in (ops.softmax, ops.log_softmax):
        g = jax.grad(lambda x, op=op: jnp.sum(vjp.manual(op)(x) * jnp.arange(3.0)))(x)
        assert np.all(np.isfinite(g))
