"""PyTorch eager reference: the same LeNet-5 recipe as ``train_fashion.py --model lenet5``.

    pip install torch==2.13.0        # the CPU wheel (funcnet's optional extra "torch")
    python experiments/torch_fashion.py [--epochs 10] [--json out.json]

Same network (``Conv(6, 5x5, SAME) -> ReLU -> MaxPool 2 -> Conv(16, 5x5) -> ReLU -> MaxPool 2
-> 120 -> 84 -> 10``, 61,706 parameters), the same optimizer (AdamW, peak lr 3e-3 with a
per-step cosine decay to 0 over the run, weight decay 1e-4 on the weights only, not the
biases), batch 128 reshuffled every epoch, 10 epochs, and like ``fit`` the test set is
evaluated after every epoch and counted in the epoch's time. Images are scaled to [0, 1]
as ``fn.data.fashion_mnist`` does.

This script never imports jax or funcnet: it runs in its own process so that JAX's thread
pool cannot slow PyTorch down (``compare_fashion.py`` runs both, one after the other).
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import time

import numpy as np
import torch
from torch import nn

DATA_DIR = "/usr/share/datasets/fashion-mnist"


def read_idx(path: str) -> np.ndarray:
    """An MNIST-format IDX file (gzip or raw) as a uint8 array."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    dims = np.frombuffer(raw, ">u4", count=ndim, offset=4)
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(tuple(int(d) for d in dims))


def load(folder: str):
    def find(name):
        for candidate in (name, name[: -len(".gz")]):
            if os.path.isfile(os.path.join(folder, candidate)):
                return os.path.join(folder, candidate)
        raise FileNotFoundError(f"{name} not in {folder}: apt-get install -y dataset-fashion-mnist")

    def images(name):  # (N, 1, 28, 28) float32 in [0, 1]
        return torch.from_numpy(read_idx(find(name)).astype(np.float32) / 255.0).unsqueeze(1)

    def labels(name):
        return torch.from_numpy(read_idx(find(name)).astype(np.int64))

    return (images("train-images-idx3-ubyte.gz"), labels("train-labels-idx1-ubyte.gz"),
            images("t10k-images-idx3-ubyte.gz"), labels("t10k-labels-idx1-ubyte.gz"))


def lenet5() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 5 * 5, 120), nn.ReLU(),
        nn.Linear(120, 84), nn.ReLU(),
        nn.Linear(84, 10),
    )  # fmt: skip


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", default=DATA_DIR)
    parser.add_argument("--json", default=None, help="write the metrics here")
    args = parser.parse_args(argv)

    t_start = time.perf_counter()
    torch.manual_seed(args.seed)
    x_train, y_train, x_test, y_test = load(args.data)
    net = lenet5()
    n_params = sum(p.numel() for p in net.parameters())
    weights = [p for p in net.parameters() if p.ndim >= 2]
    biases = [p for p in net.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": weights, "weight_decay": args.weight_decay},
                             {"params": biases, "weight_decay": 0.0}], lr=args.lr)
    steps_per_epoch = math.ceil(len(x_train) / args.batch_size)
    total = args.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total)))
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(args.seed)
    history = {"loss": [], "val_accuracy": [], "time": [], "train_time": []}
    print(f"torch {torch.__version__} eager, {torch.get_num_threads()} threads; LeNet-5 "
          f"({n_params:,} parameters); adamw lr {args.lr} weight decay {args.weight_decay}, "
          f"{args.epochs} epochs of batch {args.batch_size}", flush=True)
    for epoch in range(args.epochs):
        t0 = time.perf_counter()
        net.train()
        order = torch.randperm(len(x_train), generator=gen)
        total_loss = 0.0
        for i in range(steps_per_epoch):
            idx = order[i * args.batch_size:(i + 1) * args.batch_size]
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(net(x_train[idx]), y_train[idx])
            loss.backward()
            opt.step()
            sched.step()
            total_loss += loss.item() * len(idx)
        t_train = time.perf_counter() - t0
        net.eval()
        with torch.no_grad():
            correct = sum(int((net(x_test[j:j + 1000]).argmax(1) == y_test[j:j + 1000]).sum())
                          for j in range(0, len(x_test), 1000))
        history["time"].append(time.perf_counter() - t0)
        history["train_time"].append(t_train)
        history["loss"].append(total_loss / len(x_train))
        history["val_accuracy"].append(correct / len(x_test))
        print(f"epoch {epoch + 1}: loss {history['loss'][-1]:.4f}, test accuracy "
              f"{history['val_accuracy'][-1]:.2%}, {history['time'][-1]:.2f} s "
              f"(training {t_train:.2f} s)", flush=True)
    wall = time.perf_counter() - t_start
    later = sorted(history["time"][1:]) or history["time"]
    metrics = {"framework": f"torch {torch.__version__} eager", "params": n_params,
               "test_accuracy": history["val_accuracy"][-1], "wall_time_s": wall,
               "median_epoch_s": later[len(later) // 2], "history": history,
               "config": vars(args)}
    print(f"final test accuracy {metrics['test_accuracy']:.2%}; total {wall:.1f} s; "
          f"median epoch {metrics['median_epoch_s']:.2f} s", flush=True)
    if args.json:
        with open(args.json + ".tmp", "w") as f:
            json.dump(metrics, f, indent=1)
        os.replace(args.json + ".tmp", args.json)
    return metrics


if __name__ == "__main__":
    main()
