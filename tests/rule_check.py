"""Shared test helper: an op's hand-written rule against ``jax.vjp`` and central
differences, in one compiled program (float64: call it inside ``jax.enable_x64``)."""

import jax
import jax.numpy as jnp
import numpy as np

from funcnet import gradcheck

VJP_TOL = 1e-10  # float64, the same maths up to summation order
FD_TOL = 1e-6  # central differences, h = 1e-6


def rand(shape, seed, loc=0.0, scale=1.0):
    return jax.device_put(loc + scale * np.random.default_rng(seed).standard_normal(shape))


def check_op_rule(rule, op, arrays, static=None, seed=0):
    """``rule`` (a ``Rule`` of ``op``) at ``arrays`` (name -> array or None): its forward
    equals ``op``, its backward equals ``jax.vjp`` and central differences, with the
    arguments' shapes and dtypes, and ``None`` for every absent argument."""
    static = dict(static or {})
    present = [n for n in rule.diff if arrays.get(n) is not None]

    def call(*a):
        return op(**{**arrays, **dict(zip(present, a, strict=True))}, **static)

    @jax.jit  # one compilation for the whole comparison
    def run(primals, g):
        out, res = rule.fwd(**{**arrays, **dict(zip(present, primals, strict=True))}, **static)
        ref_out, vjp_fn = jax.vjp(call, *primals)
        fd = gradcheck.numerical_grad(lambda ps: jnp.sum(call(*ps) * g), primals)
        return out, rule.bwd(res, g), ref_out, vjp_fn(g), fd

    primals = tuple(arrays[n] for n in present)
    g = rand(jax.eval_shape(call, *primals).shape, seed + 100)
    out, mine, ref_out, ref, fd = run(primals, g)
    mine = dict(zip(rule.diff, mine, strict=True))
    assert gradcheck.relative_error(out, ref_out) < VJP_TOL
    for name in rule.diff:
        if name not in present:
            assert mine[name] is None, name
    for name, r, d in zip(present, ref, fd, strict=True):
        assert mine[name].shape == arrays[name].shape, name
        assert mine[name].dtype == arrays[name].dtype, name
        assert gradcheck.relative_error(mine[name], r) < VJP_TOL, name
        assert gradcheck.relative_error(mine[name], d) < FD_TOL, name
