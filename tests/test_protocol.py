"""The layer protocol: every public layer answers for its rule, FLOPs and window, and passes
one generic conformance test (init / state / apply / output_shape / jit / manual == autodiff
in float64); combinators; the fixes that came with the protocol."""

import dataclasses
import inspect

import draw
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import funcnet as fn
from funcnet import layers, vjp
from funcnet.nn.base import Layer, rule_forward
from funcnet.zoo_vit import VisionTransformer

TOL = 1e-9

# One small configuration of every public layer: (layer, unbatched input shape).
EXAMPLES = {
    fn.Dense: (fn.Dense(3), (2, 4)),
    fn.Conv: (fn.Conv(4, 3, stride=2, padding="SAME", groups=2), (5, 5, 2)),
    fn.LocallyConnected: (fn.LocallyConnected(2, 2, padding=1), (3, 3, 2)),
    fn.MaxPool: (fn.MaxPool(2, 1, padding=1), (3, 4, 2)),
    fn.AvgPool: (fn.AvgPool(3, 2, padding=1, count_include_pad=False), (5, 4, 2)),
    fn.LpPool: (fn.LpPool(2, p=3.0), (4, 4, 2)),
    fn.L2Pool: (fn.L2Pool(2), (4, 4, 1)),
    fn.FeatureMaxPool: (fn.FeatureMaxPool(2), (3, 4)),
    fn.FeatureL2Pool: (fn.FeatureL2Pool(3), (6,)),
    fn.GlobalAvgPool: (fn.GlobalAvgPool(), (3, 2, 4)),
    fn.ReLU: (fn.ReLU(), (5,)),
    fn.Sigmoid: (fn.Sigmoid(), (5,)),
    fn.Tanh: (fn.Tanh(), (5,)),
    fn.Softmax: (fn.Softmax(axis=-2), (3, 4)),
    fn.LogSoftmax: (fn.LogSoftmax(), (4,)),
    fn.Activation: (fn.Activation(jax.nn.gelu), (5,)),
    fn.Flatten: (fn.Flatten(), (2, 3, 2)),
    fn.BatchNorm: (fn.BatchNorm(momentum=0.2), (3, 2, 4)),
    fn.LayerNorm: (fn.LayerNorm(), (2, 5)),
    fn.LocalResponseNorm: (fn.LocalResponseNorm(size=3, alpha=0.5), (2, 2, 5)),
    fn.Dropout: (fn.Dropout(0.5), (4, 3)),
    fn.Embedding: (fn.Embedding(6, 3), (4,)),
    fn.GELU: (fn.GELU(), (5,)),
    fn.MultiHeadSelfAttention: (fn.MultiHeadSelfAttention(2), (3, 4)),
    fn.ClassToken: (fn.ClassToken(), (3, 4)),
    fn.PositionEmbedding: (fn.PositionEmbedding(), (3, 4)),
    fn.TakeToken: (fn.TakeToken(), (3, 4)),
    fn.Reshape: (fn.Reshape((-1, 2)), (3, 4)),
    fn.Serial: (fn.Serial([fn.Conv(3, 2), fn.ReLU(), fn.Flatten(), fn.Dense(2)]), (4, 4, 1)),
    fn.Parallel: (fn.Parallel([fn.Conv(2, 1), fn.Serial([fn.Conv(3, 3, padding="SAME"),
                                                         fn.Tanh()])]), (4, 4, 2)),
    fn.Residual: (fn.Residual(fn.Serial([fn.Conv(2, 3, padding="SAME"), fn.ReLU()])),
                  (4, 4, 2)),
    # public outside fn.layers: the Serial that fn.models.vit builds (checks its image)
    VisionTransformer: (fn.models.vit(3, image_size=4, patch=2, width=4, depth=1, heads=2,
                                      channels=2), (4, 4, 2)),
}


def public_layer_classes():
    classes = {c for name, c in vars(layers).items()
               if inspect.isclass(c) and issubclass(c, Layer) and c is not Layer
               and not name.startswith("_")}
    return classes | {fn.Serial, fn.Parallel, fn.Residual}


def test_every_public_layer_has_an_example_a_rule_flops_and_a_window():
    classes = public_layer_classes()
    assert len(classes) >= 21
    missing = sorted(c.__name__ for c in classes - set(EXAMPLES))
    assert not missing, f"public layers without a conformance example: {missing}"
    for cls, (layer, shape) in EXAMPLES.items():
        assert type(layer) is cls
        assert cls.has_hand_rule(), f"{cls.__name__} has no hand-written rule"
        assert cls.receptive_field is not Layer.receptive_field, cls.__name__
        flops = layer.flops(shape)
        if flops is None:  # an arbitrary function: summary measures it with XLA
            assert cls is fn.Activation
            row = fn.summary(layer, shape).rows[0]
            assert row.flops_source == "xla" and row.flops + row.transcendentals > 0
        else:
            assert all(v >= 0 for v in flops), cls.__name__


def _x(shape, n=3, seed=1, layer=None):
    if layer is not None and layer.takes_integers():
        return draw.integers((n, *shape), layer.num_embeddings, seed=seed)
    return draw.normal((n, *shape), seed=seed, dtype=np.float64)


def _f64(tree):
    return jax.tree_util.tree_map(lambda a: jax.device_put(np.asarray(a, np.float64)), tree)


@pytest.mark.parametrize("cls", list(EXAMPLES), ids=lambda c: c.__name__)
def test_conformance(cls):
    layer, shape = EXAMPLES[cls]
    key = jax.random.key(7)
    with jax.enable_x64(True):
        # init's output as traced (shapes; its values are tested where they matter), and
        # arbitrary float64 values drawn on the host for the rules
        traced = jax.eval_shape(lambda k: layer.init(k, shape), jax.random.key(0))
        params = draw.params(layer, shape, dtype=np.float64)
        state = _f64(layer.init_state(shape))
        shapes = jax.tree_util.tree_map(lambda s: s.shape, layer.param_shapes(shape))
        assert jax.tree_util.tree_map(lambda s: s.shape, traced) == shapes
        sshapes = jax.tree_util.tree_map(lambda s: s.shape, layer.state_shapes(shape))
        assert jax.tree_util.tree_map(jnp.shape, state) == sshapes
        x = _x(shape, layer=layer)
        ints = layer.takes_integers()
        out_shape = (3, *layer.output_shape(shape))
        g = draw.normal(out_shape, seed=3, dtype=np.float64)

        def run(params, state, x, key, train):
            y, new_state = layer.apply_with_state(params, state, x, key=key, train=train)
            # the hand rule: same forward, and its backward against jax.vjp of the forward
            ym, sm, res = rule_forward(layer, params, state, x, key=key, train=train)
            dx, dp = layer.bwd(res, g, True)
            _, vjp_fn = jax.vjp(lambda p, x: layer.forward(
                p, state, x, key=key, train=train)[0], params, x)
            return y, new_state, ym, sm, dx, dp, vjp_fn(g)

        # both modes in one compiled program
        both = jax.jit(lambda *a: (run(*a, False), run(*a, True)))(params, state, x, key)
        for train, results in zip((False, True), both, strict=True):
            y, new_state, ym, sm, dx, dp, (dp_ref, dx_ref) = results
            assert y.shape == out_shape
            assert jax.tree_util.tree_structure(new_state) == jax.tree_util.tree_structure(state)
            np.testing.assert_allclose(ym, y, rtol=1e-12, atol=1e-12)
            for a, b in zip(jax.tree_util.tree_leaves(sm),
                            jax.tree_util.tree_leaves(new_state), strict=True):
                np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
            if train:  # eager (validated) execution gives what the compiled program gives
                ye, _ = layer.apply_with_state(params, state, x, key=key, train=train)
                np.testing.assert_allclose(ye, y, rtol=1e-12, atol=1e-12)
            if ints:  # no gradient with respect to integer ids
                assert dx is None
            else:
                np.testing.assert_allclose(dx, dx_ref, rtol=TOL, atol=TOL)
            fn.gradcheck.compare({"manual": dp, "autodiff": dp_ref}, tol=TOL)
        if not layer.has_state(shape):
            np.testing.assert_allclose(layer(params, x), layer.apply(params, x))


# ---------------------------------------------------------------------------------------
# Combinators
# ---------------------------------------------------------------------------------------


def _manual_equals_autodiff(net, shape, labels):
    with jax.enable_x64(True):
        params = _f64(net.init(jax.random.key(0), shape))
        x = _x(shape, n=len(labels))
        y = jnp.asarray(labels)
        loss_fn = fn.losses.softmax_cross_entropy
        loss_m, grads_m = jax.jit(vjp.value_and_grad(net, loss_fn))(params, x, y)
        autodiff = jax.value_and_grad(lambda p: loss_fn(net.apply(p, x), y))
        loss_a, grads_a = jax.jit(autodiff)(params)
        assert abs(float(loss_m) - float(loss_a)) <= 1e-12
        fn.gradcheck.compare({"manual": grads_m, "autodiff": grads_a}, tol=TOL)
        return params, grads_m


@pytest.mark.slow  # heavier integration check; CI runs the slow tier
def test_inception_style_parallel_manual_equals_autodiff():
    block = fn.Parallel([
        fn.Conv(2, 1),
        fn.Serial([fn.Conv(2, 1), fn.ReLU(), fn.Conv(3, 3, padding="SAME")]),
        fn.Serial([fn.MaxPool(3, 1, padding=1), fn.Conv(1, 1)]),
    ])
    net = fn.Serial([fn.Conv(3, 3, padding="SAME"), block, fn.ReLU(), fn.GlobalAvgPool(),
                     fn.Dense(3)])
    assert net.output_shape((5, 5, 1)) == (3,)
    assert block.output_shape((5, 5, 3)) == (5, 5, 6)
    _manual_equals_autodiff(net, (5, 5, 1), [0, 2, 1])


@pytest.mark.slow  # heavier integration check; CI runs the slow tier
def test_residual_blocks_identity_and_projection_manual_equals_autodiff():
    body = fn.Serial([fn.Conv(4, 3, stride=2, padding="SAME"), fn.ReLU(),
                      fn.Conv(4, 3, padding="SAME")])
    net = fn.Serial([
        fn.Conv(2, 3, padding="SAME"),
        fn.Residual(fn.Serial([fn.Conv(2, 3, padding="SAME"), fn.Tanh()])),
        fn.Residual(body, shortcut=fn.Conv(4, 1, stride=2)),
        fn.Parallel([fn.Flatten(), fn.Serial([fn.GlobalAvgPool(), fn.Dense(36)])],
                    merge="sum"),
        fn.Dense(3),
    ])
    params, grads = _manual_equals_autodiff(net, (6, 6, 1), [1, 0, 2, 2])
    assert params[1][1] == {} and grads[1][1] == {}  # identity shortcut: no params


def test_add_gate_distributes_and_copy_gate_adds():
    # y = x + x through Residual(identity body): dy/dx = 2 (copy gate adds, add gate copies)
    net = fn.Residual(fn.Activation(lambda x: x))
    x = jnp.arange(3.0).reshape(1, 3)
    _, _, res = rule_forward(net, ({}, {}), ({}, {}), x, key=None, train=False)
    dx, _ = net.bwd(res, jnp.ones((1, 3)), True)
    np.testing.assert_array_equal(dx, 2 * jnp.ones((1, 3)))
    # concat splits the gradient among the branches; their input gradients add
    par = fn.Parallel([fn.Activation(lambda x: 2 * x), fn.Activation(lambda x: 3 * x)])
    y, _, res = rule_forward(par, ({}, {}), ({}, {}), x, key=None, train=False)
    assert y.shape == (1, 6)
    dx, _ = par.bwd(res, jnp.concatenate([jnp.ones((1, 3)), 10 * jnp.ones((1, 3))], -1), True)
    np.testing.assert_array_equal(dx, 32 * jnp.ones((1, 3)))


@pytest.mark.parametrize("net, match", [
    (fn.Residual(fn.Dense(1)), r"Residual: the body's output shape \(1,\) differs"),
    (fn.Parallel([fn.Dense(1), fn.Dense(4)], merge="sum"), r"Parallel\(merge='sum'\)"),
    (fn.Serial([fn.Dense(2), fn.Residual(fn.Dense(3))]),
     r"Serial layer 1: Residual: the body.s output shape \(3,\)"),
], ids=["residual", "parallel-sum", "nested"])
def test_init_refuses_parts_that_do_not_fit_together(net, match):
    """As a leaf layer's init validates its input shape: the error comes from init (and
    param_shapes, init_state), not later from apply."""
    for make in (lambda: net.init(jax.random.key(0), (4,)), lambda: net.param_shapes((4,)),
                 lambda: net.init_state((4,))):
        with pytest.raises(ValueError, match=match):
            make()


def test_combinator_shape_errors_name_the_part():
    with pytest.raises(ValueError, match=r"Residual: the body's output shape \(2, 2, 4\) differs"):
        fn.Residual(fn.Conv(4, 3)).output_shape((4, 4, 4))
    with pytest.raises(ValueError, match=r"Parallel\(merge='sum'\): every branch"):
        fn.Parallel([fn.Dense(2), fn.Dense(3)], merge="sum").output_shape((4,))
    with pytest.raises(ValueError, match=r"Parallel\(merge='concat'\): branches must agree"):
        fn.Parallel([fn.Conv(2, 1), fn.Conv(2, 3)]).output_shape((4, 4, 1))
    with pytest.raises(ValueError, match="merge must be one of"):
        fn.Parallel([fn.ReLU()], merge="mean")
    with pytest.raises(ValueError, match=r"Parallel branch 1: Conv\(2, \(1, 1\)\): expected"):
        fn.Parallel([fn.Dense(2), fn.Conv(2, 1)]).output_shape((4, 4))
    with pytest.raises(TypeError, match="class instead of an instance"):
        fn.Residual(fn.ReLU)


def test_summary_of_branching_network_counts_params_merges_and_fields():
    body = fn.Serial([fn.Conv(4, 3, padding="SAME"), fn.ReLU()])
    net = fn.Serial([fn.Conv(4, 1), fn.Residual(body),
                     fn.Parallel([fn.Conv(2, 1), fn.Conv(3, 5, padding="SAME")])])
    s = fn.summary(net, (8, 8, 1))
    assert s.total_params == fn.nn.base.param_count(net, (8, 8, 1))
    paths = [r.path for r in s.rows]
    assert paths == [(0,), (1, 0, 0), (1, 0, 1), (1,), (2, 0), (2, 1), (2,)]
    merge = s.rows[3]
    assert merge.params == 0 and merge.flops == 8 * 8 * 4  # one add per output
    assert s.rows[-1].flops == 0 and s.rows[-1].output_shape == (8, 8, 5)
    assert s.receptive_field == (7, 7)  # the 5x5 branch after the 3x3 body
    assert "Residual add" in str(s) and "Parallel concat of 2" in str(s)


# ---------------------------------------------------------------------------------------
# Fixes that came with the protocol
# ---------------------------------------------------------------------------------------


def test_jax_errors_inside_a_network_keep_their_type():
    def branchy(x):
        return x if x.sum() > 0 else -x  # bool() of a tracer under jit

    net = fn.Serial([fn.Dense(2), fn.Activation(branchy)])
    params = net.init(jax.random.key(0), (3,))
    with pytest.raises(jax.errors.TracerBoolConversionError):
        jax.jit(net.apply)(params, jnp.ones((2, 3)))


def test_nested_networks_print_nested():
    net = fn.Serial([fn.Dense(2), fn.Serial([fn.ReLU(), fn.Dense(1)])])
    assert repr(net) == (
        "Serial([\n  Dense(2),\n  Serial([\n    ReLU(),\n    Dense(1),\n  ]),\n])"
    )


@dataclasses.dataclass(frozen=True, repr=False)
class _Scale(fn.Layer):
    """A custom layer whose factor does not take part in equality (a user's choice)."""

    factor: float = dataclasses.field(default=1.0, compare=False)

    def param_specs(self, input_shape):
        return {"w": input_shape}

    def initializers(self):
        return {"w": lambda key, shape, dtype: jnp.full(shape, self.factor, dtype)}

    def forward(self, params, state, x, *, key=None, train=False):
        return self.factor * x * params["w"], state

    def receptive_field(self, input_shape, rf):
        return rf


def test_compiled_programs_are_not_shared_between_equal_layers():
    a, b = _Scale(2.0), _Scale(3.0)
    assert a == b and hash(a) == hash(b)
    x = jnp.ones((4, 2))
    ones = {"w": jnp.ones(2)}
    np.testing.assert_allclose(fn.train.predict(a, ones, x), 2 * x)
    np.testing.assert_allclose(fn.train.predict(b, ones, x), 3 * x)
    # nor by init and apply outside a trace (each one program), also inside a network
    for net_a, net_b in [(a, b), (fn.Serial([fn.ReLU(), a]), fn.Serial([fn.ReLU(), b]))]:
        assert net_a == net_b
        for net, factor in [(net_a, 2.0), (net_b, 3.0)]:
            params = net.init(jax.random.key(0), (2,))
            np.testing.assert_allclose(jax.tree_util.tree_leaves(params)[0], [factor] * 2)
            np.testing.assert_allclose(net.apply(params, x), factor * factor * x)


def test_conv_with_half_precision_input_computes_in_the_promoted_dtype():
    conv = fn.Conv(2, 3)
    params = conv.init(jax.random.key(0), (5, 5, 1))
    x = draw.normal((2, 5, 5, 1), seed=1)
    ref = conv.apply(params, x)
    for dtype in (jnp.float16, jnp.bfloat16):
        y = conv.apply(params, x.astype(dtype))
        assert y.dtype == jnp.float32
        np.testing.assert_allclose(y, ref, rtol=0.05, atol=0.05)


def test_apply_refuses_a_network_with_state_and_names_the_alternative():
    @dataclasses.dataclass(frozen=True, repr=False)
    class Counter(fn.Layer):
        def state_specs(self, input_shape):
            return {"n": ()}

        def forward(self, params, state, x, *, key=None, train=False):
            return x, ({"n": state["n"] + 1} if train else state)

    net = fn.Serial([fn.Dense(2), Counter()])
    params = net.init(jax.random.key(0), (3,))
    with pytest.raises(ValueError, match="apply_with_state"):
        net.apply(params, jnp.ones((1, 3)))
    state = net.init_state((3,))
    _, s1 = net.apply_with_state(params, state, jnp.ones((1, 3)), train=True)
    _, s2 = net.apply_with_state(params, s1, jnp.ones((1, 3)), train=False)
    assert float(s1[1]["n"]) == 1.0 and float(s2[1]["n"]) == 1.0


def test_init_with_the_batch_dimension_says_so():
    with pytest.raises(ValueError, match=r"did you include the batch dimension\? .* \(28, 28, 1\)"):
        fn.models.lenet5().init(jax.random.key(0), (32, 28, 28, 1))


def test_a_stochastic_layer_in_training_needs_a_key():
    @dataclasses.dataclass(frozen=True, repr=False)
    class Noise(fn.Layer):
        stochastic = True

        def forward(self, params, state, x, *, key=None, train=False):
            return (x + jax.random.normal(key, x.shape) if train else x), state

    net = fn.Serial([fn.Dense(2), Noise()])
    params = net.init(jax.random.key(0), (3,))
    x = jnp.ones((1, 3))
    with pytest.raises(ValueError, match=r"Serial layer 1: Noise\(\): training mode .* needs a PRNG key"):
        net.apply(params, x, train=True)
    assert net.apply(params, x).shape == (1, 2)  # evaluation needs no key
    assert net.apply(params, x, key=jax.random.key(1), train=True).shape == (1, 2)


def test_bad_train_flag_key_and_state_name_the_layer():
    net = fn.Serial([fn.Dense(2)])
    params = net.init(jax.random.key(0), (3,))
    x = jnp.ones((1, 3))
    with pytest.raises(TypeError, match="train must be a Python bool"):
        net.apply(params, x, train=1)
    with pytest.raises(TypeError, match="key must be a JAX PRNG key"):
        net.apply(params, x, key=3)
    with pytest.raises(ValueError, match=r"Serial: state must be a tuple with one entry per layer"):
        net.apply_with_state(params, ({"n": jnp.ones(())}, {}), x)


def test_a_subclass_of_a_layer_keeps_its_rule_flops_and_window():
    class MyConv(fn.Conv):
        """A user's subclass: no registration anywhere."""

    net = fn.Serial([MyConv(2, 3, padding="SAME"), fn.ReLU(), fn.Flatten(), fn.Dense(2)])
    assert MyConv.has_hand_rule()
    row = fn.summary(net, (4, 4, 1)).rows[0]
    assert row.flops_source == "analytic" and row.receptive_field == (3, 3)
    # convolutional, by attribute: autodiff loops its epochs (the hand rules scan them)
    assert fn.train.choose_epoch_mode(net, grad="autodiff") == "loop"
    _manual_equals_autodiff(net, (4, 4, 1), [0, 1])
