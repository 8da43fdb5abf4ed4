"""Back-propagation through whole networks with the hand rules == jax.value_and_grad;
the rule table covers every public op and layer."""

import inspect

import draw
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import funcnet as fn
from funcnet import gradcheck, layers, losses, ops, regularizers, vjp

TOL = 1e-10  # float64; relative per leaf


def _f64(tree):
    return jax.tree_util.tree_map(lambda a: jax.device_put(np.asarray(a, np.float64)), tree)


def _check_net(net, in_shape, loss_fn, y, n=3, seed=0):
    with jax.enable_x64(True):
        params = draw.params(net, in_shape, seed, np.float64)  # arbitrary: no init program
        x = draw.normal((n, *in_shape), seed=seed + 1, dtype=np.float64)
        loss_m, grads_m = jax.jit(vjp.value_and_grad(net, loss_fn))(params, x, y)
        autodiff = jax.value_and_grad(lambda p: loss_fn(net.apply(p, x), y))
        loss_a, grads_a = jax.jit(autodiff)(params)
        assert abs(float(loss_m) - float(loss_a)) <= TOL * abs(float(loss_a))
        gradcheck.compare({"manual": grads_m, "autodiff": grads_a}, tol=TOL)


def test_every_public_op_has_a_rule():
    missing = [name for name in ops.__all__ if getattr(ops, name) not in vjp.RULES]
    assert not missing, f"ops without a hand-written rule: {missing}"


def test_every_loss_and_regularizer_has_a_rule():
    for module in (losses, regularizers):
        public = [getattr(module, name) for name in module.__all__
                  if inspect.isfunction(getattr(module, name)) and name != "weights_mask"]
        assert len(public) >= 2, module.__name__
        missing = [f.__name__ for f in public if f not in vjp.RULES]
        assert not missing, f"{module.__name__} without a rule: {missing}"


def test_every_public_layer_class_has_a_hand_rule():
    classes = [c for name, c in vars(layers).items()
               if inspect.isclass(c) and issubclass(c, layers.Layer) and c is not layers.Layer
               and not name.startswith("_")]
    assert len(classes) >= 17
    missing = [c.__name__ for c in [*classes, fn.Serial, fn.Parallel, fn.Residual]
               if not c.has_hand_rule()]
    assert not missing, f"layers without a hand-written rule: {missing}"


@pytest.mark.parametrize("act", [fn.ReLU(), fn.Sigmoid(), fn.Tanh(),
                                 fn.Activation(jax.nn.gelu)],
                         ids=["relu", "sigmoid", "tanh", "gelu-fallback"])
def test_mlp_matches_autodiff(act):
    net = fn.models.mlp([7, 5], 4, activation=act)
    _check_net(net, (3, 2), losses.softmax_cross_entropy, jnp.array([0, 3, 1]))


POOLS = {
    "max": fn.MaxPool(2),
    "max-overlap": fn.MaxPool(3, 1, "SAME"),
    "avg": fn.AvgPool(2, padding="SAME"),
    "avg-excl": fn.AvgPool(3, 2, 1, count_include_pad=False),
    "l2": fn.L2Pool(2),
    "lp3": fn.LpPool(2, p=3.0),
}


CNN_GRID = [("max", 1), ("max", 2), ("max", 3), ("max-overlap", 2), ("avg", 3),
            ("avg-excl", 1), ("l2", 2), ("lp3", 1)]


@pytest.mark.parametrize("pool,stride", CNN_GRID, ids=[f"{p}-s{s}" for p, s in CNN_GRID])
def test_cnn_matches_autodiff(pool, stride):
    net = fn.Serial([
        fn.Conv(3, (3, 3), stride=stride, padding="SAME"), fn.ReLU(), POOLS[pool],
        fn.Conv(4, (2, 2), padding=1), fn.Tanh(),
        fn.Flatten(), fn.Dense(3),
    ])
    _check_net(net, (9, 9, 1), losses.softmax_cross_entropy, jnp.array([0, 2, 1]))


def test_feature_pools_locally_connected_softmax_and_nested_serial():
    net = fn.Serial([
        fn.LocallyConnected(4, (2, 2), stride=2), fn.FeatureMaxPool(2),
        fn.Serial([fn.Conv(6, 2, dilation=1), fn.FeatureL2Pool(3)]),
        fn.Flatten(), fn.Dense(4), fn.Sigmoid(),
    ])
    with jax.enable_x64(True):
        y = jax.device_put(np.random.default_rng(0).random((3, 4)))
    _check_net(net, (6, 6, 2), losses.binary_cross_entropy, y)


def test_log_softmax_and_quadratic_loss():
    net = fn.Serial([fn.Flatten(), fn.Dense(4), fn.LogSoftmax(), fn.Dense(2), fn.Softmax()])
    with jax.enable_x64(True):
        y = jax.device_put(np.random.default_rng(1).random((3, 2)))
    _check_net(net, (2, 3), losses.quadratic, y)


def test_regularized_value_and_grad_adds_lambda_grad_omega():
    net = fn.models.mlp([5], 3)
    with jax.enable_x64(True):
        params = draw.params(net, (4,), dtype=np.float64)
        x = draw.normal((2, 4), seed=1, dtype=np.float64)
        y = jnp.array([0, 2])
        lam = 0.3
        for reg in (regularizers.l2, regularizers.l1):
            # compiled (op by op, every primitive of both passes compiles its own program)
            loss, grads = jax.jit(vjp.value_and_grad(net, losses.softmax_cross_entropy, reg,
                                                     lam))(params, x, y)
            loss_a, grads_a = jax.jit(jax.value_and_grad(
                lambda p, reg=reg: losses.softmax_cross_entropy(net.apply(p, x), y)
                + lam * reg(p)))(params)
            assert abs(float(loss) - float(loss_a)) < 1e-12
            gradcheck.compare({"manual": grads, "autodiff": grads_a}, tol=TOL)


def test_value_and_grad_has_jax_value_and_grad_structure_and_names_bad_layers():
    net = fn.models.mlp([3], 2)
    params = draw.params(net, (4,))
    x, y = jnp.ones((2, 4)), jnp.array([0, 1])
    loss, grads = vjp.value_and_grad(net, losses.softmax_cross_entropy)(params, x, y)
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(params)
    assert loss.shape == ()
    with pytest.raises(ValueError, match="Serial layer 1"):
        vjp.value_and_grad(net, losses.softmax_cross_entropy)(params, jnp.ones((2, 5)), y)
