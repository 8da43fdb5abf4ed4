"""The classic CNNs of funcnet.zoo_cnn: exact parameter counts against the reference
implementations (torchvision), FLOPs, summaries, small forward passes and
back-propagation with the hand rules == autodiff."""

import math

import draw
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import funcnet as fn
from funcnet import zoo_cnn
from funcnet.nn.base import param_count

IMAGENET = (224, 224, 3)


def _f64(tree):
    return jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), tree)


def _dense_macs(layer, in_shape):
    """Multiply-adds of every Conv / Dense, counting padding taps too (the convention
    of torchvision's published GMACs; ``fn.summary`` skips taps on the padding)."""
    if isinstance(layer, fn.Serial):
        total, shape = 0, in_shape
        for sub in layer.layers:
            total += _dense_macs(sub, shape)
            shape = sub.output_shape(shape)
        return total
    if layer.sublayers():  # Parallel / Residual: every part sees the same input
        return sum(_dense_macs(sub, in_shape) for sub in layer.sublayers())
    out = layer.output_shape(in_shape)
    if isinstance(layer, fn.Conv):
        kh, kw = layer.kernel_size
        return math.prod(out) * kh * kw * in_shape[-1] // layer.groups
    if isinstance(layer, fn.Dense):
        return math.prod(out) * in_shape[-1]
    return 0


def _check_summary(net, expected_params, in_shape=IMAGENET):
    s = fn.summary(net, in_shape)
    assert s.total_params == expected_params
    assert param_count(net, in_shape) == expected_params
    assert s.receptive_field is not None and len(s.receptive_field) == 2
    assert all(r > 0 for r in s.receptive_field)
    assert s.total_flops > 0
    assert str(s)  # the table renders
    return s


_quick_params = draw.params  # imported by test_zoo_train and test_onnx


def _forward(net, in_shape, num_classes, n=2, seed=0):
    params = _quick_params(net, in_shape, seed)
    state = net.init_state(in_shape)
    x = draw.normal((n, *in_shape), seed=seed + 1)
    run = jax.jit(lambda p, s, x, k: net.apply_with_state(p, s, x, train=True, key=k))
    y, new_state = run(params, state, x, jax.random.key(seed + 2))
    assert y.shape == (n, num_classes)
    assert bool(jnp.all(jnp.isfinite(y)))
    assert jax.tree_util.tree_structure(new_state) == jax.tree_util.tree_structure(state)
    return y


# ---------------------------------------------------------------------------------------
# ResNet
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("depth, expected", [(18, 11_689_512), (34, 21_797_672),
                                             (50, 25_557_032)])
def test_resnet_params_match_torchvision(depth, expected):
    net = zoo_cnn.resnet(depth)
    s = _check_summary(net, expected)
    assert s.output_shape == (1000,)
    assert s.total_state > 0  # running statistics are state, not params


def test_resnet50_flops():
    net = zoo_cnn.resnet(50)
    macs = _dense_macs(net, IMAGENET)
    assert abs(2 * macs - 8.2e9) <= 0.03 * 8.2e9, macs  # torchvision: 4.09 GMACs
    flops = fn.summary(net, IMAGENET).total_flops
    # the summary skips conv taps on the zero padding, and adds BN / ReLU / pooling
    assert 0.95 * 2 * macs <= flops <= 2 * macs, (flops, macs)


def test_resnet_stage_shapes():
    net = zoo_cnn.resnet(18)
    shape = IMAGENET
    shapes = []
    for layer in net.layers:
        shape = layer.output_shape(shape)
        shapes.append(shape)
    assert (56, 56, 64) in shapes and (7, 7, 512) in shapes
    small = zoo_cnn.resnet(18, num_classes=10, input_shape=(32, 32, 3), stem="small")
    assert small.layers[3].output_shape((32, 32, 64)) == (32, 32, 64)
    assert not any(isinstance(layer, fn.MaxPool) for layer in small.layers)
    assert param_count(small, (32, 32, 3)) == 11_689_512 - 9408 + 1728 - 513 * 990


def test_resnet_bad_arguments():
    with pytest.raises(ValueError, match="depth"):
        zoo_cnn.resnet(20)
    with pytest.raises(ValueError, match="stem"):
        zoo_cnn.resnet(18, stem="cifar")


def test_resnet18_small_forward():
    net = zoo_cnn.resnet(18, num_classes=3, input_shape=(16, 16, 3), stem="small")
    _forward(net, (16, 16, 3), 3)


@pytest.mark.slow
def test_resnet50_small_forward_with_init():
    net = zoo_cnn.resnet(50, num_classes=5, input_shape=(8, 8, 3), stem="small")
    params = net.init(jax.random.key(0), (8, 8, 3))
    state = net.init_state((8, 8, 3))
    y, _ = net.apply_with_state(params, state, jnp.ones((2, 8, 8, 3)), train=True)
    assert y.shape == (2, 5) and bool(jnp.all(jnp.isfinite(y)))


@pytest.mark.slow
def test_resnet18_small_hand_backprop_matches_autodiff():
    in_shape = (8, 8, 3)
    net = zoo_cnn.resnet(18, num_classes=3, input_shape=in_shape, stem="small")
    loss_fn = fn.losses.softmax_cross_entropy
    with jax.enable_x64(True):
        params = _quick_params(net, in_shape, dtype=np.float64)
        state = _f64(net.init_state(in_shape))
        x = draw.normal((3, *in_shape), seed=1, dtype=np.float64)
        y = jnp.array([0, 2, 1])
        key = jax.random.key(2)
        manual = jax.jit(fn.vjp.value_and_grad_with_state(net, loss_fn), static_argnums=5)
        loss_m, grads_m, state_m, _ = manual(params, state, x, y, key, True)

        def loss(p):
            out, new_state = net.apply_with_state(p, state, x, train=True, key=key)
            return loss_fn(out, y), new_state

        (loss_a, state_a), grads_a = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        assert abs(float(loss_m) - float(loss_a)) <= 1e-9 * abs(float(loss_a))
        fn.gradcheck.compare({"manual": grads_m, "autodiff": grads_a}, tol=1e-9)
        for a, b in zip(jax.tree_util.tree_leaves(state_m), jax.tree_util.tree_leaves(state_a),
                        strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------------------
# VGG
# ---------------------------------------------------------------------------------------

_VGG_CONV_CHANNELS = {11: 2752, 13: 2944, 16: 4224, 19: 5504}  # sum of conv widths


@pytest.mark.parametrize("depth, expected", [(11, 132_863_336), (13, 133_047_848),
                                             (16, 138_357_544), (19, 143_667_240)])
def test_vgg_params_match_torchvision(depth, expected):
    s = _check_summary(zoo_cnn.vgg(depth), expected)
    assert s.output_shape == (1000,)
    assert s.total_state == 0
    bn = zoo_cnn.vgg(depth, batch_norm=True)
    _check_summary(bn, expected + 2 * _VGG_CONV_CHANNELS[depth])  # BN scale + bias


def test_vgg_conv_channels_table():
    for depth, total in _VGG_CONV_CHANNELS.items():
        convs = [layer for layer in zoo_cnn.vgg(depth).layers if isinstance(layer, fn.Conv)]
        assert len(convs) == depth - 3
        assert sum(c.features for c in convs) == total


def test_vgg_layout():
    net = zoo_cnn.vgg(16, num_classes=10, dropout=0.3)
    assert [type(layer).__name__ for layer in net.layers[-8:]] == [
        "Flatten", "Dense", "ReLU", "Dropout", "Dense", "ReLU", "Dropout", "Dense"]
    assert net.layers[-2].rate == 0.3
    shape = IMAGENET
    for layer in net.layers[:-8]:
        shape = layer.output_shape(shape)
    assert shape == (7, 7, 512)  # torchvision's adaptive 7x7 pool is the identity here
    with pytest.raises(ValueError, match="depth"):
        zoo_cnn.vgg(12)


def test_vgg11_bn_small_forward():
    _forward(zoo_cnn.vgg(11, num_classes=4, batch_norm=True), (32, 32, 3), 4)


# ---------------------------------------------------------------------------------------
# AlexNet
# ---------------------------------------------------------------------------------------


def _conv_params(k, c_in, c_out, groups=1):
    return k * k * (c_in // groups) * c_out + c_out


def test_alexnet_torchvision_params():
    s = _check_summary(zoo_cnn.alexnet(), 61_100_840)
    assert s.output_shape == (1000,)


def test_alexnet_original_params_by_hand():
    by_hand = (
        _conv_params(11, 3, 96)
        + _conv_params(5, 96, 256, groups=2)
        + _conv_params(3, 256, 384)
        + _conv_params(3, 384, 384, groups=2)
        + _conv_params(3, 384, 256, groups=2)
        + (6 * 6 * 256 + 1) * 4096
        + (4096 + 1) * 4096
        + (4096 + 1) * 1000
    )
    assert by_hand == 60_965_224  # the count the docstring states
    net = zoo_cnn.alexnet(variant="original")
    _check_summary(net, by_hand)
    convs = [layer for layer in net.layers if isinstance(layer, fn.Conv)]
    assert [c.groups for c in convs] == [1, 2, 1, 2, 2]
    lrns = [layer for layer in net.layers if isinstance(layer, fn.LocalResponseNorm)]
    assert len(lrns) == 2
    assert (lrns[0].size, lrns[0].alpha, lrns[0].beta, lrns[0].k) == (5, 1e-4, 0.75, 2.0)


@pytest.mark.parametrize("variant", ["torchvision", "original"])
def test_alexnet_minimum_input(variant):
    net = zoo_cnn.alexnet(num_classes=7, variant=variant)
    shape = IMAGENET
    for layer in net.layers:
        shape = layer.output_shape(shape)
        if isinstance(layer, fn.Flatten):
            assert shape == (9216,)  # 6 x 6 x 256 at 224
    # (H + 4 - 11) // 4 + 1 >= 15 so that three 3x3/2 pools leave 1 pixel: H >= 63
    assert net.output_shape((63, 63, 3)) == (7,)
    with pytest.raises(ValueError):
        net.output_shape((62, 62, 3))
    with pytest.raises(ValueError, match="variant"):
        zoo_cnn.alexnet(variant="caffe")


@pytest.mark.parametrize("variant", ["torchvision", "original"])
def test_alexnet_forward_at_minimum_input(variant):
    _forward(zoo_cnn.alexnet(num_classes=7, variant=variant), (63, 63, 3), 7)


# ---------------------------------------------------------------------------------------
# GoogLeNet
# ---------------------------------------------------------------------------------------


def _torch_ceil_pool_size(n, k, s):
    """``torch.nn.MaxPool2d(k, s, ceil_mode=True)``'s output size (no padding)."""
    out = (n - k + s - 1) // s + 1
    return out - 1 if (out - 1) * s >= n else out


def test_googlenet_params_match_torchvision():
    net = zoo_cnn.googlenet()
    s = _check_summary(net, 6_624_904)
    assert s.output_shape == (1000,)
    assert s.total_state > 0


def test_googlenet_stage_widths_match_torchvision():
    net = zoo_cnn.googlenet()
    shape, pooled, widths = IMAGENET, [], []
    for layer in net.layers:
        shape = layer.output_shape(shape)
        if isinstance(layer, fn.MaxPool):
            pooled.append(shape[:2])
        if isinstance(layer, fn.Parallel):
            widths.append(shape[-1])
            assert len(layer.branches) == 4
            assert all(isinstance(b, fn.Serial) for b in layer.branches)
    assert pooled == [(56, 56), (28, 28), (14, 14), (7, 7)]
    assert widths == [256, 480, 512, 512, 512, 528, 832, 832, 1024]
    bns = [x for x in net.layers if isinstance(x, fn.BatchNorm)]
    assert bns and all(b.epsilon == 1e-3 for b in bns)
    assert net.layers[-2].rate == 0.2


@pytest.mark.parametrize("n", range(5, 40))
@pytest.mark.parametrize("k, s", [(3, 2), (2, 2), (3, 3)])
def test_ceil_mode_pool_emulation(n, k, s):
    pool = zoo_cnn._ceil_max_pool(k, s, (n, n + 1))
    assert pool.output_shape((n, n + 1, 1))[:2] == (
        _torch_ceil_pool_size(n, k, s), _torch_ceil_pool_size(n + 1, k, s))


def test_googlenet_other_input_size():
    net = zoo_cnn.googlenet(num_classes=10, input_shape=(32, 32, 3))
    assert net.output_shape((32, 32, 3)) == (10,)
    assert param_count(net, (32, 32, 3)) == 6_624_904 - 1025 * 990


@pytest.mark.slow
def test_googlenet_small_forward():
    net = zoo_cnn.googlenet(num_classes=6, input_shape=(32, 32, 3))
    _forward(net, (32, 32, 3), 6)


@pytest.mark.parametrize("build, where", [
    (lambda: fn.models.resnet(18, num_classes=0), "resnet"),
    (lambda: fn.models.vgg(11, num_classes=0), "vgg"),
    (lambda: fn.models.alexnet(num_classes=0), "alexnet"),
    (lambda: fn.models.googlenet(num_classes=0), "googlenet"),
    (lambda: fn.models.lenet5(num_classes=0), "lenet5"),
    (lambda: fn.models.digits_cnn(num_classes=0), "digits_cnn"),
    (lambda: fn.models.mlp([8], 0), "mlp"),
], ids=["resnet", "vgg", "alexnet", "googlenet", "lenet5", "digits_cnn", "mlp"])
def test_builders_name_num_classes(build, where):
    """Was the head's 'Dense: features must be a positive int'."""
    with pytest.raises(ValueError, match=rf"^{where}: num_classes must be a positive int"):
        build()


def test_mlp_names_hidden():
    """mlp(16, 10) was "'int' object is not iterable"."""
    with pytest.raises(TypeError, match=r"mlp: hidden must be a sequence of layer widths .* "
                                        r"got 16"):
        fn.models.mlp(16, 10)
    with pytest.raises(ValueError, match=r"mlp: hidden width must be a positive int, got 0"):
        fn.models.mlp([8, 0], 10)
    assert len(fn.models.mlp([], 3).layers) == 2  # Flatten, Dense: no hidden layer
