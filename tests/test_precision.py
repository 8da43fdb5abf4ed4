"""Mixed precision (``make_step(..., precision=)``, :mod:`funcnet.precision`): float32
parameters, the network forward and backward in bfloat16 / float16, the loss in float32."""

import re

import draw
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import funcnet as fn
from funcnet import losses, precision, train, vjp
from funcnet.nn.normalization import batch_moments
from funcnet.precision import Policy

BF16 = jnp.bfloat16
CE = losses.softmax_cross_entropy


def conv_net():
    return fn.Serial([fn.Conv(4, (3, 3)), fn.ReLU(), fn.MaxPool(2), fn.Flatten(), fn.Dense(10)])


def mlp():
    return fn.Serial([fn.Dense(16), fn.ReLU(), fn.Dense(10)])


def bn_net():
    # no conv bias: BatchNorm removes it, so its true gradient is 0 (rounding noise only)
    return fn.Serial([fn.Conv(4, (3, 3), use_bias=False), fn.BatchNorm(), fn.GELU(), fn.MaxPool(2),
                      fn.Flatten(), fn.Dense(12), fn.LayerNorm(), fn.Tanh(), fn.Dense(10)])


# input shapes: two input channels, so that the hand rule's forward is a lax convolution
SHAPES = {"conv": (8, 8, 2), "mlp": (12,), "bn": (8, 8, 2)}
NETS = {"conv": conv_net, "mlp": mlp, "bn": bn_net}


def problem(name, batch=8, seed=0, init=False):
    """``(net, params, model_state, x, y)``; ``params`` arbitrary values drawn on the host
    (no init program to compile), or ``net.init``'s with ``init``."""
    net, shape = NETS[name](), SHAPES[name]
    params = (net.init(jax.random.key(seed), shape) if init
              else draw.params(net, shape, seed=seed))
    x = draw.normal((batch, *shape), seed=seed + 1)
    y = jnp.arange(batch) % 10
    return net, params, net.init_state(shape), x, y


def matmul_operands(text):
    """``[(op, [operand types])]`` of every dot_general / convolution in StableHLO text."""
    found = []
    for line in text.splitlines():
        m = re.search(r"stablehlo\.(dot_general|convolution)\b.*:\s*\((.*)\)\s*->", line)
        if m:
            found.append((m.group(1), re.findall(r"tensor<[^>]*>", m.group(2))))
    return found


def floating_dtypes(tree):
    return {jnp.dtype(a.dtype).name for a in jax.tree_util.tree_leaves(tree)
            if jnp.issubdtype(a.dtype, jnp.floating)}


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


# ---------------------------------------------------------------------------------------
# The compiled step computes in bfloat16
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("grad", ["autodiff", "manual"])
@pytest.mark.parametrize("name", ["conv", "mlp"])
def test_lowered_step_runs_matmuls_and_convolutions_in_bf16(name, grad):
    net, params, _, x, y = problem(name)
    state = train.init_state(params, optax.sgd(0.1))
    for prec in (None, "bfloat16"):
        step = train.make_step(net, CE, optax.sgd(0.1), grad=grad, precision=prec)
        text = step.lower(state, x, y).as_text()
        ops = matmul_operands(text)
        kinds = {op for op, _ in ops}
        # forward and backward: 3 dot_generals per Dense (minus the first layer's dx)
        assert "dot_general" in kinds and len(ops) >= (5 if name == "mlp" else 4), ops
        if name == "conv":
            assert "convolution" in kinds, ops
        if prec is None:
            assert "bf16" not in text
        else:
            for op, operands in ops:
                assert len(operands) == 2 and all(t.endswith("xbf16>") for t in operands), (
                    op, operands)


@pytest.mark.parametrize("grad", ["autodiff", "manual"])
def test_params_optimizer_and_batchnorm_state_stay_float32(grad):
    net, params, model_state, x, y = problem("bn")
    opt = optax.adam(1e-2)
    state = train.init_state(params, opt, model_state)
    step = train.make_step(net, CE, opt, grad=grad, precision="bf16", donate=False)
    new, metrics = step(state, x, y)
    assert int(new.step) == 1
    for tree in (new.params, new.opt_state, new.model_state):
        assert floating_dtypes(tree) == {"float32"}
    assert floating_dtypes(metrics) == {"float32"}
    # the running statistics were updated (from float32 moments of the bf16 activations)
    bn_old, bn_new = model_state[1], new.model_state[1]
    assert not np.allclose(bn_old["mean"], bn_new["mean"])
    assert not np.allclose(bn_old["var"], bn_new["var"])


def value_and_grad_fn(net, grad, prec, loss=CE):
    """``f(params, state, x, y, key, train) -> (loss, grads, new_state, outputs)``."""
    if grad == "manual":
        return vjp.value_and_grad_with_state(net, loss, precision=prec)
    if prec is None:
        return train.autodiff_value_and_grad_with_state(net, loss)
    return precision.autodiff_value_and_grad_with_state(net, loss, prec)


def test_bf16_gradients_are_float32_and_close_to_float32_ones():
    net, params, model_state, x, y = problem("bn")
    key = jax.random.key(3)
    fns = {f"{grad}-{prec}": value_and_grad_fn(net, grad, prec)
           for grad in ("autodiff", "manual") for prec in (None, "bf16")}
    runs = jax.jit(lambda *a: {k: f(*a, key, True) for k, f in fns.items()})(
        params, model_state, x, y)  # one program: faster to compile than four
    for grad in ("autodiff", "manual"):
        loss32, g32, s32, out32 = runs[f"{grad}-None"]
        loss16, g16, s16, out16 = runs[f"{grad}-bf16"]
        assert floating_dtypes(g16) == {"float32"} and floating_dtypes(s16) == {"float32"}
        assert loss16.dtype == jnp.float32 and out16.dtype == jnp.float32
        assert rel(out16, out32) < 2e-2
        assert abs(float(loss16) - float(loss32)) < 2e-2 * abs(float(loss32))
        flat32, flat16 = jax.tree_util.tree_leaves(g32), jax.tree_util.tree_leaves(g16)
        assert len(flat32) == len(flat16) == 9
        for a, b in zip(flat16, flat32, strict=True):  # bf16 resolution 2^-8 ~ 4e-3
            assert rel(a, b) < 5e-2, (grad, rel(a, b), b.shape)
        total = rel(np.concatenate([np.ravel(a) for a in flat16]),
                    np.concatenate([np.ravel(b) for b in flat32]))
        assert 0 < total < 2e-2, (grad, total)  # not 0: the bf16 pass really rounds
        for a, b in zip(jax.tree_util.tree_leaves(s16), jax.tree_util.tree_leaves(s32),
                        strict=True):  # BatchNorm's running statistics
            assert rel(a, b) < 2e-2
    # the hand rules in bf16 agree with autodiff in bf16
    _, ga, _, _ = runs["autodiff-bf16"]
    _, gm, _, _ = runs["manual-bf16"]
    for a, b in zip(jax.tree_util.tree_leaves(gm), jax.tree_util.tree_leaves(ga), strict=True):
        assert rel(a, b) < 5e-2, (rel(a, b), b.shape)


# ---------------------------------------------------------------------------------------
# Every hand-written rule of the zoo runs in bfloat16
# ---------------------------------------------------------------------------------------

RULE_LAYERS = {
    "dense": (fn.Dense(6), (5, 4)),
    "conv": (fn.Conv(3, (3, 3), padding="SAME"), (6, 6, 2)),
    "conv-1ch": (fn.Conv(3, (3, 3), stride=2), (6, 6, 1)),
    "conv-6x6": (fn.Conv(3, (6, 6), padding=2), (6, 6, 2)),  # > 25 taps: correlation dx
    "max_pool": (fn.MaxPool(2), (6, 6, 2)),
    "max_pool-overlap": (fn.MaxPool(3, stride=2, padding="SAME"), (6, 6, 2)),
    "avg_pool": (fn.AvgPool(2), (6, 6, 2)),
    "global_avg_pool": (fn.GlobalAvgPool(), (4, 4, 3)),
    "relu": (fn.ReLU(), (7,)),
    "sigmoid": (fn.Sigmoid(), (7,)),
    "tanh": (fn.Tanh(), (7,)),
    "gelu": (fn.GELU(), (7,)),
    "gelu-tanh": (fn.GELU(approximate=True), (7,)),
    "activation-jax-gelu": (fn.Activation(jax.nn.gelu), (7,)),
    "softmax": (fn.Softmax(), (7,)),
    "log_softmax": (fn.LogSoftmax(), (7,)),
    "layer_norm": (fn.LayerNorm(), (5, 6)),
    "batch_norm-train": (fn.BatchNorm(), (4, 4, 3)),
    "batch_norm-eval": (fn.BatchNorm(), (4, 4, 3)),
    "lrn": (fn.LocalResponseNorm(size=3), (4, 4, 5)),
    "attention": (fn.MultiHeadSelfAttention(2), (5, 8)),
    "class_token": (fn.ClassToken(), (5, 8)),
    "position_embedding": (fn.PositionEmbedding(), (5, 8)),
    "take_token": (fn.TakeToken(0), (5, 8)),
    "dropout": (fn.Dropout(0.3), (7,)),
    "flatten": (fn.Flatten(), (3, 3, 2)),
    "residual": (fn.Residual(fn.Serial([fn.Dense(6), fn.ReLU()])), (6,)),
}


def rule_case(name):
    """``(run, (params, x, g))``: ``run`` is the layer's forward and backward rule."""
    layer, shape = RULE_LAYERS[name]
    train_mode = name != "batch_norm-eval"
    assert type(layer).has_hand_rule()
    rule = vjp.layer_rule(layer)
    params = draw.params(layer, shape)
    state = layer.init_state(shape)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, *shape)).astype(np.float32)
    if name.startswith("max_pool"):  # no ties, even after rounding to bf16 (exact values)
        x = ((rng.permutation(x.size).reshape(x.shape) - 72) / 16).astype(np.float32)
    g = rng.standard_normal((2, *layer.output_shape(shape))).astype(np.float32)
    key = jax.random.key(3)

    def run(params, x, g):
        y, new_state, res = rule.fwd(params, state, x, key=key, train=train_mode)
        dx, dparams = layer.bwd(res, g, True)
        return y, new_state, dx, dparams

    return run, (params, jnp.asarray(x), jnp.asarray(g))


@pytest.mark.parametrize("name", list(RULE_LAYERS))
def test_hand_rule_runs_in_bf16(name):
    run, args = rule_case(name)
    args16 = precision.cast_floating(args, BF16)
    # no matmul or convolution is silently done in float32 ...
    for op, operands in matmul_operands(jax.jit(run).lower(*args16).as_text()):
        assert all(t.endswith("xbf16>") for t in operands), (op, operands)
    # ... and the output, the input gradient and the parameter gradients are bf16
    y, new_state, dx, dparams = jax.eval_shape(run, *args16)
    assert y.dtype == BF16 and dx.dtype == BF16
    assert all(a.dtype == BF16 for a in jax.tree_util.tree_leaves(dparams))
    assert floating_dtypes(new_state) <= {"float32"}  # BatchNorm's statistics


@pytest.mark.slow  # CI's slow tier runs it; kept out of the default run for its time
def test_hand_rules_in_bf16_compute_what_float32_ones_do():
    cases = {name: rule_case(name) for name in RULE_LAYERS}

    def both(args):  # one program for every layer: one compilation
        return {name: (run(*precision.cast_floating(args[name], BF16)), run(*args[name]))
                for name, (run, _) in cases.items()}

    results = jax.jit(both)({name: args for name, (_, args) in cases.items()})
    for name, ((y, _, dx, dparams), ref) in results.items():
        for a, b in zip(jax.tree_util.tree_leaves((y, dx, dparams)),
                        jax.tree_util.tree_leaves((ref[0], ref[2], ref[3])), strict=True):
            assert rel(a, b) < 3e-2, (name, rel(a, b), b.shape)  # bf16 resolution 2^-8


@pytest.mark.parametrize("op", [fn.ops.layer_norm, fn.ops.batch_norm_train],
                         ids=["layer_norm", "batch_norm_train"])
def test_normalization_statistics_of_bf16_inputs_are_float32(op):
    # |mean| >> std: statistics kept in bf16 lose ~4% here, float32 ones ~0.2%
    x = 30 + np.random.default_rng(0).standard_normal((64, 16))
    x16 = jnp.asarray(x, BF16)
    assert {m.dtype for m in batch_moments(x16)} == {jnp.dtype(jnp.float32)}
    y16, ref = jax.jit(lambda x: (op(x), op(x.astype(jnp.float32))))(x16)
    assert y16.dtype == BF16 and rel(y16, ref) < 1e-2


def test_embedding_rule_runs_in_bf16():
    layer = fn.Embedding(10, 4)
    params = precision.cast_floating(layer.init(jax.random.key(0), (3,)), BF16)
    ids = jnp.array([[1, 2, 3], [3, 9, 0]])

    def run(params, ids):
        y, _, res = vjp.layer_rule(layer).fwd(params, {}, ids)
        return y, layer.bwd(res, jnp.ones(y.shape, BF16), False)[1]

    y, dparams = jax.jit(run)(params, ids)
    assert y.dtype == BF16 and dparams["w"].dtype == BF16
    assert float(dparams["w"][3].sum()) == 8.0  # id 3 twice, 4 features


# ---------------------------------------------------------------------------------------
# float16 and the loss scale
# ---------------------------------------------------------------------------------------

TINY = 1e-6  # the loss gradient's entries ~1e-8: below float16's smallest subnormal


def tiny_loss(o, y):
    return TINY * CE(o, y)


def test_float16_loss_scale_recovers_underflowing_gradients():
    # init's weights and zero biases: the gradient magnitudes the thresholds were set for
    net, params, model_state, x, y = problem("mlp", init=True)
    precs = {"f32": None, "fp16": "float16", "fp16-unscaled": Policy(jnp.float16, loss_scale=1)}
    fns = {f"{grad}-{name}": value_and_grad_fn(net, grad, prec, tiny_loss)
           for grad in ("autodiff", "manual") for name, prec in precs.items()}
    runs = jax.jit(lambda *a: {k: f(*a, None, True) for k, f in fns.items()})(
        params, model_state, x, y)
    for grad in ("autodiff", "manual"):
        ref = jax.tree_util.tree_leaves(runs[f"{grad}-f32"][1])
        scaled = jax.tree_util.tree_leaves(runs[f"{grad}-fp16"][1])
        unscaled = jax.tree_util.tree_leaves(runs[f"{grad}-fp16-unscaled"][1])
        assert np.abs(np.asarray(ref[0])).max() < 1e-6  # tiny indeed
        for a, b in zip(scaled, ref, strict=True):  # float16 resolution 2^-11
            assert a.dtype == jnp.float32 and np.abs(np.asarray(a)).max() > 0
            assert rel(a, b) < 2e-2, (grad, rel(a, b))
        # without the scale the float16 backward pass flushes the gradient (mostly) to 0
        assert max(rel(a, b) for a, b in zip(unscaled, ref, strict=True)) > 0.5, grad
        assert float(runs[f"{grad}-fp16"][0]) == pytest.approx(float(runs[f"{grad}-f32"][0]),
                                                                rel=1e-2)  # unscaled loss


@pytest.mark.parametrize("grad", ["autodiff", "manual"])
def test_float16_overflowing_scaled_gradient_skips_the_step(grad):
    net, params, _, x, y = problem("mlp")
    state = train.init_state(params, optax.sgd(0.1))

    def big_loss(o, y):
        return 100.0 * CE(o, y)

    for scale, applied in ((1.0, True), (60000.0, False)):
        step = train.make_step(net, big_loss, optax.sgd(0.1), grad=grad, donate=False,
                               precision=Policy(jnp.float16, loss_scale=scale))
        new, metrics = step(state, x, y)
        assert np.isfinite(float(metrics["loss"]))  # the loss is fine, the gradient is not
        assert int(new.step) == int(applied)
        same = jax.tree_util.tree_map(lambda a, b: bool(jnp.array_equal(a, b)), new.params,
                                      state.params)
        assert all(jax.tree_util.tree_leaves(same)) is (not applied)


def test_fit_names_an_overflowing_loss_scale():
    net, params, _, x, y = problem("mlp")

    def big_loss(o, y):
        return 100.0 * CE(o, y)

    kw = dict(optimizer=optax.sgd(0.1), epochs=1, batch_size=8, progress=False)
    with pytest.raises(train.NonFiniteLossError,
                       match=r"loss scale 60000 overflowed float16: lower the scale "
                             r"\(precision\.Policy\(float16, loss_scale=\.\.\.\)\)"
                       ) as info:
        train.fit(net, params, np.asarray(x), np.asarray(y), loss=big_loss,
                  precision=Policy(jnp.float16, loss_scale=60000.0), **kw)
    assert np.isfinite(info.value.value) and info.value.global_step == 0
    # a non-finite loss keeps the data / learning-rate hint, scale or not
    def nan_loss(o, y):
        return CE(o, y) * jnp.float32(jnp.nan)

    with pytest.raises(train.NonFiniteLossError, match="check the data for NaN"):
        train.fit(net, params, np.asarray(x), np.asarray(y), loss=nan_loss,
                  precision=Policy(jnp.float16, loss_scale=8.0), **kw)


def test_policy_defaults_and_parsing():
    assert precision.get_policy(None) is None
    for name in ("bfloat16", "bf16", "BF16", "mixed_bfloat16"):
        p = precision.get_policy(name)
        assert (p.compute_dtype, p.param_dtype, p.output_dtype, p.loss_scale) == (
            jnp.dtype(BF16), jnp.dtype(jnp.float32), jnp.dtype(jnp.float32), 1.0)
    for name in ("float16", "fp16", "half"):
        assert precision.get_policy(name) == Policy(jnp.float16, loss_scale=2.0**15)
    assert precision.get_policy(jnp.bfloat16) == Policy("bf16")
    policy = Policy(jnp.float16, loss_scale=1024)
    assert precision.get_policy(policy) is policy and hash(policy) == hash(Policy("fp16", loss_scale=1024.0))
    assert repr(policy) == ("Policy(compute_dtype=float16, param_dtype=float32, "
                            "output_dtype=float32, loss_scale=1024)")


# ---------------------------------------------------------------------------------------
# Bad values: clear errors, naming the argument
# ---------------------------------------------------------------------------------------

EXPECTED = r"None \(off\), 'bfloat16' / 'bf16', 'float16' / 'fp16'"

BAD = [
    ("unknown-name", "float8", ValueError, r".*got the unknown name 'float8'"),
    ("int", 3, TypeError, r".*, got 3$"),
    ("bool", True, TypeError, r".*, got True$"),
    ("int-dtype", jnp.int32, TypeError, r".*got the non-floating dtype int32$"),
    ("list", ["bf16"], TypeError, r".*, got \['bf16'\]$"),
]


@pytest.mark.parametrize("value, error, match", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_precision_is_a_clear_error(value, error, match):
    net = mlp()
    with pytest.raises(error, match="^make_step: precision must be " + EXPECTED + match):
        train.make_step(net, CE, optax.sgd(0.1), precision=value)
    with pytest.raises(error, match="^vjp.value_and_grad: precision must be " + EXPECTED + match):
        vjp.value_and_grad(net, CE, precision=value)


BAD_POLICIES = [
    ("int-compute", dict(compute_dtype=jnp.int8), TypeError,
     r"Policy: compute_dtype must be a floating dtype .*got int8"),
    ("str-compute", dict(compute_dtype="fp8"), TypeError,
     r"Policy: compute_dtype must be a floating dtype .*got 'fp8'"),
    ("none-param", dict(compute_dtype=BF16, param_dtype=None), TypeError,
     r"Policy: param_dtype must be a floating dtype .*got None"),
    ("zero-scale", dict(compute_dtype=jnp.float16, loss_scale=0), ValueError,
     r"Policy: loss_scale must be a finite number > 0 .*got 0"),
    ("negative-scale", dict(compute_dtype=jnp.float16, loss_scale=-8.0), ValueError,
     r"got -8\.0"),
    ("inf-scale", dict(compute_dtype=jnp.float16, loss_scale=float("inf")), ValueError,
     r"got inf"),
    ("nan-scale", dict(compute_dtype=jnp.float16, loss_scale=float("nan")), ValueError,
     r"got nan"),
    ("str-scale", dict(compute_dtype=jnp.float16, loss_scale="dynamic"), TypeError,
     r"Policy: loss_scale must be a finite number > 0 .*got 'dynamic'"),
    ("overflowing-scale", dict(compute_dtype=jnp.float16, loss_scale=2.0**16), ValueError,
     r"Policy: loss_scale 65536\.0 exceeds the largest float16 value \(65504\)"),
]


@pytest.mark.parametrize("kwargs, error, match", [b[1:] for b in BAD_POLICIES],
                         ids=[b[0] for b in BAD_POLICIES])
def test_bad_policy_is_a_clear_error(kwargs, error, match):
    with pytest.raises(error, match=match):
        Policy(**kwargs)


def test_precision_needs_a_builtin_grad_mode_and_float32_params():
    net, params, _, x, y = problem("mlp")
    with pytest.raises(ValueError, match=r"make_step: precision='bf16' needs grad='autodiff' "
                                         r"or grad='manual'"):
        train.make_step(net, CE, optax.sgd(0.1), precision="bf16",
                        grad=lambda net, loss: train.autodiff_value_and_grad(net, loss))
    half = precision.cast_floating(params, BF16)
    step = train.make_step(net, CE, optax.sgd(0.1), precision="bf16")
    with pytest.raises(TypeError, match=r"make_step: precision=Policy\(compute_dtype=bfloat16.*"
                                        r"params\[0\]\['b'\] has dtype bfloat16"):
        step(train.init_state(half, optax.sgd(0.1)), x, y)


# ---------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------


@pytest.mark.slow  # CI's slow tier runs it; kept out of the default run for its time
def test_bf16_training_on_digits_matches_float32_accuracy():
    split = fn.data.digits()
    x, y = split.x_train.reshape(-1, 64), split.y_train
    net = fn.Serial([fn.Dense(32), fn.ReLU(), fn.Dense(10)])
    params = net.init(jax.random.key(0), (64,))
    opt = optax.adam(1e-2)
    batch, epochs = 128, 4
    order = np.random.default_rng(0).permutation(len(x) // batch * batch).reshape(-1, batch)
    accuracy, trained = {}, {}
    for prec, grad in ((None, "autodiff"), ("bf16", "autodiff"), ("bf16", "manual")):
        step = train.make_step(net, CE, opt, grad=grad, precision=prec)
        state = train.init_state(params, opt)
        for _ in range(epochs):
            for idx in order:
                state, _ = step(state, x[idx], y[idx])
        trained[prec, grad] = state.params[0]["w"]
        _, accuracy[prec, grad] = train.evaluate(net, state.params, split.x_test.reshape(-1, 64),
                                                 split.y_test)
    base = accuracy[None, "autodiff"]
    assert base > 0.9, accuracy
    for key in (("bf16", "autodiff"), ("bf16", "manual")):
        assert abs(accuracy[key] - base) <= 0.02, accuracy
        # a different run (bf16 rounding), not the float32 one again
        assert np.abs(trained[key] - trained[None, "autodiff"]).max() > 1e-3


@pytest.mark.slow  # CI's slow tier runs it; kept out of the default run for its time
@pytest.mark.parametrize("grad", ["autodiff", "manual"])
def test_fit_in_bf16_keeps_float32_state_and_trains(grad):
    """fit(precision="bf16"), BatchNorm and a partial last batch: the state stays float32,
    the run differs from float32's by bf16 rounding only."""
    net, params, _, x, y = problem("bn", batch=40)
    kw = {"epochs": 3, "batch_size": 16, "grad": grad, "progress": False,
          "optimizer": optax.adam(1e-2)}
    full = train.fit(net, params, x, y, **kw)
    half = train.fit(net, params, x, y, precision="bf16", **kw)
    assert floating_dtypes((half.params, half.state.opt_state, half.model_state)) == {"float32"}
    assert half.history["loss"][-1] < half.history["loss"][0]
    np.testing.assert_allclose(half.history["loss"], full.history["loss"], rtol=5e-2)
    assert not np.array_equal(half.params[0]["w"], full.params[0]["w"])  # a bf16 run
    assert rel(half.params[0]["w"], full.params[0]["w"]) < 5e-2


def test_fit_stops_on_a_float16_overflow_keeping_the_last_finite_state():
    net, params, _, x, y = problem("mlp", batch=32)
    with pytest.raises(train.NonFiniteLossError, match="epoch 1, step 1") as err:
        train.fit(net, params, x, y, epochs=1, batch_size=16, progress=False,
                  precision=Policy(jnp.float16, loss_scale=60000.0),
                  loss=lambda o, t: 1e3 * CE(o, t))
    assert int(err.value.state.step) == 0
    np.testing.assert_array_equal(err.value.state.params[0]["w"], params[0]["w"])
    with pytest.raises(ValueError, match="fit: precision"):
        train.fit(net, params, x, y, epochs=1, progress=False, precision="int8")


def test_layers_of_different_param_dtypes_get_gradients_in_their_own_dtypes():
    """A bfloat16 Conv under a float32 Dense (``param_dtype``, no policy): the hand rules
    give each gradient in its parameter's dtype, as autodiff does, and back-propagate
    the float32 head's gradient into the bfloat16 convolution (it was refused there:
    'lax.conv_general_dilated requires arguments to have the same dtypes'), in fit too."""
    net = fn.Serial([fn.Conv(2, 3, param_dtype=BF16), fn.ReLU(), fn.Flatten(),
                     fn.Dense(4, param_dtype=BF16), fn.Tanh(), fn.Dense(3)])
    params = net.init(jax.random.key(0), (6, 6, 1))
    x, y = draw.normal((4, 6, 6, 1), seed=1).astype(BF16), np.arange(4) % 3
    dtypes = [a.dtype for a in jax.tree.leaves(params)]
    assert dtypes == [BF16] * 4 + [jnp.float32] * 2
    manual = jax.jit(vjp.value_and_grad(net, CE))(params, x, y)
    auto = jax.jit(jax.value_and_grad(lambda p: CE(net.apply(p, x), y)))(params)
    assert [a.dtype for a in jax.tree.leaves(manual[1])] == dtypes
    for a, b in zip(jax.tree.leaves(manual), jax.tree.leaves(auto), strict=True):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                   rtol=2e-2, atol=2e-2)
    result = train.fit(net, params, x, y, epochs=1, batch_size=4, progress=False,
                       optimizer=optax.sgd(0.1), grad="manual")
    assert [a.dtype for a in jax.tree.leaves(result.params)] == dtypes


def test_manual_op_gives_each_cotangent_its_arguments_dtype():
    """``vjp.manual``: bfloat16 x and w with a float32 bias (the output, and g, float32)."""
    x, w = draw.normal((2, 5, 5, 3), seed=1).astype(BF16), draw.normal((3, 3, 3, 2), seed=2)
    b = draw.normal((2,), seed=3)
    conv = vjp.manual(fn.ops.conv2d)
    args = (x, w.astype(BF16), b)
    grads = jax.grad(lambda *a: jnp.sum(conv(*a) ** 2), argnums=(0, 1, 2))(*args)
    auto = jax.grad(lambda *a: jnp.sum(fn.ops.conv2d(*a) ** 2), argnums=(0, 1, 2))(*args)
    assert [g.dtype for g in grads] == [BF16, BF16, jnp.float32]
    for a, r in zip(grads, auto, strict=True):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(r, np.float32),
                                   rtol=2e-2, atol=2e-1)
