"""Normalization: hand rules == jax.vjp == central differences; BatchNorm's two modes and
PyTorch's running-statistics convention; LayerNorm and LRN against numpy references."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rule_check import check_op_rule

from funcnet import gradcheck, graph
from funcnet.nn.base import RF
from funcnet.nn.normalization import (
    RULES,
    BatchNorm,
    LayerNorm,
    LocalResponseNorm,
    batch_moments,
    batch_norm_eval,
    batch_norm_train,
    layer_norm,
    local_response_norm,
)

SHAPES = [(6, 3), (3, 4, 5, 2)]  # (N, C) features and NHWC images
SHAPE_IDS = ["NC", "NHWC"]


def _rand(shape, seed, loc=0.0, scale=1.0):
    rng = np.random.default_rng(seed)
    return jax.device_put(loc + scale * rng.standard_normal(shape))


def _positive(shape, seed):
    return jax.device_put(np.random.default_rng(seed).uniform(0.5, 2.0, shape))


# ---------------------------------------------------------------------------------------
# Op rules: fwd == op, bwd == jax.vjp == central differences
# ---------------------------------------------------------------------------------------


def _check_rule(op, arrays, static=None, seed=0):
    check_op_rule(RULES[op], op, arrays, static, seed)


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_batch_norm_train_rule(shape, affine):
    with jax.enable_x64(True):
        c = shape[-1]
        arrays = {
            "x": _rand(shape, 1, loc=2.0, scale=3.0),
            "scale": _rand((c,), 2) if affine else None,
            "bias": _rand((c,), 3) if affine else None,
        }
        _check_rule(batch_norm_train, arrays, {"epsilon": 1e-3})


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_batch_norm_eval_rule(shape, affine):
    with jax.enable_x64(True):
        c = shape[-1]
        arrays = {
            "x": _rand(shape, 4),
            "mean": _rand((c,), 5),
            "var": _positive((c,), 6),
            "scale": _rand((c,), 7) if affine else None,
            "bias": _rand((c,), 8) if affine else None,
        }
        _check_rule(batch_norm_eval, arrays, {"epsilon": 1e-3})


@pytest.mark.parametrize("shape,affine", [
    ((4, 5), "both"), ((4, 5), "none"), ((2, 3, 2, 4), "both"), ((2, 3, 2, 4), "scale"),
], ids=["NC-both", "NC-none", "NHWC-both", "NHWC-scale"])
def test_layer_norm_rule(shape, affine):
    with jax.enable_x64(True):
        c = shape[-1]
        arrays = {
            "x": _rand(shape, 9, loc=-1.0, scale=2.0),
            "scale": _rand((c,), 10) if affine != "none" else None,
            "bias": _rand((c,), 11) if affine == "both" else None,
        }
        _check_rule(layer_norm, arrays, {"epsilon": 1e-3})


LRN_HYPER = {"alpha": 0.8, "beta": 0.75, "k": 1.5}  # alpha large enough that the sum matters


# even sizes: asymmetric windows; 8 > C: windows wider than the channels
@pytest.mark.parametrize("shape,size", [
    ((3, 6), 1), ((3, 6), 5), ((2, 3, 2, 6), 2), ((2, 3, 2, 6), 3), ((2, 3, 2, 6), 8),
], ids=["NC-1", "NC-5", "NHWC-2", "NHWC-3", "NHWC-8"])
def test_lrn_rule(shape, size):
    with jax.enable_x64(True):
        _check_rule(local_response_norm, {"x": _rand(shape, size)}, {"size": size, **LRN_HYPER})


@settings(max_examples=6, deadline=None)
@given(
    lead=st.lists(st.integers(1, 3), min_size=1, max_size=3),
    c=st.integers(1, 7),
    size=st.integers(1, 6),
    alpha=st.floats(0.0, 2.0),
    beta=st.floats(0.0, 1.5),
    k=st.floats(0.5, 3.0),
)
def test_lrn_rule_on_random_configurations(lead, c, size, alpha, beta, k):
    with jax.enable_x64(True):
        x = _rand((*lead, c), c * 10 + size)
        _check_rule(local_response_norm, {"x": x},
                    {"size": size, "alpha": alpha, "beta": beta, "k": k})


def test_every_op_has_a_rule():
    for op in (batch_norm_train, batch_norm_eval, layer_norm, local_response_norm):
        assert op in RULES
    for layer in (BatchNorm(), LayerNorm(), LocalResponseNorm()):
        assert type(layer).has_hand_rule()


# ---------------------------------------------------------------------------------------
# Forward values against numpy references
# ---------------------------------------------------------------------------------------


def _lrn_reference(x, size, alpha, beta, k):
    x = np.asarray(x)
    out = np.empty_like(x)
    channels = x.shape[-1]
    for c in range(channels):
        lo, hi = max(0, c - size // 2), min(channels, c + (size - 1) // 2 + 1)
        s = np.sum(x[..., lo:hi] ** 2, axis=-1)
        out[..., c] = x[..., c] / (k + alpha / size * s) ** beta
    return out


@pytest.mark.parametrize("size", [1, 2, 4, 5, 9])
def test_lrn_matches_numpy_loop(size):
    with jax.enable_x64(True):
        x = _rand((2, 3, 7), size)
        got = local_response_norm(x, size, **LRN_HYPER)
        np.testing.assert_allclose(got, _lrn_reference(x, size, **LRN_HYPER), rtol=1e-12)
        layer = LocalResponseNorm(size, **LRN_HYPER)
        np.testing.assert_allclose(layer.apply({}, x), got, rtol=1e-12)


def test_lrn_defaults_are_pytorch_defaults():
    layer = LocalResponseNorm()
    assert (layer.size, layer.alpha, layer.beta, layer.k) == (5, 1e-4, 0.75, 2.0)
    x = _rand((2, 6), 0).astype(jnp.float32)
    np.testing.assert_allclose(layer.apply({}, x), _lrn_reference(x, 5, 1e-4, 0.75, 2.0),
                               rtol=1e-6)


def test_layer_norm_matches_numpy():
    with jax.enable_x64(True):
        x = _rand((2, 3, 5), 0, loc=4.0, scale=3.0)
        scale, bias = _rand((5,), 1), _rand((5,), 2)
        xn = np.asarray(x)
        mu = xn.mean(-1, keepdims=True)
        var = xn.var(-1, keepdims=True)
        expected = (xn - mu) / np.sqrt(var + 1e-5) * np.asarray(scale) + np.asarray(bias)
        layer = LayerNorm(param_dtype=jnp.float64)
        got = layer.apply({"scale": scale, "bias": bias}, x)
        np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)
        # no affine part: per-position mean 0, variance var / (var + eps)
        plain = LayerNorm(use_scale=False, use_bias=False).apply({}, x)
        np.testing.assert_allclose(np.mean(plain, -1), 0, atol=1e-12)
        np.testing.assert_allclose(np.var(plain, -1, keepdims=True), var / (var + 1e-5),
                                   rtol=1e-12)


# ---------------------------------------------------------------------------------------
# BatchNorm: both modes, PyTorch's running statistics
# ---------------------------------------------------------------------------------------


def _axes(shape):
    return tuple(range(len(shape) - 1))


@pytest.mark.parametrize("shape", [(16, 4), (4, 3, 3, 4)], ids=SHAPE_IDS)
def test_batch_norm_training_normalizes_and_updates_running_stats(shape):
    with jax.enable_x64(True):
        layer = BatchNorm(momentum=0.3, param_dtype=jnp.float64)
        params = layer.init(jax.random.key(0), shape[1:])
        state = {"mean": _rand((4,), 1), "var": _positive((4,), 2)}
        x = _rand(shape, 3, loc=5.0, scale=3.0)
        y, new_state = layer.apply_with_state(params, state, x, train=True)
        xn = np.asarray(x)
        var = xn.var(_axes(shape))
        np.testing.assert_allclose(np.mean(y, _axes(shape)), 0, atol=1e-12)
        np.testing.assert_allclose(np.var(y, _axes(shape)), var / (var + 1e-5), rtol=1e-12)
        n = math.prod(shape[:-1])
        expected_mean = 0.7 * np.asarray(state["mean"]) + 0.3 * xn.mean(_axes(shape))
        expected_var = 0.7 * np.asarray(state["var"]) + 0.3 * xn.var(_axes(shape), ddof=1)
        assert n / (n - 1) != 1
        np.testing.assert_allclose(new_state["mean"], expected_mean, rtol=1e-12)
        np.testing.assert_allclose(new_state["var"], expected_var, rtol=1e-12)
        # a second step starts from the first's statistics
        x2 = _rand(shape, 4, loc=-1.0)
        _, state2 = layer.apply_with_state(params, new_state, x2, train=True)
        np.testing.assert_allclose(
            state2["var"], 0.7 * expected_var + 0.3 * np.asarray(x2).var(_axes(shape), ddof=1),
            rtol=1e-12,
        )


@pytest.mark.parametrize("momentum", [0.0, 1.0])
def test_batch_norm_momentum_extremes(momentum):
    with jax.enable_x64(True):
        layer = BatchNorm(momentum=momentum, param_dtype=jnp.float64)
        state = layer.init_state((3,))
        x = _rand((5, 3), 0, loc=2.0)
        _, new = layer.apply_with_state(layer.init(jax.random.key(0), (3,)), state, x,
                                        train=True)
        if momentum == 0.0:
            np.testing.assert_array_equal(new["mean"], state["mean"])
            np.testing.assert_array_equal(new["var"], state["var"])
        else:
            np.testing.assert_allclose(new["mean"], np.asarray(x).mean(0), rtol=1e-12)
            np.testing.assert_allclose(new["var"], np.asarray(x).var(0, ddof=1), rtol=1e-12)


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_batch_norm_eval_uses_running_stats_and_keeps_state(shape):
    with jax.enable_x64(True):
        c = shape[-1]
        layer = BatchNorm(epsilon=1e-3, param_dtype=jnp.float64)
        params = {"scale": _rand((c,), 1), "bias": _rand((c,), 2)}
        state = {"mean": _rand((c,), 3), "var": _positive((c,), 4)}
        x = _rand(shape, 5)
        y, new_state = layer.apply_with_state(params, state, x, train=False)
        expected = ((np.asarray(x) - np.asarray(state["mean"]))
                    / np.sqrt(np.asarray(state["var"]) + 1e-3)
                    * np.asarray(params["scale"]) + np.asarray(params["bias"]))
        np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-12)
        assert new_state is state


def test_batch_norm_training_refuses_one_value_per_channel():
    layer = BatchNorm()
    x = jnp.ones((1, 3))
    params, state = layer.init(jax.random.key(0), (3,)), layer.init_state((3,))
    with pytest.raises(ValueError, match=r"BatchNorm.*more than one value"):
        layer.apply_with_state(params, state, x, train=True)
    # evaluation needs no batch statistics
    y, _ = layer.apply_with_state(params, state, x, train=False)
    np.testing.assert_allclose(y, 1 / np.sqrt(1 + 1e-5), rtol=1e-6)


def test_batch_moments_is_two_pass_and_biased():
    with jax.enable_x64(True):
        x = _rand((6, 2, 3), 0, loc=1e6)
        mean, var = batch_moments(x)
        np.testing.assert_allclose(mean, np.asarray(x).mean((0, 1)), rtol=1e-14)
        np.testing.assert_allclose(var, np.asarray(x).var((0, 1)), rtol=1e-8)


# ---------------------------------------------------------------------------------------
# Layer rules: layer.fwd / layer.bwd == jax.vjp of layer.forward
# ---------------------------------------------------------------------------------------


LAYER_CASES = {
    "bn": (BatchNorm(momentum=0.2, epsilon=1e-3, param_dtype=jnp.float64), True),
    "bn-noscale": (BatchNorm(use_scale=False, param_dtype=jnp.float64), True),
    "bn-plain": (BatchNorm(use_scale=False, use_bias=False, param_dtype=jnp.float64), True),
    "ln": (LayerNorm(epsilon=1e-3, param_dtype=jnp.float64), False),
    "ln-nobias": (LayerNorm(use_bias=False, param_dtype=jnp.float64), False),
    "lrn": (LocalResponseNorm(4, **LRN_HYPER), False),
}
NC, NHWC = SHAPES
LAYER_GRID = [  # (case, shape, train); the stateless layers ignore train
    ("bn", NC, True), ("bn", NHWC, True), ("bn", NC, False), ("bn", NHWC, False),
    ("bn-noscale", NC, True), ("bn-plain", NHWC, True), ("bn-plain", NC, False),
    ("ln", NC, True), ("ln", NHWC, False), ("ln-nobias", NHWC, True), ("lrn", NHWC, True),
]


@pytest.mark.parametrize(
    "case,shape,train", LAYER_GRID,
    ids=[f"{c}-{'NC' if len(s) == 2 else 'NHWC'}-{'train' if t else 'eval'}"
         for c, s, t in LAYER_GRID],
)
def test_layer_rule_matches_autodiff(case, shape, train):
    layer, has_state = LAYER_CASES[case]
    with jax.enable_x64(True):
        in_shape = shape[1:]
        params = jax.tree_util.tree_map(
            lambda p: p + 0.3 * _rand(p.shape, 1), layer.init(jax.random.key(0), in_shape)
        )
        state = layer.init_state(in_shape)
        if has_state:
            c = in_shape[-1]
            state = {"mean": _rand((c,), 2), "var": _positive((c,), 3)}
        x = _rand(shape, 4, loc=1.0, scale=2.0)

        g = _rand(shape, 5)

        @jax.jit  # one compilation for both rules
        def run(params, state, x, g):
            def f(p, x):
                return layer.forward(p, state, x, key=None, train=train)[0]

            y_ref, vjp_fn = jax.vjp(f, params, x)
            state_ref = layer.forward(params, state, x, key=None, train=train)[1]
            y, new_state, res = layer.fwd(params, state, x, key=None, train=train)
            return (y_ref, state_ref, vjp_fn(g)), (y, new_state, layer.bwd(res, g, True),
                                                   layer.bwd(res, g, False)[0])

        (y_ref, state_ref, (dparams_ref, dx_ref)), (y, new_state, (dx, dparams), no_dx) = run(
            params, state, x, g
        )

        assert gradcheck.relative_error(y, y_ref) < 1e-12
        for a, b in zip(jax.tree_util.tree_leaves(new_state),
                        jax.tree_util.tree_leaves(state_ref), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-12)
        assert gradcheck.relative_error(dx, dx_ref) < 1e-9
        assert jax.tree_util.tree_structure(dparams) == jax.tree_util.tree_structure(params)
        for name in params:
            assert gradcheck.relative_error(dparams[name], dparams_ref[name]) < 1e-9, name
        assert no_dx is None


# ---------------------------------------------------------------------------------------
# PyTorch (optional: torch is not a dependency)
# ---------------------------------------------------------------------------------------


def test_against_torch():
    torch = pytest.importorskip("torch")
    with jax.enable_x64(True):
        x = _rand((4, 3, 5, 6), 0, loc=1.0, scale=2.0)
        xt = torch.tensor(np.asarray(x)).permute(0, 3, 1, 2)  # NCHW

        bn = torch.nn.BatchNorm2d(6, momentum=0.2, eps=1e-3).double()
        with torch.no_grad():
            bn.weight.copy_(torch.tensor(np.asarray(_rand((6,), 1))))
            bn.bias.copy_(torch.tensor(np.asarray(_rand((6,), 2))))
        layer = BatchNorm(momentum=0.2, epsilon=1e-3, param_dtype=jnp.float64)
        params = {"scale": _rand((6,), 1), "bias": _rand((6,), 2)}
        y, state = layer.apply_with_state(params, layer.init_state((3, 5, 6)), x, train=True)
        yt = bn.train()(xt).permute(0, 2, 3, 1).detach().numpy()
        np.testing.assert_allclose(y, yt, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(state["mean"], bn.running_mean.numpy(), rtol=1e-10)
        np.testing.assert_allclose(state["var"], bn.running_var.numpy(), rtol=1e-10)
        y_eval, _ = layer.apply_with_state(params, state, x, train=False)
        yt_eval = bn.eval()(xt).permute(0, 2, 3, 1).detach().numpy()
        np.testing.assert_allclose(y_eval, yt_eval, rtol=1e-10, atol=1e-10)

        ln = torch.nn.LayerNorm(6, eps=1e-3).double()
        np.testing.assert_allclose(
            LayerNorm(epsilon=1e-3).apply({"scale": jnp.ones(6), "bias": jnp.zeros(6)}, x),
            ln(torch.tensor(np.asarray(x))).detach().numpy(), rtol=1e-10, atol=1e-10,
        )

        for size in (2, 5):
            lrn = torch.nn.LocalResponseNorm(size, alpha=0.8, beta=0.75, k=1.5)
            np.testing.assert_allclose(
                LocalResponseNorm(size, **LRN_HYPER).apply({}, x),
                lrn(xt).permute(0, 2, 3, 1).numpy(), rtol=1e-10,
            )


# ---------------------------------------------------------------------------------------
# Validation, shapes, jit, metadata
# ---------------------------------------------------------------------------------------


BAD = [
    (BatchNorm, {"momentum": 1.5}, ValueError),
    (BatchNorm, {"momentum": -0.1}, ValueError),
    (BatchNorm, {"momentum": "0.1"}, TypeError),
    (BatchNorm, {"momentum": True}, TypeError),
    (BatchNorm, {"epsilon": 0.0}, ValueError),
    (BatchNorm, {"epsilon": -1e-5}, ValueError),
    (BatchNorm, {"epsilon": float("nan")}, ValueError),
    (BatchNorm, {"use_scale": 1}, TypeError),
    (BatchNorm, {"use_bias": None}, TypeError),
    (BatchNorm, {"param_dtype": jnp.int32}, TypeError),
    (LayerNorm, {"epsilon": 0}, ValueError),
    (LayerNorm, {"epsilon": None}, TypeError),
    (LayerNorm, {"use_scale": "yes"}, TypeError),
    (LayerNorm, {"param_dtype": "int8"}, TypeError),
    (LocalResponseNorm, {"size": 0}, ValueError),
    (LocalResponseNorm, {"size": 2.5}, TypeError),
    (LocalResponseNorm, {"size": True}, TypeError),
    (LocalResponseNorm, {"alpha": -1.0}, ValueError),
    (LocalResponseNorm, {"beta": -0.5}, ValueError),
    (LocalResponseNorm, {"k": 0.0}, ValueError),
    (LocalResponseNorm, {"k": "2"}, TypeError),
]


@pytest.mark.parametrize(
    "cls,kwargs,exc", BAD, ids=[f"{c.__name__}-{next(iter(k))}={next(iter(k.values()))!r}"
                                for c, k, _ in BAD]
)
def test_bad_hyper_parameters_name_the_layer(cls, kwargs, exc):
    name = next(iter(kwargs))
    with pytest.raises(exc, match=cls.__name__) as info:
        cls(**kwargs)
    assert name in str(info.value)


@pytest.mark.parametrize("layer", [BatchNorm(), LayerNorm(), LocalResponseNorm()], ids=repr)
def test_bad_inputs_name_the_layer(layer):
    with pytest.raises(ValueError, match=type(layer).__name__):
        layer.output_shape(())
    with pytest.raises(ValueError, match=type(layer).__name__):
        layer.init(jax.random.key(0), (3, 0))
    if isinstance(layer, LocalResponseNorm):
        return  # no params or state: any number of channels fits
    params = layer.init(jax.random.key(0), (4,))
    with pytest.raises(ValueError, match=type(layer).__name__):
        layer.apply_with_state(params, layer.init_state((4,)), jnp.ones((2, 5)))


def test_ops_validate_their_arguments():
    x = jnp.ones((4, 3))
    with pytest.raises(ValueError, match=r"batch_norm_train.*scale of shape \(3,\)"):
        batch_norm_train(x, jnp.ones(2))
    with pytest.raises(ValueError, match=r"batch_norm_train.*rank >= 2"):
        batch_norm_train(jnp.ones(4))
    with pytest.raises(ValueError, match=r"batch_norm_eval.*var"):
        batch_norm_eval(x, jnp.zeros(3), jnp.ones(4))
    with pytest.raises(TypeError, match=r"layer_norm.*floating"):
        layer_norm(jnp.ones((2, 3), jnp.int32))
    with pytest.raises(ValueError, match=r"layer_norm.*epsilon"):
        layer_norm(x, epsilon=0.0)
    with pytest.raises(ValueError, match=r"local_response_norm.*size"):
        local_response_norm(x, size=0)


@pytest.mark.parametrize("layer", [
    BatchNorm(), BatchNorm(use_bias=False), BatchNorm(use_scale=False, use_bias=False),
    LayerNorm(), LayerNorm(use_scale=False), LocalResponseNorm(3),
], ids=repr)
@pytest.mark.parametrize("in_shape", [(5,), (3, 4, 5)], ids=["C", "HWC"])
def test_init_and_shapes_agree(layer, in_shape):
    params = layer.init(jax.random.key(0), in_shape)
    state = layer.init_state(in_shape)
    as_shapes = jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), (params, state))
    predicted = jax.tree_util.tree_map(lambda s: (s.shape, s.dtype),
                                       (layer.param_shapes(in_shape), layer.state_shapes(in_shape)))
    assert as_shapes == predicted
    assert layer.output_shape(in_shape) == in_shape
    if isinstance(layer, BatchNorm):
        assert set(state) == {"mean", "var"}
        np.testing.assert_array_equal(state["mean"], 0)
        np.testing.assert_array_equal(state["var"], 1)
    else:
        assert state == {}
    for name, value in params.items():
        np.testing.assert_array_equal(value, 1 if name == "scale" else 0)
    expected_names = {n for n, flag in (("scale", getattr(layer, "use_scale", False)),
                                        ("bias", getattr(layer, "use_bias", False))) if flag}
    assert set(params) == expected_names


def test_apply_with_state_under_jit_keeps_state_dtype():
    with jax.enable_x64(True):
        layer = BatchNorm()  # float32 params and state, float64 input
        params, state = layer.init(jax.random.key(0), (3, 3, 2)), layer.init_state((3, 3, 2))
        step = jax.jit(layer.apply_with_state, static_argnames="train")
        x = _rand((4, 3, 3, 2), 0, loc=2.0)
        y, new_state = step(params, state, x, train=True)
        assert y.shape == x.shape
        assert {k: v.dtype for k, v in new_state.items()} == {"mean": jnp.float32,
                                                                "var": jnp.float32}
        y_eager, state_eager = layer.apply_with_state(params, state, x, train=True)
        np.testing.assert_allclose(y, y_eager, rtol=1e-6)
        np.testing.assert_allclose(new_state["var"], state_eager["var"], rtol=1e-6)
        y_eval, same = step(params, new_state, x, train=False)
        np.testing.assert_allclose(same["mean"], new_state["mean"])
        assert y_eval.shape == x.shape
        ln = jax.jit(lambda p, x: LayerNorm().apply(p, x))
        assert ln(LayerNorm().init(jax.random.key(0), (2,)), x[..., :2]).shape == (4, 3, 3, 2)


def test_flops_and_receptive_field():
    shape = (4, 5, 6)
    assert BatchNorm().flops(shape) == (2 * 120 + 4 * 6, 6)
    assert BatchNorm(use_scale=False).flops(shape) == (2 * 120 + 3 * 6, 6)
    assert LayerNorm().flops(shape) == (20 * (7 * 6 + 1), 20)
    assert LayerNorm(use_scale=False, use_bias=False).flops(shape) == (20 * (5 * 6 + 1), 20)
    assert LocalResponseNorm(5).flops(shape) == (8 * 120, 120)
    for layer in (BatchNorm(), LocalResponseNorm(3)):  # the counts XLA agrees with
        xla = graph.cost_analysis(layer, shape, batch=2)
        assert layer.flops(shape)[0] == pytest.approx(xla.flops / 2, rel=0.1)
    rf = RF.start((4, 5)).window((3, 3), (2, 2), ((1, 1), (1, 1)))
    for layer in (BatchNorm(), LayerNorm(), LocalResponseNorm()):
        assert layer.receptive_field(shape, rf) == rf
    flat = rf.flatten(shape)
    assert BatchNorm().receptive_field((120,), flat) == flat
    assert LayerNorm().receptive_field((120,), flat).rf == (4, 5)  # sees everything
    assert LocalResponseNorm().receptive_field((120,), flat).rf is None


def test_repr_shows_non_defaults():
    assert repr(BatchNorm()) == "BatchNorm()"
    assert repr(BatchNorm(momentum=0.01, use_bias=False)) == (
        "BatchNorm(use_bias=False, momentum=0.01)"
    )
    assert repr(LocalResponseNorm(3)) == "LocalResponseNorm(size=3)"
    assert hash(LayerNorm(epsilon=1e-6)) == hash(LayerNorm(epsilon=1e-6))
