"""Benchmark: hand-written backward rules vs JAX autodiff, and numerical_grad's speed.

1. LeNet-5 train step (batch 128, 28x28x1, SGD via optax), jitted: ``jax.value_and_grad``
   vs ``funcnet.vjp.value_and_grad``; medians of interleaved repeats. PyTorch eager if
   torch is installed (optional; never needed by the tests).
2. ``gradcheck.numerical_grad`` on all 61,706 LeNet-5 parameters (float64, batch 2),
   against a per-parameter loop of jitted ``f`` calls (timed on a sample of parameters
   and extrapolated), and the directional check.

    .venv/bin/python experiments/bench_vjp.py [--repeats 50]
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax

import funcnet as fn
from funcnet import gradcheck, losses, vjp


def median_ms(fn_, repeats):
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn_())
        ts.append(time.perf_counter() - t)
    return 1e3 * float(np.median(ts)), 1e3 * float(np.percentile(ts, 25)), 1e3 * float(
        np.percentile(ts, 75))


def bench_step(repeats: int) -> None:
    net = fn.models.lenet5()
    params = net.init(jax.random.key(0), (28, 28, 1))
    x = jax.random.normal(jax.random.key(1), (128, 28, 28, 1))
    y = jax.random.randint(jax.random.key(2), (128,), 0, 10)
    opt = optax.sgd(0.01)

    def make(value_and_grad):
        @jax.jit
        def step(p, s, x, y):
            loss, g = value_and_grad(p, x, y)
            u, s = opt.update(g, s, p)
            return optax.apply_updates(p, u), s, loss

        return step

    auto = jax.value_and_grad(lambda p, x, y: losses.softmax_cross_entropy(net.apply(p, x), y))
    manual = vjp.value_and_grad(net, losses.softmax_cross_entropy)
    (la, ga), (lm, gm) = jax.jit(auto)(params, x, y), jax.jit(manual)(params, x, y)
    err = max(gradcheck.relative_error(a, b) for a, b in
              zip(jax.tree_util.tree_leaves(ga), jax.tree_util.tree_leaves(gm), strict=True))
    steps = {"autodiff": make(auto), "manual": make(manual)}
    state = {k: (params, opt.init(params)) for k in steps}
    for k, step in steps.items():
        jax.block_until_ready(step(*state[k], x, y))
    results = {k: [] for k in steps}
    for _ in range(5):  # interleave rounds so load changes hit both alike
        for k, step in steps.items():
            p, s = state[k]
            results[k].append(median_ms(lambda step=step, p=p, s=s: step(p, s, x, y),
                                        repeats // 5)[0])
    print(f"LeNet-5 train step, batch 128, float32 (loss {float(la):.6f} vs {float(lm):.6f}, "
          f"max rel. grad difference {err:.1e})")
    print(f"{'grad':10s} {'median ms':>10s} {'min round':>10s} {'max round':>10s}")
    for k, v in results.items():
        print(f"{k:10s} {np.median(v):10.2f} {min(v):10.2f} {max(v):10.2f}")
    try:
        import torch
    except ImportError:
        print("torch not installed: PyTorch eager comparison skipped")
        return
    torch.set_num_threads(os.cpu_count() or 1)
    tnet = torch.nn.Sequential(
        torch.nn.Conv2d(1, 6, 5, padding=2), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(6, 16, 5), torch.nn.ReLU(), torch.nn.MaxPool2d(2), torch.nn.Flatten(),
        torch.nn.Linear(400, 120), torch.nn.ReLU(), torch.nn.Linear(120, 84), torch.nn.ReLU(),
        torch.nn.Linear(84, 10))
    topt = torch.optim.SGD(tnet.parameters(), lr=0.01)
    tx, ty = torch.randn(128, 1, 28, 28), torch.randint(0, 10, (128,))

    def tstep():
        topt.zero_grad()
        loss = torch.nn.functional.cross_entropy(tnet(tx), ty)
        loss.backward()
        topt.step()
        return jnp.zeros(())

    tstep()
    print(f"{'torch eager':10s} {median_ms(tstep, repeats)[0]:10.2f}")


def bench_numerical_grad(sample: int) -> None:
    with jax.enable_x64(True):
        net = fn.models.lenet5()
        params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64),
                                        net.init(jax.random.key(0), (28, 28, 1)))
        x = jax.random.normal(jax.random.key(1), (2, 28, 28, 1), jnp.float64)
        y = jnp.array([3, 7])

        def f(p):
            return losses.softmax_cross_entropy(net.apply(p, x), y)

        n = sum(a.size for a in jax.tree_util.tree_leaves(params))
        t = time.perf_counter()
        jax.block_until_ready(gradcheck.numerical_grad(f, params))
        first = time.perf_counter() - t
        t = time.perf_counter()
        num = jax.block_until_ready(gradcheck.numerical_grad(f, params))
        second = time.perf_counter() - t
        # The per-parameter loop: one jitted f, two calls per parameter.
        flat, unravel = jax.flatten_util.ravel_pytree(params)
        f_flat = jax.jit(lambda v: f(unravel(v)))
        f_flat(flat).block_until_ready()
        idx = np.random.default_rng(0).choice(flat.size, sample, replace=False)
        h = 1e-6
        t = time.perf_counter()
        loop = [float((f_flat(flat.at[i].add(h)) - f_flat(flat.at[i].add(-h))) / (2 * h))
                for i in idx]
        per_param = (time.perf_counter() - t) / sample
        err = float(np.max(np.abs(np.asarray(jax.flatten_util.ravel_pytree(num)[0])[idx]
                                  - np.array(loop))))
        grads = jax.grad(f)(params)
        gradcheck.directional_check(f, params, grads, jax.random.key(0), 4, tol=1e-6)
        t = time.perf_counter()
        gradcheck.directional_check(f, params, grads, jax.random.key(1), 4, tol=1e-6)
        directional = time.perf_counter() - t
    loop_total = per_param * n
    print(f"\nnumerical_grad, LeNet-5, {n} params, float64, batch 2, central differences")
    print(f"  numerical_grad (incl. compile)  {first:7.2f} s")
    print(f"  numerical_grad (second call)    {second:7.2f} s")
    print(f"  per-parameter loop (extrapolated from {sample} params) {loop_total:7.1f} s "
          f"-> speed-up {loop_total / first:.1f}x incl. compile, {loop_total / second:.1f}x")
    print(f"  max |difference| vs the loop on the sample: {err:.1e}")
    print(f"  directional check, 4 directions: {directional:.3f} s")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--sample", type=int, default=1000)
    args = parser.parse_args()
    print(f"jax {jax.__version__}, {jax.devices()[0].platform}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f}")
    bench_step(args.repeats)
    bench_numerical_grad(args.sample)


if __name__ == "__main__":
    main()
