"""Public ops called outside a trace run as one compiled program (funcnet._eager)."""

import draw
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from compile_log import CompileLog

import funcnet as fn
from funcnet import ops
from funcnet.nn.conv import plain_formulations

# shapes no other test uses, so that nothing is compiled yet
X = draw.normal((2, 9, 7, 3), seed=11)
SEQ = draw.normal((2, 5, 6), seed=12)
X2 = draw.normal(X.shape, seed=21)
LOGITS = draw.normal((5, 6), seed=22)
LABELS = draw.integers((5,), 6, seed=23)
_e = np.exp(np.random.default_rng(24).normal(size=(5, 6)))
SOFT = jax.device_put((_e / _e.sum(axis=1, keepdims=True)).astype(np.float32))
PROBS = draw.uniform((5, 6), seed=25, low=0.05, high=0.95)
TARGETS = draw.uniform((5, 6), seed=26)

CALLS = {
    "avg_pool": lambda: ops.avg_pool(X, (3, 2), (2, 1), "SAME", False),
    "lp_pool": lambda: ops.lp_pool(X, 3.0, 2, 1, ((1, 0), (0, 1))),
    "feature_l2_pool": lambda: ops.feature_l2_pool(X, 3),
    "conv2d": lambda: ops.conv2d(X, draw.normal((3, 2, 3, 4), seed=13), draw.normal((4,), seed=14),
                                 stride=(2, 1), padding=1, dilation=(1, 2)),
    "layer_norm": lambda: ops.layer_norm(X, draw.normal((3,), seed=15), None),
    "multi_head_self_attention": lambda: ops.multi_head_self_attention(
        SEQ, draw.normal((6, 18), seed=16), None, draw.normal((6, 6), seed=17), None, 2),
    "gelu": lambda: ops.gelu(X, approximate=True),
    # losses check their inputs' values on the host, then compute in one program
    "softmax_cross_entropy": lambda: fn.losses.softmax_cross_entropy(LOGITS, LABELS),
    "softmax_cross_entropy_one_hot": lambda: fn.losses.softmax_cross_entropy(LOGITS, SOFT),
    "quadratic": lambda: fn.losses.quadratic(X, X2),
    "binary_cross_entropy": lambda: fn.losses.binary_cross_entropy(PROBS, TARGETS),
    "binary_cross_entropy_with_logits": lambda: fn.losses.binary_cross_entropy_with_logits(
        LOGITS, TARGETS),
}


@pytest.mark.parametrize("name", list(CALLS))
def test_an_eager_op_is_one_program_with_the_values_of_op_by_op(name):
    call = CALLS[name]
    with CompileLog() as log:
        y = call()
    assert log.count("_program") == 1 and len(log.messages) == 1, log.messages
    with CompileLog() as log:  # the same configuration and shapes again: cached
        again = call()
    assert log.messages == []
    np.testing.assert_array_equal(again, y)
    with jax.disable_jit():  # op by op, as written
        ref = call()
    np.testing.assert_allclose(y, ref, rtol=2e-6, atol=1e-6)


def test_inside_a_trace_the_op_runs_in_place():
    text = str(jax.make_jaxpr(lambda x: ops.avg_pool(x, 2))(X))
    assert "reduce_window_sum" in text and "_program" not in text
    g = jax.grad(lambda x: ops.max_pool(x, 3, 2).sum())(X)  # eagerly: a trace too
    assert g.shape == X.shape and float(g.sum()) == 2 * 4 * 3 * 3  # one per window


def test_configurations_are_told_apart_by_type_and_value():
    assert ops.max_pool(X, 2, 1).shape == (2, 8, 6, 3)
    # 1.0 == 1 and hash(1.0) == hash(1): a float stride must not reuse the int's program
    with pytest.raises(TypeError, match=r"max_pool: stride must be an int or a sequence "
                                        r"of 2 ints, got 1\.0"):
        ops.max_pool(X, 2, 1.0)
    assert ops.max_pool(X, 2, 2).shape == (2, 4, 3, 3)


def test_plain_formulations_is_part_of_the_key():
    x = draw.normal((1, 11, 13, 1), seed=18)  # one channel, stride 1: the banded matmul
    w = draw.normal((3, 3, 1, 5), seed=19)
    with CompileLog() as log:
        fast = ops.conv2d(x, w)
        with plain_formulations():
            plain = ops.conv2d(x, w)
    assert log.count("_program") == 2, log.messages
    np.testing.assert_allclose(fast, plain, rtol=1e-5, atol=1e-5)
    with CompileLog() as log:  # outside the block again: the first program, bitwise
        again = ops.conv2d(x, w)
    assert log.messages == []
    np.testing.assert_array_equal(again, fast)
    banded = jax.jit(lambda x: ops.conv2d(x, w)).lower(x).as_text()
    with plain_formulations():
        lax_conv = jax.jit(lambda x: ops.conv2d(x, w)).lower(x).as_text()
    assert "convolution" not in banded and "convolution" in lax_conv  # two formulations


def test_errors_are_those_of_the_op():
    with pytest.raises(ValueError, match=r"conv2d: input x has 2 channels"):
        ops.conv2d(jnp.ones((1, 5, 5, 2)), jnp.ones((3, 3, 3, 1)))
    with pytest.raises(TypeError, match=r"avg_pool: input x must have a floating dtype .*<U1"):
        ops.avg_pool(np.array([[["a"]]]), 2)  # text: not a program's argument
    with pytest.raises(TypeError, match=r"dropout: rate must be a float in \[0, 1\)"):
        ops.dropout(X, jnp.ones(X.shape, bool), "half")
    # a layer calls its op inside its own program: unchanged
    net = fn.Serial([fn.Conv(2, 3), fn.AvgPool(2)])
    params = draw.params(net, (9, 7, 3))
    expected = ops.avg_pool(ops.conv2d(X, params[0]["w"], params[0]["b"]), 2)
    np.testing.assert_allclose(net.apply(params, X), expected, rtol=1e-5, atol=1e-6)


def test_an_eager_network_forward_is_keyed_by_plain_formulations_too():
    net = fn.Serial([fn.Conv(3, 3), fn.Flatten()])  # one channel, stride 1: banded
    params = draw.params(net, (12, 9, 1))
    x = draw.normal((2, 12, 9, 1), seed=20)
    y = net.apply(params, x)
    with plain_formulations(), CompileLog() as log:
        plain = net.apply(params, x)
    assert log.count("_forward_program") == 1, log.messages  # not the banded program
    np.testing.assert_allclose(plain, y, rtol=1e-5, atol=1e-5)
    expected = jax.jit(net.apply).lower(params, x).as_text()
    with plain_formulations():
        assert "convolution" in jax.jit(net.apply).lower(params, x).as_text()
    assert "convolution" not in expected
