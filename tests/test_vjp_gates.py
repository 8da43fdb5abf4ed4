"""The lecture's worked examples and gate patterns, reproduced with the gate rules."""

import jax
import numpy as np
import pytest

from funcnet import gradcheck
from funcnet.vjp import gates


def test_slide_example_x_plus_y_times_z():
    # f = (x + y) z at x = -2, y = 5, z = -4: q = 3, f = -12; grads (-4, -4, 3).
    x, y, z = -2.0, 5.0, -4.0
    q, add_res = gates.add_fwd(x, y)
    f, mul_res = gates.multiply_fwd(q, z)
    assert (q, f) == (3.0, -12.0)
    dq, dz = gates.multiply_bwd(mul_res, 1.0)  # swap multiplier: df/dq = z, df/dz = q
    dx, dy = gates.add_bwd(add_res, dq)  # distributor
    assert (dx, dy, dz) == (-4.0, -4.0, 3.0)


def test_slide_example_sigmoid_neuron_gate_by_gate():
    with jax.enable_x64(True):
        _sigmoid_neuron()


def _sigmoid_neuron():
    # f(w, x) = 1 / (1 + exp(-(w0 x0 + w1 x1 + w2))), w = (2, -3, -3), x = (-1, -2).
    w0, w1, w2, x0, x1 = 2.0, -3.0, -3.0, -1.0, -2.0
    a, r_a = gates.multiply_fwd(w0, x0)
    b, r_b = gates.multiply_fwd(w1, x1)
    s, r_s = gates.add_fwd(a, b)
    t, r_t = gates.add_fwd(s, w2)
    u, r_u = gates.scale_fwd(t, -1.0)
    e, r_e = gates.exp_fwd(u)
    v, r_v = gates.add_const_fwd(e, 1.0)
    f, r_f = gates.reciprocal_fwd(v)
    assert round(float(f), 4) == 0.7311
    (dv,) = gates.reciprocal_bwd(r_f, 1.0)
    de, _ = gates.add_const_bwd(r_v, dv)
    (du,) = gates.exp_bwd(r_e, de)
    dt, _ = gates.scale_bwd(r_u, du)
    ds, dw2 = gates.add_bwd(r_t, dt)
    da, db = gates.add_bwd(r_s, ds)
    dw0, dx0 = gates.multiply_bwd(r_a, da)
    dw1, dx1 = gates.multiply_bwd(r_b, db)
    np.testing.assert_allclose([dw0, dw1, dw2], [-0.1966, -0.3932, 0.1966], atol=5e-5)
    np.testing.assert_allclose([dx0, dx1], [0.3932, -0.5898], atol=5e-5)
    # The same neuron with the sigmoid as one gate: identical gradients.
    sig, r_sig = gates.sigmoid_fwd(t)
    (dt_sig,) = gates.sigmoid_bwd(r_sig, 1.0)
    assert abs(float(sig) - float(f)) < 1e-15 and abs(float(dt_sig) - float(dt)) < 1e-15
    assert round(float(dt_sig), 2) == 0.2  # the slide's (1 - 0.73)(0.73) = 0.2


def test_gate_patterns():
    g = 2.0
    assert gates.add_bwd(gates.add_fwd(3.0, 4.0)[1], g) == (g, g)  # distributor
    assert gates.copy_bwd(gates.copy_fwd(3.0)[1], (g, 5.0)) == (g + 5.0,)  # adder
    assert gates.multiply_bwd(gates.multiply_fwd(3.0, 4.0)[1], g) == (4.0 * g, 3.0 * g)
    for a, b, expected in [(3.0, 4.0, (0.0, g)), (5.0, 4.0, (g, 0.0)), (4.0, 4.0, (g, 0.0))]:
        got = gates.maximum_bwd(gates.maximum_fwd(a, b)[1], g)  # router; a tie: the first
        assert tuple(float(v) for v in got) == expected
    assert float(gates.exp_bwd(gates.exp_fwd(0.0)[1], g)[0]) == g  # e^0 = 1
    assert gates.reciprocal_bwd(gates.reciprocal_fwd(2.0)[1], g) == (-g / 4,)  # -1/x^2
    assert gates.add_const_bwd(gates.add_const_fwd(2.0, 7.0)[1], g)[0] == g  # d/dx = 1
    assert gates.scale_bwd(gates.scale_fwd(2.0, 7.0)[1], g)[0] == 7.0 * g  # d/dx = a


@pytest.mark.parametrize(
    "gate,n_args",
    [(gates.add, 2), (gates.multiply, 2), (gates.maximum, 2), (gates.exp, 1),
     (gates.reciprocal, 1), (gates.add_const, 2), (gates.scale, 2), (gates.sigmoid, 1),
     (gates.copy, 1)],
    ids=lambda v: getattr(v, "__name__", str(v)),
)
def test_gate_rules_match_autodiff_and_differences_elementwise(gate, n_args):
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        args = tuple(jax.device_put(rng.standard_normal(5) + 3.0 * (i == 0)) for i in range(n_args))
        report = gradcheck.check_rule(gate, args)
    assert max(report.vs_autodiff.values()) < 1e-12, report
    assert max(report.vs_finite_diff.values()) < 1e-6, report
