"""Reshaping layers: :class:`Flatten` and :class:`Reshape`.

Their rule is the shape bookkeeping of the lecture's gates with no arithmetic: the
gradient is the upstream gradient put back in the input's shape.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from typing import Any, NamedTuple

import jax

from funcnet import _checks
from funcnet.nn.base import RF, OpLayer, Rule, Shape, static


def _batched(x: Any, where: str) -> jax.Array:
    x = _checks.as_array(x, "input x", where)
    if x.ndim < 1:
        raise ValueError(f"{where}: expected a batched input x (N, ...), got a scalar")
    return x


def flatten(x: jax.Array) -> jax.Array:
    """``(N, d1, d2, ...) -> (N, d1 * d2 * ...)``."""
    x = _batched(x, "flatten")
    return x.reshape(x.shape[0], math.prod(x.shape[1:]))  # explicit: also for N = 0


def reshape(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """``(N, ...) -> (N, *shape)``; ``shape`` excludes the batch axis and may hold one -1."""
    x = _batched(x, "reshape")
    target = _target_shape(shape, "reshape")
    # the inferred size explicit: numpy cannot infer a -1 next to a batch of N = 0
    return x.reshape(x.shape[0], *_reshaped(tuple(x.shape[1:]), target, "reshape"))


def _target_shape(shape: Any, where: str) -> tuple[int, ...]:
    """``shape`` as a tuple of positive ints with at most one -1, else a ``TypeError``."""
    bad = TypeError(
        f"{where}: shape must be a tuple of positive ints (at most one -1), without "
        f"the batch axis; got {shape!r}"
    )
    if isinstance(shape, int) and not isinstance(shape, bool):
        shape = (shape,)
    if not isinstance(shape, tuple | list) or not shape:
        raise bad
    if any(isinstance(d, bool) for d in shape):
        raise bad
    try:
        shape = tuple(operator.index(d) for d in shape)
    except TypeError:
        raise bad from None
    if any(d == 0 or d < -1 for d in shape) or shape.count(-1) > 1:
        raise bad
    return shape


def _reshaped(in_shape: Shape, target: tuple[int, ...], where: str) -> Shape:
    """The shape ``in_shape`` takes reshaped to ``target`` (``-1`` inferred), else a
    ``ValueError`` naming both."""
    size, known = math.prod(in_shape), math.prod(d for d in target if d != -1)
    if -1 in target:
        if size % known:
            raise ValueError(
                f"{where}: cannot reshape an input of shape {in_shape} ({size} elements) "
                f"to {target}"
            )
        return tuple(size // known if d == -1 else d for d in target)
    if known != size:
        raise ValueError(
            f"{where}: cannot reshape an input of shape {in_shape} ({size} elements) to "
            f"{target} ({known} elements)"
        )
    return target


@static
class InputShape:
    shape: tuple[int, ...]


class ReshapeResiduals(NamedTuple):
    input_shape: InputShape  # static; the backward pass needs no arrays


def flatten_fwd(x: jax.Array):
    return flatten(x), ReshapeResiduals(InputShape(tuple(x.shape)))


def reshape_fwd(x: jax.Array, shape: tuple[int, ...]):
    return reshape(x, shape), ReshapeResiduals(InputShape(tuple(x.shape)))


def reshape_bwd(res: ReshapeResiduals, g: jax.Array):
    """``(g reshaped to the input's shape,)``."""
    return (g.reshape(res.input_shape.shape),)


RULES = {
    flatten: Rule(flatten_fwd, reshape_bwd, ("x",)),
    reshape: Rule(reshape_fwd, reshape_bwd, ("x",)),
}


@dataclasses.dataclass(frozen=True, repr=False)
class Flatten(OpLayer):
    """``(N, d1, d2, ...) -> (N, d1 * d2 * ...)``. No FLOPs; ends the receptive-field grid."""

    op = staticmethod(flatten)
    rule = RULES[flatten]

    def output_shape(self, input_shape: Shape) -> Shape:
        shape = super().output_shape(input_shape)
        _checks.check_features(shape, repr(self))
        return (math.prod(shape),)

    def flops(self, input_shape: Shape) -> tuple[int, int]:
        return 0, 0

    def receptive_field(self, input_shape: Shape, rf: RF) -> RF:
        return rf.flatten(input_shape)


@dataclasses.dataclass(frozen=True, repr=False)
class Reshape(OpLayer):
    """``(N, *input_shape) -> (N, *shape)``; ``shape`` excludes the batch axis and may hold
    one ``-1``, inferred from the input's size (as ``numpy.reshape``)."""

    shape: Any
    op = staticmethod(reshape)
    rule = RULES[reshape]

    def __post_init__(self):
        object.__setattr__(self, "shape", _target_shape(self.shape, "Reshape"))

    def output_shape(self, input_shape: Shape) -> Shape:
        shape = super().output_shape(input_shape)
        return _reshaped(shape, self.shape, repr(self))

    def hyper(self):
        return {"shape": self.shape}

    def flops(self, input_shape: Shape) -> tuple[int, int]:
        return 0, 0

    def receptive_field(self, input_shape: Shape, rf: RF) -> RF:
        out = self.output_shape(input_shape)
        if tuple(out[: len(rf.extent)]) == tuple(input_shape[: len(rf.extent)]) and rf.grid:
            return rf  # the spatial axes are kept; only the features are regrouped
        return rf.flatten(input_shape)
