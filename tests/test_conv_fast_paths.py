"""The conv rules' second formulations (banded matmul, row by row) == lax, in float64.

``forward_path`` / ``input_grad_path`` choose a formulation per shape; every formulation
is exact for every geometry, so each is checked on a grid that crosses the selection
rules' boundaries, and the rules themselves are pinned.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from funcnet import gradcheck, ops
from funcnet.nn import conv as vconv

TOL = 1e-12  # relative (per array), float64: only the summation order differs


def _case(seed, in_shape, k_shape, stride, padding, dilation):
    """Arbitrary x, w, upstream g; the hand rule's forward (y, residuals) and lax's
    y, dx, dw: one compiled program (op by op, each operation compiles its own)."""
    rng = np.random.default_rng(seed)
    x = jax.device_put(rng.standard_normal((2, *in_shape)))
    w = jax.device_put(rng.standard_normal((k_shape[0], k_shape[1], in_shape[2], k_shape[2])))

    def forward(x, w):
        return vconv.conv2d_fwd(x, w, None, stride, padding, dilation)

    g = jax.device_put(rng.standard_normal(jax.eval_shape(forward, x, w)[0].shape))

    @jax.jit
    def case(x, w, g):
        y, res = forward(x, w)

        def ref(x, w):
            return lax.conv_general_dilated(
                x, w, res.geom.stride, res.geom.pads, rhs_dilation=res.geom.dilation,
                dimension_numbers=vconv.DIMENSION_NUMBERS, precision=lax.Precision.HIGHEST,
            )

        y_ref, vjp = jax.vjp(ref, x, w)
        return y, res, y_ref, *vjp(g)

    y, res, y_ref, dx_ref, dw_ref = case(x, w, g)
    return x, w, y, res, g, y_ref, dx_ref, dw_ref


GRID = [
    # (H, W, C_in), (KH, KW, C_out), stride, padding, dilation
    ((7, 7, 1), (5, 5, 3), 1, "SAME", 1),  # LeNet's conv1 in small: banded forward
    ((6, 9, 1), (2, 3, 2), (2, 3), ((2, 0), (1, 3)), (2, 1)),  # strided: lax; W_out=4
    ((5, 11, 1), (3, 2, 2), 1, 1, (1, 2)),  # W_out=11: blocks of 4, the last one partial
    ((7, 7, 6), (5, 5, 4), 1, "VALID", 1),  # LeNet's conv2 in small: banded input grad
    ((6, 12, 3), (3, 3, 2), 1, "SAME", 1),  # wide output, few channels: row by row
    ((8, 9, 2), (3, 2, 3), 2, "SAME", 2),  # strided and dilated, narrow: banded
    ((6, 7, 8), (3, 3, 2), 1, 1, 1),  # 8 channels: the correlation
]
IDS = [f"in{i}-k{k}-s{s}-p{p}-d{d}".replace(" ", "") for i, k, s, p, d in GRID]


@pytest.mark.parametrize("in_shape,k_shape,stride,padding,dilation", GRID, ids=IDS)
def test_banded_forward_equals_lax(in_shape, k_shape, stride, padding, dilation):
    with jax.enable_x64(True):
        x, w, y, res, _, y_ref, _, _ = _case(0, in_shape, k_shape, stride, padding, dilation)
        banded = jax.jit(vconv.forward_banded)(x, w, res.geom)
    assert banded.shape == y_ref.shape
    assert gradcheck.relative_error(banded, y_ref) < TOL
    assert gradcheck.relative_error(y, y_ref) < TOL  # the path conv2d_fwd chose


@pytest.mark.slow  # CI's slow tier runs it; kept out of the default run for its time
@pytest.mark.parametrize("in_shape,k_shape,stride,padding,dilation", GRID, ids=IDS)
@pytest.mark.parametrize("path", ["banded", "rows", "scatter", "correlation"])
def test_every_input_gradient_formulation_equals_lax(in_shape, k_shape, stride, padding,
                                                      dilation, path):
    with jax.enable_x64(True):
        _, _, _, res, g, _, dx_ref, _ = _case(1, in_shape, k_shape, stride, padding, dilation)
        dx = jax.jit(vconv.INPUT_GRADS[path])(res, g)
    assert dx.shape == dx_ref.shape
    assert gradcheck.relative_error(dx, dx_ref) < TOL


@pytest.mark.parametrize("in_shape,k_shape,stride,padding,dilation", GRID, ids=IDS)
def test_chosen_rule_equals_lax(in_shape, k_shape, stride, padding, dilation):
    with jax.enable_x64(True):
        _, _, _, res, g, _, dx_ref, dw_ref = _case(2, in_shape, k_shape, stride, padding,
                                                   dilation)
        dx, dw, _ = jax.jit(vconv.conv2d_bwd)(res, g)  # as in training: compiled
    assert gradcheck.relative_error(dx, dx_ref) < TOL
    assert gradcheck.relative_error(dw, dw_ref) < TOL


def _geom(in_shape, k_shape, stride=1, padding="VALID", groups=1):
    x_shape = (1, *in_shape)
    stride, dilation, pads = vconv._conv_geometry(x_shape, k_shape[:2], stride, padding, 1,
                                                  "test")
    return vconv.make_geometry(in_shape[:2], k_shape[:2], stride, dilation, pads, groups)


def test_forward_path_rule():
    # one input channel, ungrouped, stride 1: banded; anything else: lax
    assert vconv.forward_path((5, 5, 1, 6), _geom((28, 28, 1), (5, 5))) == "banded"
    assert vconv.forward_path((5, 5, 2, 6), _geom((28, 28, 2), (5, 5))) == "lax"
    assert vconv.forward_path((3, 3, 1, 4), _geom((8, 8, 4), (3, 3), groups=4)) == "lax"
    assert vconv.forward_path((7, 7, 1, 8), _geom((32, 32, 1), (7, 7), 2, "SAME")) == "lax"
    assert [vconv.forward_path((k[0], k[1], i[2], k[2]), _geom(i, k, s, p))
            for i, k, s, p, _ in GRID] == ["banded", "lax", "banded"] + ["lax"] * 4


def test_input_grad_path_rule():
    lenet_conv2 = _geom((14, 14, 6), (5, 5))  # W_out 10 <= 2 * 5
    assert vconv.input_grad_path((5, 5, 6, 16), lenet_conv2) == "banded"
    assert vconv.input_grad_path((5, 5, 6, 16), _geom((15, 15, 6), (5, 5))) == "rows"
    assert vconv.input_grad_path((3, 3, 7, 16), _geom((32, 32, 7), (3, 3), 1, "SAME")) == "rows"
    assert vconv.input_grad_path((5, 5, 8, 16), lenet_conv2) == "correlation"
    # the grid above crosses every side of the rule
    paths = {vconv.input_grad_path((k[0], k[1], i[2], k[2]), _geom(i, k, s, p))
             for i, k, s, p, _ in GRID}
    assert paths == {"banded", "rows", "correlation"}


def test_banded_forward_block_size_does_not_change_the_result(monkeypatch):
    with jax.enable_x64(True):
        x, w, _, res, _, y_ref, _, _ = _case(3, (5, 11, 1), (3, 2, 2), 1, 1, (1, 2))
        results, programs = [], set()
        for block in (1, 3, 4, 11, 16):
            monkeypatch.setattr(vconv, "BAND_BLOCK", block)  # read when traced
            # a new function each time: jit reuses a trace of the same function object
            banded = jax.jit(lambda x, w: vconv.forward_banded(x, w, res.geom))
            programs.add(banded.lower(x, w).as_text(debug_info=False))
            results.append(banded(x, w))
    assert len(programs) == 5  # each block size traced a program of its own
    for y in results:
        assert gradcheck.relative_error(y, y_ref) < TOL


def test_manual_conv_uses_the_fast_paths_under_jit_and_grad():
    # The custom_vjp wrapper of conv2d with a one-channel input (banded forward) and a
    # narrow few-channel one (banded input gradient), against autodiff of lax.
    from funcnet import vjp

    conv = vjp.manual(ops.conv2d)
    with jax.enable_x64(True):
        rng = np.random.default_rng(4)
        x = jax.device_put(rng.standard_normal((2, 9, 9, 1)))
        w1 = jax.device_put(rng.standard_normal((3, 3, 1, 3)))
        w2 = jax.device_put(rng.standard_normal((3, 3, 3, 2)))

        def net(conv_fn, x, w1, w2):
            return jnp.sum(jnp.tanh(conv_fn(jnp.tanh(conv_fn(x, w1, None, 1, "SAME")), w2,
                                            None, 1, "VALID")) ** 2)

        got = jax.jit(jax.grad(lambda *a: net(conv, *a), argnums=(0, 1, 2)))(x, w1, w2)
        want = jax.jit(jax.grad(lambda *a: net(ops.conv2d, *a), argnums=(0, 1, 2)))(x, w1, w2)
    for a, b in zip(got, want, strict=True):
        assert gradcheck.relative_error(a, b) < TOL


KERNEL_GRID = [
    # (N, H, W, C_in), (KH, KW, C_out), stride, padding, dilation, groups
    ((37, 7, 7, 1), (5, 5, 3), 1, "SAME", 1, 1),  # LeNet's conv1 in small; a short last piece
    ((20, 7, 7, 6), (5, 5, 4), 1, "VALID", 1, 1),  # LeNet's conv2 in small
    ((9, 8, 9, 2), (3, 2, 3), 2, "SAME", 2, 1),  # strided and dilated
    ((12, 6, 6, 4), (3, 3, 4), 1, 1, 1, 2),  # grouped: each group in pieces
]


@pytest.mark.parametrize("x_shape,k_shape,stride,padding,dilation,groups", KERNEL_GRID)
def test_kernel_gradient_in_pieces_equals_lax(monkeypatch, x_shape, k_shape, stride, padding,
                                              dilation, groups):
    # pieces of 4 examples (16 in use): the batch splits into several, the last one short
    monkeypatch.setattr(vconv, "KERNEL_GRAD_CHUNK", 4)
    rng = np.random.default_rng(5)
    with jax.enable_x64(True):
        x = jax.device_put(rng.standard_normal(x_shape))
        w = jax.device_put(rng.standard_normal((*k_shape[:2], x_shape[3] // groups, k_shape[2])))

        def forward(x, w):
            return vconv.conv2d_fwd(x, w, None, stride, padding, dilation, groups)

        g = jax.device_put(rng.standard_normal(jax.eval_shape(forward, x, w)[0].shape))
        assert vconv.kernel_grad_path(w.shape, x_shape[0], x.dtype) == "chunked"

        @jax.jit  # one program, traced here (the chunk size above is read when traced)
        def kernel_grads(x, w, g):
            _, res = forward(x, w)
            _, vjp = jax.vjp(lambda w: lax.conv_general_dilated(
                x, w, res.geom.stride, res.geom.pads, rhs_dilation=res.geom.dilation,
                dimension_numbers=vconv.DIMENSION_NUMBERS, feature_group_count=groups,
                precision=lax.Precision.HIGHEST), w)
            pieces = vconv.kernel_grad_chunked(res, g) if groups == 1 else None
            return vjp(g)[0], vconv.conv2d_kernel_grad(res, g), pieces

        dw_ref, chosen, pieces = kernel_grads(x, w, g)
        if groups == 1:
            assert gradcheck.relative_error(pieces, dw_ref) < TOL
    assert chosen.shape == dw_ref.shape
    assert gradcheck.relative_error(chosen, dw_ref) < TOL


def test_kernel_grad_path_rule(monkeypatch):
    f32 = jnp.float32
    assert vconv.kernel_grad_path((5, 5, 1, 6), 128, f32) == "chunked"  # LeNet's conv1
    assert vconv.kernel_grad_path((5, 5, 6, 16), 128, f32) == "chunked"  # and conv2
    assert vconv.kernel_grad_path((5, 5, 6, 16), 128, jnp.float64) == "chunked"
    assert vconv.kernel_grad_path((3, 3, 16, 17), 128, f32) == "lax"  # > 16 outputs
    assert vconv.kernel_grad_path((5, 5, 6, 16), 16, f32) == "lax"  # one piece
    assert vconv.kernel_grad_path((5, 5, 6, 16), 17, f32) == "chunked"
    assert vconv.kernel_grad_path((5, 5, 6, 16), 16 * 32, f32) == "chunked"
    assert vconv.kernel_grad_path((5, 5, 6, 16), 16 * 32 + 1, f32) == "lax"  # > 32 pieces
    assert vconv.kernel_grad_path((5, 5, 6, 16), 128, jnp.bfloat16) == "lax"
    with vconv.plain_formulations():
        assert vconv.kernel_grad_path((5, 5, 6, 16), 128, f32) == "lax"
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert vconv.kernel_grad_path((5, 5, 6, 16), 128, f32) == "lax"  # a CPU-only choice


def test_conv2d_itself_takes_the_banded_forward_and_plain_formulations_turn_it_off():
    # conv2d (inference, autodiff) and the hand rule's forward pass share the formulation;
    # inside plain_formulations every convolution is lax's (what the ONNX exporter needs)
    x = jnp.ones((2, 9, 9, 1))
    w = jnp.ones((3, 3, 1, 4))

    def prims(f):  # a new function each time: make_jaxpr caches traces by function
        return {str(e.primitive) for e in jax.make_jaxpr(lambda *a: f(*a))(x, w).eqns}

    def fwd(x, w):
        return ops.conv2d(x, w, None, 1, "SAME")

    assert "conv_general_dilated" not in prims(fwd) and "dot_general" in prims(fwd)
    with pytest.raises(RuntimeError):
        with vconv.plain_formulations():
            assert "conv_general_dilated" in prims(fwd)
            assert vconv.forward_path(w.shape, _geom((9, 9, 1), (3, 3))) == "lax"
            raise RuntimeError("leaves the block")
    assert vconv.forward_path(w.shape, _geom((9, 9, 1), (3, 3))) == "banded"  # restored
    with jax.enable_x64(True):
        rng = np.random.default_rng(6)
        x64 = jax.device_put(rng.standard_normal((2, 9, 9, 1)))
        w64 = jax.device_put(rng.standard_normal((3, 3, 1, 4)))
        ref = lax.conv_general_dilated(x64, w64, (1, 1), ((1, 1), (1, 1)),
                                       dimension_numbers=vconv.DIMENSION_NUMBERS,
                                       precision=lax.Precision.HIGHEST)
        assert gradcheck.relative_error(fwd(x64, w64), ref) < TOL


def test_kernel_gradient_convolution_is_in_the_canonical_layout():
    # NHWC / HWIO / NHWC with explicit transposes: inside a scanned epoch's while loop
    # XLA:CPU does not rewrite other layouts and ran them on a generic, slow kernel
    x = jnp.ones((4, 7, 7, 3))
    w = jnp.ones((3, 3, 3, 5))
    _, res = vconv.conv2d_fwd(x, w, None, 2, "SAME", 1)
    g = jnp.ones((4, 4, 4, 5))
    text = jax.jit(vconv.kernel_grad_correlation).lower(res, g).as_text()
    convs = [line for line in text.splitlines() if "stablehlo.convolution" in line]
    assert convs and all("[b, 0, 1, f]x[0, 1, i, o]->[b, 0, 1, f]" in c for c in convs), convs
