"""Bad input to the layers, ops, losses, regularizers, ``vjp``, ``gradcheck`` and ``summary``
gets a clear ``ValueError`` / ``TypeError`` naming the culprit, raised before any work.

One table, one row per bad call: ``(id, call, exception type, regex)``; the regex names
the layer or argument and, where there is one, the given value. Every row fails before
anything is compiled, so the whole table runs in seconds. A second, short table lists
inputs that must keep working (soft labels, raw PRNG keys, float16 images, ...), so the
checks do not overshoot. The defects that needed more than a row (BCE's gradient at 0
and 1, the parameter limit, gradcheck in float32) have tests of their own below.
"""

from __future__ import annotations

import contextlib
import functools

import draw
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import funcnet as fn
from funcnet import gradcheck, ops, vjp
from funcnet.nn import base

KEY = jax.random.key(0)
X2 = jnp.ones((2, 4))  # a batch of 2 examples of 4 features
X4 = jnp.ones((2, 6, 6, 3))  # a batch of 2 NHWC images
X5 = jnp.ones((5,))  # rank 1: 5 examples with no feature axis


@functools.cache
def _params(layer: fn.Layer, shape: tuple) -> dict:
    return draw.params(layer, shape)  # arbitrary values: no init program to compile


def _dense() -> dict:
    return _params(fn.Dense(2), (4,))


def _with(params: dict, **changes) -> dict:
    return {**params, **changes}


def _drop(params: dict, name: str) -> dict:
    return {k: v for k, v in params.items() if k != name}


def _complex(params: dict) -> dict:
    return {k: v.astype(jnp.complex64) for k, v in params.items()}


@contextlib.contextmanager
def _param_limit(n):
    previous = base.set_param_limit(n)
    try:
        yield
    finally:
        base.set_param_limit(previous)


def _limited(n, call):
    def run():
        with _param_limit(n):
            return call()

    return run


def _sq(p):
    return jnp.sum(p * p)


def _vg(net=None, loss=fn.losses.quadratic, **kwargs):
    return vjp.value_and_grad(fn.Dense(2) if net is None else net, loss, **kwargs)


P_ARR = jnp.array([0.2, 0.7])
T_ARR = jnp.array([0.0, 1.0])
Y2 = jnp.ones((2, 2))

# fmt: off
BAD = [
    # -- #10 (already fixed): construction ------------------------------------------------
    ("Dense-use_bias-string", lambda: fn.Dense(3, use_bias="False"), TypeError, r"Dense: use_bias must be True or False, got 'False'"),
    ("Softmax-axis-minus2-is-batch", lambda: fn.Softmax(axis=-2).output_shape((5,)), ValueError, r"Softmax\(axis=-2\): axis -2 is not a feature axis.*batch"),
    ("LogSoftmax-axis-0-is-batch", lambda: fn.LogSoftmax(axis=0).output_shape((5,)), ValueError, r"LogSoftmax\(axis=0\): axis 0 is not a feature axis"),
    ("Softmax-apply-axis-minus3", lambda: fn.Softmax(axis=-3).apply({}, jnp.ones((2, 3, 4))), ValueError, r"Softmax\(axis=-3\): axis -3 is not a feature axis"),
    ("MaxPool-padding-2-window-2", lambda: fn.MaxPool(2, padding=2), ValueError, r"MaxPool: padding \(\(2, 2\), \(2, 2\)\) must be smaller than the window \(2, 2\)"),
    ("AvgPool-padding-high-3", lambda: fn.AvgPool(3, padding=((0, 3), (0, 0))), ValueError, r"AvgPool: padding .* must be smaller than the window \(3, 3\)"),
    ("L2Pool-padding-5", lambda: fn.L2Pool((2, 3), padding=5), ValueError, r"L2Pool: padding .* smaller than the window \(2, 3\)"),
    # -- construction of every family -------------------------------------------------------
    ("Dense-features-0", lambda: fn.Dense(0), ValueError, r"Dense: features must be a positive int, got 0"),
    ("Dense-features-True", lambda: fn.Dense(True), TypeError, r"Dense: features must be a positive int, got True"),
    ("Dense-param_dtype-int", lambda: fn.Dense(3, param_dtype=jnp.int32), TypeError, r"Dense: param_dtype must be a floating dtype"),
    ("Conv-groups-0", lambda: fn.Conv(4, 3, groups=0), ValueError, r"Conv: groups must be a positive int, got 0"),
    ("Conv-features-not-divisible-by-groups", lambda: fn.Conv(3, 3, groups=2), ValueError, r"Conv: features=3 is not divisible by groups=2"),
    ("Conv-kernel-3d", lambda: fn.Conv(4, (3, 3, 3)), ValueError, r"Conv: kernel_size must be an int or a sequence of 2"),
    ("LocallyConnected-stride-0", lambda: fn.LocallyConnected(2, 3, stride=0), ValueError, r"LocallyConnected: stride must be a positive int, got 0"),
    ("AvgPool-count_include_pad-string", lambda: fn.AvgPool(2, count_include_pad="no"), TypeError, r"AvgPool: count_include_pad must be True or False, got 'no'"),
    ("LpPool-p-half", lambda: fn.LpPool(2, p=0.5), ValueError, r"LpPool: p must be a finite number >= 1, got 0.5"),
    ("FeatureMaxPool-group-0", lambda: fn.FeatureMaxPool(0), ValueError, r"FeatureMaxPool: group_size must be a positive int, got 0"),
    ("Softmax-axis-string", lambda: fn.Softmax(axis="last"), TypeError, r"Softmax: axis must be an int, got 'last'"),
    ("Activation-not-callable", lambda: fn.Activation("relu"), TypeError, r"Activation: fn must be callable, got 'relu'"),
    ("Reshape-zero", lambda: fn.Reshape((0, 2)), TypeError, r"Reshape: shape must be a tuple of positive ints.*\(0, 2\)"),
    ("Reshape-two-minus-ones", lambda: fn.Reshape((-1, -1)), TypeError, r"Reshape: shape must be .*at most one -1.*\(-1, -1\)"),
    ("Dropout-rate-1.5", lambda: fn.Dropout(1.5), ValueError, r"Dropout: rate must be .*1\.5"),
    ("Dropout-rate-string", lambda: fn.Dropout("0.5"), TypeError, r"Dropout: rate must be a float in \[0, 1\), got '0.5'"),
    ("Embedding-num-0", lambda: fn.Embedding(0, 3), ValueError, r"Embedding: num_embeddings must be a positive int, got 0"),
    ("BatchNorm-momentum-2", lambda: fn.BatchNorm(momentum=2.0), ValueError, r"BatchNorm: momentum must be a number in \[0, 1\], got 2\.0"),
    ("LayerNorm-epsilon-0", lambda: fn.LayerNorm(epsilon=0.0), ValueError, r"LayerNorm: epsilon must be a positive number, got 0\.0"),
    ("LocalResponseNorm-size-0", lambda: fn.LocalResponseNorm(size=0), ValueError, r"LocalResponseNorm: size must be a positive int, got 0"),
    ("Serial-not-a-list", lambda: fn.Serial(fn.Dense(3)), TypeError, r"Serial: layers must be a list or tuple of layers"),
    ("Serial-class-not-instance", lambda: fn.Serial([fn.ReLU]), TypeError, r"Serial: layers\[0\] is not a funcnet layer.*instead of an instance"),
    ("Parallel-empty", lambda: fn.Parallel([]), ValueError, r"Parallel: needs at least one branch"),
    ("Parallel-merge-max", lambda: fn.Parallel([fn.Dense(2)], merge="max"), ValueError, r"Parallel: merge must be one of \('concat', 'sum'\), got 'max'"),
    ("Residual-body-string", lambda: fn.Residual("dense"), TypeError, r"Residual: body is not a funcnet layer: 'dense'"),
    # -- #4: input_shape () and a rank-1 batch x (N,) ---------------------------------------
    ("Dense-output_shape-()", lambda: fn.Dense(3).output_shape(()), ValueError, r"Dense\(3\): expected an input with a feature axis.*got input_shape \(\)"),
    ("Dense-param_specs-()", lambda: fn.Dense(3).param_specs(()), ValueError, r"Dense\(3\): expected an input with a feature axis"),
    ("Dense-init-()", lambda: fn.Dense(3).init(KEY, ()), ValueError, r"Dense\(3\): expected an input with a feature axis"),
    ("Dense-flops-()", lambda: fn.Dense(3).flops(()), ValueError, r"Dense\(3\): expected an input with a feature axis"),
    ("Dense-apply-x-(5,)", lambda: fn.Dense(2).apply(_dense(), X5), ValueError, r"Dense\(2\): .*feature axis.*x of shape \(N,\)"),
    ("Conv-apply-x-(5,)", lambda: fn.Conv(2, 3).apply({}, X5), ValueError, r"Conv\(2, \(3, 3\)\): expected input_shape of rank 3.*got shape \(\)"),
    ("Conv-output_shape-()", lambda: fn.Conv(2, 3).output_shape(()), ValueError, r"Conv\(2, \(3, 3\)\): expected input_shape of rank 3"),
    ("LocallyConnected-init-()", lambda: fn.LocallyConnected(2, 3).init(KEY, ()), ValueError, r"LocallyConnected\(2, \(3, 3\)\): expected input_shape of rank 3"),
    ("MaxPool-apply-x-(5,)", lambda: fn.MaxPool(2).apply({}, X5), ValueError, r"MaxPool\(\(2, 2\)\): expected input_shape of rank 3"),
    ("AvgPool-output_shape-()", lambda: fn.AvgPool(2).output_shape(()), ValueError, r"AvgPool\(\(2, 2\)\): expected input_shape of rank 3"),
    ("GlobalAvgPool-()", lambda: fn.GlobalAvgPool().output_shape(()), ValueError, r"GlobalAvgPool\(\): expected an input shape \(\.\.\., C\) with spatial axes.*got \(\)"),
    ("FeatureMaxPool-apply-x-(5,)", lambda: fn.FeatureMaxPool(2).apply({}, X5), ValueError, r"FeatureMaxPool\(2\): expected an input with a feature axis"),
    ("FeatureL2Pool-output_shape-()", lambda: fn.FeatureL2Pool(2).output_shape(()), ValueError, r"FeatureL2Pool\(2\): expected an input with a feature axis"),
    ("Softmax-apply-x-(5,)", lambda: fn.Softmax().apply({}, X5), ValueError, r"Softmax\(\): expected an input with a feature axis"),
    ("LogSoftmax-output_shape-()", lambda: fn.LogSoftmax().output_shape(()), ValueError, r"LogSoftmax\(\): expected an input with a feature axis"),
    ("Flatten-apply-x-(5,)", lambda: fn.Flatten().apply({}, X5), ValueError, r"Flatten\(\): expected an input with a feature axis.*x\.reshape\(N, 1\)"),
    ("Flatten-output_shape-()", lambda: fn.Flatten().output_shape(()), ValueError, r"Flatten\(\): expected an input with a feature axis"),
    ("Serial-apply-x-(5,)", lambda: fn.Serial([fn.Dense(2)]).apply((_dense(),), X5), ValueError, r"Serial layer 0: Dense\(2\): expected an input with a feature axis"),
    ("Serial-init-()", lambda: fn.Serial([fn.ReLU(), fn.Dense(2)]).init(KEY, ()), ValueError, r"Serial layer 1: Dense\(2\): expected an input with a feature axis"),
    ("Parallel-output_shape-()", lambda: fn.Parallel([fn.Dense(2)]).output_shape(()), ValueError, r"Parallel branch 0: Dense\(2\): expected an input with a feature axis"),
    ("Residual-init-()", lambda: fn.Residual(fn.Dense(2)).init(KEY, ()), ValueError, r"Residual body: Dense\(2\): expected an input with a feature axis"),
    ("BatchNorm-init-()", lambda: fn.BatchNorm().init(KEY, ()), ValueError, r"BatchNorm\(\): expected an input shape \(\.\.\., C\) of rank >= 1.*got \(\)"),
    ("LayerNorm-output_shape-()", lambda: fn.LayerNorm().output_shape(()), ValueError, r"LayerNorm\(\): expected an input shape \(\.\.\., C\)"),
    ("LocalResponseNorm-()", lambda: fn.LocalResponseNorm().output_shape(()), ValueError, r"LocalResponseNorm\(\): expected an input shape"),
    ("summary-Dense-()", lambda: fn.summary(fn.Dense(3), ()), ValueError, r"Dense\(3\): expected an input with a feature axis"),
    ("param_count-Dense-()", lambda: fn.param_count(fn.Dense(3), ()), ValueError, r"Dense\(3\): expected an input with a feature axis"),
    ("Dense-input_shape-0", lambda: fn.Dense(3).init(KEY, (0,)), ValueError, r"Dense\(3\): input_shape must be a tuple of positive ints.*\(0,\)"),
    ("Dense-input_shape-None", lambda: fn.Dense(3).init(KEY, None), TypeError, r"Dense\(3\): input_shape must be a tuple of positive ints.*None"),
    # -- bad x --------------------------------------------------------------------------------
    ("Dense-apply-x-string", lambda: fn.Dense(2).apply(_dense(), "abc"), TypeError, r"Dense\(2\): input x must be an array of numbers, got str 'abc'"),
    ("Dense-apply-x-None", lambda: fn.Dense(2).apply(_dense(), None), TypeError, r"Dense\(2\): input x must be an array of numbers, got NoneType None"),
    ("Dense-apply-x-int", lambda: fn.Dense(2).apply(_dense(), jnp.ones((2, 4), jnp.int32)), TypeError, r"Dense\(2\): input x must have a floating dtype.*int32"),
    ("Dense-apply-x-complex", lambda: fn.Dense(2).apply(_dense(), X2.astype(jnp.complex64)), TypeError, r"Dense\(2\): input x must have a floating dtype.*complex64"),
    ("Dense-apply-x-scalar", lambda: fn.Dense(2).apply(_dense(), 1.0), ValueError, r"Dense\(2\): expected a batched input \(N, \.\.\.\), got a scalar"),
    ("Dense-apply-x-wrong-features", lambda: fn.Dense(2).apply(_dense(), jnp.ones((2, 5))), ValueError, r"Dense\(2\): param 'w' has shape \(4, 2\), expected \(5, 2\)"),
    ("Conv-apply-x-unbatched", lambda: fn.Conv(2, 3).apply({}, jnp.ones((6, 6, 3))), ValueError, r"Conv\(2, \(3, 3\)\): expected input_shape of rank 3.*got shape \(6, 3\)"),
    ("Embedding-float-ids", lambda: fn.Embedding(3, 2).apply(_params(fn.Embedding(3, 2), ()), X2), TypeError, r"Embedding\(3, 2\): input ids must have an integer dtype.*float32"),
    ("Embedding-ids-out-of-range", lambda: fn.Embedding(3, 2).apply(_params(fn.Embedding(3, 2), ()), jnp.array([0, 5])), ValueError, r"Embedding\(3, 2\): ids must lie in \[0, 3\), got values in \[0, 5\]"),
    ("Dropout-train-without-key", lambda: fn.Dropout(0.5).apply({}, X2, train=True), ValueError, r"Dropout\(0\.5\): training mode \(train=True\) needs a PRNG key"),
    ("apply-train-string", lambda: fn.Dense(2).apply(_dense(), X2, train="no"), TypeError, r"Dense\(2\): train must be a Python bool, got 'no'"),
    ("BatchNorm-apply-has-state", lambda: fn.BatchNorm().apply(_params(fn.BatchNorm(), (4,)), X2), ValueError, r"BatchNorm\(\): this network carries state.*apply_with_state"),
    # -- #3: params of the wrong kind; #7: of the wrong names --------------------------------
    ("Dense-params-complex", lambda: fn.Dense(2).apply(_complex(_dense()), X2), TypeError, r"Dense\(2\): param '[bw]' must have a real floating dtype \(e\.g\. float32\), got complex64"),
    ("Dense-params-int", lambda: fn.Dense(2).apply(_with(_dense(), b=jnp.zeros(2, jnp.int32)), X2), TypeError, r"Dense\(2\): param 'b' must have a real floating dtype.*int32"),
    ("Dense-params-lists", lambda: fn.Dense(1).apply({"w": [[1.0]], "b": [0.0]}, jnp.ones((2, 1))), TypeError, r"Dense\(1\): param '[bw]' must be an array of shape .*got list.*jnp\.asarray"),
    ("Dense-param-None", lambda: fn.Dense(2).apply(_with(_dense(), w=None), X2), TypeError, r"Dense\(2\): param 'w' must be an array of shape \(4, 2\), got NoneType None"),
    ("Dense-param-string", lambda: fn.Dense(2).apply(_with(_dense(), w="w"), X2), TypeError, r"Dense\(2\): param 'w' must be an array of shape \(4, 2\), got str 'w'"),
    ("Dense-params-W-not-w", lambda: fn.Dense(2).apply({"W": _dense()["w"], "b": _dense()["b"]}, X2), ValueError, r"Dense\(2\): expected params with keys \['b', 'w'\], got \['W', 'b'\]"),
    ("Dense-params-missing-b", lambda: fn.Dense(2).apply(_drop(_dense(), "b"), X2), ValueError, r"Dense\(2\): expected params with keys \['b', 'w'\], got \['w'\]"),
    ("Dense-no-bias-given-b", lambda: fn.Dense(2, use_bias=False).apply(_dense(), X2), ValueError, r"Dense\(2, use_bias=False\): expected params with keys \['w'\], got \['b', 'w'\]"),
    ("Dense-params-extra-key", lambda: fn.Dense(2).apply(_with(_dense(), c=1.0), X2), ValueError, r"Dense\(2\): expected params with keys \['b', 'w'\], got \['b', 'c', 'w'\]"),
    ("Dense-params-tuple", lambda: fn.Dense(2).apply((_dense()["w"], _dense()["b"]), X2), ValueError, r"Dense\(2\): params do not have the expected structure"),
    ("Dense-params-None", lambda: fn.Dense(2).apply(None, X2), ValueError, r"Dense\(2\): params do not have the expected structure.*None"),
    ("Conv-params-complex", lambda: fn.Conv(2, 3).apply(_complex(_params(fn.Conv(2, 3), (6, 6, 3))), X4), TypeError, r"Conv\(2, \(3, 3\)\): param '[bw]' must have a real floating dtype.*complex64"),
    ("Conv-params-wrong-channels", lambda: fn.Conv(2, 3).apply(_params(fn.Conv(2, 3), (6, 6, 1)), X4), ValueError, r"Conv\(2, \(3, 3\)\): param 'w' has shape \(3, 3, 1, 2\), expected \(3, 3, 3, 2\)"),
    ("Embedding-table-complex", lambda: fn.Embedding(3, 2).apply({"w": jnp.ones((3, 2), jnp.complex64)}, jnp.array([0, 1])), TypeError, r"Embedding\(3, 2\): param 'w' must have a real floating dtype.*complex64"),
    ("BatchNorm-scale-int", lambda: fn.BatchNorm().apply_with_state(_with(_params(fn.BatchNorm(), (4,)), scale=jnp.ones(4, jnp.int32)), None, X2), TypeError, r"BatchNorm\(\): param 'scale' must have a real floating dtype.*int32"),
    ("LayerNorm-bias-complex", lambda: fn.LayerNorm().apply(_with(_params(fn.LayerNorm(), (4,)), bias=jnp.zeros(4, jnp.complex64)), X2), TypeError, r"LayerNorm\(\): param 'bias' must have a real floating dtype.*complex64"),
    ("Serial-params-dict", lambda: fn.Serial([fn.Dense(2)]).apply(_dense(), X2), ValueError, r"Serial: params must be a tuple with one entry per layer \(1\), got dict"),
    ("Serial-params-short", lambda: fn.Serial([fn.Dense(2), fn.ReLU()]).apply((_dense(),), X2), ValueError, r"Serial: params must be a tuple with one entry per layer \(2\), got tuple of length 1"),
    ("Serial-inner-complex", lambda: fn.Serial([fn.Dense(2)]).apply((_complex(_dense()),), X2), TypeError, r"Serial layer 0: Dense\(2\): param '[bw]' must have a real floating dtype"),
    ("Parallel-inner-W", lambda: fn.Parallel([fn.Dense(2)]).apply(({"W": _dense()["w"], "b": _dense()["b"]},), X2), ValueError, r"Parallel branch 0: Dense\(2\): expected params with keys \['b', 'w'\], got \['W', 'b'\]"),
    ("Residual-params-dict", lambda: fn.Residual(fn.ReLU()).apply({}, X2), ValueError, r"Residual: params must be a tuple with one entry per part \(body, shortcut\) \(2\), got dict"),
    # -- #5: keys that are not PRNG keys ----------------------------------------------------
    ("Dense-init-key-int", lambda: fn.Dense(2).init(0, (4,)), TypeError, r"Dense\(2\)\.init: key must be a JAX PRNG key.*got int 0"),
    ("Dense-init-key-float", lambda: fn.Dense(2).init(1.5, (4,)), TypeError, r"Dense\(2\)\.init: key must be a JAX PRNG key.*got float 1\.5"),
    ("Dense-init-key-string", lambda: fn.Dense(2).init("seed", (4,)), TypeError, r"Dense\(2\)\.init: key must be a JAX PRNG key.*got str 'seed'"),
    ("Dense-init-key-numpy", lambda: fn.Dense(2).init(np.zeros(2, np.uint32), (4,)), TypeError, r"Dense\(2\)\.init: key must be a JAX PRNG key.*got ndarray"),
    ("Dense-init-key-None", lambda: fn.Dense(2).init(None, (4,)), TypeError, r"Dense\(2\)\.init: key must be a JAX PRNG key.*got NoneType None"),
    ("Dense-init-many-keys", lambda: fn.Dense(2).init(jax.random.split(KEY, 3), (4,)), TypeError, r"Dense\(2\)\.init: key must be .*an array of 3 keys \(shape \(3,\)\)"),
    ("Dense-init-key-uint32-(3,)", lambda: fn.Dense(2).init(jnp.zeros(3, jnp.uint32), (4,)), TypeError, r"Dense\(2\)\.init: key must be .*dtype uint32 and shape \(3,\)"),
    ("Conv-init-key-int", lambda: fn.Conv(2, 3).init(7, (6, 6, 3)), TypeError, r"Conv\(2, \(3, 3\)\)\.init: key must be a JAX PRNG key.*got int 7"),
    ("ReLU-init-key-int", lambda: fn.ReLU().init(7, (4,)), TypeError, r"ReLU\(\)\.init: key must be a JAX PRNG key.*got int 7"),
    ("BatchNorm-init-key-int", lambda: fn.BatchNorm().init(1, (4,)), TypeError, r"BatchNorm\(\)\.init: key must be a JAX PRNG key.*got int 1"),
    ("Embedding-init-key-float", lambda: fn.Embedding(3, 2).init(0.0, ()), TypeError, r"Embedding\(3, 2\)\.init: key must be a JAX PRNG key.*got float 0\.0"),
    ("Dropout-init-key-string", lambda: fn.Dropout(0.5).init("k", (4,)), TypeError, r"Dropout\(0\.5\)\.init: key must be a JAX PRNG key.*got str 'k'"),
    ("Serial-init-key-int", lambda: fn.Serial([fn.Dense(2)]).init(3, (4,)), TypeError, r"Serial\.init: key must be a JAX PRNG key.*got int 3"),
    ("Parallel-init-key-string", lambda: fn.Parallel([fn.Dense(2)]).init("k", (4,)), TypeError, r"Parallel\.init: key must be a JAX PRNG key.*got str 'k'"),
    ("Residual-init-key-numpy", lambda: fn.Residual(fn.Dense(4)).init(np.array([0, 1], np.uint32), (4,)), TypeError, r"Residual\.init: key must be a JAX PRNG key.*got ndarray"),
    ("Dense-apply-key-int", lambda: fn.Dense(2).apply(_dense(), X2, key=3), TypeError, r"Dense\(2\): key must be a JAX PRNG key .* or None, got int 3"),
    ("Dropout-apply-key-numpy", lambda: fn.Dropout(0.5).apply({}, X2, key=np.zeros(2, np.uint32), train=True), TypeError, r"Dropout\(0\.5\): key must be a JAX PRNG key .*got ndarray"),
    ("Dropout-apply-many-keys", lambda: fn.Dropout(0.5).apply({}, X2, key=jax.random.split(KEY, 2), train=True), TypeError, r"Dropout\(0\.5\): key must be .*an array of 2 keys"),
    # -- #6: the parameter limit (counted from shapes, nothing allocated) -------------------
    ("Dense-40000-on-40000-default-limit", lambda: fn.Dense(40000).init(KEY, (40000,)), ValueError, r"Dense\(40000\) on input \(40000,\) would create 1,600,040,000 parameters \(6\.4 GB in float32\), more than funcnet\.nn\.base\.PARAM_LIMIT = 500,000,000.*set_param_limit\(n\)"),
    ("Conv-over-small-limit", _limited(100, lambda: fn.Conv(16, 3).init(KEY, (8, 8, 3))), ValueError, r"Conv\(16, \(3, 3\)\) on input \(8, 8, 3\) would create 448 parameters .*PARAM_LIMIT = 100"),
    ("Serial-total-over-small-limit", _limited(50, lambda: fn.Serial([fn.Dense(5), fn.Dense(5)]).init(KEY, (4,))), ValueError, r"Serial on input \(4,\) would create 55 parameters .*PARAM_LIMIT = 50"),
    ("Embedding-over-small-limit", _limited(10, lambda: fn.Embedding(100, 8).init(KEY, ())), ValueError, r"Embedding\(100, 8\) on input \(\) would create 800 parameters"),
    ("set_param_limit-0", lambda: base.set_param_limit(0), ValueError, r"set_param_limit: n must be a positive int, got 0"),
    ("set_param_limit-string", lambda: base.set_param_limit("1e9"), TypeError, r"set_param_limit: n must be a positive int, got '1e9'"),
    # -- ops ------------------------------------------------------------------------------------
    ("dense-x-complex", lambda: ops.dense(X2.astype(jnp.complex64), jnp.ones((4, 2))), TypeError, r"dense: input x must have a real \(integer or floating\) dtype, got complex64"),
    ("dense-w-string", lambda: ops.dense(X2, "w"), TypeError, r"dense: weights w must be an array of numbers, got str 'w'"),
    ("dense-w-rank-1", lambda: ops.dense(X2, jnp.ones(4)), ValueError, r"dense: expected weights w of rank 2 \(in, out\), got shape \(4,\)"),
    ("dense-b-wrong", lambda: ops.dense(X2, jnp.ones((4, 3)), jnp.ones(2)), ValueError, r"dense: expected bias b of shape \(3,\), got \(2,\)"),
    ("dense-features-mismatch", lambda: ops.dense(X2, jnp.ones((5, 3))), ValueError, r"dense: input x has 4 features.*w expects 5"),
    ("conv2d-w-complex", lambda: ops.conv2d(X4, jnp.ones((3, 3, 3, 2), jnp.complex64)), TypeError, r"conv2d: kernel w must have a real \(integer or floating\) dtype, got complex64"),
    ("conv2d-x-unbatched", lambda: ops.conv2d(jnp.ones((6, 6, 3)), jnp.ones((3, 3, 3, 2))), ValueError, r"conv2d: expected input x of rank 4 \(N, H, W, C\), got shape \(6, 6, 3\)"),
    ("conv2d-x-None", lambda: ops.conv2d(None, jnp.ones((3, 3, 3, 2))), TypeError, r"conv2d: input x must be an array of numbers, got NoneType None"),
    ("conv2d-kernel-empty", lambda: ops.conv2d(X4, jnp.ones((0, 3, 3, 2))), ValueError, r"conv2d: kernel w must have no empty axis .* got shape \(0, 3, 3, 2\)"),
    ("conv2d-groups-0", lambda: ops.conv2d(X4, jnp.ones((3, 3, 3, 2)), groups=0), ValueError, r"conv2d: groups must be a positive int, got 0"),
    ("locally_connected2d-rank", lambda: ops.locally_connected2d(X2, jnp.ones((1, 1, 1, 1, 1, 1))), ValueError, r"locally_connected2d: expected input x of rank 4"),
    ("extract_patches-string", lambda: ops.extract_patches("img", 2, 1, "VALID"), TypeError, r"extract_patches: input x must be an array of numbers, got str 'img'"),
    ("max_pool-padding-3-window-2", lambda: ops.max_pool(X4, 2, padding=3), ValueError, r"max_pool: padding \(\(3, 3\), \(3, 3\)\) must be smaller than the window \(2, 2\)"),
    ("avg_pool-padding-2-window-2", lambda: ops.avg_pool(X4, 2, padding=(2, 0)), ValueError, r"avg_pool: padding \(\(2, 2\), \(0, 0\)\) must be smaller than the window \(2, 2\)"),
    ("avg_pool-count_include_pad-string", lambda: ops.avg_pool(X4, 2, count_include_pad="no"), TypeError, r"avg_pool: count_include_pad must be True or False, got 'no'"),
    ("sum_pool-int", lambda: ops.sum_pool(jnp.ones((1, 4, 4, 1), jnp.int32), 2), TypeError, r"sum_pool: input x must have a floating dtype.*int32"),
    ("lp_pool-p-nan", lambda: ops.lp_pool(X4, float("nan"), 2), ValueError, r"lp_pool: p must be a finite number >= 1, got nan"),
    ("lp_pool-p-jax-array", lambda: ops.lp_pool(X4, jnp.float32(3), 2), TypeError, r"lp_pool: p must be a Python or NumPy number \(a static hyper-parameter\), got a jax array of dtype float32 and shape \(\)"),
    ("dropout-rate-jax-array", lambda: ops.dropout(X2, X2 > 0, jnp.float32(0.5)), TypeError, r"dropout: rate must be a Python or NumPy number .* got a jax array of dtype float32"),
    ("l2_pool-window-bigger-than-input", lambda: ops.l2_pool(X4, 7), ValueError, r"lp_pool: window \(7, 7\) \(after dilation\) is larger than the padded input \(6, 6\)"),
    ("global_avg_pool-rank-2", lambda: ops.global_avg_pool(X2), ValueError, r"global_avg_pool: expected an input \(N, \.\.\., C\) with spatial axes, got shape \(2, 4\)"),
    ("feature_max_pool-not-divisible", lambda: ops.feature_max_pool(jnp.ones((2, 5)), 2), ValueError, r"feature_max_pool: the number of features \(last axis\) 5 is not divisible by group_size 2"),
    ("feature_l2_pool-scalar", lambda: ops.feature_l2_pool(jnp.ones(()), 2), ValueError, r"feature_l2_pool: expected an input with a feature axis, got a scalar"),
    ("softmax-axis-5", lambda: ops.softmax(X2, axis=5), ValueError, r"softmax: axis 5 is out of range for an input of shape \(2, 4\)"),
    ("softmax-axis-string", lambda: ops.softmax(X2, axis="a"), TypeError, r"softmax: axis must be an int, got 'a'"),
    ("log_softmax-axis-float", lambda: ops.log_softmax(X2, axis=1.0), TypeError, r"log_softmax: axis must be an int, got 1\.0"),
    ("softmax-int", lambda: ops.softmax(jnp.ones((2, 3), jnp.int32)), TypeError, r"softmax: input x must have a floating dtype.*int32"),
    ("sigmoid-int", lambda: ops.sigmoid(jnp.ones(3, jnp.int32)), TypeError, r"sigmoid: input x must have a floating dtype.*int32"),
    ("tanh-string", lambda: ops.tanh("x"), TypeError, r"tanh: input x must be an array of numbers, got str 'x'"),
    ("relu-None", lambda: ops.relu(None), TypeError, r"relu: input x must be an array of numbers, got NoneType None"),
    ("flatten-scalar", lambda: ops.flatten(jnp.ones(())), ValueError, r"flatten: expected a batched input x \(N, \.\.\.\), got a scalar"),
    ("reshape-wrong-size", lambda: ops.reshape(X2, (3,)), ValueError, r"reshape: cannot reshape an input of shape \(4,\) \(4 elements\) to \(3,\)"),
    ("reshape-shape-string", lambda: ops.reshape(X2, "2x2"), TypeError, r"reshape: shape must be a tuple of positive ints.*'2x2'"),
    ("Reshape-layer-wrong-size", lambda: fn.Reshape((3,)).output_shape((4,)), ValueError, r"Reshape\(\(3,\)\): cannot reshape an input of shape \(4,\) \(4 elements\) to \(3,\)"),
    # -- #1 / #2: losses ----------------------------------------------------------------------
    ("bce-p-above-1", lambda: fn.losses.binary_cross_entropy(jnp.array([0.5, 1.5]), T_ARR), ValueError, r"binary_cross_entropy: p \(probabilities; for logits use binary_cross_entropy_with_logits\) must lie in \[0, 1\], got values in \[0\.5, 1\.5\]"),
    ("bce-p-negative", lambda: fn.losses.binary_cross_entropy(jnp.array([-0.25, 0.5]), T_ARR), ValueError, r"binary_cross_entropy: p .*must lie in \[0, 1\], got values in \[-0\.25, 0\.5\]"),
    ("bce-logits-given-as-p", lambda: fn.losses.binary_cross_entropy(jnp.array([[3.0, -2.0]]), jnp.array([[1.0, 0.0]])), ValueError, r"binary_cross_entropy: p .*binary_cross_entropy_with_logits.*\[-2, 3\]"),
    ("bce-target-2", lambda: fn.losses.binary_cross_entropy(P_ARR, jnp.array([0.0, 2.0])), ValueError, r"binary_cross_entropy: target must lie in \[0, 1\], got values in \[0, 2\]"),
    ("bce-target-minus-1", lambda: fn.losses.binary_cross_entropy(P_ARR, jnp.array([-1, 1])), ValueError, r"binary_cross_entropy: target must lie in \[0, 1\], got values in \[-1, 1\]"),
    ("bce-shape-mismatch", lambda: fn.losses.binary_cross_entropy(P_ARR, jnp.ones(3)), ValueError, r"binary_cross_entropy: p and target must have the same shape, got \(2,\) and \(3,\)"),
    ("bce-complex", lambda: fn.losses.binary_cross_entropy(P_ARR.astype(jnp.complex64), T_ARR), TypeError, r"binary_cross_entropy: p must have a real .*dtype, got complex64"),
    ("bce_logits-target-minus-1", lambda: fn.losses.binary_cross_entropy_with_logits(P_ARR, jnp.array([-1.0, 1.0])), ValueError, r"binary_cross_entropy_with_logits: target must lie in \[0, 1\], got values in \[-1, 1\]"),
    ("bce_logits-target-1.5", lambda: fn.losses.binary_cross_entropy_with_logits(P_ARR, jnp.array([0.0, 1.5])), ValueError, r"binary_cross_entropy_with_logits: target must lie in \[0, 1\], got values in \[0, 1\.5\]"),
    ("quadratic-shape-mismatch", lambda: fn.losses.quadratic(jnp.ones(3), jnp.ones(4)), ValueError, r"quadratic: y and target must have the same shape, got \(3,\) and \(4,\)"),
    ("quadratic-complex", lambda: fn.losses.quadratic(jnp.ones(3, jnp.complex64), jnp.ones(3)), TypeError, r"quadratic: y must have a real \(integer or floating\) dtype, got complex64"),
    ("quadratic-target-string", lambda: fn.losses.quadratic(jnp.ones(3), "t"), TypeError, r"quadratic: target must be an array of numbers, got str 't'"),
    ("sce-int-logits", lambda: fn.losses.softmax_cross_entropy(jnp.ones((2, 3), jnp.int32), jnp.array([0, 1])), TypeError, r"softmax_cross_entropy: logits must have a floating dtype.*int32"),
    ("sce-logits-rank-1", lambda: fn.losses.softmax_cross_entropy(jnp.ones(3), jnp.array([0])), ValueError, r"softmax_cross_entropy: expected logits of rank 2 \(N, K\), got shape \(3,\)"),
    ("sce-label-out-of-range", lambda: fn.losses.softmax_cross_entropy(X2, jnp.array([0, 4])), ValueError, r"softmax_cross_entropy: integer labels must lie in \[0, 4\), got values in \[0, 4\]"),
    ("sce-label-negative", lambda: fn.losses.softmax_cross_entropy(X2, jnp.array([-1, 0])), ValueError, r"softmax_cross_entropy: integer labels must lie in \[0, 4\), got values in \[-1, 0\]"),
    ("sce-labels-shape", lambda: fn.losses.softmax_cross_entropy(X2, jnp.array([0, 1, 2])), ValueError, r"softmax_cross_entropy: integer labels must have shape \(N,\) = \(2,\).*got \(3,\)"),
    ("sce-labels-bool", lambda: fn.losses.softmax_cross_entropy(X2, jnp.array([True, False])), TypeError, r"softmax_cross_entropy: labels must be integer class indices or floating one-hot targets, got dtype bool"),
    ("sce-onehot-negative", lambda: fn.losses.softmax_cross_entropy(X2, -jnp.ones((2, 4))), ValueError, r"softmax_cross_entropy: one-hot \(or probability\) labels must lie in \[0, 1\], got values in \[-1, -1\]"),
    ("sce-labels-string", lambda: fn.losses.softmax_cross_entropy(X2, "cat"), TypeError, r"softmax_cross_entropy: labels must be an array of numbers, got str 'cat'"),
    # -- regularizers ---------------------------------------------------------------------------
    ("l2-leaf-string", lambda: fn.regularizers.l2({"w": "w"}), TypeError, r"l2: params\['w'\] must be an array, got str 'w'"),
    ("l2-complex", lambda: fn.regularizers.l2({"w": jnp.ones(2, jnp.complex64)}), TypeError, r"l2: params\['w'\] must hold real numbers \(a floating dtype\), got complex64"),
    ("l1-mask-int-array", lambda: fn.regularizers.l1({"w": jnp.ones(2)}, mask={"w": jnp.array([1, 0])}), TypeError, r"l1: mask leaves must be True or False.*got ArrayImpl"),
    ("l1-mask-structure", lambda: fn.regularizers.l1({"w": jnp.ones(2)}, mask={"b": True}), ValueError, r"l1: mask must have the same tree structure as params"),
    ("l2-mask-fn-returns-int", lambda: fn.regularizers.l2({"w": jnp.ones(2)}, mask=lambda p: {"w": 1}), TypeError, r"l2: mask leaves must be True or False.*got int 1"),
    ("l2_grad-complex", lambda: vjp.regularizers.l2_grad({"w": jnp.ones(2, jnp.complex64)}), TypeError, r"l2: params\['w'\] must hold real numbers"),
    # -- #8: vjp.manual / rule_for --------------------------------------------------------------
    ("manual-jnp.sin", lambda: vjp.manual(jnp.sin), ValueError, r"vjp: no hand-written rule for 'jax\.numpy\.sin'; rules exist for: .*dense\.dense"),
    ("manual-string", lambda: vjp.manual("conv2d"), TypeError, r"vjp: op must be one of funcnet's ops .*got str 'conv2d'; rules exist for: .*conv\.conv2d"),
    ("manual-None", lambda: vjp.manual(None), TypeError, r"vjp: op must be one of funcnet's ops .*got NoneType None"),
    ("manual-lambda", lambda: vjp.manual(lambda x: x), ValueError, r"vjp: no hand-written rule for '.*<lambda>'"),
    ("manual-dense-missing-w", lambda: vjp.manual(ops.dense)(X2), TypeError, r"vjp\.manual\(dense\)\(x.*w.*\): missing a required argument: 'w'"),
    ("rule_for-Dense-layer", lambda: vjp.rule_for(fn.Dense(2)), ValueError, r"vjp: no hand-written rule for .*Dense"),
    # -- #7: vjp.value_and_grad -----------------------------------------------------------------
    ("value_and_grad-missing-bias", lambda: _vg()(_drop(_dense(), "b"), X2, Y2), ValueError, r"Dense\(2\): expected params with keys \['b', 'w'\], got \['w'\]"),
    ("value_and_grad-W-not-w", lambda: _vg()({"W": _dense()["w"], "b": _dense()["b"]}, X2, Y2), ValueError, r"Dense\(2\): expected params with keys \['b', 'w'\], got \['W', 'b'\]"),
    ("value_and_grad-Serial-missing-bias", lambda: _vg(fn.Serial([fn.Dense(2), fn.ReLU()]))((_drop(_dense(), "b"), {}), X2, Y2), ValueError, r"Serial layer 0: Dense\(2\): expected params with keys \['b', 'w'\], got \['w'\]"),
    ("value_and_grad-complex-params", lambda: _vg()(_complex(_dense()), X2, Y2), TypeError, r"Dense\(2\): param '[bw]' must have a real floating dtype"),
    ("value_and_grad-x-string", lambda: _vg()(_dense(), "x", Y2), TypeError, r"Dense\(2\): input x must be an array of numbers, got str 'x'"),
    ("value_and_grad-y-shape", lambda: _vg()(_dense(), X2, jnp.ones((2, 3))), ValueError, r"quadratic: y and target must have the same shape, got \(2, 2\) and \(2, 3\)"),
    ("value_and_grad-not-a-layer", lambda: vjp.value_and_grad("net", fn.losses.quadratic), TypeError, r"vjp\.value_and_grad: expected a funcnet layer or network, got 'net'"),
    ("value_and_grad-loss-string", lambda: vjp.value_and_grad(fn.Dense(2), "mse"), TypeError, r"vjp\.value_and_grad: loss_fn must be a function .*got 'mse'"),
    ("value_and_grad-regularizer-sum", lambda: vjp.value_and_grad(fn.Dense(2), fn.losses.quadratic, jnp.sum), ValueError, r"vjp\.value_and_grad: regularizer must be one of funcnet\.regularizers\.l2 / l1"),
    ("value_and_grad-lam-negative", lambda: vjp.value_and_grad(fn.Dense(2), fn.losses.quadratic, fn.regularizers.l2, -0.1), ValueError, r"vjp\.value_and_grad: lam must be a finite non-negative number, got -0\.1"),
    ("value_and_grad-lam-string", lambda: vjp.value_and_grad(fn.Dense(2), fn.losses.quadratic, fn.regularizers.l2, "0.1"), TypeError, r"vjp\.value_and_grad: lam must be a finite non-negative number, got '0\.1'"),
    ("value_and_grad-lam-without-regularizer", lambda: vjp.value_and_grad(fn.Dense(2), fn.losses.quadratic, lam=0.1), ValueError, r"vjp\.value_and_grad: lam=0\.1 needs a regularizer"),
    ("value_and_grad-BatchNorm-has-state", lambda: _vg(fn.BatchNorm())(_params(fn.BatchNorm(), (4,)), X2, X2), ValueError, r"vjp\.value_and_grad: BatchNorm carries state"),
    ("value_and_grad_with_state-train-string", lambda: vjp.value_and_grad_with_state(fn.Dense(2), fn.losses.quadratic)(_dense(), None, X2, Y2, None, "yes"), TypeError, r"Dense\(2\): train must be a Python bool, got 'yes'"),
    ("value_and_grad_with_state-key-int", lambda: vjp.value_and_grad_with_state(fn.Dense(2), fn.losses.quadratic)(_dense(), None, X2, Y2, 5), TypeError, r"Dense\(2\): key must be a JAX PRNG key .*got int 5"),
    ("regularizer_value_and_grad-sum", lambda: vjp.regularizer_value_and_grad(jnp.sum), ValueError, r"vjp\.regularizer_value_and_grad: regularizer must be one of funcnet\.regularizers\.l2 / l1"),
    ("layer_rule-string", lambda: vjp.layer_rule("dense"), TypeError, r"vjp: expected a funcnet layer, got 'dense'"),
    ("layer_rule-fwd-W-not-w", lambda: vjp.layer_rule(fn.Dense(2)).fwd({"W": _dense()["w"], "b": _dense()["b"]}, {}, X2), ValueError, r"Dense\(2\): expected params with keys \['b', 'w'\], got \['W', 'b'\]"),
    # -- #9: gradcheck ---------------------------------------------------------------------------
    ("numerical_grad-h-0", lambda: gradcheck.numerical_grad(_sq, jnp.ones(2), h=0), ValueError, r"numerical_grad: h \(the finite-difference step\) must be a positive finite number.*got 0"),
    ("numerical_grad-h-negative", lambda: gradcheck.numerical_grad(_sq, jnp.ones(2), h=-1e-3), ValueError, r"numerical_grad: h .*got -0\.001"),
    ("numerical_grad-h-nan", lambda: gradcheck.numerical_grad(_sq, jnp.ones(2), h=float("nan")), ValueError, r"numerical_grad: h .*got nan"),
    ("numerical_grad-h-inf", lambda: gradcheck.numerical_grad(_sq, jnp.ones(2), h=float("inf")), ValueError, r"numerical_grad: h .*got inf"),
    ("numerical_grad-h-string", lambda: gradcheck.numerical_grad(_sq, jnp.ones(2), h="1e-6"), TypeError, r"numerical_grad: h .*got '1e-6'"),
    ("numerical_grad-non-scalar-f", lambda: gradcheck.numerical_grad(lambda p: p * p, jnp.ones(2)), ValueError, r"numerical_grad: f must return a scalar \(shape \(\)\), got shape \(2,\)"),
    ("numerical_grad-f-returns-tuple", lambda: gradcheck.numerical_grad(lambda p: (_sq(p), _sq(p)), jnp.ones(2)), ValueError, r"numerical_grad: f must return a scalar \(shape \(\)\), got a tuple"),
    ("numerical_grad-int-params", lambda: gradcheck.numerical_grad(_sq, {"w": jnp.ones(2, jnp.int32)}), TypeError, r"numerical_grad: every leaf of params must be floating \(real\), leaf \['w'\] has dtype int32"),
    ("numerical_grad-complex-params", lambda: gradcheck.numerical_grad(_sq, jnp.ones(2, jnp.complex64)), TypeError, r"numerical_grad: every leaf .*dtype complex64"),
    ("numerical_grad-method", lambda: gradcheck.numerical_grad(_sq, jnp.ones(2), method="backward"), ValueError, r"numerical_grad: method must be one of \('central', 'forward'\), got 'backward'"),
    ("numerical_grad-chunk_bytes-0", lambda: gradcheck.numerical_grad(_sq, jnp.ones(2), chunk_bytes=0), ValueError, r"numerical_grad: chunk_bytes must be a positive int, got 0"),
    ("finite_differences-h-0", lambda: gradcheck.finite_differences(_sq, jnp.ones(2), h=0.0), ValueError, r"finite_differences: h .*got 0\.0"),
    ("check-h-negative", lambda: gradcheck.check(_sq, jnp.ones(2), h=-1.0), ValueError, r"check: h .*got -1\.0"),
    ("check-non-scalar-f", lambda: gradcheck.check(lambda p: p, jnp.ones(2)), ValueError, r"check: f must return a scalar \(shape \(\)\), got shape \(2,\)"),
    ("check-float16", lambda: gradcheck.check(_sq, jnp.ones(2, jnp.float16)), TypeError, r"gradcheck: parameters of dtype float16 are too coarse.*float64"),
    ("check-tol-negative", lambda: gradcheck.check(_sq, jnp.ones(2), tol=-1e-6), ValueError, r"check: tol must be a non-negative number.*-1e-06"),
    ("check-method", lambda: gradcheck.check(_sq, jnp.ones(2), method="sideways"), ValueError, r"check: method must be one of"),
    ("compare-tol-nan", lambda: gradcheck.compare({"a": jnp.ones(2), "b": jnp.ones(2)}, tol=float("nan")), ValueError, r"compare: tol must be a non-negative number.*nan"),
    ("compare-one-gradient", lambda: gradcheck.compare({"a": jnp.ones(2)}), ValueError, r"compare: need at least two gradients, got \['a'\]"),
    ("compare-structure", lambda: gradcheck.compare({"a": {"w": 1.0}, "b": {"v": 1.0}}), ValueError, r"compare: 'b' has structure"),
    ("compare-list-not-dict", lambda: gradcheck.compare([jnp.ones(2), jnp.ones(2)]), TypeError, r"compare: grads must be a dict name -> gradient pytree, got list"),
    ("relative_error-shapes", lambda: gradcheck.relative_error(np.ones(2), np.ones(3)), ValueError, r"relative_error: shapes differ, \(2,\) vs \(3,\)"),
    ("directional_check-num_directions-0", lambda: gradcheck.directional_check(_sq, jnp.ones(2), jnp.ones(2), KEY, 0), ValueError, r"directional_check: num_directions must be a positive int, got 0"),
    ("directional_check-key-int", lambda: gradcheck.directional_check(_sq, jnp.ones(2), jnp.ones(2), 0), TypeError, r"directional_check: key must be a JAX PRNG key.*got 0"),
    ("directional_check-grads-shape", lambda: gradcheck.directional_check(_sq, jnp.ones(2), jnp.ones(3), KEY), ValueError, r"directional_check: grads leaf 0 has shape \(3,\), the params leaf has \(2,\)"),
    ("directional_check-h-0", lambda: gradcheck.directional_check(_sq, jnp.ones(2), jnp.ones(2), KEY, h=0), ValueError, r"directional_check: h .*got 0"),
    ("check_rule-unknown-op", lambda: gradcheck.check_rule(jnp.cos, (jnp.ones(2),)), ValueError, r"vjp: no hand-written rule for 'jax\.numpy\.cos'"),
    ("check_rule-h-0", lambda: gradcheck.check_rule(ops.relu, (jnp.ones(2),), h=0), ValueError, r"check_rule: h .*got 0"),
    # -- summary ---------------------------------------------------------------------------------
    ("summary-not-a-layer", lambda: fn.summary("net", (3,)), TypeError, r"summary: net must be a funcnet layer or network, got 'net'"),
    ("summary-shape-0", lambda: fn.summary(fn.Dense(3), (0,)), ValueError, r"summary: input_shape must be a tuple of positive ints.*\(0,\)"),
    ("summary-shape-string", lambda: fn.summary(fn.Dense(3), "28x28"), TypeError, r"summary: input_shape must be a tuple of positive ints.*'28x28'"),
    ("summary-Serial-bad-layer", lambda: fn.summary(fn.Serial([fn.Dense(4), fn.Conv(2, 3)]), (4,)), ValueError, r"Serial layer 1: Conv\(2, \(3, 3\)\): expected input_shape of rank 3"),
]
# fmt: on


@pytest.mark.parametrize("call,exc,pattern", [pytest.param(*row[1:], id=row[0]) for row in BAD])
def test_bad_input_raises_a_clear_error(call, exc, pattern):
    with pytest.raises(exc, match=pattern) as info:
        call()
    # one of the two plain types (or a subclass), never an opaque error from inside
    assert isinstance(info.value, ValueError | TypeError)


def test_the_table_is_large_and_its_ids_unique():
    ids = [row[0] for row in BAD]
    assert len(ids) == len(set(ids))
    assert len(ids) >= 110


# -- inputs that must keep working -----------------------------------------------------------
# fmt: off
GOOD = [
    ("bce-soft-targets", lambda: fn.losses.binary_cross_entropy(P_ARR, jnp.array([0.3, 0.9])), ()),
    ("bce-p-exactly-0-and-1", lambda: fn.losses.binary_cross_entropy(jnp.array([0.0, 1.0]), T_ARR), ()),
    ("bce-integer-targets", lambda: fn.losses.binary_cross_entropy(P_ARR, jnp.array([0, 1])), ()),
    ("bce-nan-propagates", lambda: fn.losses.binary_cross_entropy(jnp.array([jnp.nan, 0.5]), T_ARR), ()),
    ("bce_logits-soft-targets", lambda: fn.losses.binary_cross_entropy_with_logits(jnp.array([30.0, -5.0]), jnp.array([0.2, 1.0])), ()),
    ("bce-traced-values-unchecked", lambda: jax.jit(fn.losses.binary_cross_entropy)(jnp.array([1.5]), jnp.array([2.0])), ()),
    ("sce-soft-labels", lambda: fn.losses.softmax_cross_entropy(X2, jnp.full((2, 4), 0.25)), ()),
    ("dense-op-lists", lambda: ops.dense([[1.0, 2.0]], [[1.0], [1.0]]), (1, 1)),
    ("Dense-apply-x-nested-list", lambda: fn.Dense(2).apply(_dense(), [[1.0, 2.0, 3.0, 4.0]]), (1, 2)),
    ("Dense-params-numpy", lambda: fn.Dense(2).apply({k: np.asarray(v) for k, v in _dense().items()}, X2), (2, 2)),
    ("Dense-params-float16", lambda: fn.Dense(2).apply({k: v.astype(jnp.float16) for k, v in _dense().items()}, X2), (2, 2)),
    ("Dense-init-raw-PRNGKey", lambda: fn.Dense(2).init(jax.random.PRNGKey(0), (4,))["w"], (4, 2)),
    ("Dense-init-under-vmap", lambda: jax.vmap(lambda k: fn.Dense(2).init(k, (4,))["w"])(jax.random.split(KEY, 3)), (3, 4, 2)),
    ("Conv-float16-input", lambda: fn.Conv(2, 3).apply(_params(fn.Conv(2, 3), (6, 6, 3)), X4.astype(jnp.float16)), (2, 4, 4, 2)),
    ("Conv-bfloat16-input", lambda: fn.Conv(2, 3).apply(_params(fn.Conv(2, 3), (6, 6, 3)), X4.astype(jnp.bfloat16)), (2, 4, 4, 2)),
    ("ReLU-rank-1-batch", lambda: fn.ReLU().apply({}, X5), (5,)),
    ("Dropout-rank-1-batch", lambda: fn.Dropout(0.5).apply({}, X5, key=KEY, train=True), (5,)),
    ("Embedding-rank-1-ids", lambda: fn.Embedding(3, 2).apply(_params(fn.Embedding(3, 2), ()), jnp.array([0, 2])), (2, 2)),
    ("Reshape-adds-feature-axis", lambda: fn.Reshape((1,)).apply({}, X5), (5, 1)),
    ("max_pool-SAME-stride-3", lambda: ops.max_pool(X4, 1, 3, "SAME"), (2, 2, 2, 3)),
    ("lp_pool-p-numpy-float32", lambda: ops.lp_pool(X4, np.float32(3), 2), (2, 3, 3, 3)),
    ("LpPool-p-numpy-int64", lambda: fn.LpPool(2, p=np.int64(3)).apply({}, X4), (2, 3, 3, 3)),
    ("l2-integer-leaf", lambda: fn.regularizers.l2({"w": jnp.ones(2, jnp.int32)}), ()),
    ("l2-mask-numpy-bool", lambda: fn.regularizers.l2({"w": jnp.ones(2)}, mask={"w": np.bool_(True)}), ()),
    ("numerical_grad-empty-params", lambda: gradcheck.numerical_grad(lambda p: jnp.zeros(()), {}), None),
]
# fmt: on


@pytest.mark.parametrize("call,shape", [pytest.param(*row[1:], id=row[0]) for row in GOOD])
def test_good_input_still_works(call, shape):
    out = call()
    if shape is not None:
        assert jnp.shape(out) == shape


# -- #1: binary cross-entropy's gradient at p = 0 and 1 --------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_bce_autodiff_equals_the_hand_rule_at_0_1_and_inside(dtype):
    with jax.enable_x64(dtype == "float64"):
        p = jnp.array([[0.0, 0.0, 1.0, 1.0, 0.3, 0.3]], dtype)
        t = jnp.array([[0.0, 1.0, 0.0, 1.0, 0.0, 1.0]], dtype)

        @jax.jit  # compiled, as in training (one program, not one per primitive)
        def gradients(p, t):
            auto = jax.grad(fn.losses.binary_cross_entropy, argnums=(0, 1))(p, t)
            _, res = vjp.losses.binary_cross_entropy_fwd(p, t)
            hand = vjp.losses.binary_cross_entropy_bwd(res, jnp.ones((), dtype))
            manual = jax.grad(vjp.manual(fn.losses.binary_cross_entropy), argnums=(0, 1))(p, t)
            return auto, hand, manual

        auto, hand, manual = gradients(p, t)
    for a, h, m in zip(auto, hand, manual, strict=True):
        assert np.all(np.isfinite(a))
        np.testing.assert_allclose(a, h, rtol=1e-6)
        np.testing.assert_array_equal(h, m)
    # a correct prediction at exactly 0 or 1 gets the live term's gradient only:
    # +1 at (p, t) = (0, 0) and -1 at (1, 1); the clamped (-100) terms contribute 0
    np.testing.assert_allclose(auto[0][0, [0, 3]], [1.0, -1.0])


def test_dense_sigmoid_bce_in_float32_has_a_finite_gradient_at_saturation():
    net = fn.Serial([fn.Dense(1), fn.Sigmoid()])
    params = ({"w": jnp.array([[10.0], [10.0]]), "b": jnp.array([20.0])}, {})
    x, y = jnp.array([[1.0, 1.0], [0.5, -0.5]]), jnp.array([[1.0], [1.0]])
    assert float(net.apply(params, x)[0, 0]) == 1.0  # sigmoid(40) rounds to 1 in float32

    def loss(p):
        return fn.losses.binary_cross_entropy(net.apply(p, x), y)

    value, grads = jax.jit(jax.value_and_grad(loss))(params)  # compiled, as in training
    m_value, m_grads = jax.jit(vjp.value_and_grad(net, fn.losses.binary_cross_entropy))(
        params, x, y)
    assert np.isfinite(float(value))
    for a, m in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(m_grads),
                    strict=True):
        assert np.all(np.isfinite(a))
        np.testing.assert_allclose(a, m, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(float(value), float(m_value), rtol=1e-6)


@settings(max_examples=15, deadline=None)
@given(
    bad=st.one_of(st.floats(1.0, 1e6, exclude_min=True), st.floats(-1e6, 0.0, exclude_max=True)),
    which=st.sampled_from(["p", "target", "logits-target"]),
)
def test_any_probability_or_target_outside_0_1_is_rejected(bad, which):
    with jax.enable_x64(True):  # so that e.g. 1 + 1e-12 stays outside [0, 1]
        ok, out = jnp.array([0.25, 0.5]), jnp.array([0.5, bad])
        loss = {"p": fn.losses.binary_cross_entropy,
                "target": fn.losses.binary_cross_entropy,
                "logits-target": fn.losses.binary_cross_entropy_with_logits}[which]
        args = (out, ok) if which == "p" else (ok, out)
        name = r"p \(probabilities" if which == "p" else "target"
        with pytest.raises(ValueError, match=rf"{name}.*must lie in \[0, 1\]"):
            loss(*args)


# -- #6: the parameter limit -------------------------------------------------------------------


def test_param_limit_is_read_at_init_and_can_be_raised_and_restored():
    layer, shape = fn.Dense(8), (8,)  # 72 parameters
    previous = base.PARAM_LIMIT
    with _param_limit(71):
        with pytest.raises(ValueError, match=r"72 parameters .*PARAM_LIMIT = 71"):
            layer.init(KEY, shape)
        with pytest.raises(ValueError, match=r"Serial"):
            fn.Serial([layer]).init(KEY, shape)
    assert base.PARAM_LIMIT == previous
    with _param_limit(72):
        assert layer.init(KEY, shape)["w"].shape == (8, 8)
    with _param_limit(None):  # no limit at all
        assert layer.init(KEY, shape)["b"].shape == (8,)
    assert base.set_param_limit(previous) == previous


# -- #9: gradcheck in float32 ------------------------------------------------------------------


def test_gradcheck_check_passes_correct_float32_gradients_and_catches_wrong_ones():
    net = fn.Serial([fn.Dense(3), fn.Tanh(), fn.Dense(2)])
    params = draw.params(net, (3,))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((4, 3)), jnp.float32)
    y = jax.device_put(rng.integers(0, 2, 4))
    grad_fn = vjp.value_and_grad(net, fn.losses.softmax_cross_entropy)

    @jax.jit
    def loss(p):
        return fn.losses.softmax_cross_entropy(net.apply(p, x), y)

    manual = jax.jit(grad_fn)(params, x, y)[1]
    report = gradcheck.check(loss, params, manual=manual)  # float32: h = 1e-3, tol = 1e-2
    assert report.ok
    assert {r.tol for r in report.rows if r.second != "finite diff"} == {1e-2}
    assert all(r.tol >= 1e-2 for r in report.rows)  # + the rounding floor eps |f| / h
    assert report.max_error("autodiff", "finite diff") > 1e-4  # 1e-6 would have failed
    wrong = jax.tree_util.tree_map(lambda g: 1.1 * g, manual)  # a 10% error is caught
    with pytest.raises(gradcheck.GradientMismatch):
        gradcheck.compare({"manual": wrong, "autodiff": manual}, gradcheck.default_tol(jnp.float32))
    assert gradcheck.default_tol(jnp.float64) == 1e-6
