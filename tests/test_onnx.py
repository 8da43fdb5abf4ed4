"""funcnet.onnx: every zoo network, exported to ONNX and run by onnxruntime, gives
funcnet's output (float32, 1e-5) with BatchNorm statistics folded in, for a symbolic and a
fixed batch; clear errors for a missing extra, bad arguments and an unconvertible layer;
no half-written file."""

from __future__ import annotations

import logging
import os
import sys

import draw
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.extend import core as jcore

import funcnet as fn
from funcnet import zoo_cnn, zoo_vit

if sys.version_info < (3, 11):  # jax2onnx itself needs Python >= 3.11 (the onnx extra)
    pytest.skip("funcnet[onnx] needs Python >= 3.11", allow_module_level=True)

# Imported, not importorskip'ed: with the dev extra installed these tests must run.
import onnx
import onnxruntime  # noqa: F401  (check_onnx needs it)
from test_zoo_cnn import _quick_params

from funcnet import onnx as fonnx

TOL = {"rtol": 1e-5, "atol": 1e-5}


def _quick_state(net, in_shape, seed=1):
    """Non-trivial BatchNorm running statistics (means ``N(0, 0.5^2)``, variances in
    ``[0.5, 2]``), so that folding them into the graph is tested."""
    rng = np.random.default_rng(seed)

    def draw(path, s):
        if "var" in jax.tree_util.keystr(path):
            return jax.device_put(rng.uniform(0.5, 2.0, s.shape).astype(np.float32))
        return jax.device_put(rng.normal(0.0, 0.5, s.shape).astype(np.float32))

    return jax.tree_util.tree_map_with_path(draw, net.state_shapes(in_shape))


def _round_trip(tmp_path, net, shape, batches=(2,), **save_kwargs):
    """Export ``net`` with random params and state; check onnxruntime against funcnet
    for each batch size; return the loaded ``onnx.ModelProto``."""
    params = _quick_params(net, shape)
    state = _quick_state(net, shape)
    path = fonnx.save_onnx(tmp_path / "net.onnx", net, params, shape, state=state, **save_kwargs)
    rng = np.random.default_rng(2)
    for n in batches:
        x = rng.normal(size=(n, *shape)).astype(np.float32)
        diff = fonnx.check_onnx(path, net, params, x, state=state, **TOL)
        assert diff <= 1e-4
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    return model


def _input_dims(model):
    dims = model.graph.input[0].type.tensor_type.shape.dim
    return [d.dim_param or d.dim_value for d in dims]


# ---------------------------------------------------------------------------------------
# The zoo
# ---------------------------------------------------------------------------------------


def test_lenet5_symbolic_batch(tmp_path):
    model = _round_trip(tmp_path, fn.models.lenet5(), (28, 28, 1), batches=(1, 5))
    assert _input_dims(model) == ["N", 28, 28, 1]
    assert [o.name for o in model.graph.output] == ["y"]
    assert model.opset_import[0].version == fonnx.DEFAULT_OPSET
    assert "MaxPool" in {node.op_type for node in model.graph.node}


def test_resnet18_folds_batchnorm_statistics(tmp_path):
    net = zoo_cnn.resnet(18, num_classes=3, input_shape=(16, 16, 3), stem="small")
    _round_trip(tmp_path, net, (16, 16, 3))
    # The statistics are in the file: default (trivial) ones give another output.
    params, state = _quick_params(net, (16, 16, 3)), _quick_state(net, (16, 16, 3))
    x = np.random.default_rng(3).normal(size=(2, 16, 16, 3))
    with pytest.raises(AssertionError, match="differs"):
        fonnx.check_onnx(tmp_path / "net.onnx", net, params, x, **TOL)
    fonnx.check_onnx(tmp_path / "net.onnx", net, params, x, state=state, **TOL)


ZOO_FAST = {
    "digits_cnn": (lambda: fn.models.digits_cnn(), (8, 8, 1)),
    "mlp": (lambda: fn.models.mlp([16, 8], 10), (4, 4, 1)),
    "vit": (lambda: zoo_vit.vit(3, image_size=8, patch=4, width=8, depth=1, heads=2), (8, 8, 3)),
}
ZOO_SLOW = {
    "alexnet_torchvision": (lambda: zoo_cnn.alexnet(5, variant="torchvision"), (63, 63, 3)),
    # groups=2 convolutions and LocalResponseNorm
    "alexnet_original": (lambda: zoo_cnn.alexnet(5, variant="original"), (63, 63, 3)),
    "vgg11": (lambda: zoo_cnn.vgg(11, 5), (32, 32, 3)),
    "vgg11_bn": (lambda: zoo_cnn.vgg(11, 5, batch_norm=True), (32, 32, 3)),
    # ceil-mode pools emulated by high-side padding
    "googlenet": (lambda: zoo_cnn.googlenet(5, input_shape=(32, 32, 3)), (32, 32, 3)),
    "resnet50": (lambda: zoo_cnn.resnet(50, 3, input_shape=(16, 16, 3), stem="small"), (16, 16, 3)),
}


@pytest.mark.parametrize("name", list(ZOO_FAST))
def test_zoo_small_networks(tmp_path, name):
    make, shape = ZOO_FAST[name]
    _round_trip(tmp_path, make(), shape)


@pytest.mark.slow  # the deeper networks take seconds each to convert
@pytest.mark.parametrize("name", list(ZOO_SLOW))
def test_zoo_deep_networks(tmp_path, name):
    make, shape = ZOO_SLOW[name]
    _round_trip(tmp_path, make(), shape)


@jax.custom_vjp
def _soft_sign(x):  # a custom_vjp call in the forward pass: the export inlines it
    return x / (1.0 + jnp.abs(x))


_soft_sign.defvjp(lambda x: (_soft_sign(x), x), lambda x, g: (g / (1.0 + jnp.abs(x)) ** 2,))

LAYERS = {
    "pools_same_padding": (fn.Serial([
        fn.MaxPool(3, stride=2, padding="SAME"),
        fn.AvgPool(3, stride=1, padding="SAME", count_include_pad=False),
        fn.AvgPool(2, padding="SAME"), fn.L2Pool(2, stride=1), fn.LpPool(2, stride=1, p=3.0),
    ]), (9, 9, 2)),
    "feature_pools": (fn.Serial([fn.FeatureMaxPool(2), fn.FeatureL2Pool(2)]), (3, 3, 8)),
    "conv_variants": (fn.Serial([
        fn.Conv(4, 3, stride=2, dilation=2, padding="SAME"), fn.Conv(4, 3, groups=2),
        fn.LocalResponseNorm(size=3), fn.LocallyConnected(3, 2), fn.GlobalAvgPool(),
    ]), (9, 9, 2)),
    "activations": (fn.Serial([
        fn.Flatten(), fn.Dense(6), fn.GELU(), fn.Dense(6), fn.GELU(approximate=True),
        fn.Sigmoid(), fn.Tanh(), fn.Activation(jax.nn.swish), fn.Activation(_soft_sign),
        fn.Dropout(0.5),
        fn.Parallel([fn.Dense(4), fn.Dense(4)], merge="sum"), fn.Softmax(), fn.LogSoftmax(),
    ]), (2, 3)),
}  # fmt: skip


@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_families(tmp_path, name):
    net, shape = LAYERS[name]
    _round_trip(tmp_path, net, shape)


def test_integer_ids_fixed_batch_and_opsets(tmp_path):
    net = fn.Serial([fn.Embedding(10, 4), fn.Flatten(), fn.Dense(3)])
    params = draw.params(net, (5,))
    ids = np.random.default_rng(0).integers(0, 10, size=(3, 5))
    for opset in (fonnx.MIN_OPSET, 23):
        path = fonnx.save_onnx(
            tmp_path / f"ids{opset}.onnx", net, params, (5,), batch=3, opset=opset
        )
        model = onnx.load(path)
        assert _input_dims(model) == [3, 5]
        assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.INT32
        assert model.opset_import[0].version == opset
        assert fonnx.check_onnx(path, net, params, ids, **TOL) <= 1e-5
    # Whole-number float ids are taken as the ids they are; fractions are refused, not
    # truncated.
    assert fonnx.check_onnx(path, net, params, ids.astype(np.float64), **TOL) <= 1e-5
    fractional = ids + np.where(np.arange(5) == 3, 0.5, 0.0)
    with pytest.raises(ValueError, match=r"onnx\.check_onnx: x must hold integer ids .*float64 "
                                         r"values that are not whole numbers, e\.g\. [\d.]+5 at "
                                         r"index \(0, 3\)"):  # fmt: skip
        fonnx.check_onnx(path, net, params, fractional, **TOL)
    with pytest.raises(ValueError, match=r"x must hold int32 ids, got values in \[0, 4294967296\]"):
        fonnx.check_onnx(path, net, params, np.where(ids == ids[0, 0], 2**32, ids), **TOL)
    # Another batch size than the fixed one: a clear error, not onnxruntime's.
    with pytest.raises(ValueError, match=r"onnx\.check_onnx: .*ids23\.onnx: the model takes x of "
                                         r"shape \(3, 5\) \(its batch size is fixed at 3\), got "
                                         r"x of shape \(2, 5\)"):  # fmt: skip
        fonnx.check_onnx(path, net, params, ids[:2], **TOL)


# ---------------------------------------------------------------------------------------
# Errors and atomic writes
# ---------------------------------------------------------------------------------------

SMALL = fn.Serial([fn.Flatten(), fn.Dense(3)])
SMALL_SHAPE = (2, 2)


@pytest.fixture(scope="module")
def small_params():
    return draw.params(SMALL, SMALL_SHAPE)


def test_missing_extra_names_it(tmp_path, monkeypatch, small_params):
    monkeypatch.setitem(sys.modules, "jax2onnx", None)  # import jax2onnx raises
    with pytest.raises(ImportError, match=r"jax2onnx.*pip install 'funcnet\[onnx\]'"):
        fonnx.save_onnx(tmp_path / "a.onnx", SMALL, small_params, SMALL_SHAPE)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ImportError, match=r"onnxruntime.*pip install 'funcnet\[onnx\]'"):
        fonnx.check_onnx(tmp_path / "a.onnx", SMALL, small_params, np.ones((1, 2, 2)))
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"path": 3}, TypeError, "path must be a str"),
    ({"path": "DIR"}, ValueError, "path .* is a directory"),
    ({"net": "lenet"}, TypeError, "net must be a funcnet layer"),
    ({"input_shape": (2, 0)}, ValueError, "input_shape must be a tuple of positive ints"),
    # the params were made for (2, 2): funcnet's own check names the layer
    ({"input_shape": (3, 3)}, ValueError, r"Dense\(3\): param 'w' has shape \(4, 3\), expected \(9, 3\)"),
    ({"batch": 0}, ValueError, "batch must be None .* or a positive int, got 0"),
    ({"batch": True}, ValueError, "batch must be .*, got True"),
    ({"batch": "dynamic"}, ValueError, "batch must be .*, got 'dynamic'"),
    ({"opset": 13}, ValueError, "opset must be an int from 17 to .*, got 13"),
    ({"opset": 99}, ValueError, "opset must be an int from 17 to .*, got 99"),
    ({"opset": "18"}, ValueError, "opset must be .*, got '18'"),
    ({"params": "nope"}, ValueError, "Serial: params must be a tuple"),
    ({"state": ({}, {"mean": np.zeros(3)})}, ValueError, r"Dense\(3\): expected state with keys \[\]"),
], ids=lambda v: v if isinstance(v, str) else None)  # fmt: skip
def test_bad_arguments_name_themselves(tmp_path, small_params, kwargs, error, match):
    args = {
        "path": tmp_path / "a.onnx",
        "net": SMALL,
        "params": small_params,
        "input_shape": SMALL_SHAPE,
    }
    args.update(kwargs)
    if args["path"] == "DIR":
        args["path"] = tmp_path
    with pytest.raises(error, match=match):
        fonnx.save_onnx(
            args.pop("path"), args.pop("net"), args.pop("params"), args.pop("input_shape"), **args
        )
    assert not os.path.exists(tmp_path / "a.onnx")


my_square_p = jcore.Primitive("my_square")  # a primitive jax2onnx has no plugin for
my_square_p.def_impl(lambda x: x * x)
my_square_p.def_abstract_eval(lambda x: jax.core.ShapedArray(x.shape, x.dtype))


@pytest.mark.parametrize("activation, reason", [
    (fn.Activation(my_square_p.bind), "No plugins registered for primitive 'my_square'"),
    (fn.Activation(lambda x: lax.reduce_window(x, 1.0, lax.mul, (1, 2, 2, 1), (1,) * 4,
                                               "SAME")),
     "reduce_window currently supports reducer jaxpr primitives: add/max/min"),
], ids=["custom_primitive", "reduce_window_mul"])  # fmt: skip
def test_unconvertible_layer_is_named_and_nothing_is_half_written(tmp_path, activation, reason):
    net = fn.Serial([fn.Conv(2, 1), activation, fn.Flatten(), fn.Dense(2)])
    params = draw.params(net, (4, 4, 1))
    target = tmp_path / "net.onnx"
    target.write_bytes(b"the previous export")
    with pytest.raises(NotImplementedError) as info:
        fonnx.save_onnx(target, net, params, (4, 4, 1))
    message = str(info.value)
    assert message.startswith("onnx.save_onnx: jax2onnx 0.17.1 cannot convert Serial")
    assert "(layer Activation(" in message and "at path (1,)" in message
    assert reason in message
    assert target.read_bytes() == b"the previous export"
    assert os.listdir(tmp_path) == ["net.onnx"]  # no temporary file left


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch, small_params):
    target = tmp_path / "net.onnx"
    fonnx.save_onnx(target, SMALL, small_params, SMALL_SHAPE)
    before = target.read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    other = draw.params(SMALL, SMALL_SHAPE, seed=1)
    with pytest.raises(OSError, match="disk full"):
        fonnx.save_onnx(target, SMALL, other, SMALL_SHAPE)
    assert target.read_bytes() == before
    assert os.listdir(tmp_path) == ["net.onnx"]


def test_save_leaves_the_root_logger_alone(tmp_path, monkeypatch, small_params):
    # jax2onnx calls logging.info, which would give an unconfigured root logger a handler.
    monkeypatch.setattr(logging.getLogger(), "handlers", [])
    fonnx.save_onnx(tmp_path / "net.onnx", SMALL, small_params, SMALL_SHAPE)
    assert logging.getLogger().handlers == []


def test_check_onnx_reports_a_mismatch(tmp_path, small_params):
    path = fonnx.save_onnx(tmp_path / "sub" / "net.onnx", SMALL, small_params, SMALL_SHAPE)
    x = np.random.default_rng(0).normal(size=(4, 2, 2))
    assert fonnx.check_onnx(path, SMALL, small_params, x) <= 1e-5
    other = draw.params(SMALL, SMALL_SHAPE, seed=1)
    with pytest.raises(AssertionError, match=r"differs from funcnet's by up to"):
        fonnx.check_onnx(path, SMALL, other, x)
    with pytest.raises(FileNotFoundError, match="no such ONNX file"):
        fonnx.check_onnx(tmp_path / "missing.onnx", SMALL, small_params, x)


def test_check_onnx_nans_at_the_same_places_match(tmp_path, small_params):
    path = fonnx.save_onnx(tmp_path / "net.onnx", SMALL, small_params, SMALL_SHAPE)
    x = np.random.default_rng(0).normal(size=(3, 2, 2))
    x[1, 0, 0] = np.nan  # a NaN input makes a whole row of Dense's output NaN, in both
    assert fonnx.check_onnx(path, SMALL, small_params, x) <= 1e-5  # a number, not NaN
    assert fonnx.check_onnx(path, SMALL, small_params, np.full((2, 2, 2), np.nan)) == 0.0
    # NaN where funcnet has a number is still a mismatch (another params: NaN only in one).
    nan_params = jax.tree_util.tree_map(np.asarray, small_params)
    nan_params[1]["b"] = nan_params[1]["b"].copy()
    nan_params[1]["b"][2] = np.nan
    with pytest.raises(AssertionError, match=r"onnxruntime's output has NaN at 0 places, "
                                             r"funcnet's at 3; they differ at 3 places \(first "
                                             r"at index \(0, 2\)"):  # fmt: skip
        fonnx.check_onnx(path, SMALL, nan_params, x[[0, 2]].repeat([1, 2], axis=0))


def test_check_onnx_names_the_expected_and_given_shape(tmp_path, small_params):
    path = fonnx.save_onnx(tmp_path / "net.onnx", SMALL, small_params, SMALL_SHAPE)
    with pytest.raises(ValueError, match=r"onnx\.check_onnx: .*net\.onnx: the model takes x of "
                                         r"shape \('N', 2, 2\), got x of shape \(2, 4\)"):  # fmt: skip
        fonnx.check_onnx(path, SMALL, small_params, np.ones((2, 4)))


def test_save_gives_the_permissions_open_would(tmp_path, small_params):
    old = os.umask(0o027)
    try:
        path = fonnx.save_onnx(tmp_path / "net.onnx", SMALL, small_params, SMALL_SHAPE)
    finally:
        os.umask(old)
    assert oct(os.stat(path).st_mode & 0o777) == oct(0o640)
