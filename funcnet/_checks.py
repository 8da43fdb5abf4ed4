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
        hint = ""
        if what == "input_shape" and len(shape) == rank + 1:
            hint = (f"; did you include the batch dimension? input_shape excludes it: "
                    f"use {tuple(shape)[1:]}")
        raise ValueError(
            f"{where}: expected {what} of rank {rank}{lay}, got shape {tuple(shape)} "
            f"of rank {len(shape)}{hint}"
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
