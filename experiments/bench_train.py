"""Train-step throughput: funcnet's paths against plain JAX, Flax and PyTorch eager.

    python experiments/bench_train.py                 # both models, default repeats
    python experiments/bench_train.py --repeats 15 --steps 40 --models lenet5
    python experiments/bench_train.py --investigate   # + LeNet-5 scan variants (see below)
    python experiments/bench_train.py --no-torch --no-flax   # funcnet and plain JAX only

Models: MLP 784-256-256-10 and LeNet-5 (``funcnet.models.lenet5()``: Conv(6, 5x5, SAME)
ReLU MaxPool2 Conv(16, 5x5, VALID) ReLU MaxPool2 Flatten Dense120 ReLU Dense84 ReLU
Dense10), inputs 28x28x1, batch 128, synthetic data, SGD lr 0.01 (``optax.sgd(0.01)``,
``torch.optim.SGD``) and mean softmax cross-entropy everywhere.

JAX paths, all measured in this process, interleaved round-robin so that load from other
processes hits them alike; each figure is the median over ``--repeats`` epochs of
``--steps`` steps (after a compile + warm-up epoch), on the same pre-made device batches:

- ``ref loop``   — plain JAX: ``jax.jit(step, donate)`` written by hand, a Python loop
  over pre-made device batches. The zero-overhead reference.
- ``ref scan``   — plain JAX: the same step body in a ``lax.scan`` over the batches.
- ``make_step loop`` — ``funcnet.train.make_step`` (``grad="autodiff"``).
- ``make_step manual loop`` — the same with ``grad="manual"``: funcnet's hand-written
  backward rules (:mod:`funcnet.vjp`) instead of ``jax.value_and_grad``.
- ``fit loop``   — the engine of ``funcnet.train.fit`` with fit's default gradient
  (``grad="auto"``: the hand rules for LeNet-5, autodiff for the MLP): jitted step that
  gathers its shuffled batch on device, with per-example weights and the non-finite guard.
- ``fit scan``   — the same, whole epoch as one compiled ``lax.scan``.
- ``flax nnx.jit`` — Flax NNX (the current Flax API), the same architecture as an
  ``nnx.Sequential`` holding the same initial parameters; the tutorials' step:
  ``nnx.jit``, ``nnx.value_and_grad``, ``nnx.Optimizer(..., wrt=nnx.Param).update``.
  ``nnx.jit`` walks the module graph in Python on every call (see Flax's guide
  "Performance considerations").
- ``flax jax.jit`` — the same NNX model in that guide's functional form: ``nnx.split``
  once, ``nnx.merge`` inside a ``jax.jit(step, donate)`` over the parameter state.
  Without Flax (``pip install flax``; it comes with the "onnx" extra) these two rows are
  skipped, and the reason printed.

``torch eager`` — PyTorch eager (``zero_grad``, forward, loss, ``backward``,
``opt.step()``) timed by ``experiments/bench_torch_step.py`` with the same warm-up,
``--steps`` and ``--repeats`` and the same synthetic numbers, in its own process (JAX's
idle thread pool slows PyTorch in a shared one) that never imports jax. It runs once,
for all models, before any JAX path, so ratios against it compare separate processes on
the same machine at different times (not interleaved: a change in load from other
processes between the two shows up in them). Skipped, with the reason printed, when
torch is not installed (``pip install torch``, funcnet's "torch" extra). PyTorch's
OpenMP threads (one per core by default; ``--torch-threads`` sets their number) suffer
far more than XLA's thread pool from another busy process: in a short run on a 2-core
machine with a training run beside it, a 2-thread step took 30 (LeNet-5) to 70 (MLP)
times as long as a 1-thread one. Time PyTorch on an otherwise idle machine, or give it
no more threads than there are free cores.

Each table gives, per path, the median ms/step, steps/s and the ratio of its time per
step to the ``ref loop``'s and to PyTorch eager's (below 1: faster).

``--investigate`` adds, for LeNet-5, the reference scan with ``unroll=2`` and a variant
whose conv backward pass is a hand-written ``custom_vjp`` that states both backward
convolutions in the canonical NHWC/HWIO form (explicit transposes), so that XLA:CPU can
hand them to its fast convolution path inside the scan's while loop as well.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

import funcnet as fn
from funcnet import losses, train

try:  # optional: the Flax rows are skipped without it
    import flax
    from flax import nnx
except Exception as e:  # not only ImportError: a flax that does not fit this jax fails too
    flax = nnx = None
    FLAX_UNAVAILABLE = f"{type(e).__name__}: {e}"
else:
    FLAX_UNAVAILABLE = None

HERE = os.path.dirname(os.path.abspath(__file__))
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
# Flax NNX networks: the same architectures as nnx.Sequential, layer i at the index of
# funcnet's layer i, so that funcnet's parameters params[i] load into layer i
# ---------------------------------------------------------------------------------------


def _flatten(x):
    return x.reshape(x.shape[0], -1)


def _flax_pool(x):
    return nnx.max_pool(x, window_shape=(2, 2), strides=(2, 2))


def flax_mlp(rngs):
    return nnx.Sequential(
        _flatten,
        nnx.Linear(28 * 28, 256, rngs=rngs), nnx.relu,
        nnx.Linear(256, 256, rngs=rngs), nnx.relu,
        nnx.Linear(256, 10, rngs=rngs),
    )  # fmt: skip


def flax_lenet5(rngs):
    return nnx.Sequential(
        nnx.Conv(1, 6, (5, 5), padding="SAME", rngs=rngs), nnx.relu, _flax_pool,
        nnx.Conv(6, 16, (5, 5), padding="VALID", rngs=rngs), nnx.relu, _flax_pool,
        _flatten,
        nnx.Linear(16 * 5 * 5, 120, rngs=rngs), nnx.relu,
        nnx.Linear(120, 84, rngs=rngs), nnx.relu,
        nnx.Linear(84, 10, rngs=rngs),
    )  # fmt: skip


def flax_model(build, params):
    """``build(rngs)`` holding copies of funcnet's ``params`` (the same starting point)."""
    model = build(nnx.Rngs(0))
    for layer, p in zip(model.layers, params, strict=True):
        if p:  # Dense/Conv: w is (in, out) / HWIO in both libraries
            layer.kernel[...] = jnp.array(p["w"], copy=True)
            layer.bias[...] = jnp.array(p["b"], copy=True)
    return model


def flax_paths(build, params, xb, yb, steps):
    """The two Flax paths (see the module docstring) on the batches ``xb``, ``yb``."""
    tx = optax.sgd(LR)

    def loss_fn(model, x, y):
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(model(x), y))

    @nnx.jit
    def nnx_step(model, optimizer, x, y):
        loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
        optimizer.update(model, grads)
        return loss

    def nnx_init():
        model = flax_model(build, params)
        return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

    def nnx_loop(c):
        for i in range(steps):
            nnx_step(*c, xb[i], yb[i])  # updates the model and optimizer in place
        return c

    graphdef, _ = nnx.split(flax_model(build, params))

    def pure_step(state, opt_state, x, y):
        loss, grads = jax.value_and_grad(lambda s: loss_fn(nnx.merge(graphdef, s), x, y))(state)
        updates, opt_state = tx.update(grads, opt_state, state)
        return optax.apply_updates(state, updates), opt_state, loss

    pure_step = jax.jit(pure_step, donate_argnums=(0, 1))

    def pure_init():
        state = nnx.state(flax_model(build, params))
        return state, tx.init(state)

    def pure_loop(c):
        for i in range(steps):
            *c, _ = pure_step(*c, xb[i], yb[i])
        return c

    return {"flax nnx.jit": (nnx_init, nnx_loop), "flax jax.jit": (pure_init, pure_loop)}


# ---------------------------------------------------------------------------------------
# Paths: each is (init() -> carry, run_epoch(carry) -> carry) timed per epoch
# ---------------------------------------------------------------------------------------


def _copy(tree):
    return jax.tree_util.tree_map(lambda a: jnp.array(a, copy=True), tree)


def make_paths(net, ref_apply, params, x_all, y_all, steps, investigate, flax_build=None):
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

    for grad in ("autodiff", "manual"):
        step = train.make_step(net, losses.softmax_cross_entropy, opt, grad=grad)

        def make_step_loop(state, step=step):
            for i in range(steps):
                state, _ = step(state, xb[i], yb[i])
            return state

        name = "make_step loop" if grad == "autodiff" else f"make_step {grad} loop"
        paths[name] = (lambda: train.init_state(params, opt), make_step_loop)

    # fit's default gradient (grad="auto": the hand rules for LeNet-5, autodiff for the MLP)
    update = train._make_update(net, losses.softmax_cross_entropy, opt, None, 0.0, "auto")
    for mode in ("loop", "scan"):
        runner = train.EpochRunner(update, x_all, y_all, BATCH, mode)
        key = jax.random.key(0)
        active = jnp.asarray(True)

        def run(state, runner=runner, key=key, active=active):
            return runner.run(state, key, active)[0]

        paths[f"fit {mode}"] = (lambda: train.init_state(params, opt), run)

    if flax_build is not None:
        paths.update(flax_paths(flax_build, params, xb, yb, steps))
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


def torch_eager(models, steps, repeats, threads=None):
    """``bench_torch_step.py``'s JSON for ``models``, run in its own process, or the reason
    it was skipped (a string). ``find_spec`` looks for torch without importing it here."""
    if importlib.util.find_spec("torch") is None:
        return "torch is not installed; pip install torch, funcnet's 'torch' extra"
    cmd = [sys.executable, os.path.join(HERE, "bench_torch_step.py"), "--models", *models,
           "--steps", str(steps), "--repeats", str(repeats)]  # fmt: skip
    if threads is not None:
        cmd += ["--threads", str(threads)]
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _ratio(sec, base):
    return f"{sec / base:10.3f}x" if base else f"{'-':>11}"


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=["mlp", "lenet5"], choices=["mlp", "lenet5"])
    parser.add_argument("--steps", type=int, default=20, help="steps per timed epoch")
    parser.add_argument("--repeats", type=int, default=9, help="timed epochs per path")
    parser.add_argument("--investigate", action="store_true")
    parser.add_argument("--no-flax", action="store_true", help="leave out the Flax rows")
    parser.add_argument("--no-torch", action="store_true", help="leave out PyTorch eager")
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="PyTorch's thread count (default: its own, one per core)")
    args = parser.parse_args(argv)

    # PyTorch first, in its own process, before this one starts any JAX work.
    torch_result = "--no-torch" if args.no_torch else None
    if torch_result is None:
        print("PyTorch eager: timing in its own process (bench_torch_step.py) ...", flush=True)
        torch_result = torch_eager(args.models, args.steps, args.repeats, args.torch_threads)
    flax_skipped = "--no-flax" if args.no_flax else FLAX_UNAVAILABLE

    print(f"jax {jax.__version__}, backend {jax.default_backend()}, {os.cpu_count()} CPUs, "
          f"{platform.processor() or platform.machine()}; batch {BATCH}, {args.steps} steps "
          f"x {args.repeats} repeats, median; load average at start "
          f"{os.getloadavg()[0]:.2f}")  # fmt: skip
    if isinstance(torch_result, dict):
        print(f"torch eager: torch {torch_result['torch']}, {torch_result['threads']} threads, "
              "its own process, run before the JAX paths (ratios vs torch are across "
              "processes on this machine)")  # fmt: skip
    else:
        print(f"torch eager: skipped ({torch_result})")
    if flax_skipped:
        print(f"flax: skipped ({flax_skipped})")
    else:
        print(f"flax {flax.__version__} (nnx)")
    rng = np.random.default_rng(0)
    n = BATCH * args.steps
    x = jnp.asarray(rng.random((n, 28, 28, 1), dtype=np.float32))
    y = jnp.asarray(rng.integers(0, 10, n).astype(np.int32))
    builders = {"mlp": (lambda: fn.models.mlp([256, 256], 10), ref_mlp, flax_mlp),
                "lenet5": (fn.models.lenet5, ref_lenet5, flax_lenet5)}  # fmt: skip
    for model in args.models:
        make_net, ref_apply, flax_build = builders[model]
        net = make_net()
        params = net.init(jax.random.key(0), (28, 28, 1))
        if flax_skipped:
            flax_build = None
        paths = make_paths(net, ref_apply, params, x, y, args.steps, args.investigate,
                           flax_build)  # fmt: skip
        medians = bench(paths, args.steps, args.repeats)
        torch_sec = None
        if isinstance(torch_result, dict):
            torch_sec = medians["torch eager"] = torch_result["seconds_per_step"][model]
        ref = medians["ref loop"]
        print(f"\n{model} (batch {BATCH})")
        print(f"| {'path':<24} | {'ms/step':>8} | {'steps/s':>8} | {'/ ref loop':>11} "
              f"| {'/ torch':>11} |")  # fmt: skip
        print(f"|{'-' * 26}|{'-' * 10}|{'-' * 10}|{'-' * 13}|{'-' * 13}|")
        for name, sec in medians.items():
            print(f"| {name:<24} | {sec * 1e3:8.3f} | {1 / sec:8.0f} | {_ratio(sec, ref)} "
                  f"| {_ratio(sec, torch_sec)} |")  # fmt: skip
    print(f"\nload average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
