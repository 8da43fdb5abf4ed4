"""Gradient check report: every op's hand rule and whole networks, three ways.

For each op (one representative configuration per op; the tests sweep geometries) and
for an MLP and LeNet-5 with each pooling variant, prints the max relative error
(per-leaf normalised, see funcnet.gradcheck) of manual vs autodiff, manual vs finite
differences and autodiff vs finite differences, in float64 and float32, with the time of
each. Exits non-zero if any tolerance fails.

Network finite differences skip the entries whose one-sided differences disagree
(gradcheck.kinks): there ``f`` has a kink (ReLU at 0, a max-pool tie) within ``h`` and no
difference quotient estimates the derivative; the count is printed.

    .venv/bin/python experiments/gradcheck_report.py
"""

from __future__ import annotations

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import funcnet as fn
from funcnet import gradcheck, losses, ops, regularizers, vjp
from funcnet.gradcheck import relative_error

# Kink detection threshold: float32 one-sided differences carry ~1e-3 noise themselves.
KINK_RTOL = {"float64": 1e-4, "float32": 0.5}
TOL = {  # (manual vs autodiff, anything vs finite differences)
    "float64": (1e-10, 1e-6),
    "float32": (1e-5, 5e-2),  # h = 1e-3 and 7 digits: differences carry ~1e-3 noise
}


def _tree_err(a, b):
    return max(relative_error(x, y) for x, y in zip(
        jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True))


def op_cases(dtype):
    rng = np.random.default_rng(0)

    def arr(*shape, scale=1.0):
        return jnp.asarray(rng.standard_normal(shape) * scale, dtype)

    def distinct(*shape):
        n = int(np.prod(shape))
        return jnp.asarray(rng.permutation(n).reshape(shape) / n - 0.5, dtype)

    x = distinct(2, 7, 8, 2)
    z, t = arr(4, 5, scale=2.0), jnp.asarray(rng.random((4, 5)), dtype)
    geo = {"stride": 2, "padding": "SAME", "dilation": 1}
    pool = {"window": 3, "stride": 2, "padding": 1}
    return [
        ("dense", ops.dense, (arr(4, 5), arr(5, 3), arr(3)), {}),
        ("conv2d s2 SAME", ops.conv2d, (x, arr(3, 3, 2, 3), arr(3)), geo),
        ("conv2d C_in=1 (MAC path)", ops.conv2d, (arr(2, 7, 7, 1), arr(5, 5, 1, 3), None),
         {"padding": "SAME"}),
        ("conv2d dilation 2", ops.conv2d, (x, arr(2, 3, 2, 2), None),
         {"stride": 1, "padding": 1, "dilation": 2}),
        ("extract_patches", ops.extract_patches, (x,),
         {"window": (2, 3), "stride": 1, "padding": "SAME"}),
        ("locally_connected2d", ops.locally_connected2d,
         (x, arr(4, 4, 3, 3, 2, 2), arr(4, 4, 2)), geo),
        ("max_pool 2x2 (tiling)", ops.max_pool, (x,), {"window": 2}),
        ("max_pool 3/2 pad 1", ops.max_pool, (x,), pool),
        ("sum_pool", ops.sum_pool, (x,), pool),
        ("avg_pool incl. pad", ops.avg_pool, (x,), pool),
        ("avg_pool excl. pad", ops.avg_pool, (x,), {**pool, "count_include_pad": False}),
        ("l2_pool", ops.l2_pool, (x,), pool),
        ("lp_pool p=3", ops.lp_pool, (x,), {"p": 3.0, **pool}),
        ("feature_l2_pool", ops.feature_l2_pool, (x,), {"group_size": 2}),
        ("feature_max_pool", ops.feature_max_pool, (x,), {"group_size": 2}),
        ("sigmoid", ops.sigmoid, (z,), {}),
        ("tanh", ops.tanh, (z,), {}),
        ("relu", ops.relu, (z,), {}),
        ("softmax", ops.softmax, (z,), {}),
        ("log_softmax", ops.log_softmax, (z,), {}),
        ("quadratic", losses.quadratic, (z, t), {}),
        ("binary CE", losses.binary_cross_entropy, (jax.nn.sigmoid(z), t), {}),
        ("binary CE logits", losses.binary_cross_entropy_with_logits, (z, t), {}),
        ("softmax CE", losses.softmax_cross_entropy, (z, jnp.array([0, 4, 1, 1])), {}),
        ("l2 regularizer", regularizers.l2, ({"w": z, "b": t[0]},), {}),
        ("l1 regularizer", regularizers.l1, ({"w": z, "b": t[0]},), {}),
    ]


def nets():
    out = [("MLP 16-8 (8x8x1)", fn.models.mlp([16, 8], 10), (8, 8, 1))]
    for name, pool in [("max", fn.MaxPool(2)), ("avg", fn.AvgPool(2)), ("l2", fn.L2Pool(2)),
                       ("lp3", fn.LpPool(2, p=3.0))]:
        out.append((f"LeNet-5 {name} pool", fn.models.lenet5(pool=pool), (28, 28, 1)))
    return out


def _zero_where(a, m):
    return jnp.where(m, 0, a)


def _timed(f, *a):
    t = time.perf_counter()
    out = jax.block_until_ready(f(*a))
    return out, time.perf_counter() - t


def main() -> int:
    failures = []
    header = (f"{'case':28s} {'dtype':7s} {'man-auto':>9s} {'man-fd':>9s} {'auto-fd':>9s} "
              f"{'t_man':>7s} {'t_auto':>7s} {'t_fd':>7s}  note")
    for dtype_name in ("float64", "float32"):
        dtype = jnp.float64 if dtype_name == "float64" else jnp.float32
        tol_auto, tol_fd = TOL[dtype_name]
        with jax.enable_x64(True):
            print(f"\n== ops, {dtype_name} (tolerances: manual-autodiff {tol_auto:g}, "
                  f"vs finite differences {tol_fd:g})\n{header}")
            for name, op, args, static in op_cases(dtype):
                t = time.perf_counter()
                r = gradcheck.check_rule(op, args, static)
                elapsed = time.perf_counter() - t
                ma = max(r.vs_autodiff.values())
                mf = max(r.vs_finite_diff.values())
                af = max(r.autodiff_vs_finite_diff.values())
                ok = ma <= tol_auto and mf <= tol_fd and af <= tol_fd
                print(f"{name:28s} {dtype_name:7s} {ma:9.1e} {mf:9.1e} {af:9.1e} "
                      f"{'':>7s} {'':>7s} {elapsed:7.2f}  {'ok' if ok else 'FAIL'}")
                if not ok:
                    failures.append((name, dtype_name))
            print(f"\n== networks, {dtype_name}, batch 2\n{header}")
            for name, net, shape in nets():
                params = jax.tree_util.tree_map(lambda a, dtype=dtype: a.astype(dtype),
                                                net.init(jax.random.key(0), shape))
                x = jax.random.normal(jax.random.key(1), (2, *shape), dtype)
                y = jnp.array([3, 7])

                def f(p, net=net, x=x, y=y):
                    return losses.softmax_cross_entropy(net.apply(p, x), y)

                man = jax.jit(vjp.value_and_grad(net, losses.softmax_cross_entropy))
                _, _ = _timed(man, params, x, y)
                (_, g_man), t_man = _timed(man, params, x, y)
                note = ""
                try:
                    auto = jax.jit(jax.grad(f))
                    _timed(auto, params)
                except ValueError:
                    auto = jax.grad(f)  # foundation bug: ops pools not differentiable in jit
                    note = "autodiff eager (ops.pool bug under jit); "
                g_auto, t_auto = _timed(auto, params)
                fd, t_fd = _timed(gradcheck.finite_differences, f, params)
                skip = gradcheck.kinks(fd, KINK_RTOL[dtype_name])
                n_skip = int(sum(int(np.sum(m)) for m in jax.tree_util.tree_leaves(skip)))

                def masked(tree, skip=skip):
                    return jax.tree_util.tree_map(_zero_where, tree, skip)

                ma = _tree_err(g_man, g_auto)
                mf = _tree_err(masked(g_man), masked(fd.central))
                af = _tree_err(masked(g_auto), masked(fd.central))
                # float32 network differences (h = 1e-3, ~60K parameters, ReLU kinks) are
                # dominated by rounding (eps |f| / h ~ 2e-4 absolute against gradient
                # entries as small as 1e-4) and kink crossings: reported, gated in float64.
                gate_fd = dtype_name == "float64"
                ok = ma <= tol_auto and (not gate_fd or (mf <= tol_fd and af <= tol_fd))
                if not gate_fd:
                    note += "FD informational; "
                n = sum(a.size for a in jax.tree_util.tree_leaves(params))
                note += f"{n} params, {n_skip} at kinks skipped"
                print(f"{name:28s} {dtype_name:7s} {ma:9.1e} {mf:9.1e} {af:9.1e} "
                      f"{t_man:7.3f} {t_auto:7.3f} {t_fd:7.2f}  {'ok' if ok else 'FAIL'} {note}")
                if not ok:
                    failures.append((name, dtype_name))
    print()
    if failures:
        print(f"FAILED: {failures}")
        return 1
    print("all gradient checks passed")
    return 0


if __name__ == "__main__":
    import argparse

    argparse.ArgumentParser(description=__doc__.strip().splitlines()[0],
                            epilog="It takes no options.").parse_args()
    sys.exit(main())
