"""Hand rules of the losses and regularizers: == jax.vjp, == central differences."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from funcnet import gradcheck, losses, regularizers, vjp

VJP_TOL = 1e-10
FD_TOL = 1e-6


def _assert_rule(report):
    assert report.forward < VJP_TOL, report
    assert max(report.vs_autodiff.values()) < VJP_TOL, report
    assert max(report.vs_custom_vjp.values()) < VJP_TOL, report
    assert max(report.vs_finite_diff.values()) < FD_TOL, report


def _data():
    rng = np.random.default_rng(0)
    z = jax.device_put(rng.standard_normal((4, 5)) * 2)
    t = jax.device_put(rng.random((4, 5)))
    return z, t


@pytest.mark.parametrize("which", ["quadratic", "bce", "bce_logits", "softmax_ce_onehot"])
def test_loss_rules_for_prediction_and_target(which):
    with jax.enable_x64(True):
        z, t = _data()
        op, args = {
            "quadratic": (losses.quadratic, (z, t)),
            "bce": (losses.binary_cross_entropy, (jax.nn.sigmoid(z), t)),
            "bce_logits": (losses.binary_cross_entropy_with_logits, (z, t)),
            "softmax_ce_onehot": (losses.softmax_cross_entropy, (z, jax.nn.softmax(t * 3))),
        }[which]
        report = gradcheck.check_rule(op, args)
    _assert_rule(report)
    assert len(report.vs_autodiff) == 2  # the target's gradient is checked too


def test_softmax_ce_with_integer_labels_is_softmax_minus_onehot_over_n():
    with jax.enable_x64(True):
        z, _ = _data()
        labels = jnp.array([0, 4, 2, 2])
        report = gradcheck.check_rule(losses.softmax_cross_entropy, (z, labels))
        _assert_rule(report)
        rule = vjp.rule_for(losses.softmax_cross_entropy)
        _, res = rule.fwd(z, labels)
        dz, dlabels = rule.bwd(res, jnp.asarray(1.0))
        expected = (jax.nn.softmax(z) - jax.nn.one_hot(labels, 5)) / 4
    assert dlabels is None
    np.testing.assert_allclose(dz, expected, rtol=1e-12)


def test_quadratic_rule_is_y_minus_target_per_example():
    y, t = jnp.array([[3.0]]), jnp.array([[1.0]])
    _, res = vjp.losses.quadratic_fwd(y, t)
    assert float(vjp.losses.quadratic_bwd(res, 1.0)[0][0, 0]) == 2.0


def test_binary_cross_entropy_rule_is_finite_at_zero_and_one():
    p, t = jnp.array([[0.0, 1.0, 0.5]]), jnp.array([[0.0, 1.0, 1.0]])
    g = jax.grad(lambda p: vjp.manual(losses.binary_cross_entropy)(p, t))(p)
    np.testing.assert_array_equal(g, [[1.0, -1.0, -2.0]])


@pytest.mark.parametrize("reg", [regularizers.l2, regularizers.l1], ids=["l2", "l1"])
def test_regularizer_rules_only_touch_masked_weights(reg):
    with jax.enable_x64(True):
        rng = np.random.default_rng(2)
        params = ({"w": jax.device_put(rng.standard_normal((3, 2))),
                   "b": jax.device_put(rng.standard_normal(2))}, {})
        report = gradcheck.check_rule(reg, (params,))
        _assert_rule(report)
        omega, grad = vjp.regularizer_value_and_grad(reg)(params)
        direct = float(reg(params))
    np.testing.assert_array_equal(grad[0]["b"], np.zeros(2))
    expected = params[0]["w"] if reg is regularizers.l2 else jnp.sign(params[0]["w"])
    np.testing.assert_array_equal(grad[0]["w"], expected)
    assert float(omega) == pytest.approx(direct)
