"""Ready-made networks: the lecture's small ones (MLPs, LeNet-5, the digits CNN) and the
architecture timeline's convolutional networks (``alexnet``, ``vgg``, ``googlenet``,
``resnet``, built in :mod:`funcnet.zoo_cnn`) and the Vision Transformer (``vit``,
``vit_tiny``, in :mod:`funcnet.zoo_vit`)."""

from __future__ import annotations

from collections.abc import Sequence

from funcnet import _checks
from funcnet import layers as L
from funcnet.nets import Serial
from funcnet.zoo_cnn import alexnet, googlenet, resnet, vgg
from funcnet.zoo_vit import vit, vit_tiny

__all__ = ["alexnet", "digits_cnn", "googlenet", "lenet5", "mlp", "resnet", "vgg", "vit",
           "vit_tiny"]


def mlp(hidden: Sequence[int], num_classes: int, activation: L.Layer | None = None) -> Serial:
    """``Flatten -> [Dense(h) -> activation]* -> Dense(num_classes)`` (logits).

    ``activation`` defaults to :class:`~funcnet.layers.ReLU`.
    """
    if isinstance(hidden, int) or not isinstance(hidden, Sequence) or isinstance(hidden, str):
        raise TypeError(f"mlp: hidden must be a sequence of layer widths (e.g. [256, 256], "
                        f"or [] for none), got {hidden!r}")
    hidden = [_checks.positive_int(h, "hidden width", "mlp") for h in hidden]
    num_classes = _checks.positive_int(num_classes, "num_classes", "mlp")
    act = L.ReLU() if activation is None else activation
    body: list[L.Layer] = [L.Flatten()]
    for h in hidden:
        body += [L.Dense(h), act]
    return Serial([*body, L.Dense(num_classes)])


def lenet5(num_classes: int = 10, pool: L.Layer | None = None) -> Serial:
    """LeNet-5 for 28x28x1 inputs (61,706 parameters with 10 classes), ReLU activations.

    ``Conv(6, 5x5, SAME) -> pool -> Conv(16, 5x5) -> pool -> 120 -> 84 -> classes``;
    ``pool`` defaults to ``MaxPool(2)`` and may be any 2x2 pooling layer.
    """
    num_classes = _checks.positive_int(num_classes, "num_classes", "lenet5")
    pool = L.MaxPool(2) if pool is None else pool
    return Serial([
        L.Conv(6, (5, 5), padding="SAME"), L.ReLU(), pool,
        L.Conv(16, (5, 5)), L.ReLU(), pool,
        L.Flatten(),
        L.Dense(120), L.ReLU(),
        L.Dense(84), L.ReLU(),
        L.Dense(num_classes),
    ])  # fmt: skip


def digits_cnn(num_classes: int = 10, pool: L.Layer | None = None) -> Serial:
    """A LeNet-style network sized for the 8x8x1 digits.

    ``Conv(16, 3x3, SAME) -> pool -> Conv(32, 3x3, SAME) -> pool -> 128 -> classes``.
    """
    num_classes = _checks.positive_int(num_classes, "num_classes", "digits_cnn")
    pool = L.MaxPool(2) if pool is None else pool
    return Serial([
        L.Conv(16, (3, 3), padding="SAME"), L.ReLU(), pool,
        L.Conv(32, (3, 3), padding="SAME"), L.ReLU(), pool,
        L.Flatten(),
        L.Dense(128), L.ReLU(),
        L.Dense(num_classes),
    ])  # fmt: skip
