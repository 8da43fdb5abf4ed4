"""How much memory ``fit`` holds: the data set as arrays against a memory-mapped stream.

    python experiments/bench_memory.py            # Fashion-MNIST (dataset-fashion-mnist)
    python experiments/bench_memory.py --n 20000  # the first 20,000 training images

Each mode trains LeNet-5 for one epoch (batch 128) in its own process and reports the
process's anonymous resident memory (``RssAnon``: heap, numpy and device buffers on the
CPU backend; not the file pages of a memory map, which the kernel can drop at any time),
sampled every 10 ms, before loading the data (after a first epoch on zeros of the same
shapes: JAX started, the programs compiled once so that the compiler's memory is already
taken, the zeros freed) and at its peak during training:

- ``arrays``: ``fit(net, params, x, y)`` with ``x`` from ``data.load_mnist`` (float32);
- ``stream``: ``fit(net, params, data.mnist_batches(images, labels, 128))`` over the raw
  (uncompressed) IDX file, memory-mapped: uint8 pixels read one batch at a time.

The data set's float32 size is printed alongside, to read the columns against.
"""

from __future__ import annotations

import argparse
import gc
import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np


def rss_anon_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no RssAnon in /proc/self/status (Linux only)")


class PeakSampler:
    def __init__(self, every: float = 0.01):
        self.every, self.peak, self._stop = every, rss_anon_mib(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_anon_mib())
            time.sleep(self.every)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_anon_mib())


def child(mode: str, images: str, labels: str, n: int) -> dict:
    import jax
    import optax

    import funcnet as fn
    from funcnet import data, train

    net = fn.models.lenet5()
    params = net.init(jax.random.key(0), (28, 28, 1))
    kw = {"epochs": 1, "seed": 0, "progress": False, "optimizer": optax.adam(1e-3)}
    # a first epoch on zeros of the same shapes: JAX up, the same programs compiled once
    # (fit builds new jit closures, so the measured run compiles them again, reusing the
    # memory the compiler took here), the zeros freed again
    zeros = np.zeros((n, 28, 28, 1), np.float32), np.zeros(n, np.int32)
    if mode == "arrays":
        train.fit(net, params, *zeros, batch_size=128, **kw)
    else:
        train.fit(net, params, data.ArrayBatches(*zeros, 128), **kw)
    del zeros
    gc.collect()
    baseline = rss_anon_mib()
    t0 = time.perf_counter()
    with PeakSampler() as peak:
        if mode == "arrays":
            x, y = data.load_mnist(images, labels)
            x, y = x[:n], y[:n]
            result = train.fit(net, params, x, y, batch_size=128, **kw)
        else:
            source = data.mnist_batches(images, labels, 128)
            if n < source.n:
                source = data.ArrayBatches(source.x[:n], source.y[:n], 128,
                                           transform=source.transform)
            result = train.fit(net, params, source, **kw)
    return {"mode": mode, "baseline_mib": baseline, "peak_mib": peak.peak,
            "held_mib": peak.peak - baseline, "seconds": time.perf_counter() - t0,
            "loss": result.history["loss"][-1]}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--n", type=int, default=60000, help="training images used")
    parser.add_argument("--json", default=None, help="write the rows here")
    parser.add_argument("--child", nargs=4, metavar=("MODE", "IMAGES", "LABELS", "N"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        mode, images, labels, n = args.child
        print(json.dumps(child(mode, images, labels, int(n))))
        return

    tmp = tempfile.mkdtemp(prefix="bench_memory_")
    try:
        raw = {}
        for key, name in (("images", "train-images-idx3-ubyte"),
                          ("labels", "train-labels-idx1-ubyte")):
            src = os.path.join(args.data, name)
            raw[key] = os.path.join(tmp, name)
            if os.path.exists(src):
                shutil.copyfile(src, raw[key])
            else:  # the Debian package ships them gzip-compressed: mapping needs them raw
                with gzip.open(src + ".gz") as f, open(raw[key], "wb") as out:
                    shutil.copyfileobj(f, out)
        rows = []
        for mode in ("arrays", "stream"):
            out = subprocess.run(
                [sys.executable, __file__, "--child", mode, raw["images"], raw["labels"],
                 str(args.n)], check=True, capture_output=True, text=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    data_mib = args.n * 28 * 28 * 4 / 2**20
    batch_mib = 128 * 28 * 28 * 4 / 2**20
    print(f"LeNet-5, one epoch of {args.n} Fashion-MNIST images, batch 128; the images as "
          f"float32: {data_mib:.1f} MiB, one batch: {batch_mib:.2f} MiB")
    print(f"{'mode':8} {'before (MiB)':>13} {'peak (MiB)':>11} {'held (MiB)':>11} "
          f"{'held / data':>12} {'epoch (s)':>10}")
    for r in rows:
        print(f"{r['mode']:8} {r['baseline_mib']:13.1f} {r['peak_mib']:11.1f} "
              f"{r['held_mib']:11.1f} {r['held_mib'] / data_mib:12.2f} {r['seconds']:10.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"n": args.n, "data_mib": data_mib, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
