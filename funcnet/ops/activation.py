"""Elementwise activations and the softmax family, from ``jax.nn``.

Conventions pinned by the tests: ``relu'(0) = 0`` (as ``jax.nn.relu``); softmax and
log-softmax act on ``axis=-1`` by default and are invariant to adding a constant.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sigmoid(x: jax.Array) -> jax.Array:
    """``sigma(x) = 1 / (1 + exp(-x))``; ``sigma' = sigma (1 - sigma)``."""
    return jax.nn.sigmoid(x)


def tanh(x: jax.Array) -> jax.Array:
    """Hyperbolic tangent; ``tanh' = 1 - tanh^2``."""
    return jnp.tanh(x)


def relu(x: jax.Array) -> jax.Array:
    """``max(0, x)``; its derivative at 0 is taken to be 0."""
    return jax.nn.relu(x)


def softmax(x: jax.Array, axis: int = -1) -> jax.Array:
    """``y_k = exp(b_k) / sum_l exp(b_l)`` along ``axis`` (computed shift-stably)."""
    return jax.nn.softmax(x, axis=axis)


def log_softmax(x: jax.Array, axis: int = -1) -> jax.Array:
    """``log softmax(x)`` along ``axis``, finite for logits of any magnitude."""
    return jax.nn.log_softmax(x, axis=axis)
