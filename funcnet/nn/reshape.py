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

from funcnet.nn.base import RF, OpLayer, Rule, Shape, static


def flatten(x: jax.Array) -> jax.Array:
    """``(N, d1, d2, ...) -> (N, d1 * d2 * ...)``."""
    return x.reshape(x.shape[0], -1)


def reshape(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """``(N, ...) -> (N, *shape)``; ``shape`` excludes the batch axis and may hold one -1."""
    return x.reshape(x.shape[0], *shape)


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
        return (math.prod(super().output_shape(input_shape)),)

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
        shape = self.shape
        bad = TypeError(
            f"Reshape: shape must be a tuple of positive ints (at most one -1), without "
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
        object.__setattr__(self, "shape", shape)

    def output_shape(self, input_shape: Shape) -> Shape:
        shape = super().output_shape(input_shape)
        size, known = math.prod(shape), math.prod(d for d in self.shape if d != -1)
        if -1 in self.shape:
            if size % known:
                raise ValueError(
                    f"{self!r}: cannot reshape an input of shape {shape} ({size} elements) "
                    f"to {self.shape}"
                )
            return tuple(size // known if d == -1 else d for d in self.shape)
        if known != size:
            raise ValueError(
                f"{self!r}: cannot reshape an input of shape {shape} ({size} elements) to "
                f"{self.shape} ({known} elements)"
            )
        return self.shape

    def hyper(self):
        return {"shape": self.shape}

    def flops(self, input_shape: Shape) -> tuple[int, int]:
        return 0, 0

    def receptive_field(self, input_shape: Shape, rf: RF) -> RF:
        out = self.output_shape(input_shape)
        if tuple(out[: len(rf.extent)]) == tuple(input_shape[: len(rf.extent)]) and rf.grid:
            return rf  # the spatial axes are kept; only the features are regrouped
        return rf.flatten(input_shape)
