"""Dropout: zero each unit with probability ``rate`` in training, the identity in evaluation.

Inverted dropout (Srivastava et al., 2014, as PyTorch and Flax): the survivors are scaled
by ``1 / (1 - rate)`` during training, so ``E[y] = x`` and evaluation needs no rescaling.
With a keep-mask ``m`` drawn as ``m ~ Bernoulli(1 - rate)``:

- forward:  ``y = m * x / (1 - rate)``
- backward: ``dL/dx = m * g / (1 - rate)`` (the same mask: dropout is linear in ``x``)

The op takes the mask as an argument (:func:`dropout_mask` draws it), so the op and its
rule are deterministic; the :class:`Dropout` layer draws the mask from its ``key``, and
its ``forward`` and its rule's ``fwd`` draw the same mask from the same key.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import operator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from funcnet import _checks
from funcnet._eager import compiled_when_eager
from funcnet.nn.base import RF, Layer, Rule, Shape, static

# ---------------------------------------------------------------------------------------
# The op
# ---------------------------------------------------------------------------------------


def _check_rate(rate: Any, where: str) -> float:
    """``rate`` as a float in ``[0, 1)``, or an error naming ``where``."""
    _checks.static_number(rate, "rate", where)
    if isinstance(rate, bool) or not isinstance(rate, numbers.Real):
        raise TypeError(f"{where}: rate must be a float in [0, 1), got {rate!r}")
    rate = float(rate)
    if not 0.0 <= rate < 1.0:  # also rejects NaN
        raise ValueError(
            f"{where}: rate must be a float in [0, 1) (the probability of dropping a unit), "
            f"got {rate!r}"
        )
    return rate


@compiled_when_eager()
def dropout_mask(key: jax.Array, shape: tuple[int, ...], rate: float) -> jax.Array:
    """A boolean keep-mask of ``shape``: each entry ``True`` with probability ``1 - rate``."""
    rate = _check_rate(rate, "dropout_mask")
    return jax.random.bernoulli(key, 1.0 - rate, shape)


@compiled_when_eager()
def dropout(x: jax.Array, mask: jax.Array, rate: float) -> jax.Array:
    """Inverted dropout with a given keep-mask.

    Args:
      x: ``(N, ...)`` input, floating.
      mask: boolean keep-mask broadcastable to ``x``'s shape (``(N, ...)``, or with size-1
        axes to share one draw along them, e.g. ``(N, 1, 1, C)`` for spatial dropout).
      rate: the drop probability in ``[0, 1)``, a Python float.

    Returns:
      ``x``'s shape: ``y = where(mask, x / (1 - rate), 0)``.
    """
    rate = _check_rate(rate, "dropout")
    _check_mask(x, mask, "dropout")
    return jnp.where(mask, x / (1.0 - rate), jnp.zeros((), x.dtype))


def _check_mask(x: jax.Array, mask: jax.Array, where: str) -> None:
    if jnp.result_type(mask) != jnp.bool_:
        raise TypeError(f"{where}: mask must be boolean (True = keep), got {jnp.result_type(mask)}")
    try:
        shape = jnp.broadcast_shapes(jnp.shape(mask), jnp.shape(x))
    except ValueError:
        shape = None
    if shape != jnp.shape(x):
        raise ValueError(
            f"{where}: mask of shape {jnp.shape(mask)} does not broadcast to the input's "
            f"shape {jnp.shape(x)}"
        )


# ---------------------------------------------------------------------------------------
# Its rule: dL/dx = where(mask, g / (1 - rate), 0), reusing the forward's mask
# ---------------------------------------------------------------------------------------


@static
class DropRate:
    value: float  # the drop probability, a Python float


class DropoutResiduals(NamedTuple):
    mask: jax.Array | None  # bool, broadcastable to x; None: the identity (eval or rate 0)
    rate: DropRate  # static


def dropout_fwd(x: jax.Array, mask: jax.Array, rate: float):
    """``(y, residuals)``: ``y = where(mask, x / (1 - rate), 0)``, keeping the mask."""
    return dropout(x, mask, rate), DropoutResiduals(mask, DropRate(_check_rate(rate, "dropout")))


def dropout_bwd(res: DropoutResiduals, g: jax.Array):
    """``(dL/dx,)`` for upstream ``g`` of ``x``'s shape: ``where(mask, g / (1 - rate), 0)``."""
    if res.mask is None:
        return (g,)
    return (jnp.where(res.mask, g / (1.0 - res.rate.value), jnp.zeros((), g.dtype)),)


RULES = {dropout: Rule(dropout_fwd, dropout_bwd, ("x",))}


# ---------------------------------------------------------------------------------------
# The layer
# ---------------------------------------------------------------------------------------


def _check_dims(value: Any, where: str) -> tuple[int, ...]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value,)
    bad = TypeError(
        f"{where}: broadcast_dims must be a tuple of ints (axes of the input without the "
        f"batch axis), got {value!r}"
    )
    if not isinstance(value, tuple | list) or any(isinstance(d, bool) for d in value):
        raise bad
    try:
        dims = tuple(operator.index(d) for d in value)
    except TypeError:
        raise bad from None
    if len(set(dims)) != len(dims):
        raise ValueError(f"{where}: broadcast_dims has repeated axes: {dims}")
    return dims


@dataclasses.dataclass(frozen=True, repr=False)
class Dropout(Layer):
    """Inverted dropout: in training each unit is zeroed with probability ``rate`` and the
    survivors are scaled by ``1 / (1 - rate)``; in evaluation (``train=False``) the identity.

    ``y = m * x / (1 - rate)``, ``m ~ Bernoulli(1 - rate)`` drawn from ``key``.

    Input ``(N, ...)`` -> output of the same shape. No params, no state. Training mode
    with ``rate > 0`` needs a ``key`` (``apply(..., key=jax.random.key(0), train=True)``;
    ``fit`` passes a fresh one every step); ``rate = 0`` is the identity in both modes.

    ``broadcast_dims``: axes of the *unbatched* input (negative counts from the end) along
    which one draw of the mask is shared: on an ``(H, W, C)`` input, ``(0, 1)`` drops whole
    channels of each example (spatial dropout). The mask has shape ``(N, ...)`` with
    those axes of size 1.
    """

    rate: float
    broadcast_dims: tuple[int, ...] = ()

    @property
    def stochastic(self) -> bool:  # rate 0 is the identity: no key needed
        return self.rate > 0

    def __post_init__(self):
        where = type(self).__name__
        object.__setattr__(self, "rate", _check_rate(self.rate, where))
        object.__setattr__(self, "broadcast_dims", _check_dims(self.broadcast_dims, where))

    def _broadcast_axes(self, input_shape: Shape) -> set[int]:
        """``broadcast_dims`` as non-negative axes of the unbatched input (validated)."""
        rank = len(input_shape)
        axes = set()
        for d in self.broadcast_dims:
            if not -rank <= d < rank:
                raise ValueError(
                    f"{self!r}: broadcast_dims {self.broadcast_dims} out of range for an "
                    f"input of shape {tuple(input_shape)} (rank {rank}, batch axis excluded)"
                )
            axes.add(d % rank)
        if len(axes) != len(self.broadcast_dims):
            raise ValueError(
                f"{self!r}: broadcast_dims {self.broadcast_dims} name the same axis twice for "
                f"an input of shape {tuple(input_shape)}"
            )
        return axes

    def output_shape(self, input_shape: Shape) -> Shape:
        shape = super().output_shape(input_shape)
        self._broadcast_axes(shape)
        return shape

    def mask_shape(self, x_shape: Shape) -> Shape:
        """The mask's shape for a batched ``x_shape``: ``broadcast_dims`` set to 1."""
        axes = self._broadcast_axes(x_shape[1:])
        return (x_shape[0], *(1 if a in axes else d for a, d in enumerate(x_shape[1:])))

    def _mask(self, key: jax.Array | None, x: jax.Array) -> jax.Array:
        if key is None:
            raise ValueError(
                f"{self!r}: training mode (train=True) needs a PRNG key to draw the dropout "
                f"mask; pass key=jax.random.key(seed), e.g. apply(params, x, "
                f"key=jax.random.key(0), train=True) (fit passes a fresh key every step)"
            )
        return dropout_mask(key, self.mask_shape(tuple(x.shape)), self.rate)

    def _active(self, train: bool) -> bool:
        return train and self.rate > 0.0

    def forward(self, params, state, x, *, key=None, train=False):
        if not self._active(train):
            return x, state
        return dropout(x, self._mask(key, x), self.rate), state

    # the layer rule: the op rule with the mask drawn as forward draws it
    def fwd(self, params, state, x, *, key=None, train=False):
        if not self._active(train):
            return x, state, DropoutResiduals(None, DropRate(self.rate))
        y, res = dropout_fwd(x, self._mask(key, x), self.rate)
        return y, state, res

    def bwd(self, res, g, need_dx):
        return (dropout_bwd(res, g)[0] if need_dx else None), {}

    # metadata: the training-mode forward, a multiply (the 1 / (1 - rate) scale) and a
    # select per element; drawing the random mask is not counted; evaluation costs 0
    def flops(self, input_shape: Shape) -> tuple[int, int]:
        return (2 * math.prod(input_shape) if self.rate > 0.0 else 0), 0

    def receptive_field(self, input_shape: Shape, rf: RF) -> RF:
        return rf  # elementwise
