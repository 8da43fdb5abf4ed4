"""Penalties ``Omega(theta)`` on a parameter pytree, by default over the weights only.

The lecture's update is ``Delta = -grad l - lambda grad Omega``; a regularizer here is
just ``Omega``. The mask follows optax: a pytree of bools with the structure of the
params, or a function ``params -> mask``. The default, :func:`weights_mask`, selects the
leaves named ``"w"`` (dense, conv and locally connected kernels) and leaves biases
(``"b"``) out.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

Mask = Any | Callable[[Any], Any]


def weights_mask(params: Any) -> Any:
    """``True`` for every leaf whose dict key is ``"w"``, ``False`` otherwise."""

    def is_weight(path, _leaf):
        return bool(path) and isinstance(path[-1], jax.tree_util.DictKey) and path[-1].key == "w"

    return jax.tree_util.tree_map_with_path(is_weight, params)


def _masked_leaves(params: Any, mask: Mask, where: str) -> list[jax.Array]:
    if callable(mask):
        mask = mask(params)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    mask_leaves, mask_def = jax.tree_util.tree_flatten(mask)
    if mask_def != treedef:
        raise ValueError(
            f"{where}: mask must have the same tree structure as params; params are "
            f"{treedef}, mask is {mask_def}"
        )
    return [leaf for leaf, m in zip(leaves, mask_leaves, strict=True) if m]


def l2(params: Any, mask: Mask = weights_mask) -> jax.Array:
    """``Omega = 1/2 sum w^2`` over the masked leaves; ``grad Omega = w`` there, 0 elsewhere."""
    leaves = _masked_leaves(params, mask, "l2")
    return 0.5 * sum((jnp.sum(leaf * leaf) for leaf in leaves), jnp.zeros(()))


def l1(params: Any, mask: Mask = weights_mask) -> jax.Array:
    """``Omega = sum |w|`` over the masked leaves; ``grad Omega = sign(w)`` (0 at 0)."""
    leaves = _masked_leaves(params, mask, "l1")
    return sum((jnp.sum(jnp.abs(leaf)) for leaf in leaves), jnp.zeros(()))
