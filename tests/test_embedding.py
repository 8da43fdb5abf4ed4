"""Embedding: the op's rule (== jax.vjp, == differences, repeated ids add), the layer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import funcnet
from funcnet import gradcheck, losses, regularizers
from funcnet import vjp as fvjp
from funcnet.nn.base import RF, rule_forward
from funcnet.nn.embedding import (
    RULES,
    Embedding,
    EmbeddingResiduals,
    embedding,
    embedding_bwd,
    embedding_fwd,
)
from funcnet.vjp import table as rule_table

VJP_TOL = 1e-12  # float64, the same sums
FD_TOL = 1e-8  # central differences of a linear function: exact up to rounding

# ids with repeats (3 and 0 appear several times), so the gradients of a row must add
IDS = np.array([[3, 0, 3], [1, 3, 0]])


def _table(shape=(5, 4), seed=0, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)


# ---------------------------------------------------------------------------------------
# The op and its rule
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("ids_shape", [(6,), (2, 3), (2, 3, 1)], ids=["N", "NT", "NTU"])
def test_op_is_row_lookup(ids_shape):
    t = _table()
    ids = jnp.asarray(IDS.reshape(ids_shape))
    y = embedding(ids, t)
    assert y.shape == (*ids_shape, 4)
    np.testing.assert_array_equal(y, t[ids])


def test_rule_matches_vjp_and_differences_with_repeated_ids():
    with jax.enable_x64(True):
        t = _table(dtype=jnp.float64)
        ids = jnp.asarray(IDS)
        g = _table((2, 3, 4), seed=1, dtype=jnp.float64)
        y, res = embedding_fwd(ids, t)
        assert isinstance(res, EmbeddingResiduals)
        np.testing.assert_array_equal(y, t[ids])
        dids, dt = embedding_bwd(res, g)
        ref = jax.vjp(lambda t: embedding(ids, t), t)[1](g)[0]
        fd = gradcheck.numerical_grad(lambda t: jnp.sum(embedding(ids, t) * g), t)
        assert dids is None
        assert dt.shape == t.shape and dt.dtype == jnp.float64
        assert gradcheck.relative_error(dt, ref) < VJP_TOL
        assert gradcheck.relative_error(dt, fd) < FD_TOL
        # row 3 appears three times: its gradient is the sum of those rows of g
        expected = g[0, 0] + g[0, 2] + g[1, 1]
        np.testing.assert_allclose(dt[3], expected, rtol=1e-14)
        np.testing.assert_array_equal(dt[2], 0.0)  # an unused row gets nothing
        np.testing.assert_array_equal(dt[4], 0.0)


def test_rule_in_the_table_convention(monkeypatch):
    """Through gradcheck.check_rule (jax.vjp, jax.custom_vjp, differences) as the table will,
    and through vjp.manual: the integer ids get no cotangent."""
    monkeypatch.setitem(rule_table.RULES, embedding, RULES[embedding])
    with jax.enable_x64(True):
        t, ids = _table(dtype=jnp.float64), jnp.asarray(IDS)
        report = gradcheck.check_rule(embedding, (ids, t))
        assert report.forward < VJP_TOL, report
        assert set(report.vs_autodiff) == {"table"}  # ids are integer: not compared
        assert report.vs_autodiff["table"] < VJP_TOL, report
        assert report.vs_custom_vjp["table"] < VJP_TOL, report
        assert report.vs_finite_diff["table"] < FD_TOL, report
        manual = fvjp.manual(embedding)
        grad = jax.grad(lambda t: jnp.sum(manual(ids, t) ** 2))(t)
        ref = jax.grad(lambda t: jnp.sum(t[ids] ** 2))(t)
        np.testing.assert_allclose(grad, ref, rtol=1e-14)


def test_out_of_range_ids_give_nan_rows_and_no_gradient():
    t = _table()
    ids = jnp.array([[0, 5, 2], [-1, 4, 99]])  # 5, -1 and 99 are out of range for 5 rows
    y = jax.jit(embedding)(ids, t)
    bad = np.array([[False, True, False], [True, False, True]])
    assert np.all(np.isnan(np.asarray(y)[bad]))
    np.testing.assert_array_equal(np.asarray(y)[~bad], np.asarray(t)[np.asarray(ids)[~bad]])
    _, res = embedding_fwd(ids, t)
    dt = embedding_bwd(res, jnp.ones((2, 3, 4)))[1]
    np.testing.assert_array_equal(dt.sum(axis=1), [4.0, 0.0, 4.0, 0.0, 4.0])


def test_op_validates_its_arguments():
    with pytest.raises(TypeError, match="embedding: ids must have an integer dtype"):
        embedding(jnp.zeros((2,)), _table())
    with pytest.raises(ValueError, match="embedding: expected table of rank 2"):
        embedding(jnp.zeros((2,), int), jnp.zeros((5,)))


# ---------------------------------------------------------------------------------------
# The layer
# ---------------------------------------------------------------------------------------


def test_layer_values_init_and_shapes():
    layer = Embedding(10, 4)
    assert repr(layer) == "Embedding(10, 4)"
    params = layer.init(jax.random.key(0), (3,))
    assert set(params) == {"w"}
    assert params["w"].shape == (10, 4) and params["w"].dtype == jnp.float32
    assert layer.output_shape((3,)) == (3, 4)
    assert layer.output_shape(()) == (4,)
    ids = jnp.array([[1, 9, 1], [0, 2, 3]])
    np.testing.assert_array_equal(layer.apply(params, ids), params["w"][ids])
    np.testing.assert_array_equal(layer(params, np.array([4, 5])), params["w"][jnp.array([4, 5])])
    assert (
        Embedding(3, 2, param_dtype=jnp.bfloat16).init(jax.random.key(0), (1,))["w"].dtype
        == jnp.bfloat16
    )
    # the table is a weight for the default regularizer mask
    assert regularizers.weights_mask(params) == {"w": True}


def test_float_input_names_the_layer():
    layer = Embedding(10, 4)
    params = layer.init(jax.random.key(0), (3,))
    with pytest.raises(TypeError, match=r"^Embedding\(10, 4\): input ids must have an integer"):
        layer.apply(params, jnp.zeros((2, 3)))
    with pytest.raises(TypeError, match=r"^Embedding\(10, 4\): input ids must have an integer"):
        layer.apply(params, jnp.zeros((2, 3), bool))
    with pytest.raises(ValueError, match=r"^Embedding\(10, 4\): expected a batched input"):
        layer.apply(params, 3)
    net = funcnet.Serial([layer, funcnet.Flatten()])
    with pytest.raises(TypeError, match=r"Embedding\(10, 4\): input ids must have an integer"):
        net.apply(net.init(jax.random.key(0), (3,)), jnp.zeros((2, 3)))


def test_out_of_range_ids_raise_eagerly_and_give_nan_under_jit():
    layer = Embedding(10, 4)
    params = layer.init(jax.random.key(0), (3,))
    for bad in ([[0, 10, 2]], [[0, -1, 2]]):
        with pytest.raises(ValueError, match=r"^Embedding\(10, 4\): ids must lie in \[0, 10\)"):
            layer.apply(params, jnp.array(bad))
        with pytest.raises(ValueError, match=r"^Embedding\(10, 4\): ids must lie in \[0, 10\)"):
            rule_forward(layer, params, {}, jnp.array(bad), key=None, train=True)
    y = jax.jit(layer.apply)(params, jnp.array([[0, 10, 2], [-1, 3, 3]]))
    assert np.all(np.isnan(np.asarray(y)[[0, 1], [1, 0]]))
    np.testing.assert_array_equal(y[0, 0], params["w"][0])
    np.testing.assert_array_equal(y[1, 2], params["w"][3])
    # in a network, the eager error carries the layer's index
    net = funcnet.Serial([layer, funcnet.Flatten()])
    with pytest.raises(ValueError, match=r"^Serial layer 0: Embedding\(10, 4\): ids must lie"):
        net.apply(net.init(jax.random.key(0), (3,)), jnp.array([[0, 10, 2]]))


@pytest.mark.parametrize(
    "kwargs,err,msg",
    [
        ({"num_embeddings": 0, "features": 4}, ValueError, "num_embeddings must be a positive"),
        ({"num_embeddings": 10, "features": 2.0}, TypeError, "features must be a positive int"),
        ({"num_embeddings": 10, "features": 4, "w_init": 1.0}, TypeError, "w_init must be"),
        (
            {"num_embeddings": 10, "features": 4, "param_dtype": jnp.int32},
            TypeError,
            "param_dtype must be a floating",
        ),
    ],
    ids=["zero-rows", "float-features", "bad-init", "int-dtype"],
)
def test_bad_hyper_parameters_name_the_layer(kwargs, err, msg):
    with pytest.raises(err, match=f"^Embedding: {msg}"):
        Embedding(**kwargs)


def test_layer_rule_matches_vjp_with_repeated_ids():
    layer = Embedding(5, 4)
    params = {"w": _table()}
    ids, g = jnp.asarray(IDS), _table((2, 3, 4), seed=1)
    y, state, res = layer.fwd(params, {}, ids, key=None, train=True)
    np.testing.assert_array_equal(y, layer.forward(params, {}, ids, key=None, train=True)[0])
    assert state == {}
    for need_dx in (True, False):
        dx, dparams = layer.bwd(res, g, need_dx)
        assert dx is None  # no gradient w.r.t. integer ids, even when asked
    ref = jax.vjp(lambda p: layer.forward(p, {}, ids, key=None, train=True)[0], params)[1](g)[0]
    assert set(dparams) == {"w"}
    np.testing.assert_allclose(dparams["w"], ref["w"], rtol=1e-6)
    assert type(layer).has_hand_rule()


def test_in_a_network_forward_grad_and_hand_backprop():
    net = funcnet.Serial([Embedding(10, 4), funcnet.Flatten(), funcnet.Dense(3)])
    params = net.init(jax.random.key(0), (5,))
    ids = jnp.array([[1, 2, 3, 2, 9], [0, 0, 7, 8, 1]])  # (N, T), a repeated id per row
    labels = jnp.array([2, 0])
    out = net.apply(params, ids)
    assert out.shape == (2, 3) and np.all(np.isfinite(np.asarray(out)))

    def loss(p):
        return losses.softmax_cross_entropy(net.apply(p, ids), labels)

    ref_loss, ref = jax.jit(jax.value_and_grad(loss))(params)
    assert ref[0]["w"].shape == (10, 4)
    assert float(jnp.abs(ref[0]["w"][4]).max()) == 0.0  # id 4 is never used
    hand = jax.jit(fvjp.value_and_grad(net, losses.softmax_cross_entropy))
    got_loss, grads = hand(params, ids, labels)
    np.testing.assert_allclose(got_loss, ref_loss, rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(ref)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_metadata():
    layer = Embedding(10, 4)
    assert layer.flops((5,)) == (0, 0)
    rf = RF.start((5,))
    assert layer.receptive_field((5, 2), rf) is rf  # positions are kept
    assert not Embedding.stochastic
    summary = funcnet.summary(funcnet.Serial([layer, funcnet.Flatten(), funcnet.Dense(3)]), (5,))
    assert summary.rows[0].output_shape == (5, 4)
