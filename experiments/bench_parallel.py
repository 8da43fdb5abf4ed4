"""Data-parallel train-step throughput and scaling efficiency against the device count.

    python experiments/bench_parallel.py                          # 1, 2, 4 devices, both models
    python experiments/bench_parallel.py --devices 1 2 --models lenet5 --rounds 3 --steps 5
    python experiments/bench_parallel.py --json parallel.json     # also write the figures
    python experiments/bench_parallel.py --platform cpu           # CPU even where a GPU is

What is timed: ``funcnet.train.make_step(net, loss, optimizer, devices=<the d devices>)``,
the data-parallel step (the global batch sharded along the mesh's data axis, the state
replicated, XLA's all-reduce of the gradient and of BatchNorm's batch statistics), at a
fixed **global** batch (``--batch``, default 128) of synthetic 28x28x1 inputs, mean
softmax cross-entropy, ``optax.sgd(0.01)``. The batch is put on the devices once, already
sharded, so no host-to-device copy is timed; the state is donated and threaded from step
to step. Models: ``lenet5`` (``funcnet.models.lenet5()``) and ``resnet``
(``small_resnet()`` of experiments/train_fashion.py: a BatchNorm ResNet, widths 32, 64,
128).

Each device count runs in its own process, since JAX fixes the device count when it
starts: on CPU that process sees ``d`` simulated devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=d``); on another platform (GPU, TPU)
it uses the first ``d`` of ``jax.devices()`` (a count above what is there is reported as
skipped). In each process: the first call (compile + run) is timed alone, then ``--warmup``
steps, then ``--rounds`` rounds of ``--steps`` steps per model, the models interleaved
round-robin so that load from other processes hits them alike; a round ends with
``block_until_ready``. The table gives per model and device count the median ms per
step, images/s (global batch / step time) and the scaling efficiency
``(throughput_d / throughput_1) / d`` (1.0: perfect linear scaling).

On a CPU the simulated devices share the same cores (XLA:CPU already spreads one
device's work over the cores), so the CPU figures show the cost of data parallelism
(partitioned programs, the all-reduces, smaller per-device convolutions), not a speed-up:
an efficiency near ``1/d`` means the same throughput as one device, below it a slowdown.
Measure speed-up on several real devices (``--platform`` left to JAX on a GPU machine).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
MODELS = ("lenet5", "resnet")
LR = 0.01


# ---------------------------------------------------------------------------------------
# The worker: one device count, in its own process (imports jax)
# ---------------------------------------------------------------------------------------


def build(model: str):
    """The network for ``model`` (28x28x1 inputs, 10 classes)."""
    import funcnet as fn

    if model == "lenet5":
        return fn.models.lenet5()
    sys.path.insert(0, HERE)
    from train_fashion import small_resnet

    return small_resnet()


def worker(d: int, models: list[str], batch: int, steps: int, rounds: int,
           warmup: int) -> dict:
    """Time the data-parallel step on ``d`` devices; one dict per model."""
    import jax
    import numpy as np
    import optax

    import funcnet as fn
    from funcnet import parallel, train

    available = jax.devices()
    info = {"d": d, "platform": available[0].platform, "device_kind": available[0].device_kind,
            "available_devices": len(available), "jax": jax.__version__}
    if len(available) < d:
        return {**info, "skipped": f"only {len(available)} {info['platform']} devices"}
    mesh = parallel.data_mesh(available[:d])
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, 28, 28, 1)).astype(np.float32)
    y = rng.integers(0, 10, batch).astype(np.int32)
    xs, ys = parallel.shard_batch((jax.numpy.asarray(x), jax.numpy.asarray(y)), mesh)

    runs = {}
    for model in models:
        net = build(model)
        params = net.init(jax.random.key(0), (28, 28, 1))
        optimizer = optax.sgd(LR)
        state = parallel.replicate(train.init_state(params, optimizer, net.init_state(
            (28, 28, 1))), mesh)
        step = train.make_step(net, fn.losses.softmax_cross_entropy, optimizer,
                               devices=mesh)
        t0 = time.perf_counter()
        state, metrics = step(state, xs, ys)
        jax.block_until_ready(state)
        first = time.perf_counter() - t0
        for _ in range(warmup):
            state, metrics = step(state, xs, ys)
        jax.block_until_ready(state)
        runs[model] = {"step": step, "state": state, "first_call_s": first, "times": []}
    for _ in range(rounds):
        for model in models:  # round-robin
            r = runs[model]
            state = r["state"]
            t0 = time.perf_counter()
            for _ in range(steps):
                state, metrics = r["step"](state, xs, ys)
            jax.block_until_ready(state)
            r["times"].append((time.perf_counter() - t0) / steps)
            r["state"], r["loss"] = state, float(metrics["loss"])
    rows = []
    for model in models:
        r = runs[model]
        med = statistics.median(r["times"])
        rows.append({"model": model, "devices": d, "median_step_ms": 1e3 * med,
                     "min_step_ms": 1e3 * min(r["times"]), "images_per_s": batch / med,
                     "first_call_s": r["first_call_s"], "rounds_ms": [1e3 * t for t in
                                                                      r["times"]],
                     "final_loss": r["loss"],
                     "x_shard_rows": [s.data.shape[0] for s in xs.addressable_shards]})
    return {**info, "rows": rows}


# ---------------------------------------------------------------------------------------
# The driver: one process per device count, then the table
# ---------------------------------------------------------------------------------------


def run_worker(d: int, args) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "")
                        + f" --xla_force_host_platform_device_count={d}").strip()
    if args.platform:
        env["JAX_PLATFORMS"] = args.platform
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", str(d), "--models",
           *args.models, "--batch", str(args.batch), "--steps", str(args.steps), "--rounds",
           str(args.rounds), "--warmup", str(args.warmup)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    if proc.returncode != 0:
        return {"d": d, "skipped": f"worker failed ({proc.returncode}): "
                                   f"{proc.stderr.strip().splitlines()[-1:]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(results: list[dict], models: list[str]) -> tuple[str, list[dict]]:
    """The markdown table and its rows, with the scaling efficiency against 1 device."""
    rows = [r for res in results for r in res.get("rows", [])]
    base = {r["model"]: r["images_per_s"] for r in rows if r["devices"] == 1}
    lines = ["| devices | model | median ms/step | min ms/step | images/s | scaling "
             "efficiency | first call (s) |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for model in models:
        for r in sorted((r for r in rows if r["model"] == model), key=lambda r: r["devices"]):
            eff = (r["images_per_s"] / base[model] / r["devices"]) if model in base else None
            r["scaling_efficiency"] = eff
            lines.append(f"| {r['devices']} | {model} | {r['median_step_ms']:.1f} | "
                         f"{r['min_step_ms']:.1f} | {r['images_per_s']:.0f} | "
                         f"{'-' if eff is None else f'{eff:.2f}'} | "
                         f"{r['first_call_s']:.1f} |")
    for res in results:
        if "skipped" in res:
            lines.append(f"| {res['d']} | (skipped: {res['skipped']}) | | | | | |")
    return "\n".join(lines), rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4],
                        help="device counts to compare (default: 1 2 4)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--batch", type=int, default=128, help="global batch (default 128)")
    parser.add_argument("--steps", type=int, default=10, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds (the median)")
    parser.add_argument("--warmup", type=int, default=3, help="steps after the first call")
    parser.add_argument("--platform", default=None,
                        help="JAX_PLATFORMS for the workers (e.g. cpu); default: JAX's choice")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per worker")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("batch", "steps", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0 or any(d < 1 for d in args.devices):
        parser.error("--warmup must be >= 0 and every --devices count >= 1")
    bad = [d for d in args.devices if args.batch % d]
    if bad:
        parser.error(f"--batch {args.batch} must divide by every device count, not by {bad}")

    if args.worker is not None:
        print(json.dumps(worker(args.worker, args.models, args.batch, args.steps,
                                args.rounds, args.warmup)))
        return

    load_before = os.getloadavg()
    t0 = time.perf_counter()
    results = []
    for d in args.devices:
        print(f"... {d} device(s)", file=sys.stderr, flush=True)
        results.append(run_worker(d, args))
    text, rows = table(results, args.models)
    first = next((r for r in results if "platform" in r), {})
    seen = ", ".join(str(r["available_devices"]) for r in results if "available_devices" in r)
    machine = (f"{platform.machine()}, {os.cpu_count()} CPU cores, Python "
               f"{platform.python_version()}, jax {first.get('jax', '?')}, platform "
               f"{first.get('platform', '?')} ({first.get('device_kind', '?')}; devices "
               f"visible to the workers: {seen})")
    load_after = os.getloadavg()
    print(f"Machine: {machine}")
    print(f"Global batch {args.batch}, {args.rounds} rounds x {args.steps} steps (median), "
          f"{args.warmup} warm-up steps; load average {load_before[0]:.1f} before, "
          f"{load_after[0]:.1f} after; {time.perf_counter() - t0:.0f} s in all")
    if first.get("platform") == "cpu":
        print("CPU: the simulated devices share the same cores; the figures show the "
              "overhead of data parallelism, not a speed-up.")
    print()
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "args": {k: v for k, v in vars(args).items()
                                                    if k != "worker"},
                       "load_average": [load_before, load_after], "workers": results,
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
