"""Training with the hand-written rules (grad="manual") equals training with autodiff."""

import draw
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import funcnet as fn
from funcnet import train
from funcnet.vjp import network as vnet


def _max_rel(a, b):
    errs = [
        float(np.max(np.abs(x - y)) / (np.max(np.abs(x)) + 1e-300))
        for x, y in zip(map(np.asarray, jax.tree_util.tree_leaves(a)),
                        map(np.asarray, jax.tree_util.tree_leaves(b)))
    ]
    return max(errs)


NETS = [
    ("cnn_maxpool_stride1", fn.Serial([fn.Conv(3, 3, padding="SAME"), fn.ReLU(), fn.MaxPool(2),
                                       fn.Flatten(), fn.Dense(4)])),
    ("cnn_avgpool_stride2", fn.Serial([fn.Conv(3, 3, stride=2, padding=1), fn.Tanh(),
                                       fn.AvgPool(2, 1, "SAME", count_include_pad=False),
                                       fn.Flatten(), fn.Dense(4)])),
    ("cnn_l2pool_stride3", fn.Serial([fn.Conv(4, 2, stride=3), fn.Sigmoid(), fn.L2Pool(2, 1),
                                      fn.FeatureMaxPool(2), fn.Flatten(), fn.Dense(4)])),
    ("mlp_featurel2", fn.Serial([fn.Flatten(), fn.Dense(6), fn.FeatureL2Pool(2), fn.Dense(4)])),
]  # fmt: skip


@pytest.mark.parametrize("name,net", NETS, ids=[n for n, _ in NETS])
def test_manual_steps_give_the_same_parameters_as_autodiff(name, net):
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        x = jax.device_put(rng.standard_normal((8, 7, 7, 1)))
        y = jax.device_put(rng.integers(0, 4, 8))
        params = draw.params(net, (7, 7, 1), dtype=np.float64)
        final = {}
        for grad in ("autodiff", "manual"):
            step = train.make_step(net, fn.losses.softmax_cross_entropy,
                                   optax.sgd(0.1, momentum=0.9), regularizer=fn.regularizers.l2,
                                   lam=1e-2, grad=grad)  # fmt: skip
            state = train.init_state(params, optax.sgd(0.1, momentum=0.9))
            for _ in range(5):
                state, _ = step(state, x, y)
            final[grad] = state.params
        assert _max_rel(final["autodiff"], final["manual"]) < 1e-9


@pytest.mark.slow  # heavier integration check; CI runs the slow tier
def test_fit_manual_with_partial_batches_and_regularizer_matches_autodiff():
    with jax.enable_x64(True):
        split = fn.data.digits(seed=0)
        x, y = split.x_train[:75].astype(np.float64), split.y_train[:75]  # 75 = 2 * 32 + 11
        net = fn.models.digits_cnn()
        params = draw.params(net, (8, 8, 1), dtype=np.float64)
        results = {
            grad: fn.train.fit(net, params, x, y, optimizer=optax.sgd(0.05, momentum=0.9),
                               regularizer=fn.regularizers.l1, lam=1e-4, epochs=2,
                               batch_size=32, progress=False, grad=grad, epoch_mode="loop")
            for grad in ("autodiff", "manual")
        }  # fmt: skip
        assert _max_rel(results["autodiff"].params, results["manual"].params) < 1e-9
        np.testing.assert_allclose(results["manual"].history["loss"],
                                   results["autodiff"].history["loss"], rtol=1e-10)


def test_weighted_loss_is_back_propagated_by_the_hand_rule():
    # The padded-batch loss sum_i w_i l_i / sum_i w_i: value and delta from the base rule.
    with jax.enable_x64(True):
        rng = np.random.default_rng(1)
        out = jax.device_put(rng.standard_normal((5, 3)))
        y = jnp.asarray([0, 2, 1, 1, 0])
        w = jnp.asarray([1.0, 1.0, 0.0, 1.0, 0.0])
        wloss = train.weighted_loss(fn.losses.softmax_cross_entropy)
        value, delta = jax.jit(vnet._loss_value_and_delta, static_argnums=0)(wloss, out,
                                                                               (y, w))

        @jax.jit  # the reference in one program too
        def reference(o):
            ref_value, vjp_fn = jax.vjp(lambda o: wloss(o, (y, w)), o)
            return ref_value, vjp_fn(jnp.ones((), o.dtype))[0]

        ref_value, ref_delta = reference(out)
        np.testing.assert_allclose(value, ref_value, rtol=1e-12)
        np.testing.assert_allclose(delta, ref_delta, rtol=1e-12, atol=1e-15)
        np.testing.assert_array_equal(delta[2], 0.0)  # padding gets no gradient
        # (softmax - onehot) / 3 on the real rows
        expected = (jax.nn.softmax(out) - jax.nn.one_hot(y, 3)) / 3
        np.testing.assert_allclose(delta[0], expected[0], rtol=1e-12)


def test_unknown_grad_mode_lists_the_valid_ones():
    net = fn.Serial([fn.Dense(2)])
    with pytest.raises(ValueError, match=r"grad must be one of \['autodiff', 'manual'\].*'symbolic'"):
        train.make_step(net, fn.losses.softmax_cross_entropy, optax.sgd(0.1), grad="symbolic")


def test_default_grad_is_the_hand_rules_for_conv_nets_and_autodiff_otherwise():
    """grad="auto" (the default): the same compiled step as grad="manual" for a network
    with a convolution, as grad="autodiff" for a dense one (choose_grad says which)."""
    conv = fn.Serial([fn.Conv(2, 3), fn.ReLU(), fn.Flatten(), fn.Dense(3)])
    dense = fn.Serial([fn.Flatten(), fn.Dense(3)])
    assert train.choose_grad(conv) == "manual" and train.choose_grad(dense) == "autodiff"
    assert train.choose_grad(conv, "autodiff") == "autodiff"
    x, y = jnp.ones((4, 5, 5, 1)), jnp.arange(4) % 3
    for net, same in ((conv, "manual"), (dense, "autodiff")):
        params = draw.params(net, (5, 5, 1))
        state = train.init_state(params, optax.sgd(0.1))

        def text(net=net, state=state, **kw):
            step = train.make_step(net, fn.losses.softmax_cross_entropy, optax.sgd(0.1), **kw)
            return step.lower(state, x, y).as_text()

        default = text()
        assert default == text(grad=same)
        other = "autodiff" if same == "manual" else "manual"
        if net is conv:
            assert default != text(grad=other)
