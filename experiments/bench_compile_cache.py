"""Cold vs warm start with funcnet's persistent compilation cache.

Each measurement is a fresh Python process (as a rerun of an experiment would be) that
imports funcnet, optionally enables the cache, builds a program and compiles it ahead of
time (``jax.jit(f).lower(...).compile()``), timing tracing+lowering and XLA compilation
apart, plus the whole process. Three settings per program:

- ``off``:  no persistent cache (what every run pays today);
- ``cold``: cache enabled on an empty directory (first run: compiles and writes);
- ``warm``: cache enabled on the directory a previous run filled (loads the executable).

Programs: the LeNet-5 forward pass (batch 64), the digits CNN's SGD train step
(``value_and_grad`` + optax, batch 32), and an MLP train step. A program that fails to
compile is reported as failed with the error's first line.

Run: ``python experiments/bench_compile_cache.py [--repeats 5] [--write]``; ``--write``
replaces the "Static graphs and compilation cache" section of BENCHMARKS.md (and only it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Static graphs and compilation cache"

CHILD = textwrap.dedent(
    """
    import json, sys, time
    t0 = time.perf_counter()
    import jax, jax.numpy as jnp, optax
    import funcnet as fn
    from funcnet import cache
    program, cache_dir = sys.argv[1], sys.argv[2]
    if cache_dir != "-":
        cache.enable_compilation_cache(cache_dir)
    t_import = time.perf_counter() - t0

    def train_step(net, shape, batch):
        opt = optax.sgd(0.1)
        params = net.init(jax.random.key(0), shape)
        opt_state = opt.init(params)

        def step(params, opt_state, x, y):
            def loss(p):
                logits = net.apply(p, x)
                return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            value, grads = jax.value_and_grad(loss)(params)
            updates, opt_state = opt.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, value

        x = jnp.zeros((batch, *shape)); y = jnp.zeros((batch,), jnp.int32)
        return jax.jit(step, donate_argnums=(0, 1)), (params, opt_state, x, y)

    if program == "lenet5_forward":
        net = fn.models.lenet5()
        params = net.init(jax.random.key(0), (28, 28, 1))
        f, args = jax.jit(net.apply), (params, jnp.zeros((64, 28, 28, 1)))
    elif program == "digits_cnn_train_step":
        f, args = train_step(fn.models.digits_cnn(), (8, 8, 1), 32)
    elif program == "mlp_train_step":
        f, args = train_step(fn.models.mlp([128, 64], 10), (8, 8, 1), 32)
    else:
        raise SystemExit(f"unknown program {program}")
    jax.block_until_ready(args)
    try:
        t1 = time.perf_counter()
        lowered = f.lower(*args)
        t2 = time.perf_counter()
        compiled = lowered.compile()
        t3 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        t4 = time.perf_counter()
    except Exception as e:
        print(json.dumps({"error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}))
        raise SystemExit(0)
    print(json.dumps({
        "import": t_import, "lower": t2 - t1, "compile": t3 - t2, "first_call": t4 - t3,
        "process": t4 - t0,
    }))
    """
)

PROGRAMS = ("lenet5_forward", "digits_cnn_train_step", "mlp_train_step")


def run_child(program: str, cache_dir: str) -> dict:
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", CHILD, program, cache_dir],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    if out.returncode != 0:
        raise RuntimeError(f"{program}: child failed:\n{out.stderr[-2000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["wall"] = time.perf_counter() - start
    return result


def measure(repeats: int) -> dict:
    results: dict = {}
    for program in PROGRAMS:
        runs: dict[str, list[dict]] = {"off": [], "cold": [], "warm": []}
        error = None
        for _ in range(repeats):
            with tempfile.TemporaryDirectory(prefix="fn-xla-cache-") as d:
                runs["off"].append(run_child(program, "-"))
                runs["cold"].append(run_child(program, d))
                runs["warm"].append(run_child(program, d))
            error = next((r["error"] for v in runs.values() for r in v if "error" in r), None)
            if error:
                break
        if error:
            results[program] = {"error": error}
            print(f"{program}: FAILED: {error}", flush=True)
            continue
        results[program] = {
            setting: {key: statistics.median(r[key] for r in rs)
                      for key in ("lower", "compile", "first_call", "process", "wall")}
            for setting, rs in runs.items()
        }
        med = results[program]
        print(f"{program}: compile off {med['off']['compile'] * 1e3:.0f} ms, cold "
              f"{med['cold']['compile'] * 1e3:.0f} ms, warm {med['warm']['compile'] * 1e3:.0f} ms",
              flush=True)
    return results


def table(results: dict, repeats: int) -> str:
    lines = [
        "| program | cache | trace+lower (ms) | XLA compile (ms) | first call (ms) "
        "| process to first result (s) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for program, res in results.items():
        if "error" in res:
            lines.append(f"| {program} | — | failed: `{res['error']}` | | | |")
            continue
        for setting in ("off", "cold", "warm"):
            m = res[setting]
            lines.append(
                f"| {program} | {setting} | {m['lower'] * 1e3:.0f} | {m['compile'] * 1e3:.0f} "
                f"| {m['first_call'] * 1e3:.0f} | {m['process']:.2f} |"
            )
    return "\n".join(lines)


def section_text(results: dict, repeats: int) -> str:
    import jax

    machine = (f"{platform.machine()}, {os.cpu_count()} CPU cores, Python "
               f"{platform.python_version()}, jax {jax.__version__} (CPU)")
    speedups = []
    for program, res in results.items():
        if "error" not in res and res["warm"]["compile"] > 0:
            speedups.append(f"{program} {res['off']['compile'] / res['warm']['compile']:.0f}x")
    return textwrap.dedent(
        f"""\
        {SECTION}

        `python experiments/bench_compile_cache.py --repeats {repeats} --write` on {machine}.
        Every figure is the median of {repeats} fresh processes; the machine was shared with
        other jobs, so single timings are noisy. `off`: no persistent cache; `cold`:
        `fn.cache.enable_compilation_cache(dir)` on an empty directory (compile + write);
        `warm`: the same directory, filled by the cold run (the executable is loaded,
        XLA's passes are skipped). Tracing and lowering are not cached (JAX always
        re-traces); only the XLA compile is. "Process to first result" is the whole cold
        or warm start: importing jax and funcnet, initialising the parameters (each
        initializer is a small program compiled per shape, cached as well), compiling
        the program and running it once.

        """
    ) + table(results, repeats) + (
        f"\n\nXLA compile time, no cache vs warm cache: {', '.join(speedups)}.\n"
        if speedups else "\n"
    )


def write_section(text: str) -> None:
    """Replace (or append) only our section of BENCHMARKS.md, re-reading it right before."""
    path = ROOT / "BENCHMARKS.md"
    current = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(current):
        new = pattern.sub(lambda _: text.rstrip("\n") + "\n\n", current, count=1)
    else:
        new = current.rstrip("\n") + "\n\n" + text
    new = new.rstrip("\n") + "\n"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(new)
    os.replace(tmp, path)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    args = parser.parse_args(argv)
    results = measure(args.repeats)
    text = section_text(results, args.repeats)
    print()
    print(text)
    if args.write:
        write_section(text)
        print("BENCHMARKS.md updated (section only)")


if __name__ == "__main__":
    main()
