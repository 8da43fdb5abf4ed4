"""LeNet-5's hand rules per part, in the whole train step, and per XLA fusion.

    .venv/bin/python experiments/bench_rules.py parts   [--rounds 7]
    .venv/bin/python experiments/bench_rules.py step    [--rounds 15]
    .venv/bin/python experiments/bench_rules.py profile [--variant NAME]

``parts``: each formulation of each conv rule alone, at LeNet-5's shapes (batch 128,
float32), one jitted function timed with ``block_until_ready``. ``step``: the whole
``make_step(grad="manual")`` step with the selection rules of ``funcnet/nn/conv.py``
forced to each alternative (the path functions are replaced while the step is traced),
and autodiff. ``profile``: the time of every XLA fusion of one of those steps, from a
``jax.profiler`` trace (the step's optimised HLO names them:
``jax.jit(f).lower(...).compile().as_text()``).

Figures are medians over ``--rounds`` interleaved rounds (every candidate once per
round, so that load from other processes hits them alike). Alone and in the step can
disagree: XLA fuses a cheap elementwise formulation into its consumers and recomputes it
there (see ``forward_path`` in ``funcnet/nn/conv.py``), so the rules were chosen on the
``step`` and ``profile`` figures.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import glob
import gzip
import json
import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import funcnet as fn
from funcnet import losses, train
from funcnet.nn import conv as C

N = 128


def _arr(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, dtype=np.float32))


def _time(candidates, rounds, calls):
    """``{name: median seconds}`` of ``candidates = {name: (f, args)}``, interleaved."""
    for f, a in candidates.values():
        jax.block_until_ready(f(*a))
    times = {k: [] for k in candidates}
    for _ in range(rounds):
        for k, (f, a) in candidates.items():
            t = time.perf_counter()
            for _ in range(calls):
                out = f(*a)
            jax.block_until_ready(out)
            times[k].append((time.perf_counter() - t) / calls)
    return {k: statistics.median(v) for k, v in times.items()}


def parts():
    """Each formulation of conv1's forward and conv2's input gradient, and the rest."""
    out = {}
    for name, in_hw, c_in, c_out, padding in [("conv1", (28, 28), 1, 6, "SAME"),
                                              ("conv2", (14, 14), 6, 16, "VALID")]:
        x, w = _arr(1, (N, *in_hw, c_in)), _arr(2, (5, 5, c_in, c_out))
        y, res = C.conv2d_fwd(x, w, None, 1, padding)
        g, geom = _arr(3, y.shape), res.geom

        def lax_fwd(x, w, pads=geom.pads):
            return C.conv2d(x, w, None, 1, pads)

        def banded_fwd(x, w, geom=geom):
            return C.forward_banded(x, w, geom)

        def kernel_grad(x, g, geom=geom, w=w):
            return C.conv2d_kernel_grad(C.Conv2dResiduals(x, w, None, geom), g)

        out[f"{name} forward lax"] = (jax.jit(lax_fwd), (x, w))
        out[f"{name} forward banded"] = (jax.jit(banded_fwd), (x, w))
        out[f"{name} kernel grad (lax)"] = (jax.jit(kernel_grad), (x, g))
        if name == "conv2":  # conv1's input gradient is never needed
            for path, rule in C.INPUT_GRADS.items():

                def input_grad(w, g, geom=geom, x=x, rule=rule):
                    return rule(C.Conv2dResiduals(x, w, None, geom), g)

                out[f"{name} input grad {path}"] = (jax.jit(input_grad), (w, g))
    return out


def _lenet_step():
    net = fn.models.lenet5()
    params = net.init(jax.random.key(0), (28, 28, 1))
    x = _arr(7, (N, 28, 28, 1))
    y = jax.random.randint(jax.random.key(2), (N,), 0, 10)
    return net, params, x, y, optax.sgd(0.01)


#: Whole-step variants: (grad, {conv module attribute: replacement while tracing}).
VARIANTS = {
    "chosen rules": ("manual", {}),
    "forward lax": ("manual", {"forward_path": lambda w, g: "lax"}),
    "input grad rows": ("manual", {"input_grad_path": lambda w, g: "rows"}),
    "input grad scatter": ("manual", {"input_grad_path": lambda w, g: "scatter"}),
    "input grad correlation": ("manual", {"input_grad_path": lambda w, g: "correlation"}),
    "autodiff": ("autodiff", {}),
}


@contextlib.contextmanager
def _patched(attrs):
    old = {k: getattr(C, k) for k in attrs}
    for k, v in attrs.items():
        setattr(C, k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(C, k, v)


def _traced_step(name):
    """A jitted step of variant ``name``, traced (and compiled) under its replacements."""
    net, params, x, y, opt = _lenet_step()
    grad, attrs = VARIANTS[name]
    step = train.make_step(net, losses.softmax_cross_entropy, opt, grad=grad)
    state = train.init_state(params, opt)
    with _patched(attrs):
        state, _ = step(state, x, y)
    jax.block_until_ready(state)
    return step, state, x, y


def steps():
    out = {}
    for name in VARIANTS:
        step, state, x, y = _traced_step(name)
        box = [state]

        def run(step=step, box=box, x=x, y=y):
            box[0], loss = step(box[0], x, y)
            return loss

        out[name] = (run, ())
    return out


def profile(name, steps_n=20, top=20):
    step, state, x, y = _traced_step(name)
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            for _ in range(steps_n):
                state, _ = step(state, x, y)
            jax.block_until_ready(state)
        (path,) = glob.glob(os.path.join(d, "**", "*.trace.json.gz"), recursive=True)
        with gzip.open(path) as f:
            events = json.load(f)["traceEvents"]
    total = collections.defaultdict(float)
    for e in events:  # XLA's thunks: fusions, dots, convolutions, copies
        if e.get("ph") == "X" and not e["name"].startswith(("$", "Thunk", "Pjit", "Common")):
            total[e["name"]] += e["dur"] / 1e3 / steps_n
    print(f"| {'XLA op (' + name + ')':<40} | {'ms/step':>8} |")
    print(f"|{'-' * 42}|{'-' * 10}|")
    for k, ms in sorted(total.items(), key=lambda kv: -kv[1])[:top]:
        print(f"| {k[:40]:<40} | {ms:8.3f} |")
    print(f"| {'sum of all ops':<40} | {sum(total.values()):8.3f} |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["parts", "step", "profile"])
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--variant", default="chosen rules", choices=list(VARIANTS))
    args = parser.parse_args(argv)
    load0 = os.getloadavg()[0]
    print(f"jax {jax.__version__}, {os.cpu_count()} CPUs, batch {N}, float32, "
          f"load average {load0:.2f} at start")
    if args.what == "profile":
        profile(args.variant)
    else:
        rounds = args.rounds or (7 if args.what == "parts" else 15)
        cands = parts() if args.what == "parts" else steps()
        medians = _time(cands, rounds, 10)
        print(f"median of {rounds} interleaved rounds x 10 calls; load average "
              f"{os.getloadavg()[0]:.2f} at end")
        print(f"| {args.what:<32} | {'ms':>8} |")
        print(f"|{'-' * 34}|{'-' * 10}|")
        for k, sec in medians.items():
            print(f"| {k:<32} | {1e3 * sec:8.3f} |")


if __name__ == "__main__":
    main()
