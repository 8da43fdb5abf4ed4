"""Train a zoo network on Fashion-MNIST (60,000 + 10,000 28x28 grayscale images).

    apt-get update && apt-get install -y dataset-fashion-mnist   # the data, once
    python experiments/train_fashion.py                  # LeNet-5 (default)
    python experiments/train_fashion.py --model resnet   # a small BatchNorm ResNet for 28x28
    python experiments/train_fashion.py --model vit      # a small Vision Transformer

Writes to ``--out`` (default ``runs/fashion-<model>``) what the main job writes:
``metrics.json``, ``curves.png``, ``checkpoint.ckpt`` (the final TrainState, BatchNorm
statistics included) and ``model.fnx`` (the evaluation-mode forward pass, state folded in).

Models:
- ``lenet5``: ``funcnet.models.lenet5()`` (61,706 parameters), AdamW, batch 128, 10 epochs.
- ``resnet``: a small ResNet for 28x28 inputs (308,074 parameters): a 3x3 stem of 32
  channels and a 2x2 max-pool, then one basic block per width 32, 64, 128 (14, 7, 4 pixels),
  BatchNorm after every convolution, global average pooling; AdamW (weight decay 5e-2),
  batch 128, 12 epochs, the hand-written rules (``grad="manual"``).
- ``vit``: a small ViT (139,018 parameters): 4x4 patches, width 64, 4 encoder blocks of
  4 heads, MLP 128; AdamW lr 1e-3 (weight decay 5e-2), batch 128, hand rules, 30 epochs
  with random augmentation (``--augment``: every batch drawn afresh, each image mirrored
  with probability 1/2 and shifted by up to ``--max-shift`` 1 pixel; ``fit`` streams the
  batches from a ``data.ArrayBatches`` source).

``--flip`` instead adds a fixed mirrored copy of every image (120,000 images per epoch).
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import sys
import time

import jax
import numpy as np

import funcnet as fn
from funcnet import checkpoint, data, export, train

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_digits import build_optimizer, save_curves, write_json

DEFAULTS = {
    "lenet5": {"epochs": 10, "batch_size": 128, "lr": 3e-3, "weight_decay": 1e-4,
               "grad": "auto", "flip": False, "augment": False, "max_shift": 2},
    "resnet": {"epochs": 12, "batch_size": 128, "lr": 3e-3, "weight_decay": 5e-2,
               "grad": "manual", "flip": False, "augment": False, "max_shift": 2},
    "vit": {"epochs": 30, "batch_size": 128, "lr": 1e-3, "weight_decay": 5e-2,
            "grad": "manual", "flip": False, "augment": True, "max_shift": 1},
}
#: ``--augment``'s default largest random shift, in pixels, along each axis.
MAX_SHIFT = 2


def augment(x: np.ndarray, y: np.ndarray, rng: np.random.Generator,
            max_shift: int = MAX_SHIFT) -> tuple[np.ndarray, np.ndarray]:
    """A batch ``(B, H, W, C)`` with each image mirrored left-right with probability 1/2
    and shifted by a random whole number of pixels in ``[-max_shift, max_shift]`` along
    each axis (the uncovered border is 0, the background); the labels unchanged."""
    b, h, w = x.shape[:3]
    mirror = rng.random(b) < 0.5
    x = np.where(mirror[:, None, None, None], x[:, :, ::-1], x)
    p = max_shift
    padded = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    top = rng.integers(0, 2 * p + 1, b)
    left = rng.integers(0, 2 * p + 1, b)
    rows = (top[:, None] + np.arange(h))[:, :, None]
    cols = (left[:, None] + np.arange(w))[:, None, :]
    return padded[np.arange(b)[:, None, None], rows, cols], y


def small_resnet(num_classes: int = 10, widths: tuple[int, ...] = (32, 64, 128)) -> fn.Serial:
    """A ResNet for 28x28 inputs: a 3x3 stem (BatchNorm, ReLU) and a 2x2 max-pool to 14x14,
    then one basic block per width (the first at stride 1, the others at stride 2: 14, 7,
    4), each convolution followed by BatchNorm, global average pooling and the classifier.
    """

    def conv_bn(features, stride=1, relu=True):
        layers = [fn.Conv(features, 3, stride=stride, padding="SAME", use_bias=False),
                  fn.BatchNorm()]
        return layers + ([fn.ReLU()] if relu else [])

    def block(features, stride, in_features):
        body = fn.Serial([*conv_bn(features, stride), *conv_bn(features, relu=False)])
        shortcut = None
        if stride != 1 or in_features != features:
            shortcut = fn.Serial([fn.Conv(features, 1, stride=stride, use_bias=False),
                                  fn.BatchNorm()])
        return [fn.Residual(body, shortcut=shortcut), fn.ReLU()]

    layers, width = [*conv_bn(widths[0]), fn.MaxPool(2)], widths[0]
    for i, features in enumerate(widths):
        layers += block(features, 1 if i == 0 else 2, width)
        width = features
    return fn.Serial([*layers, fn.GlobalAvgPool(), fn.Dense(num_classes)])


def small_vit(num_classes: int = 10) -> fn.Serial:
    """A ViT for 28x28 inputs: 4x4 patches (49 tokens and the class token), width 64,
    4 pre-norm encoder blocks of 4 heads with an MLP of 128."""
    return fn.models.vit(num_classes, image_size=28, patch=4, width=64, depth=4, heads=4,
                         mlp_dim=128, channels=1)


def build_model(name: str) -> fn.Serial:
    return {"lenet5": fn.models.lenet5, "resnet": small_resnet, "vit": small_vit}[name]()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=sorted(DEFAULTS), default="lenet5")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate")
    parser.add_argument("--weight-decay", type=float, default=None)
    parser.add_argument("--grad", choices=["auto", "autodiff", "manual"], default=None,
                        help="auto (the hand rules for conv nets), jax.grad or the hand-written "
                             "backward rules (default: per model)")
    parser.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                        help="add a left-right mirrored copy of every training image "
                             "(twice the steps per epoch; default: per model)")
    parser.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                        help="random mirroring and shifts of up to --max-shift pixels, drawn "
                             "afresh for every batch (default: per model)")
    parser.add_argument("--max-shift", type=int, default=None,
                        help="--augment's largest shift in pixels (default: per model)")
    parser.add_argument("--seed", type=int, default=0, help="init, shuffling and dropout")
    parser.add_argument("--data", default=None, help=f"default: {data.FASHION_MNIST_DIR}")
    parser.add_argument("--out", default=None, help="default: runs/fashion-<model>")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    cfg = dict(DEFAULTS[args.model])
    for key in cfg:
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    if cfg["max_shift"] < 0:
        parser.error(f"--max-shift must be >= 0, got {cfg['max_shift']}")
    out = args.out or os.path.join("runs", f"fashion-{args.model}")

    t_start = time.perf_counter()
    split = data.fashion_mnist(args.data)
    if cfg["flip"]:  # the mirrored garments are garments of the same class
        split = split._replace(x_train=np.concatenate([split.x_train, split.x_train[:, :, ::-1]]),
                               y_train=np.concatenate([split.y_train, split.y_train]))
    net = build_model(args.model)
    input_shape = split.x_train.shape[1:]
    params = net.init(jax.random.key(args.seed), input_shape)
    train_data = (split.x_train, split.y_train)
    if cfg["augment"]:  # a batch source: fit streams it, each epoch's batches drawn afresh
        train_data = (data.ArrayBatches(split.x_train, split.y_train, cfg["batch_size"],
                                        seed=args.seed,
                                        transform=functools.partial(
                                            augment, max_shift=cfg["max_shift"])),)
    steps_per_epoch = -(-len(split.x_train) // cfg["batch_size"])
    optimizer, regularizer, lam = build_optimizer(
        "adamw", cfg["lr"], cfg["weight_decay"], cfg["epochs"] * steps_per_epoch
    )
    mirrored = " (half of them mirrored copies)" if cfg["flip"] else ""
    if cfg["augment"]:
        mirrored += f" (randomly mirrored and shifted by up to {cfg['max_shift']} pixels)"
    print(f"fashion-mnist: {len(split.x_train)} train{mirrored} / {len(split.x_test)} test images "
          f"{input_shape}; model {args.model} ({fn.param_count(net, input_shape):,} "
          f"parameters); adamw lr {cfg['lr']} weight decay {cfg['weight_decay']}, "
          f"{cfg['epochs']} epochs of batch {cfg['batch_size']}")
    result = train.fit(
        net, params, *train_data, optimizer=optimizer,
        regularizer=regularizer, lam=lam, epochs=cfg["epochs"],
        batch_size=None if cfg["augment"] else cfg["batch_size"],
        grad=cfg["grad"], seed=args.seed, validation_data=(split.x_test, split.y_test),
        progress=not args.no_progress,
    )  # fmt: skip
    test_loss, test_acc = train.evaluate(net, result.params, split.x_test, split.y_test,
                                         state=result.model_state)
    wall = time.perf_counter() - t_start

    os.makedirs(out, exist_ok=True)
    checkpoint.save(os.path.join(out, "checkpoint.ckpt"), {"state": result.state},
                    metadata={"model": args.model, "config": cfg, "seed": args.seed})
    export.save(os.path.join(out, "model.fnx"), net, result.params, input_shape,
                state=result.model_state)
    times = result.history["time"]
    metrics = {
        "model": args.model, "config": cfg, "seed": args.seed,
        "test_loss": test_loss, "test_accuracy": test_acc, "wall_time_s": wall,
        "first_epoch_s_incl_compile": times[0],
        "median_epoch_s": sorted(times[1:])[len(times[1:]) // 2] if len(times) > 1 else None,
        "history": result.history,
        "machine": {"jax": jax.__version__, "backend": jax.default_backend(),
                    "cpu_count": os.cpu_count(), "python": platform.python_version()},
    }  # fmt: skip
    write_json(os.path.join(out, "metrics.json"), metrics)
    save_curves(result.history, os.path.join(out, "curves.png"),
                f"Fashion-MNIST, {args.model}: test accuracy {test_acc:.2%}")
    median = metrics["median_epoch_s"]
    per_epoch = ("one epoch, compilation included" if median is None
                 else f"median epoch {median:.2f} s after the first")
    print(f"final test accuracy: {test_acc:.2%} (test loss {test_loss:.4f}); total time "
          f"{wall:.1f} s including compilation; {per_epoch}; "
          f"wrote {out}/metrics.json, curves.png, checkpoint.ckpt, model.fnx")
    sys.stdout.flush()
    return metrics


if __name__ == "__main__":
    main()
