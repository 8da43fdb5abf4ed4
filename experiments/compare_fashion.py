"""funcnet vs PyTorch eager on the same LeNet-5 Fashion-MNIST recipe, each in its own process.

    pip install torch==2.13.0                    # CPU wheel, funcnet's optional extra "torch"
    python experiments/compare_fashion.py [--rounds 3] [--epochs 10]

Each round runs ``train_fashion.py --model lenet5`` and then ``torch_fashion.py`` (same
network, AdamW + cosine schedule, weight decay on the weights, batch 128, test-set
evaluation after every epoch), as separate processes one after the other, so both see the
same machine. Prints one row per framework with medians over the rounds: test accuracy,
median epoch time (epochs after the first, evaluation included), whole process time, and
the ratio funcnet / PyTorch of the epoch time measured in the same rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def run(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--data", default=None)
    args = parser.parse_args(argv)
    data = ["--data", args.data] if args.data else []
    rows = {"funcnet": [], "torch": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            out = os.path.join(tmp, f"funcnet{r}")
            wall = run([sys.executable, os.path.join(HERE, "train_fashion.py"), "--model",
                        "lenet5", "--no-progress", "--epochs", str(args.epochs), "--out", out,
                        *data])
            with open(os.path.join(out, "metrics.json")) as f:
                m = json.load(f)
            rows["funcnet"].append((m["test_accuracy"], m["median_epoch_s"], wall,
                                    m["first_epoch_s_incl_compile"]))
            js = os.path.join(tmp, f"torch{r}.json")
            wall = run([sys.executable, os.path.join(HERE, "torch_fashion.py"), "--epochs",
                        str(args.epochs), "--json", js, *data])
            with open(js) as f:
                m = json.load(f)
            rows["torch"].append((m["test_accuracy"], m["median_epoch_s"], wall,
                                  m["history"]["time"][0]))
            print(f"round {r + 1}: funcnet epoch {rows['funcnet'][-1][1]:.2f} s, "
                  f"torch epoch {rows['torch'][-1][1]:.2f} s", flush=True)
    ratios = [f[1] / t[1] for f, t in zip(rows["funcnet"], rows["torch"], strict=True)]
    print(f"\nLeNet-5 on Fashion-MNIST, {args.epochs} epochs, batch 128, AdamW; medians of "
          f"{args.rounds} rounds (each framework in its own process)\n")
    print("| framework | test accuracy | median epoch (s) | first epoch (s) | process (s) |")
    print("|---|---:|---:|---:|---:|")
    table = []
    for name, rs in rows.items():
        acc, epoch, wall, first = (statistics.median(c) for c in zip(*rs, strict=True))
        table.append({"framework": name, "test_accuracy": acc, "median_epoch_s": epoch,
                      "first_epoch_s": first, "process_s": wall})
        print(f"| {name} | {acc:.2%} | {epoch:.2f} | {first:.2f} | {wall:.1f} |")
    print(f"\nepoch time funcnet / torch: median {statistics.median(ratios):.2f}x "
          f"(per round: {', '.join(f'{x:.2f}' for x in ratios)})")
    return table


if __name__ == "__main__":
    main()
