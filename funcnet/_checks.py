"""Normalisation and validation of hyper-parameters, shared by ops and layers.

Every helper takes a ``where`` string (the layer or function being configured) so that
the error it raises names the culprit, the expected value and the given one.
"""

from __future__ import annotations

import functools
import math
import numbers
import operator
from collections.abc import Sequence
from typing import Any

import jax
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


def dtype_of(x: Any) -> np.dtype:
    """The dtype of an array, or the one NumPy gives a Python value (``float64`` for 1.0)."""
    dtype = getattr(x, "dtype", None)
    return np.dtype(np.asarray(x).dtype if dtype is None else dtype)


def describe(value: Any) -> str:
    """``"<type> <repr>"``, the repr cut to 60 characters: how errors show a given value."""
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


def static_number(value: Any, name: str, where: str) -> None:
    """Refuse a jax array where a static hyper-parameter (a Python or NumPy number) is
    expected: under ``jit`` (and in funcnet's compiled eager calls) it is a tracer,
    whose value the check cannot read."""
    if isinstance(value, jax.Array):
        raise TypeError(
            f"{where}: {name} must be a Python or NumPy number (a static hyper-parameter), "
            f"got a jax array of dtype {value.dtype} and shape {tuple(value.shape)}; pass "
            f"float({name}) if it is concrete"
        )


def as_array(x: Any, what: str, where: str) -> Any:
    """``x`` as an array (JAX arrays, tracers and NumPy arrays pass unchanged; nested lists
    of numbers are converted); a ``TypeError`` naming ``what`` for anything else (a string,
    ``None``, an object)."""
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return x
    try:
        arr = jnp.asarray(x)
    except (TypeError, ValueError):
        raise TypeError(
            f"{where}: {what} must be an array of numbers, got {describe(x)}"
        ) from None
    return arr


def on_device(x: Any) -> jax.Array:
    """``jnp.asarray(x)`` without compiling: a NumPy array is copied to the default
    device by ``jax.device_put`` (``jnp.asarray`` of one runs a small identity program,
    compiled once per shape and dtype); anything else goes through ``jnp.asarray``."""
    if isinstance(x, np.ndarray):
        return jax.device_put(x)
    return jnp.asarray(x)


def check_real(x: Any, what: str, where: str) -> None:
    """``x`` has a real number dtype (integer or floating; not complex, bool or text)."""
    dtype = dtype_of(x)
    if dtype == np.bool_ or not (
        jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.floating)
    ):
        raise TypeError(
            f"{where}: {what} must have a real (integer or floating) dtype, got {dtype}"
        )


def check_features(shape: Sequence[int], where: str) -> None:
    """``shape`` (an unbatched input shape) has a feature axis: rank >= 1."""
    if len(shape) == 0:
        raise ValueError(
            f"{where}: expected an input with a feature axis, input_shape (..., features) "
            f"without the batch dimension, got input_shape (); a batch x of shape (N,) has "
            f"no feature axis: use x.reshape(N, 1) for one feature per example"
        )


def is_concrete(x: Any) -> bool:
    """Whether the values of ``x`` are known now (not a tracer under ``jit``/``grad``)."""
    return not isinstance(x, jax.core.Tracer)


def check_in_unit_interval(x: Any, what: str, where: str) -> None:
    """Concrete ``x`` lies in ``[0, 1]`` (NaNs are left to propagate); skipped under
    tracing, where the values are unknown."""
    if not is_concrete(x):
        return
    dtype = dtype_of(x)
    if not (jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.floating)):
        return  # other dtypes are the caller's to reject
    arr = np.asarray(x, dtype=np.float64)
    arr = arr[~np.isnan(arr)]
    if arr.size == 0:
        return
    lo, hi = arr.min(), arr.max()
    if lo < 0 or hi > 1:
        raise ValueError(
            f"{where}: {what} must lie in [0, 1], got values in [{lo:.6g}, {hi:.6g}]"
        )


def check_loss_fn(loss: Any, where: str, name: str = "loss") -> None:
    """``loss`` is a function ``(outputs, y) -> scalar``, else a ``TypeError``."""
    if not callable(loss):
        raise TypeError(
            f"{where}: {name} must be a function (outputs, y) -> scalar (e.g. "
            f"funcnet.losses.softmax_cross_entropy), got {loss!r}"
        )


def check_lam(regularizer: Any, lam: Any, where: str) -> float:
    """``lam`` a finite non-negative number with a callable ``regularizer`` when positive."""
    if isinstance(lam, bool) or not isinstance(lam, numbers.Real):
        raise TypeError(f"{where}: lam must be a finite non-negative number, got {lam!r}")
    if not math.isfinite(lam) or lam < 0:
        raise ValueError(f"{where}: lam must be a finite non-negative number, got {lam!r}")
    if regularizer is not None and not callable(regularizer):
        raise TypeError(
            f"{where}: regularizer must be a function params -> Omega (e.g. "
            f"funcnet.regularizers.l2), got {regularizer!r}"
        )
    if lam > 0 and regularizer is None:
        raise ValueError(
            f"{where}: lam={lam} needs a regularizer (e.g. funcnet.regularizers.l2)"
        )
    return float(lam)


def check_batch_loss(loss_fn: Any, outputs: Any, y: Any, where: str) -> None:
    """Trace ``loss_fn`` on the whole batch's shapes (no computation; only once the
    per-example trace failed), so that a loss that refuses ``outputs`` and ``y`` says so
    for the batch ((16, 1) and (16,)), not for the single examples the weighted loss
    applies it to ((1, 1) and (1,))."""
    spec = functools.partial(jax.tree_util.tree_map,
                             lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)))
    try:
        jax.eval_shape(loss_fn, spec(outputs), spec(y))
    except (ValueError, TypeError) as e:
        if type(e) not in (ValueError, TypeError):
            raise
        raise type(e)(f"{where}: the loss refuses the network's outputs of shape "
                      f"{tuple(jnp.shape(outputs))} and y of shape "
                      f"{tuple(jnp.shape(y)) if hasattr(y, 'shape') else type(y).__name__}: "
                      f"{e}") from e
