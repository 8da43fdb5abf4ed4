"""Layers and Serial: shapes predicted == shapes produced, parameter counts, pytrees."""

import dataclasses
import math

import draw
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from compile_log import CompileLog

import funcnet as fn
from funcnet.nn import base

SPATIAL = (9, 8, 3)
LAYERS = [
    (fn.Dense(5), (7,)),
    (fn.Dense(4, use_bias=False), (3, 6)),
    (fn.Conv(4, 3), SPATIAL),
    (fn.Conv(4, (3, 2), stride=3, padding="SAME"), SPATIAL),
    (fn.Conv(2, 3, stride=(2, 1), padding=((1, 2), (0, 1)), dilation=2), SPATIAL),
    (fn.Conv(2, 5, stride=3, padding=2), SPATIAL),
    (fn.LocallyConnected(2, 3), SPATIAL),
    (fn.LocallyConnected(2, (2, 3), stride=3, padding="SAME"), SPATIAL),
    (fn.LocallyConnected(1, 3, stride=2, padding=1, dilation=2, use_bias=False), SPATIAL),
    (fn.MaxPool(2), SPATIAL),
    (fn.MaxPool(3, stride=1, padding="SAME"), SPATIAL),
    (fn.MaxPool((3, 2), stride=3, padding="SAME"), SPATIAL),
    (fn.AvgPool(3, 2, padding=1), SPATIAL),
    (fn.AvgPool(3, 3, "SAME", count_include_pad=False), SPATIAL),
    (fn.L2Pool(2, 1), SPATIAL),
    (fn.LpPool(3, 2, "SAME", p=3), SPATIAL),
    (fn.FeatureL2Pool(3), SPATIAL),
    (fn.FeatureMaxPool(1), (6,)),
    (fn.Sigmoid(), SPATIAL),
    (fn.Tanh(), (4,)),
    (fn.ReLU(), SPATIAL),
    (fn.Activation(jax.nn.gelu), SPATIAL),
    (fn.Softmax(), (10,)),
    (fn.LogSoftmax(axis=1), (3, 4)),
    (fn.Flatten(), SPATIAL),
    (fn.models.lenet5(), (28, 28, 1)),
    (fn.models.digits_cnn(), (8, 8, 1)),
    (fn.models.mlp([16, 8], 3, fn.Tanh()), (4, 4, 1)),
    (fn.Serial([fn.Serial([fn.Conv(2, 3), fn.ReLU()]), fn.Flatten(), fn.Dense(3)]), SPATIAL),
]
IDS = [repr(layer).replace("\n", "")[:60] for layer, _ in LAYERS]


# the layer a static argument: one compiled program per layer, input shape and dtype,
# shared by the tests below that run the same layer on the same arguments
_APPLY = jax.jit(lambda layer, params, x: layer.apply(params, x), static_argnums=0)


@pytest.mark.parametrize("layer,shape", LAYERS, ids=IDS)
def test_output_shape_equals_the_shape_apply_produces(layer, shape):
    params = draw.params(layer, shape)  # arbitrary values: no init program to compile
    x = draw.normal((2, *shape), seed=1)
    y = _APPLY(layer, params, x)  # one program (test_protocol runs each one eagerly)
    assert y.shape == (2, *layer.output_shape(shape))
    assert y.dtype == jnp.float32


@pytest.mark.parametrize("layer,shape", LAYERS, ids=IDS)
def test_param_shapes_match_init_without_allocating(layer, shape):
    predicted = layer.param_shapes(shape)
    # init's output as traced (the shapes and dtypes its compiled program returns; the
    # values are tested by the init tests below and test_protocol's conformance)
    actual = jax.eval_shape(lambda key: layer.init(key, shape), jax.random.key(0))
    assert jax.tree_util.tree_structure(predicted) == jax.tree_util.tree_structure(actual)
    for p, a in zip(jax.tree_util.tree_leaves(predicted), jax.tree_util.tree_leaves(actual)):
        assert p.shape == a.shape and p.dtype == a.dtype
    assert fn.param_count(layer, shape) == sum(a.size for a in jax.tree_util.tree_leaves(actual))


@pytest.mark.parametrize("layer,shape", LAYERS, ids=IDS)
def test_layers_are_hashable_comparable_and_static_jit_arguments(layer, shape):
    clone = dataclasses.replace(layer)
    assert clone == layer and hash(clone) == hash(layer)
    assert "Array" not in repr(layer)  # layers never hold arrays
    params = draw.params(layer, shape)
    x = draw.normal((2, *shape), seed=1)
    y = _APPLY(layer, params, x)
    programs = _APPLY._cache_size()
    np.testing.assert_array_equal(_APPLY(clone, params, x), y)
    assert _APPLY._cache_size() == programs  # an equal layer hits the same compiled program


def test_slide_parameter_counts_from_shapes_alone():
    # 200x200 image, 40K hidden units, fully connected: 1.6e9 weights (the slide says ~2B).
    dense = fn.Dense(40_000)
    specs = dense.param_specs((200 * 200,))
    assert math.prod(specs["w"]) == 1_600_000_000
    assert fn.param_count(dense, (200 * 200,)) == 1_600_000_000 + 40_000
    # Locally connected, a 10x10 filter per hidden unit (40K units = 200x200 outputs): 4M.
    local = fn.LocallyConnected(1, (10, 10), padding="SAME")
    assert local.output_shape((200, 200, 1)) == (200, 200, 1)
    assert math.prod(local.param_specs((200, 200, 1))["w"]) == 4_000_000
    # Convolution, 100 filters of 10x10, shared across positions: 10K.
    conv = fn.Conv(100, (10, 10), padding="SAME")
    assert math.prod(conv.param_specs((200, 200, 1))["w"]) == 10_000
    assert fn.param_count(conv, (200, 200, 1)) == 10_000 + 100


def test_summary_of_the_huge_dense_layer_does_not_allocate():
    s = fn.summary(fn.Serial([fn.Flatten(), fn.Dense(40_000)]), (200, 200, 1))
    assert s.total_params == 1_600_040_000
    assert "1,600,040,000" in str(s)


def test_lenet5_has_the_classic_parameter_count():
    assert fn.param_count(fn.models.lenet5(), (28, 28, 1)) == 61_706


def test_serial_params_are_a_tuple_of_named_dicts():
    net = fn.Serial([fn.Dense(3), fn.ReLU(), fn.Dense(2, use_bias=False)])
    params = net.init(jax.random.key(0), (4,))
    assert isinstance(params, tuple) and len(params) == 3
    assert set(params[0]) == {"w", "b"} and params[1] == {} and set(params[2]) == {"w"}


def test_serial_is_the_composition_of_its_layers():
    layers = [fn.Dense(3), fn.Tanh(), fn.Dense(2), fn.Softmax()]
    net = fn.Serial(layers)
    params = draw.params(net, (4,))
    x = draw.normal((5, 4), seed=1)
    y = x
    for layer, p in zip(layers, params):
        y = layer.apply(p, y)
    np.testing.assert_array_equal(net.apply(params, x), y)
    np.testing.assert_allclose(
        y,
        jax.nn.softmax(
            jnp.tanh(x @ params[0]["w"] + params[0]["b"]) @ params[2]["w"] + params[2]["b"]
        ),
        rtol=1e-6,
    )


def test_serial_init_uses_independent_keys_per_layer():
    net = fn.Serial([fn.Dense(4), fn.Dense(4)])
    p = net.init(jax.random.key(0), (4,))
    assert not np.allclose(p[0]["w"], p[1]["w"])


def test_init_of_a_network_is_one_program_with_the_values_of_op_by_op():
    # a network no other test initialises on this shape: nothing cached yet
    net = fn.Serial([fn.Conv(3, 3), fn.BatchNorm(), fn.ReLU(),
                     fn.Serial([fn.Dense(5), fn.Dropout(0.5)]), fn.Dense(2)])
    key = jax.random.key(4)
    with CompileLog() as log:
        params = net.init(key, [5, 6, 2])  # a list shape is fine too
    assert log.count("_init_program") == 1 and len(log.messages) == 1, log.messages
    with CompileLog() as log:
        again = dataclasses.replace(net).init(key, (5, 6, 2))  # an equal net
    assert log.messages == []
    eager = net.init_params(key, (5, 6, 2))  # called directly: initializer by initializer
    for a, b, c in zip(*map(jax.tree_util.tree_leaves, (params, again, eager)), strict=True):
        assert a.dtype == c.dtype
        np.testing.assert_array_equal(a, c)
        np.testing.assert_array_equal(b, c)
    # inside a trace it runs in place: jit, vmap (an ensemble), eval_shape
    jitted = jax.jit(net.init, static_argnums=1)(key, (5, 6, 2))
    for a, b in zip(*map(jax.tree_util.tree_leaves, (jitted, params)), strict=True):
        np.testing.assert_array_equal(a, b)
    stacked = jax.vmap(net.init, in_axes=(0, None))(jax.random.split(key, 3), (5, 6, 2))
    assert jax.tree_util.tree_leaves(stacked)[0].shape[0] == 3
    shapes = jax.eval_shape(lambda k: net.init(k, (5, 6, 2)), key)
    assert shapes == net.param_shapes((5, 6, 2))
    # a network without parameters: its empty structure, nothing compiled
    with CompileLog() as log:
        empty = fn.Serial([fn.ReLU(), fn.Flatten()]).init(key, (3, 2))
    assert empty == ({}, {}) and log.messages == []


def test_param_limit_is_checked_on_every_init_even_with_a_compiled_program():
    net = fn.Serial([fn.Dense(7), fn.Dense(3)])
    net.init(jax.random.key(0), (9,))  # 94 parameters: compiled and cached
    previous = base.set_param_limit(50)
    try:
        with pytest.raises(ValueError, match="94 parameters"):
            net.init(jax.random.key(0), (9,))
    finally:
        base.set_param_limit(previous)


@dataclasses.dataclass(frozen=True)
class _UnhashableDense(fn.Dense):
    """A layer that cannot be a static jit argument (a user's unhashable layer)."""

    __hash__ = None


def test_an_unhashable_layer_is_initialised_op_by_op():
    layer = _UnhashableDense(4)
    with pytest.raises(TypeError):
        hash(layer)
    params = layer.init(jax.random.key(2), (3,))
    expected = fn.Dense(4).init(jax.random.key(2), (3,))
    np.testing.assert_array_equal(params["w"], expected["w"])
    np.testing.assert_array_equal(params["b"], expected["b"])


def test_apply_outside_a_trace_is_one_program_with_the_values_of_op_by_op():
    # a network with state, randomness and a branch, on a shape no other test uses
    net = fn.Serial([fn.Conv(3, 3), fn.BatchNorm(), fn.ReLU(),
                     fn.Residual(fn.Serial([fn.Dense(3), fn.Dropout(0.5)])), fn.Flatten(),
                     fn.Dense(2)])
    shape = (5, 7, 2)
    params, state = draw.params(net, shape), net.init_state(shape)
    x = jax.device_put(np.random.default_rng(1).normal(size=(3, *shape)).astype(np.float32))
    key = jax.random.key(2)
    for train in (True, False):
        with CompileLog() as log:
            y, new = net.apply_with_state(params, state, x, key=key, train=train)
        assert log.count("_forward_program") == 1 and len(log.messages) == 1, log.messages
        with CompileLog() as log:  # the same call again, and an equal network: cached
            y2, _ = dataclasses.replace(net).apply_with_state(params, state, x, key=key,
                                                              train=train)
        assert log.messages == []
        # the same as op by op (jax.disable_jit; in training, where the state moves and
        # Dropout draws) and as the forward traced by a jit of the caller's
        if train:
            with jax.disable_jit():
                y_ref, new_ref = net.apply_with_state(params, state, x, key=key, train=True)
        else:
            y_ref, new_ref = jax.jit(
                lambda p, s, x, k: net.apply_with_state(p, s, x, key=k, train=False)
            )(params, state, x, key)
        for a in (y2, y_ref):
            np.testing.assert_allclose(a, y, rtol=1e-6, atol=1e-6)
        for a, b in zip(*map(jax.tree_util.tree_leaves, (new, new_ref)), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
        if train:  # BatchNorm's running statistics moved
            assert not np.allclose(new[1]["mean"], state[1]["mean"])
        else:  # evaluation hands back the very state given, not a copy
            assert new is state
    # under grad and vmap the forward runs in place (it is part of their trace)
    with CompileLog() as log:
        g = jax.jit(jax.grad(lambda p: jnp.sum(net.apply_with_state(p, state, x)[0])))(params)
        per_example = jax.jit(jax.vmap(lambda e: net.apply_with_state(params, state, e[None])[0]))(x)
    assert log.count("_forward_program") == 0, log.messages
    assert jax.tree_util.tree_structure(g) == jax.tree_util.tree_structure(params)
    np.testing.assert_allclose(per_example[:, 0], y, rtol=1e-5, atol=1e-6)


def test_an_unhashable_layer_runs_op_by_op_and_a_network_checks_ids_before_compiling():
    layer = _UnhashableDense(4)
    params = layer.init(jax.random.key(2), (3,))
    x = jax.device_put(np.ones((2, 3), np.float32))
    with CompileLog() as log:
        y = layer.apply(params, x)
    assert log.count("_forward_program") == 0
    np.testing.assert_allclose(y, fn.Dense(4).apply(params, x), rtol=1e-6)
    # an Embedding deep in a network still sees its concrete ids (the trace cannot)
    net = fn.Serial([fn.Serial([fn.Embedding(6, 2)]), fn.Flatten(), fn.Dense(1)])
    p = draw.params(net, (3,))
    ids = jax.device_put(np.array([[0, 5, 6]], np.int32))
    with pytest.raises(ValueError, match=r"Serial layer 0: Serial layer 0: Embedding\(6, 2\): "
                                         r"ids must lie in \[0, 6\), got values in \[0, 6\]"):
        net.apply(p, ids)
    assert net.apply(p, ids.at[0, 2].set(1)).shape == (1, 1)


def test_default_initializers_are_lecun_normal_and_zero_bias():
    layer = fn.Dense(2000)
    p = layer.init(jax.random.key(0), (500,))
    np.testing.assert_array_equal(p["b"], 0.0)
    # lecun_normal: truncated normal with variance 1 / fan_in.
    np.testing.assert_allclose(np.var(np.asarray(p["w"])), 1 / 500, rtol=0.05)
    conv = fn.Conv(64, 3).init(jax.random.key(0), (8, 8, 16))["w"]
    np.testing.assert_allclose(np.var(np.asarray(conv)), 1 / (3 * 3 * 16), rtol=0.05)
    local = fn.LocallyConnected(8, 3).init(jax.random.key(0), (12, 12, 16))["w"]
    np.testing.assert_allclose(np.var(np.asarray(local)), 1 / (3 * 3 * 16), rtol=0.05)


def test_initializers_are_overridable_per_layer():
    ones = jax.nn.initializers.ones
    p = fn.Conv(2, 3, w_init=ones, b_init=jax.nn.initializers.constant(0.5)).init(
        jax.random.key(0), (5, 5, 1)
    )
    np.testing.assert_array_equal(p["w"], 1.0)
    np.testing.assert_array_equal(p["b"], 0.5)
    p64 = fn.Dense(3, param_dtype=jnp.bfloat16).init(jax.random.key(0), (2,))
    assert p64["w"].dtype == jnp.bfloat16


def test_activation_layers_compute_their_functions():
    x = jnp.linspace(-3, 3, 13).reshape(1, 13)
    np.testing.assert_allclose(fn.Sigmoid().apply({}, x), 1 / (1 + np.exp(-x)), rtol=1e-6)
    np.testing.assert_allclose(fn.Tanh().apply({}, x), np.tanh(x), rtol=1e-6)
    np.testing.assert_array_equal(fn.ReLU().apply({}, x), np.maximum(x, 0))
    np.testing.assert_allclose(fn.Activation(jnp.sin).apply({}, x), np.sin(x), rtol=1e-6)
    np.testing.assert_allclose(
        fn.LogSoftmax().apply({}, x), np.log(fn.Softmax().apply({}, x)), atol=1e-5
    )


def test_relu_derivative_at_zero_is_zero():
    assert jax.grad(lambda x: fn.ops.relu(x))(0.0) == 0.0


def test_softmax_sums_to_one_and_is_shift_invariant():
    x = draw.normal((4, 7)) * 5
    s = fn.ops.softmax(x)
    np.testing.assert_allclose(s.sum(-1), 1.0, rtol=1e-6)
    # Shift invariance in float64: in float32, x + 1000 would round x itself.
    with jax.enable_x64(True):
        x64 = jnp.asarray(np.asarray(x), jnp.float64)
        s64 = fn.ops.softmax(x64)
        np.testing.assert_allclose(fn.ops.softmax(x64 + 1000.0), s64, rtol=1e-10)
        np.testing.assert_allclose(
            fn.ops.log_softmax(x64 - 123.0), fn.ops.log_softmax(x64), atol=1e-10
        )
    big = fn.ops.softmax(jnp.array([[1e4, -1e4, 0.0]]))
    assert np.all(np.isfinite(big)) and np.isclose(big.sum(), 1.0)
    # The lecture's formula y_k = exp(b_k) / sum_l exp(b_l), on small logits.
    b = np.array([[0.5, -1.0, 2.0]])
    np.testing.assert_allclose(
        fn.ops.softmax(jnp.asarray(b)), np.exp(b) / np.exp(b).sum(), rtol=1e-6
    )


def test_flatten_keeps_the_batch():
    x = jnp.arange(24.0).reshape(2, 3, 2, 2)
    np.testing.assert_array_equal(fn.Flatten().apply({}, x), x.reshape(2, 12))


@pytest.mark.parametrize("layer, out", [(fn.Flatten(), (0, 12)), (fn.Reshape((-1, 4)), (0, 3, 4))],
                         ids=repr)
def test_flatten_and_reshape_take_an_empty_batch(layer, out):
    """N = 0 (a filtered-out batch, ``predict`` on nothing), as Conv, pooling and Dense do:
    numpy cannot infer a -1 next to a zero batch, so the size is given explicitly."""
    x = jnp.zeros((0, 3, 2, 2))
    assert layer.apply({}, x).shape == out
    dx = jax.grad(lambda x: jnp.sum(fn.vjp.manual(type(layer).op)(x, **layer.hyper())))(x)
    assert dx.shape == x.shape


def test_vmap_and_grad_apply_to_a_network():
    net = fn.models.digits_cnn()
    params = draw.params(net, (8, 8, 1))
    x = draw.uniform((3, 8, 8, 1), seed=1)
    # jitted: op by op, each transformed primitive would compile its own program
    per_example = jax.jit(jax.vmap(lambda xi: net.apply(params, xi[None])[0]))(x)
    np.testing.assert_allclose(per_example, jax.jit(net.apply)(params, x), rtol=1e-5,
                               atol=1e-5)
    grads = jax.jit(jax.grad(lambda p: net.apply(p, x).sum()))(params)
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(params)
