"""Penalties ``Omega(theta)`` on a parameter pytree, by default over the weights only.

The lecture's update is ``Delta = -grad l - lambda grad Omega``; a regularizer here is
just ``Omega``. The mask follows optax: a pytree of bools with the structure of the
params, or a function ``params -> mask``. The default, :func:`weights_mask`, selects the
leaves named ``"w"`` or ``"w_..."`` (dense, conv, locally connected and embedding
kernels, attention's ``w_qkv`` and ``w_out``) and leaves biases (``"b"``, ``"b_..."``),
normalisation scales, tokens and position tables out.

The backward rules: ``grad Omega`` for the lecture's update
``Delta = -grad l - lambda grad Omega``.

- L2, ``Omega = 1/2 sum w^2``: ``grad Omega = w`` on the masked leaves, 0 elsewhere;
- L1, ``Omega = sum |w|``: ``grad Omega = sign(w)`` (0 at 0, as ``jnp.abs``), 0 elsewhere.

:func:`l2_grad` and :func:`l1_grad` return the gradient directly (a pytree like
``params``), for a train step that adds ``lambda * grad Omega`` itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from funcnet import _checks
from funcnet.nn.base import Rule

Mask = Any | Callable[[Any], Any]


def weights_mask(params: Any) -> Any:
    """``True`` for every leaf whose dict key is ``"w"`` or starts with ``"w_"`` (the
    kernels: attention has ``w_qkv`` and ``w_out``), ``False`` otherwise."""

    def is_weight(path, _leaf):
        if not path or not isinstance(path[-1], jax.tree_util.DictKey):
            return False
        key = path[-1].key
        return isinstance(key, str) and (key == "w" or key.startswith("w_"))

    return jax.tree_util.tree_map_with_path(is_weight, params)


def _check_params(params: Any, where: str) -> None:
    """Every leaf of ``params`` is an array (or number) of reals, else a ``TypeError``
    naming the leaf."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = jax.tree_util.keystr(path) or "(root)"
        if not (hasattr(leaf, "dtype") or isinstance(leaf, int | float | complex)):
            raise TypeError(
                f"{where}: params{'' if name == '(root)' else name} must be an array, got "
                f"{type(leaf).__name__} {leaf!r}"
            )
        dtype = _checks.dtype_of(leaf)
        if not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)) \
                or dtype == jnp.bool_:
            raise TypeError(
                f"{where}: params{'' if name == '(root)' else name} must hold real numbers "
                f"(a floating dtype), got {dtype}"
            )


def _mask_bools(params: Any, mask: Mask, where: str) -> tuple[Any, list[bool]]:
    """``(treedef of params, the mask's leaves as Python bools)``, validated."""
    _check_params(params, where)
    if callable(mask):
        mask = mask(params)
    treedef = jax.tree_util.tree_structure(params)
    mask_leaves, mask_def = jax.tree_util.tree_flatten(mask)
    if mask_def != treedef:
        raise ValueError(
            f"{where}: mask must have the same tree structure as params; params are "
            f"{treedef}, mask is {mask_def}"
        )
    bools = []
    for m in mask_leaves:
        if isinstance(m, bool | np.bool_):
            bools.append(bool(m))
        elif hasattr(m, "dtype") and m.dtype == jnp.bool_ and jnp.shape(m) == () \
                and _checks.is_concrete(m):
            bools.append(bool(m))
        else:
            raise TypeError(
                f"{where}: mask leaves must be True or False (one per parameter array), "
                f"got {type(m).__name__} {m!r}"
            )
    return treedef, bools


def _masked_leaves(params: Any, mask: Mask, where: str) -> list[jax.Array]:
    _, bools = _mask_bools(params, mask, where)
    leaves = jax.tree_util.tree_leaves(params)
    return [leaf for leaf, m in zip(leaves, bools, strict=True) if m]


def l2(params: Any, mask: Mask = weights_mask) -> jax.Array:
    """``Omega = 1/2 sum w^2`` over the masked leaves; ``grad Omega = w`` there, 0 elsewhere."""
    leaves = _masked_leaves(params, mask, "l2")
    return 0.5 * sum((jnp.sum(leaf * leaf) for leaf in leaves), jnp.zeros(()))


def l1(params: Any, mask: Mask = weights_mask) -> jax.Array:
    """``Omega = sum |w|`` over the masked leaves; ``grad Omega = sign(w)`` (0 at 0)."""
    leaves = _masked_leaves(params, mask, "l1")
    return sum((jnp.sum(jnp.abs(leaf)) for leaf in leaves), jnp.zeros(()))



def _mask_tree(params: Any, mask: Mask, where: str) -> Any:
    """The mask as a pytree of Python bools with the structure of ``params``."""
    treedef, bools = _mask_bools(params, mask, where)
    return jax.tree_util.tree_unflatten(treedef, bools)


def _masked_map(fn, params: Any, mask: Mask, where: str) -> Any:
    mask = _mask_tree(params, mask, where)
    return jax.tree_util.tree_map(
        lambda leaf, m: fn(leaf) if m else jnp.zeros_like(leaf), params, mask
    )


def l2_grad(params: Any, mask: Mask = weights_mask) -> Any:
    """``grad (1/2 sum w^2) = w`` on masked leaves, zeros elsewhere (same pytree)."""
    return _masked_map(lambda w: w, params, mask, "l2")


def l1_grad(params: Any, mask: Mask = weights_mask) -> Any:
    """``grad (sum |w|) = sign(w)`` on masked leaves, zeros elsewhere (same pytree)."""
    return _masked_map(jnp.sign, params, mask, "l1")


class RegularizerResiduals(NamedTuple):
    grad: Any  # grad Omega, a pytree like params


def l2_fwd(params: Any, mask: Mask = weights_mask):
    """``(l2(params, mask), residuals)``."""
    return l2(params, mask), RegularizerResiduals(l2_grad(params, mask))


def l1_fwd(params: Any, mask: Mask = weights_mask):
    """``(l1(params, mask), residuals)``."""
    return l1(params, mask), RegularizerResiduals(l1_grad(params, mask))


def regularizer_bwd(res: RegularizerResiduals, g: jax.Array):
    """``(g grad Omega,)``."""
    return (jax.tree_util.tree_map(lambda d: g * d, res.grad),)


l2_bwd = l1_bwd = regularizer_bwd

GRADS = {l2: l2_grad, l1: l1_grad}

RULES = {
    l2: Rule(l2_fwd, l2_bwd, ("params",)),
    l1: Rule(l1_fwd, l1_bwd, ("params",)),
}

