"""Bad configurations and bad inputs raise ValueError / TypeError naming the culprit."""

import draw
import jax
import jax.numpy as jnp
import pytest

import funcnet as fn
from funcnet import ops

BAD_CONFIGS = [
    (lambda: fn.Dense(0), ValueError, r"Dense: features must be a positive int, got 0"),
    (lambda: fn.Dense(2.5), TypeError, r"Dense: features must be a positive int, got 2.5"),
    (lambda: fn.Conv(4, (3, 3, 3)), ValueError, r"Conv: kernel_size must be an int or a sequence of 2"),
    (lambda: fn.Conv(4, 3, stride=0), ValueError, r"Conv: stride must be a positive int, got 0"),
    (lambda: fn.Conv(4, 3, padding="FULL"), ValueError, r"Conv: padding must be one of \('VALID', 'SAME'\).*'FULL'"),
    (lambda: fn.Conv(4, 3, padding=-1), ValueError, r"Conv: padding must be.*got -1"),
    (lambda: fn.Conv(4, 3, dilation=(1, 0)), ValueError, r"Conv: dilation must be a positive int"),
    (lambda: fn.LocallyConnected(-1, 3), ValueError, r"LocallyConnected: features must be a positive int, got -1"),
    (lambda: fn.MaxPool(0), ValueError, r"MaxPool: window must be a positive int, got 0"),
    (lambda: fn.AvgPool(2, stride=(1, 2, 3)), ValueError, r"AvgPool: stride must be an int or a sequence of 2"),
    (lambda: fn.L2Pool(2, padding=((1, 2),)), ValueError, r"L2Pool: padding must be"),
    (lambda: fn.LpPool(2, p=0.5), ValueError, r"LpPool: p must be a finite number >= 1, got 0.5"),
    (lambda: fn.FeatureL2Pool(0), ValueError, r"FeatureL2Pool: group_size must be a positive int, got 0"),
    (lambda: fn.FeatureMaxPool("2"), TypeError, r"FeatureMaxPool: group_size must be a positive int, got '2'"),
    (lambda: fn.Activation("relu"), TypeError, r"Activation: fn must be callable, got 'relu'"),
    (lambda: fn.Dense(3, w_init=0.1), TypeError, r"Dense: w_init must be an initializer"),
    (lambda: fn.Dense(3, param_dtype=jnp.int32), TypeError, r"Dense: param_dtype must be a floating dtype"),
    (lambda: fn.Serial(fn.Dense(3)), TypeError, r"Serial: layers must be a list or tuple of layers"),
    (lambda: fn.Serial([fn.Dense(3), fn.ReLU]), TypeError, r"Serial: layers\[1\] is not a funcnet layer.*instead of an instance"),
]  # fmt: skip


@pytest.mark.parametrize("make,exc,msg", BAD_CONFIGS, ids=[m for _, _, m in BAD_CONFIGS])
def test_bad_configuration_is_rejected_at_construction(make, exc, msg):
    with pytest.raises(exc, match=msg):
        make()


BAD_SHAPES = [
    (fn.Conv(4, 3), (8, 8), r"Conv\(4, \(3, 3\)\): expected input_shape of rank 3 \(H, W, C; no batch dimension\), got shape \(8, 8\)"),
    (fn.Conv(4, 5), (4, 4, 1), r"Conv\(4, \(5, 5\)\): window \(5, 5\) \(after dilation\) is larger than the padded input \(4, 4\)"),
    (fn.Conv(4, 3, dilation=3), (6, 6, 1), r"window \(7, 7\) \(after dilation\) is larger"),
    (fn.MaxPool(3), (2, 5, 1), r"MaxPool\(\(3, 3\)\): window \(3, 3\) \(after dilation\) is larger than the padded input \(2, 5\)"),
    (fn.AvgPool(2), (4, 4), r"AvgPool\(\(2, 2\)\): expected input_shape of rank 3"),
    (fn.FeatureL2Pool(4), (3, 3, 6), r"FeatureL2Pool\(4\): the number of features \(last axis\) 6 is not divisible by group_size 4"),
    (fn.Softmax(axis=3), (5,), r"Softmax\(axis=3\): axis 3 is not a feature axis"),
    (fn.Dense(3), (0,), r"Dense\(3\): input_shape must be a tuple of positive ints"),
    (fn.Dense(3), "28x28", r"Dense\(3\): input_shape must be a tuple of positive ints"),
]  # fmt: skip


@pytest.mark.parametrize("layer,shape,msg", BAD_SHAPES, ids=[repr(l) for l, _, _ in BAD_SHAPES])
def test_bad_input_shape_is_rejected_at_init_and_output_shape(layer, shape, msg):
    with pytest.raises((ValueError, TypeError), match=msg):
        layer.output_shape(shape)
    with pytest.raises((ValueError, TypeError), match=msg):
        layer.init(jax.random.key(0), shape)


def test_bad_input_at_apply_names_layer_expected_and_given():
    conv = fn.Conv(4, 3)
    params = draw.params(conv, (8, 8, 3))
    with pytest.raises(ValueError, match=r"Conv\(4, \(3, 3\)\): expected input_shape of rank 3"):
        conv.apply(params, jnp.ones((8, 8, 3)))  # forgot the batch axis
    with pytest.raises(ValueError, match=r"Conv\(4, \(3, 3\)\): param 'w' has shape \(3, 3, 3, 4\), "
                                         r"expected \(3, 3, 1, 4\) for input shape \(8, 8, 1\)"):
        conv.apply(params, jnp.ones((2, 8, 8, 1)))  # wrong channel count
    with pytest.raises(TypeError, match=r"Conv\(4, \(3, 3\)\): input x must have a floating dtype.*int32"):
        conv.apply(params, jnp.ones((2, 8, 8, 3), jnp.int32))
    with pytest.raises(ValueError, match=r"Conv\(4, \(3, 3\)\): expected params with keys \['b', 'w'\], got \['w'\]"):
        conv.apply({"w": params["w"]}, jnp.ones((2, 8, 8, 3)))
    dense = fn.Dense(3)
    p = draw.params(dense, (5,))
    with pytest.raises(ValueError, match=r"Dense\(3\): param 'w' has shape \(5, 3\), expected \(4, 3\)"):
        dense.apply(p, jnp.ones((2, 4)))


def test_serial_errors_name_the_layer_index():
    net = fn.Serial([fn.Conv(4, 3), fn.MaxPool(2), fn.Conv(8, 5)])
    with pytest.raises(ValueError, match=r"Serial layer 2: Conv\(8, \(5, 5\)\): window \(5, 5\)"):
        net.init(jax.random.key(0), (10, 10, 1))
    ok = fn.Serial([fn.Dense(3), fn.Dense(2)])
    params = draw.params(ok, (4,))
    with pytest.raises(ValueError, match=r"Serial: params must be a tuple with one entry per layer \(2\), got tuple of length 1"):
        ok.apply(params[:1], jnp.ones((1, 4)))
    with pytest.raises(ValueError, match=r"Serial layer 0: Dense\(3\): param 'w' has shape \(4, 3\), expected \(6, 3\)"):
        ok.apply(params, jnp.ones((1, 6)))


def test_errors_are_raised_at_trace_time_under_jit():
    net = fn.Serial([fn.Conv(2, 3), fn.Flatten(), fn.Dense(2)])
    params = draw.params(net, (6, 6, 1))
    with pytest.raises(ValueError, match=r"Serial layer 0: Conv\(2, \(3, 3\)\): param 'w'"):
        jax.jit(net.apply)(params, jnp.ones((2, 6, 6, 2)))


OP_ERRORS = [
    (lambda: ops.conv2d(jnp.ones((1, 5, 5, 2)), jnp.ones((3, 3, 3, 1))), ValueError, r"conv2d: input x has 2 channels.*kernel w expects 3"),
    (lambda: ops.conv2d(jnp.ones((5, 5, 2)), jnp.ones((3, 3, 2, 1))), ValueError, r"conv2d: expected input x of rank 4 \(N, H, W, C\), got shape \(5, 5, 2\)"),
    (lambda: ops.dense(jnp.ones((2, 3)), jnp.ones((4, 5))), ValueError, r"dense: input x has 3 features.*w expects 4"),
    (lambda: ops.max_pool(jnp.ones((1, 2, 2, 1)), 3), ValueError, r"max_pool: window \(3, 3\).*larger than the padded input \(2, 2\)"),
    (lambda: ops.avg_pool(jnp.ones((1, 4, 4, 1), jnp.int32), 2), TypeError, r"avg_pool: input x must have a floating dtype"),
    (lambda: ops.feature_max_pool(jnp.ones((2, 5)), 2), ValueError, r"feature_max_pool: the number of features \(last axis\) 5 is not divisible by group_size 2"),
    (lambda: ops.locally_connected2d(jnp.ones((1, 5, 5, 1)), jnp.ones((2, 2, 3, 3, 1, 1))), ValueError, r"locally_connected2d: .*give \(3, 3\) output positions but w has kernels for \(2, 2\)"),
]  # fmt: skip


@pytest.mark.parametrize("call,exc,msg", OP_ERRORS, ids=[m[:40] for _, _, m in OP_ERRORS])
def test_ops_validate_their_inputs(call, exc, msg):
    with pytest.raises(exc, match=msg):
        call()
