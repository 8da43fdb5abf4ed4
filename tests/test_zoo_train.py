"""The model zoo trains, exports and summarises: for every zoo network (LeNet-5, AlexNet
in both variants, VGG, GoogLeNet, ResNet-18/34/50, ViT) one ``make_step`` step with the
hand rules (``grad="manual"``) equals the autodiff step in float64, BatchNorm's running
statistics move and Dropout draws the same masks in both; a GoogLeNet inception block
back-propagates by hand exactly as autodiff; every network exports with its BatchNorm
state folded in and reloads in a fresh process; ``summary`` of the ImageNet-sized networks
allocates nothing."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from compile_log import CompileLog
from test_zoo_cnn import _dense_macs, _f64, _quick_params

import funcnet as fn
from funcnet import zoo_cnn
from funcnet.nn.base import iter_layers

LOSS = fn.losses.softmax_cross_entropy
LR = 0.1
TOL = 1e-9  # float64: hand rules and autodiff differ only by rounding (~1e-14 here)

# XLA's CPU backend at optimization level 0 compiles these training programs in about
# half the time (the tests are compile-bound: each program runs once, on tiny inputs).
# It only leaves the generated loops less optimised: still float64 arithmetic, at most in
# another summation order, so the 1e-9 comparisons mean the same.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _run_once(f, *args):
    """``jax.jit(f)(*args)``, compiled with :data:`FAST_COMPILE`, results on the host."""
    return jax.device_get(jax.jit(f).lower(*args).compile(FAST_COMPILE)(*args))


def _vit_small(dropout=0.1):
    return fn.models.vit(3, image_size=8, patch=4, width=8, depth=1, heads=2, dropout=dropout)


# name -> (builder, input shape, classes); the smallest inputs each network accepts (or
# near it): AlexNet needs 63x63, VGG 32x32 (five 2x2 pools), GoogLeNet's stride-32 stack
# ends at 1x1 for 32x32.
ZOO = {
    "lenet5": (lambda: fn.models.lenet5(3), (28, 28, 1), 3),
    "alexnet-torchvision": (lambda: zoo_cnn.alexnet(4, "torchvision"), (63, 63, 3), 4),
    "alexnet-original": (lambda: zoo_cnn.alexnet(4, "original"), (63, 63, 3), 4),
    "vgg11": (lambda: zoo_cnn.vgg(11, 3), (32, 32, 3), 3),
    "vgg11-bn": (lambda: zoo_cnn.vgg(11, 3, batch_norm=True), (32, 32, 3), 3),
    "googlenet": (lambda: zoo_cnn.googlenet(3, (32, 32, 3)), (32, 32, 3), 3),
    "resnet18": (lambda: zoo_cnn.resnet(18, 3, (8, 8, 3), "small"), (8, 8, 3), 3),
    "resnet34": (lambda: zoo_cnn.resnet(34, 3, (8, 8, 3), "small"), (8, 8, 3), 3),
    "resnet50": (lambda: zoo_cnn.resnet(50, 3, (8, 8, 3), "small"), (8, 8, 3), 3),
    "vit": (_vit_small, (8, 8, 3), 3),
}
DEFAULT_TIER = ("lenet5", "resnet18", "vit")  # the rest compile for seconds each: slow


def _zoo_params(names):
    return [
        pytest.param(n, id=n, marks=() if n in DEFAULT_TIER else pytest.mark.slow) for n in names
    ]


def _has(net, kind):
    return any(type(layer) is kind for layer in iter_layers(net))


# ---------------------------------------------------------------------------------------
# (a) One training step: grad="manual" == grad="autodiff"
# ---------------------------------------------------------------------------------------


def _recording_sgd(lr=LR):
    """Plain SGD whose optimizer state is the gradient it was last given, so a step of
    ``make_step`` hands back the exact gradient it computed (``state.opt_state``)."""

    def init(params):
        return jax.tree_util.tree_map(jnp.zeros_like, params)

    def update(grads, state, params=None):
        return jax.tree_util.tree_map(lambda g: -lr * g, grads), grads

    return optax.GradientTransformation(init, update)


def _leaves(tree):
    return [np.asarray(a) for a in jax.tree_util.tree_leaves(tree)]


NOISE = 1e-12  # a leaf below NOISE * (the largest gradient) in both modes is 0 + rounding


def _compare_grads(grads_m, grads_a):
    """Manual vs autodiff gradients, leaf by leaf at relative :data:`TOL`, except leaves
    that are zero up to rounding in *both* (below ``NOISE`` times the largest gradient
    entry; float64 rounding puts them near 1e-16): a relative comparison of two rounding
    noises means nothing. Such leaves are exact zeros of the calculus, e.g. the bias of
    a conv that a BatchNorm follows (VGG-BN keeps torchvision's conv biases): training
    mode subtracts the batch mean, cancelling any constant shift. A leaf that is 0 in one
    mode only is still compared, and fails. Returns the names of the exempt leaves."""
    flat_m = jax.tree_util.tree_flatten_with_path(grads_m)[0]
    flat_a = jax.tree_util.tree_leaves(grads_a)
    assert len(flat_m) == len(flat_a)
    floor = NOISE * max(float(np.max(np.abs(g))) for g in _leaves(grads_m) + _leaves(grads_a))
    keep_m, keep_a, exempt = {}, {}, []
    for (path, gm), ga in zip(flat_m, flat_a, strict=True):
        name = jax.tree_util.keystr(path)
        if np.max(np.abs(gm)) <= floor and np.max(np.abs(ga)) <= floor:
            exempt.append(name)
        else:
            keep_m[name], keep_a[name] = gm, ga
    fn.gradcheck.compare({"manual": keep_m, "autodiff": keep_a}, tol=TOL)
    return exempt


@pytest.mark.parametrize("name", _zoo_params(ZOO))
def test_one_manual_step_equals_the_autodiff_step(name):
    build, in_shape, classes = ZOO[name]
    net = build()
    seed, n = 0, 2 if name.startswith("resnet") else 4  # n=2: ResNets' 512-channel convs
    with jax.enable_x64(True):
        params = _quick_params(net, in_shape, seed, dtype=np.float64)
        x = np.random.default_rng(seed + 1).normal(size=(n, *in_shape))
        y = np.arange(n) % classes
        opt = _recording_sgd()
        manual = fn.train.make_step(net, LOSS, opt, grad="manual", seed=seed, donate=False)
        autodiff = fn.train.make_step(net, LOSS, opt, grad="autodiff", seed=seed, donate=False)

        dropout, batch_norm = _has(net, fn.Dropout), _has(net, fn.BatchNorm)

        # one compilation for both steps, and nothing run eagerly (each eager op compiles)
        def run(params, x, y):
            state0 = _f64(net.init_state(in_shape))
            start = fn.train.init_state(params, opt, state0)
            other = None
            if dropout:  # a forward without the step's Dropout masks
                out, _ = net.apply_with_state(
                    params, state0, x, train=batch_norm, key=jax.random.key(seed + 7)
                )
                other = LOSS(out, y)
            return state0, manual(start, x, y), autodiff(start, x, y), other

        state0, (new_m, met_m), (new_a, met_a), other_loss = _run_once(run, params, x, y)
        params = jax.device_get(params)

    # the step was applied (a non-finite loss or a bad label leaves the state as it was)
    assert int(new_m.step) == int(new_a.step) == 1
    loss_m, loss_a = float(met_m["loss"]), float(met_a["loss"])
    assert math.isfinite(loss_m) and loss_m > 0
    assert abs(loss_m - loss_a) <= TOL * loss_a
    assert float(met_m["count"]) == n and float(met_m["correct"]) == float(met_a["correct"])

    # the gradients (the recording optimizer's state) agree leaf by leaf
    grads_m, grads_a = new_m.opt_state, new_a.opt_state
    exempt = _compare_grads(grads_m, grads_a)
    # only biases can be exact zeros (a training-mode BatchNorm downstream cancels a
    # constant shift): VGG-BN's 8 conv biases, always; in GoogLeNet at 32x32 a few
    # BatchNorm biases (the stem's: ReLU -> max pool -> 1x1 conv -> BatchNorm) whenever
    # no pool window is all zero
    assert all(e.endswith(("['b']", "['bias']")) for e in exempt), exempt
    conv_biases = [e for e in exempt if e.endswith("['b']")]
    assert len(conv_biases) == (8 if name == "vgg11-bn" else 0), exempt
    assert all(np.all(np.isfinite(g)) for g in _leaves(new_m.opt_state))
    # and the comparison is not vacuous: every weight matrix / kernel gets a gradient
    for p, g in zip(_leaves(params), _leaves(grads_m), strict=True):
        if p.ndim >= 2:
            assert np.any(g != 0)

    # params moved by exactly -LR * grad, the same in both modes
    for old, new, g in zip(
        _leaves(params), _leaves(new_m.params), _leaves(new_m.opt_state), strict=True
    ):
        np.testing.assert_allclose(new, old - LR * g, rtol=1e-12, atol=1e-15)
        if old.ndim >= 2:
            assert np.any(new != old)
    fn.gradcheck.compare({"manual": new_m.params, "autodiff": new_a.params}, tol=TOL)

    # BatchNorm's running statistics moved away from (0, 1), the same in both modes
    leaves0, leaves_m, leaves_a = (
        _leaves(state0),
        _leaves(new_m.model_state),
        _leaves(new_a.model_state),
    )
    assert bool(leaves0) == _has(net, fn.BatchNorm)
    for s0, sm, sa in zip(leaves0, leaves_m, leaves_a, strict=True):
        assert np.all(sm != s0)  # momentum 0.1 of a batch statistic: every channel moves
        np.testing.assert_allclose(sm, sa, rtol=TOL, atol=1e-15)

    # Dropout is live in the step: the loss without its masks (evaluation mode, or with
    # BatchNorm another key) differs, so the two modes agree because they draw the same
    # masks from the step's key, not because neither draws one
    if dropout:
        assert abs(float(other_loss) - loss_m) > 1e-6


# ---------------------------------------------------------------------------------------
# (b) A GoogLeNet inception block: the hand rules == autodiff, training and evaluation
# ---------------------------------------------------------------------------------------


def _running_stats(net, in_shape, seed=0, dtype=np.float32):
    """BatchNorm state far from its initial (0, 1): means ``N(0, 0.5^2)``, variances in
    ``[0.5, 2]``, so evaluation mode really normalises with them."""
    rng = np.random.default_rng(seed)

    def draw(path, s):
        if jax.tree_util.keystr(path).endswith("['var']"):
            return rng.uniform(0.5, 2.0, s.shape).astype(dtype)
        return (0.5 * rng.normal(size=s.shape)).astype(dtype)

    return jax.tree_util.tree_map_with_path(draw, net.state_shapes(in_shape))


@pytest.mark.parametrize(
    "train", [True, pytest.param(False, marks=pytest.mark.slow)], ids=["train", "eval"]
)
def test_inception_block_hand_backprop_equals_autodiff(train):
    # A conv before the block, so the block's input gradient (the fan-out of its four
    # branches: a copy gate, their gradients add) is back-propagated and checked too. It
    # has no bias: in training every branch's BatchNorm would cancel a constant shift, so
    # that gradient is 0 up to rounding and a relative comparison of it meaningless.
    block = zoo_cnn._inception(4, 3, 5, 2, 3, 2)
    net = fn.Serial(
        [fn.Conv(5, (3, 3), padding=1, use_bias=False), block, fn.GlobalAvgPool(), fn.Dense(3)]
    )
    in_shape, n = (6, 6, 2), 3
    assert net.output_shape(in_shape) == (3,) and block.output_shape((6, 6, 5)) == (6, 6, 14)
    with jax.enable_x64(True):
        params = _quick_params(net, in_shape, dtype=np.float64)
        state = _running_stats(net, in_shape, dtype=np.float64)
        x = np.random.default_rng(1).normal(size=(n, *in_shape))
        y = np.array([0, 2, 1])
        manual = fn.vjp.value_and_grad_with_state(net, LOSS)
        autodiff = fn.train.autodiff_value_and_grad_with_state(net, LOSS)

        def run(params, state, x, y):  # one compilation for both
            return (
                manual(params, state, x, y, None, train),
                autodiff(params, state, x, y, None, train),
            )

        hand, ref = _run_once(run, params, state, x, y)
    (loss_m, grads_m, state_m, out_m), (loss_a, grads_a, state_a, out_a) = hand, ref
    assert math.isfinite(float(loss_m))
    assert abs(float(loss_m) - float(loss_a)) <= TOL * float(loss_a)
    np.testing.assert_allclose(out_m, out_a, rtol=TOL, atol=1e-15)
    assert _compare_grads(grads_m, grads_a) == []
    # every branch carries gradient: no leaf is all zero (BatchNorm scales and biases
    # included), so the agreement is not vacuous
    assert all(np.any(g != 0) for g in _leaves(grads_m))
    for s0, sm, sa in zip(_leaves(state), _leaves(state_m), _leaves(state_a), strict=True):
        np.testing.assert_allclose(sm, sa, rtol=TOL, atol=1e-15)
        if train:
            assert np.all(sm != s0)
        else:
            np.testing.assert_array_equal(sm, s0)  # evaluation leaves the state alone


# ---------------------------------------------------------------------------------------
# (c) Export: evaluation mode, BatchNorm state folded in, reloaded in a fresh process
# ---------------------------------------------------------------------------------------

_LOAD_ALL = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    import numpy as np

    from funcnet.export import load  # the loader only: no layers, no network code

    folder = Path(sys.argv[1])
    xs = np.load(folder / "inputs.npz")
    for name in xs.files:
        model = load(folder / f"{name}.fnx")
        np.save(folder / f"{name}.out.npy", np.asarray(model(xs[name])))
    """
)


@pytest.mark.slow  # ten networks (VGG's and AlexNet's 4096-wide layers: ~100 MB files)
def test_every_zoo_network_exports_and_reloads_in_one_fresh_process(tmp_path):
    inputs, expected = {}, {}
    for i, (name, (build, in_shape, classes)) in enumerate(ZOO.items()):
        net = build()
        params = _quick_params(net, in_shape, seed=i)
        state = _running_stats(net, in_shape, seed=i)  # not the initial (0, 1)
        x = np.random.default_rng(100 + i).normal(size=(3, *in_shape)).astype(np.float32)
        path = fn.export.save(tmp_path / f"{name}.fnx", net, params, in_shape, state=state)
        assert path.stat().st_size > 4 * fn.param_count(net, in_shape)  # params baked in
        evaluate = jax.jit(lambda p, s, x, net=net: net.apply_with_state(p, s, x)[0])
        expected[name] = np.asarray(evaluate(params, state, x))
        assert expected[name].shape == (3, classes)
        inputs[name] = x
    np.savez(tmp_path / "inputs.npz", **inputs)
    done = subprocess.run(
        [sys.executable, "-c", _LOAD_ALL, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    for name, ref in expected.items():
        got = np.load(tmp_path / f"{name}.out.npy")
        assert got.shape == ref.shape and got.dtype == np.float32
        # The same float32 program, except that XLA folds the baked-in constants (the
        # weights, BatchNorm's scale / sqrt(var + eps)) at compile time and fuses around
        # them: a few ulps per layer, measured up to 2e-6 of the largest logit (ResNet-50;
        # AlexNet and ViT match bit for bit). The initial BatchNorm state instead of the
        # saved one moves the logits by 0.1 to 0.7 of the largest (VGG-11-BN, ResNet-18,
        # GoogLeNet), so a state that was not folded in fails here.
        err = np.max(np.abs(got - ref)) / np.max(np.abs(ref))
        assert err <= 1e-5, (name, err)
    for f in tmp_path.glob("*.fnx"):  # ~600 MB in all: not left for pytest's tmp reaper
        f.unlink()


# ---------------------------------------------------------------------------------------
# (d) summary of the ImageNet-sized networks: from shapes alone
# ---------------------------------------------------------------------------------------

IMAGENET = (224, 224, 3)
IMAGENET_ZOO = {
    "alexnet-torchvision": lambda: zoo_cnn.alexnet(),
    "alexnet-original": lambda: zoo_cnn.alexnet(variant="original"),
    **{
        f"vgg{d}{'-bn' if bn else ''}": (lambda d=d, bn=bn: zoo_cnn.vgg(d, batch_norm=bn))
        for d in (11, 13, 16, 19)
        for bn in (False, True)
    },
    "googlenet": zoo_cnn.googlenet,
    **{f"resnet{d}": (lambda d=d: zoo_cnn.resnet(d)) for d in (18, 34, 50)},
    "vit_tiny": fn.models.vit_tiny,
}


def test_the_guards_catch_every_way_to_allocate():
    # With host-to-device transfers disallowed, creating an array eagerly raises: a key,
    # a constant, BatchNorm's running zeros / ones. A network's init runs as one compiled
    # program (its constants live in the program: no transfer), which the compile log
    # sees. (So a summary that ran init or init_state under both would fail.)
    key = jax.random.key(0)
    with jax.transfer_guard("disallow"):
        for allocate in (
            lambda: jax.random.key(1),
            lambda: jnp.zeros((3,)),
            lambda: fn.BatchNorm().init_state((4, 4, 8)),
        ):
            with pytest.raises(Exception, match="Disallowed host-to-device transfer"):
                allocate()
    # layers no other test initialises on these shapes, so no program is cached yet
    for net, shape in ((fn.Serial([fn.Conv(5, (3, 3)), fn.ReLU(), fn.Flatten(), fn.Dense(3)]),
                        (7, 6, 2)),
                       (fn.MultiHeadSelfAttention(2), (5, 6))):
        with CompileLog() as log:
            net.init(key, shape)
        assert len(log.messages) == 1 and "init_program" in log.messages[0], log.messages


@pytest.mark.parametrize("name", IMAGENET_ZOO)
def test_summary_of_an_imagenet_network_allocates_nothing(name):
    net = IMAGENET_ZOO[name]()
    with jax.transfer_guard("disallow"), CompileLog() as log:  # see the test above
        s = fn.summary(net, IMAGENET)
    assert log.messages == []
    assert s.total_flops > 0 and s.total_params > 0
    assert s.receptive_field == (224, 224)  # every logit sees the whole image
    for row in s.rows:
        assert row.flops_source == "analytic", row  # nothing compiled either
        assert row.flops >= 0
        if row.name in ("Conv", "Dense", "BatchNorm", "LayerNorm", "MultiHeadSelfAttention"):
            assert row.flops > 0, row
        rf = row.receptive_field
        assert rf is not None and len(rf) == 2 and all(r >= 1 for r in rf), row
    assert str(s)


def _row(s, name, n=0):
    return [r for r in s.rows if r.name == name][n]


def test_summary_receptive_fields_and_flops_of_the_zoo_by_hand():
    # AlexNet (both variants): 11/4, pool 3/2, 5, pool 3/2, 3, 3, 3, pool 3/2 gives 195
    # pixels at a jump of 32 (padding does not change a field)
    for variant in ("torchvision", "original"):
        flat = _row(fn.summary(zoo_cnn.alexnet(variant=variant), IMAGENET), "Flatten")
        assert flat.receptive_field == (195, 195) and flat.input_shape == (6, 6, 256)
    # VGG-16's pool5 sees 212 pixels, VGG-11's 150 (3x3 convs, 2x2/2 pools)
    assert _row(fn.summary(zoo_cnn.vgg(16), IMAGENET), "Flatten").receptive_field == (212, 212)
    assert _row(fn.summary(zoo_cnn.vgg(11), IMAGENET), "Flatten").receptive_field == (150, 150)

    # GoogLeNet: inception 3a sees 27 + 2 * 8 = 43 pixels (its 3x3 branches, jump 8), 3b
    # 59; FLOPs: torchvision's 1.50 GMACs (padding taps included), the summary skips the
    # taps on the padding
    g = fn.summary(zoo_cnn.googlenet(), IMAGENET)
    merge_3a, merge_3b = _row(g, "Parallel", 0), _row(g, "Parallel", 1)
    assert (merge_3a.receptive_field, merge_3a.jump) == ((43, 43), (8, 8))
    assert merge_3b.receptive_field == (59, 59) and merge_3b.output_shape == (28, 28, 480)
    macs = _dense_macs(zoo_cnn.googlenet(), IMAGENET)
    assert abs(macs - 1.50e9) <= 0.01 * 1.50e9, macs
    assert 0.95 * 2 * macs <= g.total_flops <= 2 * macs

    # ViT-Ti/16: the patch embedding sees one 16x16 patch; self-attention, the whole image
    v = fn.summary(fn.models.vit_tiny(), IMAGENET)
    patch = _row(v, "Conv")
    assert (patch.receptive_field, patch.jump) == ((16, 16), (16, 16))
    first_attention = _row(v, "MultiHeadSelfAttention").index
    assert all(r.receptive_field == (224, 224) for r in v.rows[first_attention:])
    # multiply-adds: patch embedding, then per block QKV, Q K^T, A V, the output
    # projection and the MLP, then the head (timm: 1.26 GMACs); LayerNorm, softmax, GELU,
    # biases and residual adds are the rest (under 1%)
    t, d, m, blocks = 197, 192, 768, 12
    block = t * d * 3 * d + 2 * t * t * d + t * d * d + 2 * t * d * m
    vit_macs = 196 * (16 * 16 * 3) * d + blocks * block + d * 1000
    assert abs(vit_macs - 1.254e9) <= 1e-3 * 1.254e9
    assert 2 * vit_macs < v.total_flops <= 1.01 * 2 * vit_macs
