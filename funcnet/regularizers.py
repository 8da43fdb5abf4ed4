"""Regularizers, re-exported from :mod:`funcnet.nn.regularizers` (their rules:
``fn.vjp.regularizers``)."""

from funcnet.nn.regularizers import (
    Mask,
    l1,
    l2,
    weights_mask,
)

__all__ = [
    "Mask",
    "l1",
    "l2",
    "weights_mask",
]
