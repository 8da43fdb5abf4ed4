"""Training a network with state and randomness: a ResNet-style block with BatchNorm and
Dropout trains with fit on the digits in both gradient modes; the running statistics move
in training and not in evaluation; each step draws a fresh Dropout key."""

import chex
import draw
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import funcnet as fn
from funcnet import train


def resnet_block_net():
    block = fn.Serial([fn.Conv(8, 3, padding="SAME", use_bias=False), fn.BatchNorm(),
                       fn.ReLU(), fn.Dropout(0.1)])
    return fn.Serial([
        fn.Conv(8, 3, padding="SAME", use_bias=False), fn.BatchNorm(), fn.ReLU(),
        fn.Residual(block),
        fn.Residual(fn.Serial([fn.Conv(12, 3, stride=2, padding="SAME"), fn.BatchNorm()]),
                    shortcut=fn.Conv(12, 1, stride=2)),
        fn.ReLU(), fn.GlobalAvgPool(), fn.Dropout(0.2), fn.Dense(10),
    ])


@pytest.fixture(scope="module")
def digits():
    return fn.data.digits()


@pytest.mark.slow  # heavier integration check; CI runs the slow tier
@pytest.mark.parametrize("grad", ["autodiff", "manual"])
def test_resnet_block_with_batchnorm_and_dropout_trains_on_digits(digits, grad):
    net = resnet_block_net()
    params = net.init(jax.random.key(0), (8, 8, 1))
    state0 = net.init_state((8, 8, 1))
    result = train.fit(net, params, digits.x_train, digits.y_train, grad=grad, epochs=2,
                       batch_size=32, optimizer=optax.adam(1e-2), progress=False,
                       validation_data=(digits.x_test, digits.y_test))
    h = result.history
    assert h["val_loss"][1] < h["val_loss"][0] and h["val_accuracy"][-1] > 0.6, h
    # the running statistics of every BatchNorm moved away from (0, 1) in training
    moved = [not np.allclose(a, b) for a, b in zip(jax.tree_util.tree_leaves(state0),
                                                    jax.tree_util.tree_leaves(result.model_state),
                                                    strict=True)]
    assert len(moved) == 2 * 3 and all(moved)
    # evaluation leaves them alone, and evaluate uses them
    out, after = net.apply_with_state(result.params, result.model_state, digits.x_test)
    chex.assert_trees_all_equal(after, result.model_state)
    _, acc = train.evaluate(net, result.params, digits.x_test, digits.y_test,
                            state=result.model_state)
    assert acc == pytest.approx(float(jnp.mean(jnp.argmax(out, -1) == digits.y_test)))
    assert acc == result.history["val_accuracy"][-1]


def test_both_gradient_modes_take_the_same_steps_with_state_and_dropout(digits):
    net = resnet_block_net()
    params = draw.params(net, (8, 8, 1), seed=1)
    x, y = digits.x_train[:96], digits.y_train[:96]
    states = {}
    for grad in ("autodiff", "manual"):
        step = train.make_step(net, fn.losses.softmax_cross_entropy, optax.sgd(0.05),
                               grad=grad, seed=3)
        state = train.init_state(params, optax.sgd(0.05), net.init_state((8, 8, 1)))
        for i in range(3):
            state, _ = step(state, x[32 * i:32 * (i + 1)], y[32 * i:32 * (i + 1)])
        states[grad] = state
    chex.assert_trees_all_close(states["autodiff"], states["manual"], rtol=1e-4, atol=1e-5)


def test_every_step_draws_a_fresh_dropout_key():
    net = fn.Serial([fn.Dropout(0.5)])
    seen = []

    def loss(out, y):
        return jnp.mean((out - y) ** 2)

    # a one-parameter model: y = Dropout(w * x); the gradient shows the mask
    wnet = fn.Serial([fn.Dense(8, use_bias=False), net])
    params = draw.params(wnet, (1,))
    step = train.make_step(wnet, loss, optax.sgd(0.0), donate=False, seed=0)
    state = train.init_state(params, optax.sgd(0.0))
    x, y = jnp.ones((1, 1)), jnp.zeros((1, 8))
    for _ in range(3):
        new, _ = step(state, x, y)
        seen.append(new)
        state = new._replace(params=state.params)
    masks = []
    for i in range(3):
        key = jax.random.fold_in(train.step_keys(0), i)
        out = wnet.apply(params, x, key=key, train=True)
        masks.append(np.asarray(out != 0))
    assert not (np.array_equal(masks[0], masks[1]) and np.array_equal(masks[1], masks[2]))
    assert [int(s.step) for s in seen] == [1, 2, 3]


def test_scanned_and_looped_epochs_agree_with_state_and_dropout(digits):
    net = fn.Serial([fn.Flatten(), fn.Dense(32), fn.BatchNorm(), fn.ReLU(), fn.Dropout(0.3),
                     fn.Dense(10)])
    params = draw.params(net, (8, 8, 1))
    x, y = digits.x_train[:200], digits.y_train[:200]  # 200 = 3 * 64 + 8: a padded batch
    runs = {mode: train.fit(net, params, x, y, epochs=2, batch_size=64, epoch_mode=mode,
                            optimizer=optax.sgd(0.1), progress=False, seed=5)
            for mode in ("loop", "scan")}
    chex.assert_trees_all_close(runs["loop"].state, runs["scan"].state, rtol=1e-5, atol=1e-6)
    assert not np.allclose(runs["scan"].model_state[2]["var"], 1.0)


def test_graph_and_summary_of_a_network_with_state():
    assert fn.summary(resnet_block_net(), (8, 8, 1)).total_state == 2 * (8 + 8 + 12)
    net = fn.Serial([fn.Conv(3, 3), fn.BatchNorm(), fn.ReLU(), fn.Flatten(), fn.Dense(2)])
    compiled = fn.graph.compile(net, (5, 5, 1), batch=2)
    params = draw.params(net, (5, 5, 1))
    state = jax.tree_util.tree_map(lambda a: a + 0.5, net.init_state((5, 5, 1)))
    x = draw.normal((2, 5, 5, 1), seed=1)
    expected = jax.jit(lambda p, s, x: net.apply_with_state(p, s, x)[0])(params, state, x)
    np.testing.assert_allclose(compiled(params, state, x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["loop", "scan"])
def test_last_partial_batch_runs_at_its_true_size_for_batchnorm(mode):
    """Padding rows (weight 0) would enter BatchNorm's batch statistics: for a network
    that mixes the batch, fit's last partial batch equals a step on exactly those rows,
    and the epoch's loss is the example-weighted mean of the two steps."""
    net = fn.Serial([fn.Dense(8, use_bias=False), fn.BatchNorm(), fn.ReLU(), fn.Dense(3)])
    assert fn.nn.base.mixes_batch(net) and not fn.nn.base.mixes_batch(fn.models.lenet5())
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20, 5)).astype(np.float32)
    y = rng.integers(0, 3, 20)
    params, state = draw.params(net, (5,)), net.init_state((5,))
    opt = optax.sgd(0.1)
    result = train.fit(net, params, x, y, optimizer=opt, epochs=1, batch_size=16,
                       shuffle=False, model_state=state, epoch_mode=mode, progress=False)
    step = train.make_step(net, fn.losses.softmax_cross_entropy, opt, donate=False)
    s = train.init_state(params, opt, model_state=state)
    s, m1 = step(s, x[:16], y[:16])
    s, m2 = step(s, x[16:], y[16:])
    chex.assert_trees_all_close((result.params, result.model_state),
                                (s.params, s.model_state), rtol=1e-6, atol=1e-7)
    expected = (16 * float(m1["loss"]) + 4 * float(m2["loss"])) / 20
    assert result.history["loss"][0] == pytest.approx(expected, rel=1e-6)
