"""Losses, re-exported from :mod:`funcnet.nn.losses` (their rules: ``fn.vjp.losses``)."""

from funcnet.nn.losses import (
    LOG_CLAMP,
    binary_cross_entropy,
    binary_cross_entropy_with_logits,
    quadratic,
    softmax_cross_entropy,
)

__all__ = [
    "LOG_CLAMP",
    "binary_cross_entropy",
    "binary_cross_entropy_with_logits",
    "quadratic",
    "softmax_cross_entropy",
]
