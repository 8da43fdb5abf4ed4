"""Explicit back-propagation through a network, layer by layer, with the hand rules.

The lecture's four steps of back-propagation, for ``f = f_{L+1} o ... o f_1``:

1. **feed-forward**: run every layer's ``fwd``, keeping its residuals (what its backward
   pass needs: its input, its output, a mask, ...);
2. **back-propagate to the output layer**: the loss rule gives ``delta = dl/d(output)``;
3. **back-propagate to the hidden layers**: from the last layer to the first, each
   layer's ``bwd`` turns the upstream ``delta`` into its parameter gradients and the
   ``delta`` of the layer below (the first layer skips the gradient w.r.t. the data);
4. **weight update**: left to the optimizer (``funcnet.train`` or optax).

Every layer answers for its own rule (``layer.fwd`` / ``layer.bwd``, see
:mod:`funcnet.nn.base`); combinators back-propagate through their parts with the gate
patterns. A layer without a hand-written rule (a user's layer that does not define one,
``Activation`` of an arbitrary function) falls back to ``jax.vjp`` of its forward; a loss
without a rule falls back to ``jax.vjp`` the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from funcnet import _checks
from funcnet import precision as _precision
from funcnet.nn import regularizers as vreg
from funcnet.nn.base import Layer, rule_forward
from funcnet.vjp.table import RULES


class LayerRule(NamedTuple):
    """A layer's rule as a pair of functions (``layer.fwd`` and ``layer.bwd``)."""

    fwd: Callable
    bwd: Callable


def layer_rule(layer: Layer) -> LayerRule:
    """``layer``'s own rule: ``(layer.fwd, layer.bwd)`` (the ``jax.vjp`` fallback when it
    has none written by hand; ``type(layer).has_hand_rule()`` tells which).

    ``fwd(params, state, x, *, key=None, train=False)`` validates its arguments first (as
    ``apply`` does), so wrong params are a ``ValueError`` naming the layer, not a
    ``KeyError`` from inside the rule.
    """
    if not isinstance(layer, Layer):
        raise TypeError(f"vjp: expected a funcnet layer, got {layer!r}")

    def fwd(params, state, x, *, key=None, train=False):
        return rule_forward(layer, params, state, x, key=key, train=train)

    return LayerRule(fwd, layer.bwd)


def _loss_value_and_delta(loss_fn: Callable, out: jax.Array, y: Any):
    """Step 2: the loss and ``delta = dl/d(output)`` from the loss rule (or ``jax.vjp``).

    A per-example weighted loss ``loss_fn(out, (y, w)) = sum_i w_i l_i / sum_i w_i`` (as
    :func:`funcnet.train.weighted_loss` builds, marking it with ``base_loss``) is
    back-propagated by hand too: each example's ``l_i`` and ``dl_i/d out_i`` come from the
    base loss's rule on a batch of one, and ``delta_i = w_i / sum(w) * dl_i/d out_i``.
    """
    rule = RULES.get(loss_fn)
    if rule is not None:
        loss, res = rule.fwd(out, y)
        delta = rule.bwd(res, jnp.ones((), loss.dtype))[0]
        return loss, delta
    base_rule = RULES.get(getattr(loss_fn, "base_loss", None))
    if base_rule is not None:
        y, w = y

        def one(o, t):
            loss_i, res = base_rule.fwd(o[None], t[None])
            return loss_i, base_rule.bwd(res, jnp.ones((), loss_i.dtype))[0][0]

        try:
            per_loss, per_delta = jax.vmap(one)(out, y)
        except (ValueError, TypeError):  # said for the batch, if the loss refuses it too
            _checks.check_batch_loss(loss_fn.base_loss, out, y,
                                     getattr(loss_fn, "where", "vjp.value_and_grad"))
            raise
        scale = (w / jnp.sum(w)).astype(per_loss.dtype)
        delta = per_delta * scale.reshape(-1, *([1] * (out.ndim - 1)))
        return jnp.sum(scale * per_loss), delta
    loss, vjp_fn = jax.vjp(lambda o: loss_fn(o, y), out)
    return loss, vjp_fn(jnp.ones_like(loss))[0]


def _as_network(net: Any, where: str) -> Layer:
    if not isinstance(net, Layer):
        raise TypeError(f"{where}: expected a funcnet layer or network, got {net!r}")
    return net


def _check_regularizer(regularizer: Any, where: str) -> None:
    if regularizer is not None and regularizer not in vreg.GRADS:
        raise ValueError(
            f"{where}: regularizer must be one of funcnet.regularizers.l2 / l1, "
            f"got {regularizer!r}"
        )


def value_and_grad_with_state(
    net: Layer,
    loss_fn: Callable[[jax.Array, Any], jax.Array],
    regularizer: Callable | None = None,
    lam: float = 0.0,
    *,
    precision: Any = None,
) -> Callable:
    """``f(params, state, x, y, key=None, train=True) -> (loss, grads, new_state, outputs)``.

    Explicit back-propagation with the hand rules for any network, state and randomness
    included: the feed-forward runs in training mode (Dropout draws its mask from
    ``key``, BatchNorm normalises with the batch statistics and returns the updated
    running statistics in ``new_state``); ``grads`` has the structure of ``params``;
    ``outputs`` are the network's outputs from the same pass. With a ``regularizer``
    (``funcnet.regularizers.l2`` / ``l1``) ``lam * Omega`` is added to the loss and
    ``lam * grad Omega`` to the gradients. Pure and ``jit``-compatible.

    ``precision`` (:mod:`funcnet.precision`: ``"bfloat16"``, ``"float16"``, a
    ``Policy``; ``None`` off): the parameters and a floating ``x`` are cast to the
    compute dtype and every layer's ``fwd`` and ``bwd`` run in it; the outputs are cast
    to the output dtype (float32) for the loss and its rule, whose ``delta`` (times the
    loss scale) goes back in the compute dtype; ``grads`` come back in the parameters'
    dtypes, unscaled, and ``new_state`` in the dtypes of ``state``.
    """
    where = "vjp.value_and_grad_with_state"
    net = _as_network(net, where)
    _checks.check_loss_fn(loss_fn, where, "loss_fn")
    _check_regularizer(regularizer, where)
    _checks.check_lam(regularizer, lam, where)
    policy = _precision.get_policy(precision, where)
    if policy is not None:
        return _mixed_value_and_grad_with_state(net, loss_fn, regularizer, lam, policy)

    def f(params, state, x, y, key=None, train=True):
        out, new_state, res = rule_forward(net, params, state, x, key=key, train=train)  # 1.
        loss, delta = _loss_value_and_delta(loss_fn, out, y)  # 2. output layer
        _, grads = net.bwd(res, delta, False)  # 3. hidden layers, last to first
        grads = _precision.keep_dtypes(grads, params)  # as autodiff: the params' dtypes
        if regularizer is not None:  # lambda * grad Omega; 4. (update) is the optimizer's
            loss = loss + lam * regularizer(params)
            reg = vreg.GRADS[regularizer](params)
            grads = jax.tree_util.tree_map(lambda d, r: d + lam * r, grads, reg)
        return loss, grads, new_state, out

    return f


def _mixed_value_and_grad_with_state(net, loss_fn, regularizer, lam, policy):
    """:func:`value_and_grad_with_state` under a mixed-precision ``policy``."""

    def f(params, state, x, y, key=None, train=True):
        cparams, x = policy.cast_to_compute(params), policy.cast_to_compute(x)
        out, new_state, res = rule_forward(net, cparams, state, x, key=key, train=train)
        out32 = policy.cast_to_output(out)
        loss, delta = _loss_value_and_delta(loss_fn, out32, y)  # 2. in float32
        delta = policy.scale(delta).astype(out.dtype)  # back into the compute dtype
        _, grads = net.bwd(res, delta, False)
        grads = policy.unscale(grads, params)
        if regularizer is not None:  # on the float32 parameters, unscaled
            loss = loss + lam * regularizer(params)
            reg = vreg.GRADS[regularizer](params)
            grads = jax.tree_util.tree_map(lambda d, r: d + lam * r, grads, reg)
        return loss, grads, _precision.keep_dtypes(new_state, state), out32

    return f


def value_and_grad(
    net: Layer,
    loss_fn: Callable[[jax.Array, Any], jax.Array],
    regularizer: Callable | None = None,
    lam: float = 0.0,
    return_outputs: bool = False,
    *,
    precision: Any = None,
) -> Callable:
    """``f(params, x, y) -> (loss, grads)`` by explicit back-propagation with the hand rules.

    Same contract as ``jax.value_and_grad(lambda p, x, y: loss_fn(net.apply(p, x), y))``
    (evaluation mode, for networks without state; use :func:`value_and_grad_with_state`
    for BatchNorm, or Dropout in training mode): ``loss`` is a scalar, ``grads`` has the
    structure of ``params``. ``loss_fn(outputs, y)`` is the batch-mean loss (e.g.
    :func:`funcnet.losses.softmax_cross_entropy`). With a ``regularizer``
    (``funcnet.regularizers.l2`` / ``l1``) the objective is ``loss + lam * Omega(params)``
    and ``lam * grad Omega`` is added to the gradients. Pure and ``jit``-compatible. With
    ``return_outputs=True``, ``f`` returns ``(loss, grads, outputs)``. ``precision``:
    mixed precision, as in :func:`value_and_grad_with_state`.
    """
    where = "vjp.value_and_grad"
    net = _as_network(net, where)
    _checks.check_loss_fn(loss_fn, where, "loss_fn")
    _check_regularizer(regularizer, where)
    _checks.check_lam(regularizer, lam, where)
    _precision.get_policy(precision, where)  # a bad value fails here, naming this function
    inner = value_and_grad_with_state(net, loss_fn, regularizer, lam, precision=precision)

    def f(params, x, y):
        x = net.check_input(x)
        in_shape = tuple(x.shape[1:])
        if net.has_state(in_shape):
            raise ValueError(
                f"vjp.value_and_grad: {type(net).__name__} carries state (BatchNorm); use "
                f"vjp.value_and_grad_with_state(net, loss)(params, state, x, y, key, train)"
            )
        loss, grads, _, out = inner(params, net.init_state(in_shape), x, y, None, False)
        return (loss, grads, out) if return_outputs else (loss, grads)

    return f


def regularizer_value_and_grad(regularizer: Callable, mask: Any = None) -> Callable:
    """``f(params) -> (Omega, grad Omega)`` from the hand rule of ``l2`` / ``l1``."""
    _check_regularizer(regularizer, "vjp.regularizer_value_and_grad")
    grad_fn = vreg.GRADS[regularizer]

    def f(params):
        if mask is None:
            return regularizer(params), grad_fn(params)
        return regularizer(params, mask), grad_fn(params, mask)

    return f


__all__ = [
    "LayerRule",
    "layer_rule",
    "regularizer_value_and_grad",
    "value_and_grad",
    "value_and_grad_with_state",
]
