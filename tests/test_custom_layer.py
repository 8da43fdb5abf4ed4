"""A user-defined layer (parameters not named w/b, with state) goes through fit, summary,
export, checkpoints and resume, and grad="manual" (its own hand rule, or the jax.vjp
fallback)."""

import dataclasses

import chex
import draw
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import funcnet as fn
from funcnet import checkpoint, export, train


@dataclasses.dataclass(frozen=True, repr=False)
class CenterGain(fn.Layer):
    """``y = gain * (x - mean) + shift`` over the last axis; ``mean`` is the batch mean in
    training and a running mean (the state) in evaluation. No hand rule: ``grad="manual"``
    uses the jax.vjp fallback."""

    momentum: float = 0.3

    def output_shape(self, input_shape):
        return tuple(input_shape)

    def param_specs(self, input_shape):
        return {"gain": (input_shape[-1],), "shift": (input_shape[-1],)}

    def initializers(self):
        return {"gain": jax.nn.initializers.ones, "shift": jax.nn.initializers.zeros}

    def state_specs(self, input_shape):
        return {"mean": (input_shape[-1],)}

    def forward(self, params, state, x, *, key=None, train=False):
        if train:
            mean = jnp.mean(x, axis=tuple(range(x.ndim - 1)))
            m = self.momentum
            state = {"mean": (1 - m) * state["mean"] + m * jax.lax.stop_gradient(mean)}
        else:
            mean = state["mean"]
        return params["gain"] * (x - mean) + params["shift"], state


@dataclasses.dataclass(frozen=True, repr=False)
class Scale(fn.Layer):
    """``y = alpha * x`` with a scalar parameter ``alpha`` and a hand-written rule."""

    def output_shape(self, input_shape):
        return tuple(input_shape)

    def param_specs(self, input_shape):
        return {"alpha": ()}

    def initializers(self):
        return {"alpha": jax.nn.initializers.ones}

    def forward(self, params, state, x, *, key=None, train=False):
        return params["alpha"] * x, state

    def fwd(self, params, state, x, *, key=None, train=False):
        return params["alpha"] * x, state, (x, params["alpha"])

    def bwd(self, res, g, need_dx):
        x, alpha = res
        return (alpha * g if need_dx else None), {"alpha": jnp.sum(g * x)}

    def flops(self, input_shape):
        return int(np.prod(input_shape)), 0

    def receptive_field(self, input_shape, rf):
        return rf


def _net():
    return fn.Serial([fn.Flatten(), fn.Dense(16), CenterGain(), fn.ReLU(), Scale(),
                      fn.Dense(10)])


@pytest.fixture(scope="module")
def data():
    split = fn.data.digits()
    return split.x_train[:256], split.y_train[:256], split.x_test[:64], split.y_test[:64]


def test_protocol_answers():
    assert not CenterGain.has_hand_rule() and Scale.has_hand_rule()
    net = _net()
    params = draw.params(net, (8, 8, 1))
    assert set(params[2]) == {"gain", "shift"} and set(params[4]) == {"alpha"}
    state = net.init_state((8, 8, 1))
    assert state[2]["mean"].shape == (16,) and net.has_state((8, 8, 1))
    s = fn.summary(net, (8, 8, 1))
    assert s.rows[2].params == 32 and s.rows[2].state == 16 and s.total_state == 16
    assert s.rows[2].flops_source == "xla" and s.rows[4].flops == 16
    assert "state" in str(s)


@pytest.mark.parametrize("grad", ["autodiff", "manual"])
def test_fit_threads_the_state_and_both_gradient_modes_agree(data, grad):
    x, y, xv, yv = data
    net = _net()
    params = net.init(jax.random.key(0), (8, 8, 1))
    # SGD, not Adam: the Dense bias before the centring has a zero gradient in exact
    # arithmetic, and Adam would blow its rounding noise up to full-size steps
    kw = dict(optimizer=optax.sgd(0.1, momentum=0.9), epochs=3, batch_size=32,
              progress=False, validation_data=(xv, yv))
    result = train.fit(net, params, x, y, grad=grad, **kw)
    other = train.fit(net, params, x, y, grad="manual" if grad == "autodiff" else "autodiff",
                      **kw)
    chex.assert_trees_all_close(result.state, other.state, rtol=2e-4, atol=2e-5)
    mean = result.model_state[2]["mean"]
    assert float(jnp.abs(mean).sum()) > 0  # the running mean moved in training
    # evaluation uses the running mean; evaluate and predict agree with apply_with_state
    out, same = net.apply_with_state(result.params, result.model_state, xv)
    np.testing.assert_array_equal(same[2]["mean"], mean)
    np.testing.assert_allclose(
        train.predict(net, result.params, xv, state=result.model_state), out, rtol=1e-5,
        atol=1e-5)
    _, acc = train.evaluate(net, result.params, xv, yv, state=result.model_state)
    assert acc == pytest.approx(float(jnp.mean(jnp.argmax(out, -1) == yv)))
    assert acc > 0.5


def test_export_folds_the_state_in(data, tmp_path):
    x, y, xv, _ = data
    net = _net()
    params = draw.params(net, (8, 8, 1))
    result = train.fit(net, params, x, y, epochs=1, batch_size=64, progress=False)
    path = export.save(tmp_path / "custom.fnx", net, result.params, (8, 8, 1),
                       state=result.model_state)
    loaded = export.load(path)
    expected, _ = net.apply_with_state(result.params, result.model_state, xv)
    np.testing.assert_allclose(loaded(xv), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="state do not match"):
        export.save(tmp_path / "bad.fnx", net, result.params, (8, 8, 1),
                    state=({}, {}, {"mean": jnp.zeros(3)}, {}, {}, {}))


def test_checkpoint_round_trip_and_resume_are_bitwise(data, tmp_path):
    x, y, _, _ = data
    net = _net()
    params = draw.params(net, (8, 8, 1))
    kw = dict(optimizer=optax.adam(1e-2), batch_size=64, progress=False, grad="manual")
    full = train.fit(net, params, x, y, epochs=2, **kw)
    path = tmp_path / "run.ckpt"
    train.fit(net, params, x, y, epochs=1, checkpoint=path, **kw)
    resumed = train.fit(net, params, x, y, epochs=2, checkpoint=path, resume=True, **kw)
    chex.assert_trees_all_equal(resumed.state, full.state)
    restored, _ = checkpoint.restore(path, {"state": full.state})
    np.testing.assert_array_equal(restored["state"].model_state[2]["mean"],
                                  full.model_state[2]["mean"])


def test_a_subclass_that_overrides_forward_drops_the_inherited_hand_rule():
    """A Conv whose forward doubles its kernel: the manual gradient is that of its own
    forward (the jax.vjp fallback), not Conv's hand rule for the parent's forward."""
    @dataclasses.dataclass(frozen=True, repr=False)
    class DoubledConv(fn.Conv):
        def forward(self, params, state, x, *, key=None, train=False):
            doubled = {**params, "w": 2.0 * params["w"]}
            return super().forward(doubled, state, x, key=key, train=train)

    @dataclasses.dataclass(frozen=True, repr=False)
    class SameConv(fn.Conv):  # keeps Conv's forward: keeps its hand rule
        pass

    assert fn.Conv.has_hand_rule() and SameConv.has_hand_rule()
    assert not DoubledConv.has_hand_rule()
    net = fn.Serial([DoubledConv(2, 3), fn.Flatten(), fn.Dense(3)])
    params = draw.params(net, (5, 5, 1))
    x, y = draw.normal((4, 5, 5, 1), seed=1), np.arange(4) % 3
    loss = fn.losses.softmax_cross_entropy
    manual = jax.jit(fn.vjp.value_and_grad(net, loss))(params, x, y)  # compiled: one
    auto = jax.jit(jax.value_and_grad(lambda p: loss(net.apply(p, x), y)))(params)  # program
    for a, b in zip(jax.tree.leaves(manual), jax.tree.leaves(auto), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


@dataclasses.dataclass(frozen=True, repr=False)
class LeakyReLU(fn.ReLU):  # Stateless's override point: the function, not ReLU's rule
    def _apply(self, params, x):
        return jnp.where(x > 0, x, 0.1 * x)


@dataclasses.dataclass(frozen=True, repr=False)
class Swish(fn.Sigmoid):  # OpLayer's override point: another op, Sigmoid's rule unfit
    op = staticmethod(lambda x: x * jax.nn.sigmoid(x))


@pytest.mark.parametrize("layer", [LeakyReLU(), Swish()], ids=repr)
def test_a_subclass_that_overrides_apply_or_op_drops_the_inherited_hand_rule(layer):
    """Through ``_apply`` or ``op`` too, a subclass that computes another function without
    a rule of its own trains that function under the hand rules (the jax.vjp fallback)."""
    assert type(layer).__mro__[1].has_hand_rule() and not type(layer).has_hand_rule()
    net = fn.Serial([fn.Dense(4), layer, fn.Dense(2)])
    params = draw.params(net, (3,))
    x, y = draw.normal((5, 3), seed=1), draw.normal((5, 2), seed=2)
    loss = fn.losses.quadratic
    manual = jax.jit(fn.vjp.value_and_grad(net, loss))(params, x, y)
    auto = jax.jit(jax.value_and_grad(lambda p: loss(net.apply(p, x), y)))(params)
    for a, b in zip(jax.tree.leaves(manual), jax.tree.leaves(auto), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
