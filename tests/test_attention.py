"""GELU, multi-head self-attention, ClassToken, PositionEmbedding, TakeToken and the ViT:
hand rules == jax.vjp == central differences in float64; forward against references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from rule_check import check_op_rule

from funcnet import gradcheck
from funcnet.nn import activation
from funcnet.nn.activation import GELU, Activation, gelu

VJP_TOL = 1e-10  # float64, the same maths up to summation order
LAYER_TOL = 1e-9


def _rand(shape, seed, scale=1.0):
    return jax.device_put(scale * np.random.default_rng(seed).standard_normal(shape))


def _check_rule(rules, op, arrays, static=None, seed=0):
    check_op_rule(rules[op], op, arrays, static, seed)


def _check_layer_rule(layer, input_shape, seed=0, batch=2):
    """``layer.fwd`` then ``layer.bwd`` == ``jax.vjp`` of ``layer.forward`` (params and x)."""
    with jax.enable_x64(True):
        params = jax.tree_util.tree_map(  # shapes only: nothing to initialise
            lambda p: _rand(p.shape, seed + 1), layer.param_shapes(input_shape))
        x = _rand((batch, *input_shape), seed)
        g = _rand((batch, *layer.output_shape(input_shape)), seed + 2)

        @jax.jit  # one compilation for the whole comparison
        def run(params, x, g):
            y, _, res = layer.fwd(params, {}, x, key=None, train=False)
            ref_y, vjp_fn = jax.vjp(
                lambda p, x: layer.forward(p, {}, x, key=None, train=False)[0], params, x)
            no_dx, dparams_only = layer.bwd(res, g, False)
            return y, ref_y, layer.bwd(res, g, True), vjp_fn(g), no_dx, dparams_only

        y, ref_y, (dx, dparams), (ref_dp, ref_dx), no_dx, dparams_only = run(params, x, g)
        assert gradcheck.relative_error(y, ref_y) < LAYER_TOL
        assert gradcheck.relative_error(dx, ref_dx) < LAYER_TOL
        gradcheck.compare({"hand": dparams, "autodiff": ref_dp, "no_dx": dparams_only},
                          tol=LAYER_TOL)
        assert no_dx is None


# ---------------------------------------------------------------------------------------
# GELU
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("approximate", [False, True], ids=["erf", "tanh"])
def test_gelu_rule(approximate):
    with jax.enable_x64(True):
        _check_rule(activation.RULES, gelu, {"x": _rand((3, 4, 5), 0, 2.0)},
                    {"approximate": approximate})


@pytest.mark.parametrize("approximate", [False, True], ids=["erf", "tanh"])
def test_gelu_values_match_jax_nn_gelu(approximate):
    with jax.enable_x64(True):
        x = jnp.linspace(-6.0, 6.0, 101)
        ref = jax.nn.gelu(x, approximate=approximate)
        assert gradcheck.relative_error(gelu(x, approximate), ref) < 1e-14
        assert gradcheck.relative_error(
            GELU(approximate).apply({}, x[:, None]), ref[:, None]) < 1e-14
    # the exact form is x Phi(x)
    x = np.linspace(-3, 3, 13)
    from math import erf, sqrt
    exact = np.array([v * 0.5 * (1 + erf(v / sqrt(2))) for v in x])
    np.testing.assert_allclose(np.asarray(gelu(jnp.asarray(x, jnp.float32))), exact,
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("approximate", [False, True], ids=["erf", "tanh"])
def test_gelu_layer_rule_and_metadata(approximate):
    layer = GELU(approximate)
    _check_layer_rule(layer, (3, 4))
    assert layer.hyper() == {"approximate": approximate}
    assert layer.flops((3, 4)) == ((8 if approximate else 4) * 12, 12)
    assert repr(GELU()) == "GELU()" and repr(GELU(True)) == "GELU(approximate=True)"


def test_activation_jax_nn_gelu_uses_tanh_rule_and_funcnet_gelu_the_exact_one():
    with jax.enable_x64(True):
        x = _rand((2, 7), 3, 2.0)
        g = _rand((2, 7), 4)
        for fn, approximate in [(jax.nn.gelu, True), (gelu, False)]:
            layer = Activation(fn)
            y, _, res = layer.fwd({}, {}, x, key=None, train=False)
            assert not isinstance(res, activation.FallbackResiduals)
            assert gradcheck.relative_error(y, jax.nn.gelu(x, approximate=approximate)) < 1e-14
            ref = jax.vjp(lambda x, a=approximate: jax.nn.gelu(x, approximate=a), x)[1](g)[0]
            assert gradcheck.relative_error(layer.bwd(res, g, True)[0], ref) < VJP_TOL


def test_gelu_bad_approximate_names_the_layer():
    with pytest.raises(TypeError, match="GELU"):
        GELU("tanh")
    with pytest.raises(TypeError, match="gelu"):
        gelu(jnp.ones(3), approximate=1)


# ---------------------------------------------------------------------------------------
# Attention family: op rules
# ---------------------------------------------------------------------------------------

from funcnet.nn import attention  # noqa: E402
from funcnet.nn.attention import (  # noqa: E402
    ClassToken,
    MultiHeadSelfAttention,
    PositionEmbedding,
    TakeToken,
    class_token,
    multi_head_self_attention,
    position_embedding,
    take_token,
)
from funcnet.nn.base import RF  # noqa: E402

MHSA_CONFIGS = [(3, 4, 1, True), (5, 4, 2, True), (4, 6, 2, False)]
MHSA_IDS = ["T3-D4-H1", "T5-D4-H2", "T4-D6-H2-nobias"]


def _mhsa_arrays(n, t, d, bias, seed=0):
    return {
        "x": _rand((n, t, d), seed),
        "w_qkv": _rand((d, 3 * d), seed + 1, 0.7),
        "b_qkv": _rand((3 * d,), seed + 2) if bias else None,
        "w_out": _rand((d, d), seed + 3),
        "b_out": _rand((d,), seed + 4) if bias else None,
    }


@pytest.mark.parametrize("t,d,h,bias", MHSA_CONFIGS, ids=MHSA_IDS)
def test_multi_head_self_attention_rule(t, d, h, bias):
    with jax.enable_x64(True):
        _check_rule(attention.RULES, multi_head_self_attention, _mhsa_arrays(2, t, d, bias),
                    {"num_heads": h})


def test_class_token_position_embedding_take_token_rules():
    with jax.enable_x64(True):
        x = _rand((2, 4, 6), 0)
        _check_rule(attention.RULES, class_token, {"x": x, "token": _rand((1, 6), 1)})
        _check_rule(attention.RULES, position_embedding, {"x": x, "table": _rand((4, 6), 2)})
        for index in (0, 2, -1):
            _check_rule(attention.RULES, take_token, {"x": x}, {"index": index})


def _reference_mhsa(x, w_qkv, b_qkv, w_out, b_out, h):
    """Plain numpy, one example and one head at a time."""
    x, w_qkv, b_qkv, w_out, b_out = map(np.asarray, (x, w_qkv, b_qkv, w_out, b_out))
    n, t, d = x.shape
    dh = d // h
    out = np.zeros((n, t, d))
    for i in range(n):
        qkv = x[i] @ w_qkv + b_qkv
        q, k, v = qkv[:, :d], qkv[:, d:2 * d], qkv[:, 2 * d:]
        heads = []
        for j in range(h):
            sl = slice(j * dh, (j + 1) * dh)
            s = q[:, sl] @ k[:, sl].T / np.sqrt(dh)
            a = np.exp(s - s.max(axis=1, keepdims=True))
            a /= a.sum(axis=1, keepdims=True)
            heads.append(a @ v[:, sl])
        out[i] = np.concatenate(heads, axis=1) @ w_out + b_out
    return out


@pytest.mark.parametrize("t,d,h", [(3, 4, 1), (5, 4, 2), (4, 6, 3)])
def test_multi_head_self_attention_matches_numpy_reference(t, d, h):
    with jax.enable_x64(True):
        a = _mhsa_arrays(3, t, d, True, seed=7)
        y = multi_head_self_attention(**a, num_heads=h)
        ref = _reference_mhsa(a["x"], a["w_qkv"], a["b_qkv"], a["w_out"], a["b_out"], h)
        np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-12, atol=1e-12)


def test_multi_head_self_attention_matches_torch():
    torch = pytest.importorskip("torch")
    t, d, h = 5, 6, 2
    with jax.enable_x64(True):
        a = _mhsa_arrays(2, t, d, True, seed=11)
        mha = torch.nn.MultiheadAttention(d, h, batch_first=True, dtype=torch.float64)
        with torch.no_grad():
            mha.in_proj_weight.copy_(torch.tensor(np.asarray(a["w_qkv"]).T))
            mha.in_proj_bias.copy_(torch.tensor(np.asarray(a["b_qkv"])))
            mha.out_proj.weight.copy_(torch.tensor(np.asarray(a["w_out"]).T))
            mha.out_proj.bias.copy_(torch.tensor(np.asarray(a["b_out"])))
            xt = torch.tensor(np.asarray(a["x"]))
            ref = mha(xt, xt, xt, need_weights=False)[0].numpy()
        y = multi_head_self_attention(**a, num_heads=h)
        np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------
# Attention family: layers
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "layer,shape",
    [(MultiHeadSelfAttention(1), (3, 4)), (MultiHeadSelfAttention(2), (5, 6)),
     (ClassToken(), (4, 6)),
     (PositionEmbedding(), (4, 6)), (TakeToken(), (4, 6)), (TakeToken(-2), (4, 6))],
    ids=["mhsa-H1", "mhsa-H2", "class_token", "pos_emb", "take0", "take-2"],
)
def test_layer_rules_match_autodiff(layer, shape):
    assert type(layer).has_hand_rule()
    _check_layer_rule(layer, shape)


def test_layer_shapes_params_and_flops():
    mhsa = MultiHeadSelfAttention(3)
    specs = mhsa.param_specs((7, 12))
    assert specs == {"w_qkv": (12, 36), "b_qkv": (36,), "w_out": (12, 12), "b_out": (12,)}
    from funcnet.nn.base import param_count
    assert param_count(mhsa, (7, 12)) == 4 * 12**2 + 4 * 12
    t, d = 7, 12
    assert mhsa.flops((t, d)) == (
        2 * t * d * 3 * d + 4 * t * t * d + 2 * t * d * d + 4 * 3 * t * t, 3 * t * t)
    params = mhsa.init(jax.random.key(0), (t, d))
    assert not np.any(np.asarray(params["b_qkv"])) and np.any(np.asarray(params["w_qkv"]))
    assert ClassToken().output_shape((4, 6)) == (5, 6)
    tok = ClassToken().init(jax.random.key(0), (4, 6))
    assert tok["token"].shape == (1, 6) and not np.any(np.asarray(tok["token"]))
    table = PositionEmbedding().init(jax.random.key(0), (50, 40))["table"]
    assert table.shape == (50, 40) and 0.015 < float(jnp.std(table)) < 0.025
    assert PositionEmbedding().flops((4, 6)) == (24, 0)
    assert ClassToken().flops((4, 6)) == (0, 0) and TakeToken().flops((4, 6)) == (0, 0)
    assert TakeToken().output_shape((4, 6)) == (6,)


def test_receptive_fields():
    rf = RF.start((8, 8))
    flat = rf.flatten((16, 5))  # what a Reshape((-1, D)) of a patch grid leaves
    whole = MultiHeadSelfAttention(1).receptive_field((16, 4), flat)
    assert whole.rf == (8, 8)
    assert PositionEmbedding().receptive_field((16, 4), flat) == flat
    assert ClassToken().receptive_field((16, 4), flat) == flat
    assert TakeToken().receptive_field((16, 4), flat) == flat
    untracked = RF.start(())
    assert MultiHeadSelfAttention(1).receptive_field((4, 4), untracked) == untracked


def test_bad_hyper_parameters_and_shapes_name_the_layer():
    with pytest.raises(TypeError, match="MultiHeadSelfAttention"):
        MultiHeadSelfAttention(2.0)
    with pytest.raises(ValueError, match="MultiHeadSelfAttention"):
        MultiHeadSelfAttention(0)
    with pytest.raises(ValueError, match=r"MultiHeadSelfAttention\(4\).*divisible"):
        MultiHeadSelfAttention(4).output_shape((3, 6))
    with pytest.raises(ValueError, match=r"MultiHeadSelfAttention\(2\).*\(T, D\)"):
        MultiHeadSelfAttention(2).output_shape((3, 4, 4))
    with pytest.raises(TypeError, match="MultiHeadSelfAttention"):
        MultiHeadSelfAttention(2, w_init=3)
    with pytest.raises(ValueError, match="ClassToken"):
        ClassToken().output_shape((6,))
    with pytest.raises(ValueError, match="PositionEmbedding"):
        PositionEmbedding().apply({"table": jnp.zeros((3, 4))}, jnp.zeros((2, 4, 4)))
    with pytest.raises(TypeError, match="TakeToken"):
        TakeToken(1.5)
    with pytest.raises(ValueError, match="TakeToken"):
        TakeToken(4).output_shape((4, 6))
    with pytest.raises(ValueError, match="multi_head_self_attention"):
        multi_head_self_attention(jnp.zeros((2, 3, 4)), jnp.zeros((4, 12)), None,
                                  jnp.zeros((4, 4)), None, 3)
    with pytest.raises(ValueError, match="multi_head_self_attention"):
        multi_head_self_attention(jnp.zeros((3, 4)), jnp.zeros((4, 12)), None,
                                  jnp.zeros((4, 4)), None, 2)
    with pytest.raises(ValueError, match="class_token"):
        class_token(jnp.zeros((2, 3, 4)), jnp.zeros((1, 5)))


# ---------------------------------------------------------------------------------------
# The Vision Transformer
# ---------------------------------------------------------------------------------------

import funcnet as fn  # noqa: E402
from funcnet.nn.base import iter_layers, param_count  # noqa: E402
from funcnet.nn.dropout import Dropout  # noqa: E402
from funcnet.zoo_vit import vit, vit_tiny  # noqa: E402


def test_vit_tiny_has_timms_parameter_count():
    net = vit_tiny()
    assert param_count(net, (224, 224, 3)) == 5_717_416
    assert fn.summary(net, (224, 224, 3)).total_params == 5_717_416
    assert net.output_shape((224, 224, 3)) == (1000,)


def _tiny_vit(depth=2, **kw):
    return vit(3, image_size=8, patch=4, width=8, depth=depth, heads=2, **kw)


@pytest.mark.parametrize(
    "depth", [1, pytest.param(2, marks=pytest.mark.slow)], ids=["depth1", "depth2"])
def test_tiny_vit_hand_backprop_equals_autodiff(depth):
    net = _tiny_vit(depth)
    loss = fn.losses.softmax_cross_entropy
    with jax.enable_x64(True):
        shapes = net.param_shapes((8, 8, 3))
        # random (not zero) tokens and biases, so every path carries gradient
        leaves, treedef = jax.tree_util.tree_flatten(shapes)
        params = jax.tree_util.tree_unflatten(
            treedef, [_rand(p.shape, i, 0.5) for i, p in enumerate(leaves)])
        x = _rand((4, 8, 8, 3), 99)
        y = jnp.array([0, 2, 1, 2])
        hand_fn = fn.vjp.value_and_grad(net, loss, return_outputs=True)
        ref_fn = jax.value_and_grad(lambda p, x, y: loss(net.apply(p, x), y))

        @jax.jit  # one compilation for both
        def run(params, x, y):
            return hand_fn(params, x, y), ref_fn(params, x, y)

        (hand_loss, hand, out), (ref_loss, ref) = run(params, x, y)
        assert out.shape == (4, 3)
        assert abs(float(hand_loss - ref_loss)) < 1e-12
        gradcheck.compare({"manual": hand, "autodiff": ref}, tol=1e-9)


def test_vit_dropout_layers_and_bad_hyper_parameters():
    kinds = [type(layer) for layer in iter_layers(_tiny_vit(dropout=0.1))]
    assert kinds.count(Dropout) == 1 + 2 * 3
    assert Dropout not in [type(layer) for layer in iter_layers(_tiny_vit())]
    assert vit(10, image_size=32, patch=8, width=16, depth=1, heads=4).output_shape(
        (32, 32, 3)) == (10,)
    with pytest.raises(ValueError, match=r"vit.*patch"):
        vit(image_size=30, patch=16)
    with pytest.raises(ValueError, match=r"vit.*heads"):
        vit(width=10, heads=3)
    with pytest.raises(TypeError, match=r"vit.*depth"):
        vit(depth=2.5)
    with pytest.raises(ValueError, match=r"vit.*dropout"):
        vit(dropout=1.0)


def test_vit_refuses_an_image_it_was_not_built_for():
    """The stride-16 patch embedding takes any size: 30x30 made one patch, dropping 14
    rows and columns; 48x48 or one channel went through a network built for 32x32x3."""
    net = vit(10, image_size=32, patch=16, width=8, depth=1, heads=2)
    params = net.init(jax.random.key(0), (32, 32, 3))
    assert net.apply(params, jnp.ones((2, 32, 32, 3))).shape == (2, 10)
    for shape in ((30, 30, 3), (48, 48, 3), (32, 32, 1)):
        with pytest.raises(ValueError, match=r"vit: built for images of shape \(32, 32, 3\) "
                                             rf"\(image_size=32, channels=3\), got input shape "
                                             rf"\({shape[0]}, {shape[1]}, {shape[2]}\)"):
            net.init(jax.random.key(0), shape)
    with pytest.raises(ValueError, match=r"vit: built for images .* got input shape \(30, 30"):
        net.apply(params, jnp.ones((2, 30, 30, 3)))
