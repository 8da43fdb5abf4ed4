"""summary: receptive fields against brute force, parameter counts against init, FLOPs
against XLA, the lecture's examples, and the 1.6e9-weight layer without allocating."""

from __future__ import annotations

import math
import resource

import draw
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import funcnet as fn
from funcnet import graph
from funcnet.nn.conv import plain_formulations


def _random_net(seed: int, in_hw: int):
    """A small random conv / average-pool stack with strides, paddings and dilations."""
    rng = np.random.default_rng(seed)
    layers = []
    shape = (in_hw, in_hw, 1)
    for _ in range(rng.integers(2, 5)):
        kind = rng.choice(["conv", "pool", "act"], p=[0.5, 0.35, 0.15])
        pad = [("VALID"), ("SAME"), int(rng.integers(0, 3)),
               ((int(rng.integers(0, 3)), int(rng.integers(0, 3))),) * 2][rng.integers(0, 4)]
        if kind == "conv":
            k = (int(rng.integers(1, 5)), int(rng.integers(1, 5)))
            layer = fn.Conv(int(rng.integers(1, 3)), k, stride=int(rng.integers(1, 3)),
                            padding=pad, dilation=int(rng.integers(1, 3)))
        elif kind == "pool":
            w = int(rng.integers(1, 4))
            layer = fn.AvgPool(w, stride=int(rng.integers(1, 4)),
                               padding=pad if isinstance(pad, str) else "VALID")
        else:
            layer = [fn.ReLU(), fn.Sigmoid(), fn.Tanh()][rng.integers(0, 3)]
        try:
            out = layer.output_shape(shape)
        except ValueError:
            continue
        if min(out[:2]) < 1:
            continue
        layers.append(layer)
        shape = out
    return fn.Serial(layers)


def _dependency_masks(net, in_shape, params, x, poison=False):
    """``(H_out, W_out, H, W)`` bool: input pixels that output unit ``(i, j, 0)`` depends on.

    With ``poison`` the dependency is found by setting each input pixel to +inf in turn
    (with positive weights it reaches every unit that depends on the pixel, through max
    pooling too, where a gradient reaches only the argmax); otherwise as
    the nonzero entries of ``jax.grad`` of the unit (the Jacobian, one row per unit).
    """
    if poison:
        # Exact convolutions only: conv.py's banded matmul (one-channel inputs) multiplies
        # the band's zeros by the input too, and 0 * inf = nan reaches the block's other
        # outputs (as in Winograd-style kernels elsewhere).
        with plain_formulations():
            return _poisoned_masks(net, in_shape, params, x)
    jac_fn = jax.jacrev(lambda z: net.apply(params, z[None])[0, ..., 0])
    jac = jax.jit(jac_fn)(x)
    return np.asarray(jac[..., 0] != 0)  # (H_out, W_out, H, W)


def _poisoned_masks(net, in_shape, params, x):
    """Input pixels each output unit depends on, found by +inf poisoning."""
    h, w = in_shape[:2]
    eye = jnp.eye(h * w, dtype=bool).reshape(h * w, h, w, 1)

    def poisoned(mask):
        y = net.apply(params, jnp.where(mask, jnp.inf, x)[None])[0, ..., 0]
        return jnp.isinf(y)

    hits = jax.jit(jax.vmap(poisoned))(eye)  # (H*W, H_out, W_out)
    return np.moveaxis(np.asarray(hits).reshape(h, w, *hits.shape[1:]), (0, 1), (2, 3))


def _check_rf_against_brute_force(net, in_shape, poison=False):
    s = fn.summary(net, in_shape)
    rf, jump, c0 = s.rows[-1].receptive_field, s.rows[-1].jump, s.rows[-1].rf_center
    # positive weights and biases: no accidental zero gradient, +inf reaches every
    # dependent unit (drawn on the host: no init program to compile)
    params = draw.positive_params(net, in_shape, seed=1)
    x = draw.uniform(in_shape, seed=2, low=0.5, high=1.5)
    masks = _dependency_masks(net, in_shape, params, x, poison)
    h, w = in_shape[:2]
    dilated = any(getattr(layer, "dilation", (1, 1)) != (1, 1) for layer in net.layers)
    interior = 0
    for i in range(masks.shape[0]):
        for j in range(masks.shape[1]):
            lo = [c + u * jmp - (r - 1) / 2 for c, u, jmp, r in zip(c0, (i, j), jump, rf)]
            hi = [a + r - 1 for a, r in zip(lo, rf)]
            assert all(float(v).is_integer() for v in lo), (lo, s)
            lo, hi = [int(v) for v in lo], [int(v) for v in hi]
            got = np.argwhere(masks[i, j])
            box = np.zeros((h, w), bool)
            box[max(lo[0], 0):hi[0] + 1, max(lo[1], 0):hi[1] + 1] = True
            # Every dependency lies in the predicted field (clipped to the image).
            assert not np.any(masks[i, j] & ~box), (i, j, lo, hi, s)
            if lo[0] >= 0 and lo[1] >= 0 and hi[0] < h and hi[1] < w:
                interior += 1
                # A unit whose field is inside the image: the field is exactly the
                # bounding box of what it depends on (all of it without dilation holes).
                assert got.min(0).tolist() == lo and got.max(0).tolist() == hi, (i, j, s)
                if not dilated and all(
                    getattr(layer, "stride", (1, 1))[0] <= getattr(layer, "kernel_size",
                                                                   getattr(layer, "window",
                                                                           (1, 1)))[0]
                    for layer in net.layers
                ):
                    assert masks[i, j].sum() == rf[0] * rf[1], (i, j, s)
    return interior


@pytest.mark.parametrize("seed", range(8))
def test_receptive_field_matches_jax_grad_on_random_networks(seed):
    net = _random_net(seed, 15)
    interior = _check_rf_against_brute_force(net, (15, 15, 1))
    assert len(net.layers) >= 1
    if interior == 0:  # the field is larger than the image: still checked above (subset)
        assert max(fn.summary(net, (15, 15, 1)).receptive_field) > 8


@pytest.mark.parametrize(
    "layers",
    [
        [fn.Conv(2, 3), fn.ReLU(), fn.MaxPool(2)],
        [fn.Conv(2, 3, padding="SAME"), fn.MaxPool(3, stride=2, padding="SAME"), fn.Conv(1, 2)],
        [fn.Conv(2, 2, stride=2), fn.MaxPool(2, stride=1), fn.Conv(1, 3, dilation=2)],
    ],
    ids=["conv-pool", "same-overlapping-pool", "stride-dilation"],
)
def test_receptive_field_through_max_pooling_matches_inf_poisoning(layers):
    assert _check_rf_against_brute_force(fn.Serial(layers), (14, 14, 1), poison=True) > 0


def test_dense_after_flatten_sees_the_whole_input_and_flatten_keeps_the_field():
    net = fn.Serial([fn.Conv(2, 3, stride=2), fn.Flatten(), fn.Dense(3)])
    s = fn.summary(net, (9, 9, 1))
    assert s.rows[1].receptive_field == (3, 3) and s.rows[1].jump == (None, None)
    assert s.receptive_field == (9, 9)
    params = draw.positive_params(net, (9, 9, 1))
    x = draw.uniform((9, 9, 1), seed=1, low=0.5)
    g = jax.grad(lambda z: net.apply(params, z[None])[0, 0])(x)
    assert bool(jnp.all(g != 0))  # every input pixel matters to one dense unit
    # A Dense on an (H, W, C) input acts per position, like a 1x1 convolution.
    assert fn.summary(fn.Serial([fn.Conv(2, 3), fn.Dense(4)]), (9, 9, 1)).receptive_field == (3, 3)


@pytest.mark.parametrize("k,p", [(3, 2), (5, 2), (5, 3), (2, 4)])
def test_lecture_rules(k, p):
    two3 = fn.summary(fn.Serial([fn.Conv(1, 3), fn.Conv(1, 3)]), (32, 32, 1))
    assert two3.receptive_field == (5, 5)
    two5 = fn.summary(fn.Serial([fn.Conv(1, 5), fn.Conv(1, 5)]), (32, 32, 1))
    assert two5.receptive_field == (9, 9)
    conv_pool = fn.summary(fn.Serial([fn.Conv(1, k), fn.MaxPool(p)]), (32, 32, 1))
    assert conv_pool.receptive_field == (p + k - 1, p + k - 1)
    assert conv_pool.jump == (p, p)
    strided = fn.summary(fn.Serial([fn.Conv(1, k, stride=2), fn.Conv(1, k)]), (32, 32, 1))
    # Stride 2 doubles the jump, so the second layer adds (k - 1) * 2.
    assert strided.rows[0].jump == (2, 2)
    assert strided.receptive_field == (k + (k - 1) * 2,) * 2


def _leaf(tree, path):
    for i in path:
        tree = tree[i]
    return tree


NETS = [
    ("mlp", fn.models.mlp([64, 32], 10), (8, 8, 1)),
    ("lenet5", fn.models.lenet5(), (28, 28, 1)),
    ("digits_cnn", fn.models.digits_cnn(), (8, 8, 1)),
    ("mixed", fn.Serial([
        fn.Conv(4, 3, padding="SAME", use_bias=False), fn.Sigmoid(), fn.L2Pool(2),
        fn.LocallyConnected(3, 2, stride=2), fn.FeatureMaxPool(3), fn.Flatten(),
        fn.Dense(5), fn.LogSoftmax(),
    ]), (12, 12, 2)),
]  # fmt: skip


@pytest.mark.parametrize("net,shape", [n[1:] for n in NETS], ids=[n[0] for n in NETS])
def test_param_counts_equal_the_leaves_init_produces(net, shape):
    s = fn.summary(net, shape)
    # The leaves init produces, traced (not run) for speed: shapes and dtypes are exact.
    params = jax.eval_shape(lambda k: net.init(k, shape), jax.random.key(0))
    sizes = [a.size for a in jax.tree_util.tree_leaves(params)]
    assert s.total_params == sum(sizes) == fn.param_count(net, shape)
    for row in s.rows:
        leaves = jax.tree_util.tree_leaves(_leaf(params, row.path))
        assert row.params == sum(a.size for a in leaves), row
        assert row.param_bytes == sum(a.size * a.dtype.itemsize for a in leaves), row
        assert row.output_shape == net.layers[row.path[0]].output_shape(row.input_shape)


@pytest.mark.parametrize("name,net,shape", [n for n in NETS if n[0] in ("mlp", "lenet5")],
                         ids=["mlp", "lenet5"])
def test_flops_agree_with_xla_cost_analysis(name, net, shape):
    batch = 4
    s = fn.summary(net, shape)
    # the convolution as defined (conv.py's banded matmul for LeNet's conv1 also
    # multiplies the band's zeros: XLA counts those too)
    with plain_formulations():
        xla = graph.cost_analysis(net, shape, batch=batch).flops / batch
    assert s.total_flops == pytest.approx(xla, rel=0.10), str(s)
    assert all(r.flops_source == "analytic" for r in s.rows)


@pytest.mark.parametrize(
    "layer,shape",
    [
        (fn.Dense(7), (5, 6)),
        (fn.Conv(3, (3, 2), padding="SAME"), (9, 8, 2)),
        (fn.Conv(3, 3, stride=2, padding=1, dilation=2, use_bias=False), (11, 10, 2)),
        (fn.MaxPool(3, stride=2, padding="SAME"), (9, 9, 2)),
        (fn.AvgPool(2), (8, 8, 3)),
        (fn.L2Pool(2), (8, 8, 3)),
        (fn.FeatureMaxPool(2), (4, 4, 6)),
        (fn.ReLU(), (4, 4, 6)),
        (fn.Sigmoid(), (4, 4, 6)),
    ],
    ids=lambda v: repr(v) if isinstance(v, fn.Layer) else None,
)
def test_per_layer_flops_agree_with_xla(layer, shape):
    row = fn.summary(layer, shape).rows[0]
    cost = graph.cost_analysis(layer, shape, batch=2)
    assert row.flops == pytest.approx(cost.flops / 2, rel=0.10)
    assert row.transcendentals == pytest.approx(cost.transcendentals / 2, rel=0.10)


def test_nested_serial_is_expanded_with_paths():
    inner = fn.Serial([fn.Conv(4, 3), fn.ReLU()])
    nested = fn.Serial([inner, fn.MaxPool(2), fn.Serial([fn.Flatten(), fn.Dense(3)])])
    flat = fn.Serial([*inner.layers, fn.MaxPool(2), fn.Flatten(), fn.Dense(3)])
    a, b = fn.summary(nested, (10, 10, 1)), fn.summary(flat, (10, 10, 1))
    assert [r.path for r in a.rows] == [(0, 0), (0, 1), (1,), (2, 0), (2, 1)]
    strip = ("path",)
    assert [{k: v for k, v in r.as_dict().items() if k not in strip} for r in a.rows] == [
        {k: v for k, v in r.as_dict().items() if k not in strip} for r in b.rows
    ]
    assert "2.1" in str(a) and a.total_params == fn.param_count(nested, (10, 10, 1))


def test_table_and_data():
    s = fn.summary(fn.models.lenet5(), (28, 28, 1))
    text = str(s)
    for needed in ("Conv(6, (5, 5), padding='SAME')", "61,706", "831,066", "16x16", "4x4",
                   "RF", "jump", "FLOPs"):
        assert needed in text, needed
    data = s.as_dicts()
    assert len(data) == 12 and data[0]["flops"] == 220_176 and data[5]["jump"] == (4, 4)
    assert s.total_flops == sum(d["flops"] for d in data)
    # A user-defined layer without an analytic rule gets XLA's count, marked with *.
    gelu = fn.summary(fn.Activation(jax.nn.gelu), (4, 4))
    assert gelu.rows[0].flops_source == "xla" and gelu.rows[0].flops > 0 and "*" in str(gelu)


def test_summary_of_the_huge_dense_layer_does_not_allocate():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    s = fn.summary(fn.Serial([fn.Flatten(), fn.Dense(40_000)]), (200, 200, 1))
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mib < 500  # the weights alone would be 6,400 MB
    assert s.total_params == 200 * 200 * 40_000 + 40_000
    assert s.total_flops == 2 * 200 * 200 * 40_000 + 40_000
    assert s.receptive_field == (200, 200)
    assert math.isclose(s.rows[1].param_bytes, 4 * s.total_params)
