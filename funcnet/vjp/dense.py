"""Backward rule of :func:`funcnet.ops.dense`, ``y = x W + b``.

``dL/dx = g W^T``, ``dL/dW = x^T g`` (summed over every leading axis), ``dL/db = sum g``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from funcnet import ops
from funcnet.vjp._common import Rule


class DenseResiduals(NamedTuple):
    x: jax.Array  # (..., in)
    w: jax.Array  # (in, out)
    b: jax.Array | None  # (out,) or None: its presence decides whether db is returned


def dense_fwd(x: jax.Array, w: jax.Array, b: jax.Array | None = None):
    """``(y, residuals)``: ``y = x W + b`` of shape ``(..., out)``."""
    return ops.dense(x, w, b), DenseResiduals(x, w, b)


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


RULES = {ops.dense: Rule(dense_fwd, dense_bwd, ("x", "w", "b"))}
