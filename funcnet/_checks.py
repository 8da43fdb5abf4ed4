"""Normalisation and validation of hyper-parameters, shared by ops and layers.

Every helper takes a ``where`` string (the layer or function being configured) so that
the error it raises names the culprit, the expected value and the given one.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

Padding = str | int | Sequence[int] | Sequence[tuple[int, int]]
PadPairs = tuple[tuple[int, int], ...]

PADDING_STRINGS = ("VALID", "SAME")


def _is_int(v: Any) -> bool:
    if isinstance(v, bool):
        return False
    try:
        operator.index(v)
    except TypeError:
        return False
    return True


def positive_int(value: Any, name: str, where: str) -> int:
    """Return ``value`` as an int, or raise naming ``where`` and ``name``."""
    if not _is_int(value):
        raise TypeError(f"{where}: {name} must be a positive int, got {value!r}")
    value = operator.index(value)
    if value <= 0:
        raise ValueError(f"{where}: {name} must be a positive int, got {value}")
    return value


def ntuple(value: Any, n: int, name: str, where: str) -> tuple[int, ...]:
    """Normalise an int or a length-``n`` sequence of ints to a tuple of positive ints."""
    if _is_int(value):
        return (positive_int(value, name, where),) * n
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != n:
            raise ValueError(
                f"{where}: {name} must be an int or a sequence of {n} ints, got {value!r}"
            )
        return tuple(positive_int(v, name, where) for v in value)
    raise TypeError(f"{where}: {name} must be an int or a sequence of {n} ints, got {value!r}")


def normalize_padding(padding: Any, n: int, where: str) -> str | PadPairs:
    """Normalise padding to ``"VALID"``, ``"SAME"`` or ``n`` explicit (low, high) pairs.

    Accepted: ``"VALID"``/``"SAME"`` (any case), an int ``p`` (``p`` on every side), a
    sequence of ``n`` ints (symmetric per dimension), or ``n`` pairs ``(low, high)``.
    """
    if isinstance(padding, str):
        up = padding.upper()
        if up not in PADDING_STRINGS:
            raise ValueError(
                f"{where}: padding must be one of {PADDING_STRINGS}, an int, or {n} "
                f"(low, high) pairs, got {padding!r}"
            )
        return up
    bad = (
        f"{where}: padding must be one of {PADDING_STRINGS}, a non-negative int, "
        f"{n} ints, or {n} (low, high) pairs, got {padding!r}"
    )
    if _is_int(padding):
        p = operator.index(padding)
        if p < 0:
            raise ValueError(bad)
        return ((p, p),) * n
    if not isinstance(padding, Sequence) or len(padding) != n:
        raise ValueError(bad)
    pairs = []
    for item in padding:
        if _is_int(item):
            lo = hi = operator.index(item)
        elif isinstance(item, Sequence) and len(item) == 2 and all(_is_int(v) for v in item):
            lo, hi = (operator.index(v) for v in item)
        else:
            raise ValueError(bad)
        if lo < 0 or hi < 0:
            raise ValueError(bad)
        pairs.append((lo, hi))
    return tuple(pairs)


def effective_window(window: Sequence[int], dilation: Sequence[int]) -> tuple[int, ...]:
    """Spatial extent of a dilated window: ``(k - 1) * d + 1`` per dimension."""
    return tuple((k - 1) * d + 1 for k, d in zip(window, dilation, strict=True))


def resolve_padding(
    padding: str | PadPairs,
    in_spatial: Sequence[int],
    window: Sequence[int],
    stride: Sequence[int],
    dilation: Sequence[int] | None = None,
) -> PadPairs:
    """Explicit (low, high) pads for a normalised padding on a given input size.

    ``"SAME"`` follows XLA/TensorFlow: the output has ``ceil(in / stride)`` positions and
    the total padding ``max((out - 1) * stride + k_eff - in, 0)`` is split with the extra
    pixel (if odd) at the high end. ``"VALID"`` pads nothing.
    """
    if dilation is None:
        dilation = (1,) * len(window)
    k_eff = effective_window(window, dilation)
    if padding == "VALID":
        return tuple((0, 0) for _ in window)
    if padding == "SAME":
        pads = []
        for size, k, s in zip(in_spatial, k_eff, stride, strict=True):
            out = -(-size // s)
            total = max((out - 1) * s + k - size, 0)
            pads.append((total // 2, total - total // 2))
        return tuple(pads)
    return tuple(padding)


def conv_output_size(
    in_spatial: Sequence[int],
    window: Sequence[int],
    stride: Sequence[int],
    pads: PadPairs,
    dilation: Sequence[int] | None = None,
) -> tuple[int, ...]:
    """``floor((in + lo + hi - k_eff) / stride) + 1`` per spatial dimension."""
    if dilation is None:
        dilation = (1,) * len(window)
    k_eff = effective_window(window, dilation)
    return tuple(
        (size + lo + hi - k) // s + 1
        for size, (lo, hi), k, s in zip(in_spatial, pads, k_eff, stride, strict=True)
    )


def check_window_fits(
    in_spatial: Sequence[int],
    window: Sequence[int],
    pads: PadPairs,
    where: str,
    dilation: Sequence[int] | None = None,
) -> None:
    """Raise if the (dilated) window is larger than the padded input."""
    if dilation is None:
        dilation = (1,) * len(window)
    k_eff = effective_window(window, dilation)
    padded = tuple(size + lo + hi for size, (lo, hi) in zip(in_spatial, pads, strict=True))
    if any(k > p for k, p in zip(k_eff, padded, strict=True)):
        raise ValueError(
            f"{where}: window {tuple(k_eff)} (after dilation) is larger than the padded "
            f"input {padded} (input {tuple(in_spatial)}, padding {pads}); use a smaller "
            f"window or more padding"
        )


def input_shape_tuple(input_shape: Any, where: str) -> tuple[int, ...]:
    """Validate an unbatched ``input_shape`` (a sequence of positive ints)."""
    if _is_int(input_shape):
        input_shape = (input_shape,)
    if not isinstance(input_shape, Sequence) or isinstance(input_shape, str):
        raise TypeError(
            f"{where}: input_shape must be a tuple of positive ints (without the batch "
            f"dimension), got {input_shape!r}"
        )
    out = []
    for d in input_shape:
        if not _is_int(d) or operator.index(d) <= 0:
            raise ValueError(
                f"{where}: input_shape must be a tuple of positive ints (without the batch "
                f"dimension), got {tuple(input_shape)!r}"
            )
        out.append(operator.index(d))
    return tuple(out)


def check_rank(shape: Sequence[int], rank: int, what: str, where: str, layout: str = "") -> None:
    if len(shape) != rank:
        lay = f" ({layout})" if layout else ""
        raise ValueError(
            f"{where}: expected {what} of rank {rank}{lay}, got shape {tuple(shape)} "
            f"of rank {len(shape)}"
        )


def check_floating(x: Any, what: str, where: str) -> None:
    dtype = getattr(x, "dtype", None)
    if dtype is None:
        x = np.asarray(x)
        dtype = x.dtype
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
            f"{where}: {what} must have a floating dtype (e.g. float32), got {dtype}; "
            f"convert it with x.astype(jnp.float32)"
        )
