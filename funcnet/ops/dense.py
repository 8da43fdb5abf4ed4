"""Fully connected (dense) layer: ``y = x W + b``."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def dense(x: jax.Array, w: jax.Array, b: jax.Array | None = None) -> jax.Array:
    """Affine map over the last axis.

    Args:
      x: ``(..., in)`` input; the leading axes (the batch) are kept.
      w: ``(in, out)`` weights.
      b: ``(out,)`` bias, or ``None``.

    Returns:
      ``(..., out)``: ``y[..., j] = sum_i x[..., i] w[i, j] + b[j]``.
    """
    if w.ndim != 2:
        raise ValueError(f"dense: expected weights w of rank 2 (in, out), got shape {w.shape}")
    if x.ndim < 1 or x.shape[-1] != w.shape[0]:
        raise ValueError(
            f"dense: input x has {x.shape[-1] if x.ndim else 'no'} features on its last "
            f"axis (shape {x.shape}) but w expects {w.shape[0]} (w shape {w.shape})"
        )
    y = jnp.matmul(x, w)
    if b is not None:
        if b.shape != (w.shape[1],):
            raise ValueError(f"dense: expected bias b of shape ({w.shape[1]},), got {b.shape}")
        y = y + b
    return y
