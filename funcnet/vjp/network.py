"""Explicit back-propagation through a network, layer by layer, with the hand rules.

The lecture's four steps of back-propagation, for ``f = f_{L+1} o ... o f_1``:

1. **feed-forward**: run every layer's ``fwd``, keeping its residuals (what its backward
   pass needs: its input, its output, a mask, ...);
2. **back-propagate to the output layer**: the loss rule gives ``delta = dl/d(output)``;
3. **back-propagate to the hidden layers**: from the last layer to the first, each
   layer's ``bwd`` turns the upstream ``delta`` into its parameter gradients and the
   ``delta`` of the layer below (the first layer skips the gradient w.r.t. the data);
4. **weight update**: left to the optimizer (``funcnet.train`` or optax).

Each layer class maps to a :class:`LayerRule` built from the op rules. ``Activation(fn)``
uses the op rule when ``fn`` is one of the ops (or its ``jax.nn`` twin) and otherwise
falls back to ``jax.vjp`` of ``fn``: an arbitrary user function has no hand rule. A
loss without a rule falls back to ``jax.vjp`` the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from funcnet import layers as L
from funcnet import ops
from funcnet.nets import Serial
from funcnet.vjp import activation, conv, dense, pool
from funcnet.vjp import regularizers as vreg
from funcnet.vjp.table import RULES


class LayerRule(NamedTuple):
    """``fwd(layer, params, x) -> (y, res)``; ``bwd(layer, res, g, need_dx) -> (dx, dparams)``.

    ``dx`` is ``None`` when ``need_dx`` is false (the network's first layer).
    """

    fwd: Callable[[Any, Any, jax.Array], tuple[jax.Array, Any]]
    bwd: Callable[[Any, Any, jax.Array, bool], tuple[jax.Array | None, Any]]


# -- parametrised layers ------------------------------------------------------------------


def _dense_fwd(layer, params, x):
    y, res = dense.dense_fwd(x, params["w"], params.get("b"))
    return y, res


def _dense_bwd(layer, res, g, need_dx):
    dw, db = dense.dense_param_grads(res, g)
    dx = dense.dense_input_grad(res, g) if need_dx else None
    grads = {"w": dw} if db is None else {"w": dw, "b": db}
    return dx, grads


def _conv_fwd(layer, params, x):
    return conv.conv2d_fwd(
        x, params["w"], params.get("b"), layer.stride, layer.padding, layer.dilation
    )


def _conv_bwd(layer, res, g, need_dx):
    dw = conv.conv2d_kernel_grad(res, g)
    dx = conv.conv2d_input_grad(res, g) if need_dx else None
    grads = {"w": dw} if res.b is None else {"w": dw, "b": jnp.sum(g, axis=(0, 1, 2))}
    return dx, grads


def _local_fwd(layer, params, x):
    return conv.locally_connected2d_fwd(
        x, params["w"], params.get("b"), layer.stride, layer.padding, layer.dilation
    )


def _local_bwd(layer, res, g, need_dx):
    dx, dw, db = conv.locally_connected2d_bwd(res, g)
    return (dx if need_dx else None), ({"w": dw} if db is None else {"w": dw, "b": db})


# -- parameter-free layers: adapt an op rule ---------------------------------------------


def _param_free(fwd: Callable, bwd: Callable, hyper: Callable[[Any], dict]) -> LayerRule:
    def layer_fwd(layer, params, x):
        return fwd(x, **hyper(layer))

    def layer_bwd(layer, res, g, need_dx):
        return (bwd(res, g)[0] if need_dx else None), {}

    return LayerRule(layer_fwd, layer_bwd)


def _no_hyper(layer):
    return {}


def _pool_hyper(layer):
    return {"window": layer.window, "stride": layer.stride, "padding": layer.padding}


def _flatten_fwd(layer, params, x):
    return x.reshape(x.shape[0], -1), x.shape


def _flatten_bwd(layer, shape, g, need_dx):
    return (g.reshape(shape) if need_dx else None), {}


# Activation(fn): hand rules for the known elementwise ops.
_ELEMENTWISE = {
    ops.relu: ops.relu,
    jax.nn.relu: ops.relu,
    ops.sigmoid: ops.sigmoid,
    jax.nn.sigmoid: ops.sigmoid,
    ops.tanh: ops.tanh,
    jnp.tanh: ops.tanh,
}


class _FallbackResiduals(NamedTuple):
    vjp_fn: Callable


def _activation_fwd(layer, params, x):
    op = _ELEMENTWISE.get(layer.fn)
    if op is not None:
        return RULES[op].fwd(x)
    # An arbitrary user function: no hand rule exists, so use JAX's (documented fallback).
    y, vjp_fn = jax.vjp(layer.fn, x)
    if jnp.shape(y) != x.shape:
        raise ValueError(
            f"{layer!r}: fn must be elementwise (shape-preserving); it mapped {x.shape} "
            f"to {jnp.shape(y)}"
        )
    return y, _FallbackResiduals(vjp_fn)


def _activation_bwd(layer, res, g, need_dx):
    if not need_dx:
        return None, {}
    if isinstance(res, _FallbackResiduals):
        return res.vjp_fn(g)[0], {}
    return RULES[_ELEMENTWISE[layer.fn]].bwd(res, g)[0], {}


def _serial_fwd(net, params, x):
    return _forward(net, params, x)


def _serial_bwd(net, res, g, need_dx):
    grads, dx = _backward(net, res, g, need_dx)
    return dx, grads


#: Every layer class -> its rule. A test fails if a public layer class has no entry.
LAYER_RULES: dict[type, LayerRule] = {
    L.Dense: LayerRule(_dense_fwd, _dense_bwd),
    L.Conv: LayerRule(_conv_fwd, _conv_bwd),
    L.LocallyConnected: LayerRule(_local_fwd, _local_bwd),
    L.MaxPool: _param_free(pool.max_pool_fwd, pool.max_pool_bwd, _pool_hyper),
    L.AvgPool: _param_free(
        pool.avg_pool_fwd,
        pool.avg_pool_bwd,
        lambda layer: {**_pool_hyper(layer), "count_include_pad": layer.count_include_pad},
    ),
    L.LpPool: _param_free(
        pool.lp_pool_fwd, pool.lp_pool_bwd, lambda layer: {"p": layer.p, **_pool_hyper(layer)}
    ),
    L.L2Pool: _param_free(pool.l2_pool_fwd, pool.l2_pool_bwd, _pool_hyper),
    L.FeatureL2Pool: _param_free(
        pool.feature_l2_pool_fwd,
        pool.feature_l2_pool_bwd,
        lambda layer: {"group_size": layer.group_size},
    ),
    L.FeatureMaxPool: _param_free(
        pool.feature_max_pool_fwd,
        pool.feature_max_pool_bwd,
        lambda layer: {"group_size": layer.group_size},
    ),
    L.Sigmoid: _param_free(activation.sigmoid_fwd, activation.sigmoid_bwd, _no_hyper),
    L.Tanh: _param_free(activation.tanh_fwd, activation.tanh_bwd, _no_hyper),
    L.ReLU: _param_free(activation.relu_fwd, activation.relu_bwd, _no_hyper),
    L.Softmax: _param_free(
        activation.softmax_fwd, activation.softmax_bwd, lambda layer: {"axis": layer.axis}
    ),
    L.LogSoftmax: _param_free(
        activation.log_softmax_fwd, activation.log_softmax_bwd, lambda layer: {"axis": layer.axis}
    ),
    L.Activation: LayerRule(_activation_fwd, _activation_bwd),
    L.Flatten: LayerRule(_flatten_fwd, _flatten_bwd),
    Serial: LayerRule(_serial_fwd, _serial_bwd),
}


def layer_rule(layer: L.Layer) -> LayerRule:
    """The :class:`LayerRule` of ``layer`` (looked up by its exact class)."""
    rule = LAYER_RULES.get(type(layer))
    if rule is None:
        raise TypeError(
            f"vjp: no hand-written backward rule for layer {layer!r} of type "
            f"{type(layer).__name__}; known: {sorted(t.__name__ for t in LAYER_RULES)}"
        )
    return rule


def _forward(net: Serial, params: Any, x: jax.Array):
    """Step 1: feed-forward, keeping every layer's residuals."""
    if not isinstance(params, tuple | list) or len(params) != len(net.layers):
        raise ValueError(
            f"Serial: params must be a tuple with one entry per layer ({len(net.layers)}), "
            f"got {type(params).__name__}"
        )
    residuals = []
    for i, (layer, p) in enumerate(zip(net.layers, params, strict=True)):
        try:
            layer.output_shape(x.shape[1:])  # validates the input, naming the layer
            x, res = layer_rule(layer).fwd(layer, p, x)
        except (ValueError, TypeError) as e:
            raise type(e)(f"Serial layer {i} ({layer!r}): {e}") from e
        residuals.append(res)
    return x, tuple(residuals)


def _backward(net: Serial, residuals: tuple, delta: jax.Array, need_dx: bool):
    """Step 3: from the last layer to the first, ``delta`` -> parameter grads, ``delta``."""
    grads = [None] * len(net.layers)
    for i in reversed(range(len(net.layers))):
        layer = net.layers[i]
        need = need_dx or i > 0
        delta, grads[i] = layer_rule(layer).bwd(layer, residuals[i], delta, need)
    return tuple(grads), delta


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

        per_loss, per_delta = jax.vmap(one)(out, y)
        scale = (w / jnp.sum(w)).astype(per_loss.dtype)
        delta = per_delta * scale.reshape(-1, *([1] * (out.ndim - 1)))
        return jnp.sum(scale * per_loss), delta
    loss, vjp_fn = jax.vjp(lambda o: loss_fn(o, y), out)
    return loss, vjp_fn(jnp.ones_like(loss))[0]


def value_and_grad(
    net: Serial,
    loss_fn: Callable[[jax.Array, Any], jax.Array],
    regularizer: Callable | None = None,
    lam: float = 0.0,
    return_outputs: bool = False,
) -> Callable:
    """``f(params, x, y) -> (loss, grads)`` by explicit back-propagation with the hand rules.

    Same contract as ``jax.value_and_grad(lambda p, x, y: loss_fn(net.apply(p, x), y))``:
    ``loss`` is a scalar, ``grads`` has the structure of ``params``. ``loss_fn(outputs, y)``
    is the batch-mean loss (e.g. :func:`funcnet.losses.softmax_cross_entropy`). With a
    ``regularizer`` (``funcnet.regularizers.l2`` / ``l1``) the objective is
    ``loss + lam * Omega(params)`` and ``lam * grad Omega`` is added to the gradients.
    Pure and ``jit``-compatible (``net`` and ``loss_fn`` are closed over). With
    ``return_outputs=True``, ``f`` returns ``(loss, grads, outputs)``: the network's output
    from the same feed-forward pass (the train step uses it for accuracy).
    """
    if isinstance(net, L.Layer) and not isinstance(net, Serial):
        net = Serial([net])
    if not isinstance(net, Serial):
        raise TypeError(f"vjp.value_and_grad: expected a funcnet Serial network, got {net!r}")
    if regularizer is not None and regularizer not in vreg.GRADS:
        raise ValueError(
            f"vjp.value_and_grad: regularizer must be one of funcnet.regularizers.l2 / l1, "
            f"got {regularizer!r}"
        )

    def f(params, x, y):
        x = jnp.asarray(x)
        out, residuals = _forward(net, params, x)  # 1. feed-forward
        loss, delta = _loss_value_and_delta(loss_fn, out, y)  # 2. output layer
        grads, _ = _backward(net, residuals, delta, need_dx=False)  # 3. hidden layers
        if regularizer is not None:  # lambda * grad Omega; 4. (update) is the optimizer's
            loss = loss + lam * regularizer(params)
            reg = vreg.GRADS[regularizer](params)
            grads = jax.tree_util.tree_map(lambda d, r: d + lam * r, grads, reg)
        return (loss, grads, out) if return_outputs else (loss, grads)

    return f


def regularizer_value_and_grad(regularizer: Callable, mask: Any = None) -> Callable:
    """``f(params) -> (Omega, grad Omega)`` from the hand rule of ``l2`` / ``l1``."""
    grad_fn = vreg.GRADS[regularizer]

    def f(params):
        if mask is None:
            return regularizer(params), grad_fn(params)
        return regularizer(params, mask), grad_fn(params, mask)

    return f
