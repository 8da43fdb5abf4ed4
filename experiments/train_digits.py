"""The main job: train a network on scikit-learn's bundled 8x8 digits and report test accuracy.

    python experiments/train_digits.py                 # the LeNet-style CNN (default)
    python experiments/train_digits.py --model mlp     # MLP 64-256-256-10

Writes to ``--out`` (default ``runs/digits``): ``metrics.json`` (configuration, history,
final test loss / accuracy, wall time), ``curves.png`` (loss and accuracy per epoch) and
``checkpoint.ckpt`` (the final :class:`funcnet.train.TrainState`, a funcnet checkpoint) and
``model.fnx`` (the trained forward pass exported as StableHLO with a symbolic batch:
``funcnet.export.load("model.fnx")(x)`` runs it without the network's code).

Defaults (per model; every one can be overridden): AdamW with a cosine-decayed learning
rate and decoupled weight decay on the weights (not the biases), 40 epochs; CNN batch 32,
lr 3e-3, weight decay 1e-2; MLP batch 16, lr 1e-3, weight decay 5e-2. With ``--optimizer
sgd`` / ``momentum`` the weight decay is the lecture's L2 regularizer ``lambda Omega``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import jax
import numpy as np
import optax

import funcnet as fn
from funcnet import checkpoint, data, export, regularizers, train

DEFAULTS = {
    "cnn": {"epochs": 40, "batch_size": 32, "lr": 3e-3, "weight_decay": 1e-2},
    "mlp": {"epochs": 40, "batch_size": 16, "lr": 1e-3, "weight_decay": 5e-2},
}
OPTIMIZERS = ("adamw", "adam", "sgd", "momentum")


def build_model(name: str):
    if name == "cnn":
        return fn.models.digits_cnn()
    return fn.models.mlp([256, 256], 10)


def build_optimizer(name: str, lr: float, weight_decay: float, total_steps: int):
    """``(optimizer, regularizer, lam)``: decoupled decay for AdamW, else L2 with lambda."""
    schedule = optax.cosine_decay_schedule(lr, max(total_steps, 1))
    if name == "adamw":
        opt = optax.adamw(schedule, weight_decay=weight_decay, mask=regularizers.weights_mask)
        return opt, None, 0.0
    opt = {
        "adam": lambda: optax.adam(schedule),
        "sgd": lambda: optax.sgd(schedule),
        "momentum": lambda: optax.sgd(schedule, momentum=0.9),
    }[name]()
    return opt, (regularizers.l2 if weight_decay > 0 else None), weight_decay


def write_json(path: str, data: dict) -> None:
    """Write ``data`` to ``path`` atomically: never a half-written file."""
    with open(path + ".tmp", "w") as f:
        json.dump(data, f, indent=1)
    os.replace(path + ".tmp", path)


def save_curves(history: dict, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = np.arange(1, len(history["loss"]) + 1)
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, history["loss"], label="train")
    ax_loss.plot(epochs, history["val_loss"], label="test")
    ax_loss.set(xlabel="epoch", ylabel="loss", yscale="log", title="loss")
    ax_acc.plot(epochs, history["accuracy"], label="train")
    ax_acc.plot(epochs, history["val_accuracy"], label="test")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy", ylim=(0.8, 1.0))
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=sorted(DEFAULTS), default="cnn")
    parser.add_argument("--epochs", type=int, default=None, help="default: 40")
    parser.add_argument("--batch-size", type=int, default=None, help="default: cnn 32, mlp 16")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate")
    parser.add_argument("--weight-decay", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0, help="data split, init and shuffling")
    parser.add_argument("--epoch-mode", choices=train.EPOCH_MODES, default="auto")
    parser.add_argument("--out", default=os.path.join("runs", "digits"))
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("--compilation-cache", metavar="DIR", default=None,
                        help="persistent XLA compilation cache: a second run skips compiling")
    args = parser.parse_args(argv)
    if args.compilation_cache:
        fn.enable_compilation_cache(args.compilation_cache)
    cfg = dict(DEFAULTS[args.model])
    for key in cfg:
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)

    t_start = time.perf_counter()
    split = data.digits(seed=args.seed)
    net = build_model(args.model)
    input_shape = split.x_train.shape[1:]
    params = net.init(jax.random.key(args.seed), input_shape)
    steps_per_epoch = -(-len(split.x_train) // cfg["batch_size"])
    optimizer, regularizer, lam = build_optimizer(
        args.optimizer, cfg["lr"], cfg["weight_decay"], cfg["epochs"] * steps_per_epoch
    )
    print(f"digits: {len(split.x_train)} train / {len(split.x_test)} test images {input_shape}; "
          f"model {args.model} ({fn.param_count(net, input_shape):,} parameters); {args.optimizer} "
          f"lr {cfg['lr']} weight decay {cfg['weight_decay']}, {cfg['epochs']} epochs of "
          f"batch {cfg['batch_size']}, epoch mode {train.choose_epoch_mode(net, args.epoch_mode)}")

    result = train.fit(
        net, params, split.x_train, split.y_train,
        optimizer=optimizer, regularizer=regularizer, lam=lam,
        epochs=cfg["epochs"], batch_size=cfg["batch_size"], seed=args.seed,
        validation_data=(split.x_test, split.y_test), epoch_mode=args.epoch_mode,
        progress=not args.no_progress,
    )  # fmt: skip
    test_loss, test_acc = train.evaluate(net, result.params, split.x_test, split.y_test)
    wall = time.perf_counter() - t_start

    os.makedirs(args.out, exist_ok=True)
    ckpt_path = os.path.join(args.out, "checkpoint.ckpt")
    checkpoint.save(ckpt_path, {"state": result.state},
                    metadata={"model": args.model, "config": cfg, "seed": args.seed})
    metrics = {
        "model": args.model,
        "optimizer": args.optimizer,
        "config": cfg,
        "seed": args.seed,
        "epoch_mode": train.choose_epoch_mode(net, args.epoch_mode),
        "test_loss": test_loss,
        "test_accuracy": test_acc,
        "wall_time_s": wall,
        "first_epoch_s_incl_compile": result.history["time"][0],
        "stop_reason": result.stop_reason,
        "history": result.history,
        "machine": {"jax": jax.__version__, "backend": jax.default_backend(),
                    "cpu_count": os.cpu_count(), "python": platform.python_version()},
    }  # fmt: skip
    export.save(os.path.join(args.out, "model.fnx"), net, result.params, input_shape)
    write_json(os.path.join(args.out, "metrics.json"), metrics)
    save_curves(result.history, os.path.join(args.out, "curves.png"),
                f"digits, {args.model}: test accuracy {test_acc:.2%}")
    print(f"final test accuracy: {test_acc:.2%} (test loss {test_loss:.4f}); "
          f"total time {wall:.1f} s including compilation; wrote {args.out}/metrics.json, "
          f"curves.png, checkpoint.ckpt, model.fnx")
    sys.stdout.flush()
    return metrics


if __name__ == "__main__":
    main()
