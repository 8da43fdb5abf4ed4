"""Train-step throughput: funcnet's paths against a hand-written plain-JAX reference.

    python experiments/bench_train.py                 # both models, default repeats
    python experiments/bench_train.py --repeats 15 --steps 40 --models lenet5
    python experiments/bench_train.py --investigate   # + LeNet-5 scan variants (see below)

Models: MLP 784-256-256-10 and LeNet-5 (``funcnet.models.lenet5()``), inputs 28x28x1,
batch 128, synthetic data, ``optax.sgd(0.01)`` and softmax cross-entropy everywhere.

Paths, all measured in the same process, interleaved round-robin so that load from other
processes hits them alike; each figure is the median over ``--repeats`` epochs of
``--steps`` steps (after a compile + warm-up epoch):

- ``ref loop``   — plain JAX: ``jax.jit(step, donate)`` written by hand, a Python loop
  over pre-made device batches. The zero-overhead reference.
- ``ref scan``   — plain JAX: the same step body in a ``lax.scan`` over the batches.
- ``make_step``  — ``funcnet.train.make_step`` on the same pre-made batches.
- ``fit loop``   — the engine of ``funcnet.train.fit``: jitted step that gathers its
  shuffled batch on device, with per-example weights and the non-finite guard.
- ``fit scan``   — the same, whole epoch as one compiled ``lax.scan``.

``--investigate`` adds, for LeNet-5, the reference scan with ``unroll=2`` and a variant
whose conv backward pass is a hand-written ``custom_vjp`` that states both backward
convolutions in the canonical NHWC/HWIO form (explicit transposes), so that XLA:CPU can
hand them to its fast convolution path inside the scan's while loop as well.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

import funcnet as fn
from funcnet import losses, train

BATCH = 128
LR = 0.01


# ---------------------------------------------------------------------------------------
# Hand-written plain-JAX networks (the same parameter pytrees as funcnet's)
# ---------------------------------------------------------------------------------------


def _conv(x, w, b, padding):
    y = lax.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + b


@jax.custom_vjp
def _conv_canonical(x, w, b, pads):
    return _conv(x, w, b, pads)


def _conv_canonical_fwd(x, w, b, pads):
    return _conv(x, w, b, pads), (x, w, pads)


def _conv_canonical_bwd(res, g):
    """Stride-1 conv backward written as two convolutions in the canonical NHWC/HWIO form.

    ``dW[k,l,c,o] = sum_{n,i,j} xp[n,i+k,j+l,c] g[n,i,j,o]``: a conv of ``xp`` with the
    roles of batch and channels swapped (lhs ``(C, Hp, Wp, N)``, rhs ``(OH, OW, N, O)``).
    ``dx``: a full correlation of ``g`` with the flipped kernel, in and out swapped.
    """
    x, w, pads = res
    kh, kw, _, _ = w.shape
    xp = jnp.pad(x, ((0, 0), *pads, (0, 0)))
    dw = lax.conv_general_dilated(
        jnp.transpose(xp, (3, 1, 2, 0)), jnp.transpose(g, (1, 2, 0, 3)), (1, 1), "VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )  # (C, KH, KW, O)
    dw = jnp.transpose(dw, (1, 2, 0, 3))
    (plo, phi), (qlo, qhi) = pads
    w_flip = jnp.transpose(w[::-1, ::-1], (0, 1, 3, 2))  # (KH, KW, O, C)
    dx = lax.conv_general_dilated(
        g, w_flip, (1, 1), ((kh - 1 - plo, kh - 1 - phi), (kw - 1 - qlo, kw - 1 - qhi)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    return dx, dw, jnp.sum(g, axis=(0, 1, 2)), None


_conv_canonical.defvjp(_conv_canonical_fwd, _conv_canonical_bwd)


def _max_pool(x):
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")


def ref_mlp(p, x):
    h = x.reshape(x.shape[0], -1)
    h = jax.nn.relu(h @ p[1]["w"] + p[1]["b"])
    h = jax.nn.relu(h @ p[3]["w"] + p[3]["b"])
    return h @ p[5]["w"] + p[5]["b"]


def ref_lenet5(p, x, canonical=False):
    conv = (lambda x, w, b, pads: _conv_canonical(x, w, b, pads)) if canonical else _conv
    h = _max_pool(jax.nn.relu(conv(x, p[0]["w"], p[0]["b"], ((2, 2), (2, 2)))))
    h = _max_pool(jax.nn.relu(conv(h, p[3]["w"], p[3]["b"], ((0, 0), (0, 0)))))
    h = h.reshape(h.shape[0], -1)
    h = jax.nn.relu(h @ p[7]["w"] + p[7]["b"])
    h = jax.nn.relu(h @ p[9]["w"] + p[9]["b"])
    return h @ p[11]["w"] + p[11]["b"]


def ref_update(apply):
    opt = optax.sgd(LR)

    def loss_fn(p, x, y):
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(apply(p, x), y))

    def update(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return update


# ---------------------------------------------------------------------------------------
# Paths: each is (init() -> carry, run_epoch(carry) -> carry) timed per epoch
# ---------------------------------------------------------------------------------------


def _copy(tree):
    return jax.tree_util.tree_map(lambda a: jnp.array(a, copy=True), tree)


def make_paths(net, ref_apply, params, x_all, y_all, steps, investigate):
    opt = optax.sgd(LR)
    xb = [x_all[i * BATCH : (i + 1) * BATCH] for i in range(steps)]
    yb = [y_all[i * BATCH : (i + 1) * BATCH] for i in range(steps)]
    xs = x_all.reshape(steps, BATCH, *x_all.shape[1:])
    ys = y_all.reshape(steps, BATCH)
    paths = {}

    def ref_paths(name, apply, unroll=1):
        update = ref_update(apply)
        step = jax.jit(update, donate_argnums=(0, 1))

        def loop(c):
            p, s = c
            for i in range(steps):
                p, s, _ = step(p, s, xb[i], yb[i])
            return p, s

        def epoch(p, s, xs, ys):
            def body(c, b):
                p, s, loss = update(*c, *b)
                return (p, s), loss

            (p, s), _ = lax.scan(body, (p, s), (xs, ys), unroll=unroll)
            return p, s

        epoch_j = jax.jit(epoch, donate_argnums=(0, 1))
        init = lambda: (_copy(params), opt.init(_copy(params)))  # noqa: E731
        if unroll == 1:
            paths[f"{name} loop"] = (init, loop)
        paths[f"{name} scan" + (f" unroll={unroll}" if unroll > 1 else "")] = (
            init, lambda c: epoch_j(*c, xs, ys))

    ref_paths("ref", ref_apply)

    step = train.make_step(net, losses.softmax_cross_entropy, opt)

    def make_step_loop(state):
        for i in range(steps):
            state, _ = step(state, xb[i], yb[i])
        return state

    paths["make_step loop"] = (lambda: train.init_state(params, opt), make_step_loop)

    update = train._make_update(net, losses.softmax_cross_entropy, opt, None, 0.0, "autodiff")
    for mode in ("loop", "scan"):
        runner = train.EpochRunner(update, x_all, y_all, BATCH, mode)
        key = jax.random.key(0)
        active = jnp.asarray(True)

        def run(state, runner=runner, key=key, active=active):
            return runner.run(state, key, active)[0]

        paths[f"fit {mode}"] = (lambda: train.init_state(params, opt), run)

    if investigate and ref_apply is ref_lenet5:
        ref_paths("ref", ref_apply, unroll=2)
        ref_paths("ref canonical-bwd", lambda p, x: ref_lenet5(p, x, canonical=True))
    return paths


def _block(tree):
    jax.block_until_ready(jax.tree_util.tree_leaves(tree))


def bench(paths, steps, repeats):
    carries = {}
    for name, (init, run) in paths.items():  # compile and warm up
        carries[name] = run(init())
        _block(carries[name])
    times = {name: [] for name in paths}
    for _ in range(repeats):
        for name, (_, run) in paths.items():
            t0 = time.perf_counter()
            carries[name] = run(carries[name])
            _block(carries[name])
            times[name].append((time.perf_counter() - t0) / steps)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=["mlp", "lenet5"], choices=["mlp", "lenet5"])
    parser.add_argument("--steps", type=int, default=20, help="steps per timed epoch")
    parser.add_argument("--repeats", type=int, default=9, help="timed epochs per path")
    parser.add_argument("--investigate", action="store_true")
    args = parser.parse_args(argv)

    print(f"jax {jax.__version__}, backend {jax.default_backend()}, {os.cpu_count()} CPUs, "
          f"{platform.processor() or platform.machine()}; batch {BATCH}, {args.steps} steps "
          f"x {args.repeats} repeats, median; load average at start "
          f"{os.getloadavg()[0]:.2f}")  # fmt: skip
    rng = np.random.default_rng(0)
    n = BATCH * args.steps
    x = jnp.asarray(rng.random((n, 28, 28, 1), dtype=np.float32))
    y = jnp.asarray(rng.integers(0, 10, n).astype(np.int32))
    builders = {"mlp": (lambda: fn.models.mlp([256, 256], 10), ref_mlp),
                "lenet5": (fn.models.lenet5, ref_lenet5)}  # fmt: skip
    for model in args.models:
        make_net, ref_apply = builders[model]
        net = make_net()
        params = net.init(jax.random.key(0), (28, 28, 1))
        paths = make_paths(net, ref_apply, params, x, y, args.steps, args.investigate)
        medians = bench(paths, args.steps, args.repeats)
        ref = medians["ref loop"]
        print(f"\n{model} (batch {BATCH})")
        print(f"| {'path':<24} | {'ms/step':>8} | {'steps/s':>8} | {'vs ref loop':>11} |")
        print(f"|{'-' * 26}|{'-' * 10}|{'-' * 10}|{'-' * 13}|")
        for name, sec in medians.items():
            print(f"| {name:<24} | {sec * 1e3:8.3f} | {1 / sec:8.0f} | "
                  f"{(sec / ref - 1) * 100:+10.1f}% |")  # fmt: skip
    print(f"\nload average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
