"""Losses equal their formulas, are finite at the extremes; regularizers mask biases out."""

import draw
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import funcnet as fn
from funcnet import losses, regularizers


def test_quadratic_is_half_squared_error_summed_per_example_mean_over_batch():
    y = jnp.array([[1.0, 2.0], [0.0, -1.0]])
    t = jnp.array([[0.0, 0.0], [1.0, 1.0]])
    # per example: 1/2 (1 + 4) = 2.5 and 1/2 (1 + 4) = 2.5
    np.testing.assert_allclose(losses.quadratic(y, t), 2.5)
    # The lecture's single output: J = 1/2 (y - y*)^2, dJ/dy = y - y*.
    np.testing.assert_allclose(losses.quadratic(jnp.array([[3.0]]), jnp.array([[1.0]])), 2.0)
    np.testing.assert_allclose(
        jax.grad(lambda y: losses.quadratic(y, jnp.array([[1.0]])))(jnp.array([[3.0]])), [[2.0]]
    )


def test_binary_cross_entropy_is_the_negative_log_likelihood():
    p = jnp.array([[0.9], [0.2], [0.5]])
    t = jnp.array([[1.0], [0.0], [1.0]])
    expected = -np.mean([np.log(0.9), np.log(0.8), np.log(0.5)])
    np.testing.assert_allclose(losses.binary_cross_entropy(p, t), expected, rtol=1e-6)
    assert losses.binary_cross_entropy(p, t) > 0  # the slide's sign would make it negative
    # dJ/dy = -y*/y + (1 - y*)/(1 - y), for a batch of one
    g = jax.grad(lambda p: losses.binary_cross_entropy(p, jnp.array([[1.0]])))(jnp.array([[0.25]]))
    np.testing.assert_allclose(g, [[-4.0]], rtol=1e-6)


def test_binary_cross_entropy_finite_at_probabilities_zero_and_one():
    p = jnp.array([[0.0], [1.0], [0.0], [1.0]])
    t = jnp.array([[0.0], [1.0], [1.0], [0.0]])
    per_example = [0.0, 0.0, 100.0, 100.0]  # the log is clamped at -100
    np.testing.assert_allclose(losses.binary_cross_entropy(p, t), np.mean(per_example))


def test_bce_with_logits_equals_bce_of_sigmoid_and_is_finite_at_1e4():
    z = jnp.array([[-3.0, 0.5], [2.0, 0.0]])
    t = jnp.array([[0.0, 1.0], [1.0, 0.3]])
    np.testing.assert_allclose(
        losses.binary_cross_entropy_with_logits(z, t),
        losses.binary_cross_entropy(jax.nn.sigmoid(z), t),
        rtol=1e-5,
    )
    big = jnp.array([[1e4], [-1e4], [1e4], [-1e4]])
    t = jnp.array([[1.0], [0.0], [0.0], [1.0]])
    val = losses.binary_cross_entropy_with_logits(big, t)
    np.testing.assert_allclose(val, (0 + 0 + 1e4 + 1e4) / 4)
    g = jax.grad(lambda z: losses.binary_cross_entropy_with_logits(z, t))(big)
    assert np.all(np.isfinite(g))


def test_softmax_cross_entropy_integer_and_one_hot_labels_agree_with_formula():
    logits = jnp.array([[2.0, 1.0, 0.1], [0.5, 2.5, -1.0]])
    labels = jnp.array([0, 1])
    onehot = jax.nn.one_hot(labels, 3)
    ls = np.log(np.exp(logits) / np.exp(logits).sum(1, keepdims=True))
    expected = -np.mean([ls[0, 0], ls[1, 1]])
    np.testing.assert_allclose(losses.softmax_cross_entropy(logits, labels), expected, rtol=1e-6)
    np.testing.assert_allclose(losses.softmax_cross_entropy(logits, onehot), expected, rtol=1e-6)
    g = jax.grad(lambda z: losses.softmax_cross_entropy(z, labels))(logits)
    np.testing.assert_allclose(g, (jax.nn.softmax(logits) - onehot) / 2, rtol=1e-5, atol=1e-7)


def test_softmax_cross_entropy_finite_for_logits_of_magnitude_1e4():
    logits = jnp.array([[1e4, -1e4, 0.0], [-1e4, 1e4, 1e4]])
    labels = jnp.array([1, 0])
    val = losses.softmax_cross_entropy(logits, labels)
    np.testing.assert_allclose(val, (2e4 + (2e4 + np.log(2))) / 2, rtol=1e-6)
    g = jax.grad(lambda z: losses.softmax_cross_entropy(z, labels))(logits)
    assert np.all(np.isfinite(g))


def test_loss_input_errors_name_the_loss_and_the_shapes():
    with pytest.raises(ValueError, match=r"quadratic: .*same shape.*\(2, 1\).*\(2,\)"):
        losses.quadratic(jnp.zeros((2, 1)), jnp.zeros(2))
    with pytest.raises(
        ValueError,
        match=r"softmax_cross_entropy: integer labels must lie in "
        r"\[0, 3\), got values in \[0, 3\]",
    ):
        losses.softmax_cross_entropy(jnp.zeros((2, 3)), jnp.array([0, 3]))
    with pytest.raises(ValueError, match=r"shape \(N,\) = \(2,\).*got \(2, 1\)"):
        losses.softmax_cross_entropy(jnp.zeros((2, 3)), jnp.array([[0], [1]]))
    with pytest.raises(TypeError, match="labels must be integer class indices"):
        losses.softmax_cross_entropy(jnp.zeros((2, 3)), jnp.array([True, False]))
    with pytest.raises(ValueError, match="expected logits of rank 2"):
        losses.softmax_cross_entropy(jnp.zeros(3), jnp.array([0]))


def _params():
    return draw.params(fn.Serial([fn.Dense(3), fn.ReLU(), fn.Dense(2)]), (4,))


def test_l2_and_l1_sum_over_weights_only_by_default():
    params = _params()
    params = jax.tree_util.tree_map(lambda a: a + 1.0, params)  # nonzero biases
    w = [params[0]["w"], params[2]["w"]]
    np.testing.assert_allclose(
        regularizers.l2(params), 0.5 * sum(float(jnp.sum(a * a)) for a in w), rtol=1e-6
    )
    np.testing.assert_allclose(
        regularizers.l1(params), sum(float(jnp.sum(jnp.abs(a))) for a in w), rtol=1e-6
    )
    g = jax.grad(regularizers.l2)(params)
    np.testing.assert_allclose(g[0]["w"], params[0]["w"])  # grad of 1/2 w^2 is w
    np.testing.assert_array_equal(g[0]["b"], 0.0)  # biases are not penalised
    g1 = jax.grad(regularizers.l1)(params)
    np.testing.assert_array_equal(g1[2]["w"], jnp.sign(params[2]["w"]))


def test_regularizer_masks_pytree_or_callable_and_structure_errors():
    params = _params()
    everything = jax.tree_util.tree_map(lambda _: True, params)
    total = sum(float(jnp.sum(a * a)) for a in jax.tree_util.tree_leaves(params)) / 2
    np.testing.assert_allclose(regularizers.l2(params, everything), total, rtol=1e-6)
    np.testing.assert_allclose(regularizers.l2(params, lambda p: everything), total, rtol=1e-6)
    with pytest.raises(ValueError, match="l1: mask must have the same tree structure"):
        regularizers.l1(params, (True,))
    assert regularizers.weights_mask(params) == (
        {"w": True, "b": False},
        {},
        {"w": True, "b": False},
    )


def test_weights_mask_takes_every_kernel_and_no_bias_scale_or_table():
    """Attention's projections are kernels too (``w_qkv``, ``w_out``: left out of weight
    decay before); its biases, LayerNorm's scale, the class token and the position
    table are not."""
    import funcnet as fn

    net = fn.Serial([fn.ClassToken(), fn.PositionEmbedding(), fn.LayerNorm(),
                     fn.MultiHeadSelfAttention(2), fn.Dense(3)])
    params = net.init(jax.random.key(0), (4, 6))
    mask = regularizers.weights_mask(params)
    chosen = sorted(jax.tree_util.keystr(p) for p, m in
                    jax.tree_util.tree_flatten_with_path(mask)[0] if m)
    assert chosen == ["[3]['w_out']", "[3]['w_qkv']", "[4]['w']"]
    grads = jax.grad(regularizers.l2)(params)
    np.testing.assert_array_equal(grads[3]["w_qkv"], params[3]["w_qkv"])
    assert not np.any(np.asarray(grads[3]["b_qkv"]))
