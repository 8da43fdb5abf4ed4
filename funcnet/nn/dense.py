"""Dense (fully connected) layer: ``y = x W + b``; its rule ``dx = g W^T``, ``dW = x^T g``.

The op, its hand-written rule, the :class:`Dense` layer, its layer rule and metadata.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from funcnet import _checks
from funcnet._eager import compiled_when_eager
from funcnet.nn.base import (
    DEFAULT_B_INIT,
    DEFAULT_W_INIT,
    RF,
    Initializer,
    Layer,
    Rule,
    Shape,
    check_bool,
    check_init_fn,
    check_param_dtype,
)

# ---------------------------------------------------------------------------------------
# The op
# ---------------------------------------------------------------------------------------


@compiled_when_eager()
def dense(x: jax.Array, w: jax.Array, b: jax.Array | None = None) -> jax.Array:
    """Affine map over the last axis.

    Args:
      x: ``(..., in)`` input; the leading axes (the batch) are kept.
      w: ``(in, out)`` weights.
      b: ``(out,)`` bias, or ``None``.

    Returns:
      ``(..., out)``: ``y[..., j] = sum_i x[..., i] w[i, j] + b[j]``.
    """
    where = "dense"
    x = _checks.as_array(x, "input x", where)
    w = _checks.as_array(w, "weights w", where)
    _checks.check_real(x, "input x", where)
    _checks.check_real(w, "weights w", where)
    if b is not None:
        b = _checks.as_array(b, "bias b", where)
        _checks.check_real(b, "bias b", where)
    if w.ndim != 2:
        raise ValueError(f"dense: expected weights w of rank 2 (in, out), got shape {w.shape}")
    if x.ndim < 1 or x.shape[-1] != w.shape[0]:
        raise ValueError(
            f"dense: input x has {x.shape[-1] if x.ndim else 'no'} features on its last "
            f"axis (shape {x.shape}) but w expects {w.shape[0]} (w shape {w.shape})"
        )
    if b is not None and b.shape != (w.shape[1],):
        raise ValueError(f"dense: expected bias b of shape ({w.shape[1]},), got {b.shape}")
    y = jnp.matmul(x, w)
    return y if b is None else y + b


# ---------------------------------------------------------------------------------------
# Its rule: dL/dx = g W^T, dL/dW = x^T g (summed over every leading axis), dL/db = sum g
# ---------------------------------------------------------------------------------------


class DenseResiduals(NamedTuple):
    x: jax.Array  # (..., in)
    w: jax.Array  # (in, out)
    b: jax.Array | None  # (out,) or None: its presence decides whether db is returned


def dense_fwd(x: jax.Array, w: jax.Array, b: jax.Array | None = None):
    """``(y, residuals)``: ``y = x W + b`` of shape ``(..., out)``."""
    return dense(x, w, b), DenseResiduals(x, w, b)


def dense_input_grad(res: DenseResiduals, g: jax.Array) -> jax.Array:
    """``dL/dx = g W^T``: ``(..., out) -> (..., in)``."""
    return jnp.matmul(g, res.w.T)


def dense_param_grads(res: DenseResiduals, g: jax.Array):
    """``(dL/dW, dL/db)``: ``x^T g`` of shape ``(in, out)`` and ``sum g`` of ``(out,)``."""
    x2 = res.x.reshape(-1, res.x.shape[-1])
    g2 = g.reshape(-1, g.shape[-1])
    dw = jnp.matmul(x2.T, g2)
    db = None if res.b is None else jnp.sum(g2, axis=0)
    return dw, db


def dense_bwd(res: DenseResiduals, g: jax.Array):
    """``(dL/dx, dL/dW, dL/db)`` for upstream ``g`` of shape ``(..., out)``."""
    dw, db = dense_param_grads(res, g)
    return dense_input_grad(res, g), dw, db


RULES = {dense: Rule(dense_fwd, dense_bwd, ("x", "w", "b"))}


# ---------------------------------------------------------------------------------------
# The layer
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, repr=False)
class Dense(Layer):
    """Fully connected layer over the last axis: ``y = x W + b``.

    Params: ``w`` of shape ``(in, features)``, ``b`` of shape ``(features,)``.
    Input ``(N, ..., in)`` -> output ``(N, ..., features)``.
    """

    features: int
    use_bias: bool = True
    w_init: Initializer = DEFAULT_W_INIT
    b_init: Initializer = DEFAULT_B_INIT
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        where = type(self).__name__
        object.__setattr__(self, "features", _checks.positive_int(self.features, "features", where))
        check_bool(self.use_bias, "use_bias", where)
        check_init_fn(self.w_init, "w_init", where)
        check_init_fn(self.b_init, "b_init", where)
        check_param_dtype(self.param_dtype, where)

    def output_shape(self, input_shape: Shape) -> Shape:
        shape = super().output_shape(input_shape)
        _checks.check_features(shape, repr(self))
        return (*shape[:-1], self.features)

    def param_specs(self, input_shape: Shape) -> dict[str, Shape]:
        shape = _checks.input_shape_tuple(input_shape, repr(self))
        self.output_shape(shape)
        specs = {"w": (shape[-1], self.features)}
        if self.use_bias:
            specs["b"] = (self.features,)
        return specs

    def forward(self, params, state, x, *, key=None, train=False):
        return dense(x, params["w"], params.get("b")), state

    # the layer rule: the op rule, the first layer skipping dx
    def fwd(self, params, state, x, *, key=None, train=False):
        y, res = dense_fwd(x, params["w"], params.get("b"))
        return y, state, res

    def bwd(self, res, g, need_dx):
        dw, db = dense_param_grads(res, g)
        dx = dense_input_grad(res, g) if need_dx else None
        return dx, ({"w": dw} if db is None else {"w": dw, "b": db})

    # metadata: 2 * in * out per position plus out for the bias
    def flops(self, input_shape: Shape) -> tuple[int, int]:
        self.output_shape(input_shape)
        positions = math.prod(input_shape[:-1])
        bias = positions * self.features if self.use_bias else 0
        return 2 * positions * input_shape[-1] * self.features + bias, 0

    def receptive_field(self, input_shape: Shape, rf: RF) -> RF:
        # per position on a grid, everything once flattened
        return rf.per_position(input_shape)
