"""PyTorch eager train-step time, the PyTorch row of ``bench_train.py``.

    python experiments/bench_torch_step.py [--models mlp lenet5] [--steps 20] [--repeats 9]
                                           [--threads N]

The same step as ``bench_train.py``'s paths: ``zero_grad``, forward, mean softmax
cross-entropy, ``backward``, ``torch.optim.SGD(lr=0.01).step()``, on batches of 128
synthetic 28x28x1 images (the same numbers as ``bench_train.py``'s, in NCHW), pre-made
before timing. The same convention: one warm-up epoch of ``--steps`` steps, then
``--repeats`` timed epochs; the figure is the median seconds per step. Prints one JSON
line: ``{"torch": version, "threads": n, "seconds_per_step": {model: s}}``. ``--threads``
sets ``torch.set_num_threads`` (default: PyTorch's own, one per core).

This script never imports jax or funcnet: ``bench_train.py`` runs it in its own process,
because JAX's idle thread pool slows PyTorch down in a shared one. LeNet-5 is
``torch_fashion.lenet5`` (which does not import jax either).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch
from torch import nn
from torch_fashion import lenet5

BATCH = 128
LR = 0.01


def mlp() -> nn.Sequential:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(28 * 28, 256), nn.ReLU(),
        nn.Linear(256, 256), nn.ReLU(),
        nn.Linear(256, 10),
    )  # fmt: skip


MODELS = {"mlp": mlp, "lenet5": lenet5}


def synthetic(steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``bench_train.py``'s data: ``steps`` batches from ``default_rng(0)``, images NCHW."""
    rng = np.random.default_rng(0)
    n = BATCH * steps
    x = rng.random((n, 28, 28, 1), dtype=np.float32).transpose(0, 3, 1, 2)
    y = rng.integers(0, 10, n).astype(np.int64)
    return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y)


def bench(model: str, steps: int, repeats: int) -> float:
    """Median seconds per step over ``repeats`` epochs of ``steps`` steps (after a warm-up)."""
    torch.manual_seed(0)
    net = MODELS[model]()
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    loss_fn = nn.CrossEntropyLoss()
    x_all, y_all = synthetic(steps)
    batches = [(x_all[i * BATCH : (i + 1) * BATCH], y_all[i * BATCH : (i + 1) * BATCH])
               for i in range(steps)]  # fmt: skip

    def epoch():
        for x, y in batches:
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(net(x), y)
            loss.backward()
            opt.step()

    epoch()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        epoch()
        times.append((time.perf_counter() - t0) / steps)
    return statistics.median(times)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--steps", type=int, default=20, help="steps per timed epoch")
    parser.add_argument("--repeats", type=int, default=9, help="timed epochs")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    out = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "seconds_per_step": {m: bench(m, args.steps, args.repeats) for m in args.models},
    }
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main()
