"""funcnet.train: the lecture's SGD, loop vs scanned epochs, compile-once, fit's guards."""

from __future__ import annotations

import draw
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from compile_log import CompileLog

import funcnet as fn
from funcnet import data, losses, models, regularizers, train


def _toy(n=50, d=6, k=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = rng.integers(0, k, size=n).astype(np.int32)
    return x, y


class CountingLoss:
    """softmax cross-entropy that counts how often it is traced (a Python side effect)."""

    def __init__(self):
        self.traces = 0

    def __call__(self, outputs, y):
        self.traces += 1
        return losses.softmax_cross_entropy(outputs, y)


# ---------------------------------------------------------------------------------------
# The lecture's algorithm, against numpy
# ---------------------------------------------------------------------------------------


def _numpy_lecture_sgd(params, x, t, alpha, lam, epochs):
    """theta <- theta + alpha * Delta, Delta = -grad l - lam grad Omega, one example at a time.

    Network: h = sigmoid(x W1 + b1), y = h W2 + b2; l = 1/2 |y - t|^2;
    Omega = 1/2 (|W1|^2 + |W2|^2) (weights only).
    """
    w1, b1, w2, b2 = (np.array(a, np.float64) for a in params)
    for _ in range(epochs):
        for xi, ti in zip(x, t, strict=True):
            h = 1.0 / (1.0 + np.exp(-(xi @ w1 + b1)))  # feed-forward
            y = h @ w2 + b2
            dy = y - ti  # output layer: dl/dy
            dw2, db2 = np.outer(h, dy), dy
            dz = (w2 @ dy) * h * (1.0 - h)  # hidden layer: sigma' = sigma (1 - sigma)
            dw1, db1 = np.outer(xi, dz), dz
            w1 = w1 + alpha * (-dw1 - lam * w1)
            b1 = b1 + alpha * (-db1)
            w2 = w2 + alpha * (-dw2 - lam * w2)
            b2 = b2 + alpha * (-db2)
    return w1, b1, w2, b2


@pytest.mark.parametrize("mode", ["loop", "scan"])
def test_per_example_sgd_with_l2_matches_numpy_lecture_algorithm(mode):
    with jax.enable_x64(True):
        rng = np.random.default_rng(1)
        x = rng.normal(size=(12, 3))
        t = rng.normal(size=(12, 2))
        net = fn.Serial([fn.Dense(4), fn.Sigmoid(), fn.Dense(2)])
        params = draw.params(net, (3,), dtype=np.float64)
        alpha, lam, epochs = 0.3, 0.05, 3
        result = train.fit(
            net, params, x, t, loss=losses.quadratic, optimizer=optax.sgd(alpha),
            regularizer=regularizers.l2, lam=lam, epochs=epochs, batch_size=1,
            shuffle=False, epoch_mode=mode, progress=False,
        )  # fmt: skip
        flat = (params[0]["w"], params[0]["b"], params[2]["w"], params[2]["b"])
        expected = _numpy_lecture_sgd(flat, x, t, alpha, lam, epochs)
        got = (result.params[0]["w"], result.params[0]["b"],
               result.params[2]["w"], result.params[2]["b"])  # fmt: skip
        assert got[0].dtype == jnp.float64
        for g, e in zip(got, expected, strict=True):
            np.testing.assert_allclose(np.asarray(g), e, rtol=0, atol=1e-6)
        # The parameters moved far more than the tolerance: the comparison is not vacuous.
        assert np.max(np.abs(expected[0] - np.asarray(flat[0]))) > 1e-2
        assert int(result.state.step) == epochs * len(x)


# ---------------------------------------------------------------------------------------
# Loop and scan, compile-once
# ---------------------------------------------------------------------------------------


def test_scanned_epoch_equals_loop_for_the_same_key():
    x, y = _toy(n=50)
    net = models.mlp([16], 3)
    params = draw.params(net, (6,))
    kw = dict(optimizer=optax.adam(1e-2), epochs=3, batch_size=16, seed=5, progress=False)
    loop = train.fit(net, params, x, y, epoch_mode="loop", **kw)
    scan = train.fit(net, params, x, y, epoch_mode="scan", **kw)
    other_key = train.fit(net, params, x, y, epoch_mode="scan", **{**kw, "seed": 6})
    for a, b, c in zip(jax.tree_util.tree_leaves(loop.params),
                       jax.tree_util.tree_leaves(scan.params),
                       jax.tree_util.tree_leaves(other_key.params), strict=True):  # fmt: skip
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        if a.ndim == 2:
            assert np.max(np.abs(np.asarray(a) - np.asarray(c))) > 1e-4  # the key matters
    np.testing.assert_allclose(loop.history["loss"], scan.history["loss"], rtol=1e-5)


@pytest.mark.parametrize("mode", ["loop", "scan"])
def test_step_compiles_once_across_steps_epochs_and_partial_batch(mode):
    x, y = _toy(n=50)  # 50 = 3 * 16 + 2: the last batch is partial
    net = models.mlp([8], 3)
    params = draw.params(net, (6,))
    counting = CountingLoss()
    result = train.fit(net, params, x, y, loss=counting, epochs=3, batch_size=16,
                       epoch_mode=mode, progress=False)  # fmt: skip
    assert counting.traces == 1
    assert int(result.state.step) == 3 * 4
    assert result.history["loss"][-1] < result.history["loss"][0]

    # The jitted objects themselves: one compiled program each, after many calls.
    update = train._make_update(net, counting, optax.sgd(0.1), None, 0.0, "autodiff")
    runner = train.EpochRunner(update, jnp.asarray(x), jnp.asarray(y), 16, mode)
    state = train.init_state(params, optax.sgd(0.1))
    for epoch in range(3):
        state, _, _ = runner.run(state, jax.random.key(epoch), jnp.asarray(True))
    sizes = runner.cache_sizes()
    assert sizes["step" if mode == "loop" else "epoch"] == 1
    assert sizes["epoch" if mode == "loop" else "step"] == 0


def test_make_step_public_api_compiles_once_and_donates():
    x, y = _toy(n=32)
    net = models.mlp([8], 3)
    params = draw.params(net, (6,))
    counting = CountingLoss()
    step = train.make_step(net, counting, optax.sgd(0.1))
    state = train.init_state(params, optax.sgd(0.1))
    old_leaf = state.params[1]["w"]
    for i in range(4):
        state, metrics = step(state, x[8 * i : 8 * i + 8], y[8 * i : 8 * i + 8])
    assert counting.traces == 1 and step._cache_size() == 1
    assert old_leaf.is_deleted()  # the state's buffers were donated
    assert not params[1]["w"].is_deleted()  # init_state copied the caller's params
    assert int(state.step) == 4 and set(metrics) == {"loss", "objective", "correct", "count"}
    # Weights 0 on padding reproduce the unpadded batch exactly.
    s1 = train.init_state(params, optax.sgd(0.1))
    s2 = train.init_state(params, optax.sgd(0.1))
    s1, m1 = step(s1, x[:5], y[:5])
    xp = np.concatenate([x[:5], x[:3]])
    yp = np.concatenate([y[:5], y[:3]])
    s2, m2 = step(s2, xp, yp, jnp.asarray([1.0] * 5 + [0.0] * 3))
    np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(s1.params), jax.tree_util.tree_leaves(s2.params),
                    strict=True):  # fmt: skip
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_init_state_is_one_program_of_fresh_buffers_with_the_values_op_by_op():
    net = fn.Serial([fn.Conv(2, 3), fn.BatchNorm(), fn.Flatten(), fn.Dense(3)])
    params = draw.params(net, (6, 5, 1))
    model_state = jax.tree_util.tree_map(lambda a: a + 0.5, net.init_state((6, 5, 1)))
    opt = optax.adamw(1e-2)
    with CompileLog() as log:
        state = train.init_state(params, opt, model_state)
    assert log.count("_fresh_state") == 1 and len(log.messages) == 1, log.messages
    with CompileLog() as log:  # cached per optimizer and shapes
        train.init_state(params, opt, model_state)
    assert log.messages == []
    with jax.disable_jit():  # op by op
        expected = train.init_state(params, opt, model_state)
    assert jax.tree_util.tree_structure(state) == jax.tree_util.tree_structure(expected)
    for a, b in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(expected),
                    strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    # new buffers: donating the state to a step leaves the caller's arrays alive
    given = jax.tree_util.tree_leaves((params, model_state))
    made = jax.tree_util.tree_leaves((state.params, state.model_state))
    for a, b in zip(given, made, strict=True):
        assert a.unsafe_buffer_pointer() != b.unsafe_buffer_pointer()
    # inside a trace it is part of the caller's program; NumPy leaves go to the device
    traced = jax.jit(lambda p: train.init_state(p, opt).opt_state)(params)
    np.testing.assert_array_equal(jax.tree_util.tree_leaves(traced)[1],
                                  jax.tree_util.tree_leaves(expected.opt_state)[1])
    host = train.init_state(jax.device_get(params), opt)
    assert isinstance(host.params[0]["w"], jax.Array)


@pytest.mark.parametrize("mode", ["loop", "scan"])
def test_a_second_fit_of_the_same_objects_runs_the_programs_of_the_first(mode):
    x, y = _toy(n=40)
    net = models.mlp([5], 3)
    params = draw.params(net, (6,))
    counting, opt = CountingLoss(), optax.sgd(0.1)
    kw = dict(epochs=2, batch_size=16, optimizer=opt, epoch_mode=mode, progress=False,
              grad="autodiff")
    first = train.fit(net, params, x, y, loss=counting, seed=3, **kw)
    traces = counting.traces
    with CompileLog() as log:
        again = train.fit(net, params, x, y, loss=counting, seed=3, **kw)
    assert log.count("one_step") == log.count("scan_epoch") == log.count("batches") == 0
    assert counting.traces == traces  # the step body was not traced again either
    for a, b in zip(jax.tree_util.tree_leaves(first.state),
                    jax.tree_util.tree_leaves(again.state), strict=True):
        np.testing.assert_array_equal(a, b)
    assert first.history["loss"] == again.history["loss"]
    # what the step computes with is part of the key: another seed, optimizer object or
    # data size compiles again (an equal optimizer is not trusted to be the same)
    for change in ({"seed": 4}, {"optimizer": optax.sgd(0.1)}, {"n": 39}):
        n = change.pop("n", 40)
        with CompileLog() as log:
            train.fit(net, params, x[:n], y[:n], loss=counting, **{"seed": 3, **kw, **change})
        assert log.count("one_step" if mode == "loop" else "scan_epoch") == 1, change
        if mode == "loop" and n == 40:  # its batches depend on the batching alone: shared
            assert log.count("batches") == 0, change


def test_grad_modes_unknown_and_plug_in():
    net = models.mlp([8], 3)
    with pytest.raises(ValueError, match=r"grad must be one of \['autodiff', 'manual'\].*got 'numeric'"):
        train.make_step(net, losses.softmax_cross_entropy, optax.sgd(0.1), grad="numeric")
    with pytest.raises(TypeError, match=r"optax\.GradientTransformation"):
        train.make_step(net, losses.softmax_cross_entropy, "sgd")
    with pytest.raises(ValueError, match=r"lam=0\.1 needs a regularizer"):
        train.make_step(net, losses.softmax_cross_entropy, optax.sgd(0.1), lam=0.1)

    calls = []

    def plug_in(net_, loss_fn):  # the signature the hand-written rules will provide
        calls.append(loss_fn)
        return train.autodiff_value_and_grad(net_, loss_fn)

    x, y = _toy(n=40)
    params = draw.params(net, (6,))
    kw = dict(optimizer=optax.sgd(0.1), epochs=2, batch_size=16, progress=False)
    ref = train.fit(net, params, x, y, **kw)
    got = train.fit(net, params, x, y, grad=plug_in, **kw)
    assert calls  # the plug-in built the gradients
    for a, b in zip(jax.tree_util.tree_leaves(ref.params), jax.tree_util.tree_leaves(got.params),
                    strict=True):  # fmt: skip
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert got.history["accuracy"] == pytest.approx(ref.history["accuracy"])


# ---------------------------------------------------------------------------------------
# fit on digits, stopping rules, evaluate / predict
# ---------------------------------------------------------------------------------------


def test_short_digits_run_lowers_loss_and_exceeds_90_percent():
    s = data.digits()
    net = models.mlp([64], 10)
    params = net.init(jax.random.key(0), (8, 8, 1))
    result = train.fit(net, params, s.x_train, s.y_train, optimizer=optax.adam(1e-2),
                       epochs=4, batch_size=64, validation_data=(s.x_test, s.y_test),
                       progress=False)  # fmt: skip
    h = result.history
    assert len(h["loss"]) == 4 and h["loss"][-1] < h["loss"][0] / 2
    _, test_acc = train.evaluate(net, result.params, s.x_test, s.y_test)
    assert test_acc > 0.90
    assert test_acc == pytest.approx(h["val_accuracy"][-1])
    pred = np.asarray(train.predict(net, result.params, s.x_test, batch_size=100))
    assert pred.shape == (360, 10)
    np.testing.assert_allclose(pred, net.apply(result.params, s.x_test), rtol=1e-5, atol=1e-5)
    assert np.mean(pred.argmax(1) == s.y_test) == pytest.approx(test_acc)


def test_loss_threshold_and_patience_stop_early():
    x, y = _toy(n=40)
    net = models.mlp([32], 3)
    params = net.init(jax.random.key(0), (6,))
    r = train.fit(net, params, x, y, optimizer=optax.adam(3e-2), epochs=200, batch_size=40,
                  loss_threshold=0.5, progress=False)  # fmt: skip
    assert r.stop_reason == "loss_threshold"
    assert r.history["loss"][-1] <= 0.5 < r.history["loss"][-2]
    assert len(r.history["loss"]) < 200

    xv, yv = _toy(n=30, seed=9)  # unrelated labels: validation loss soon gets worse
    r = train.fit(net, params, x, y, optimizer=optax.adam(3e-2), epochs=200, batch_size=40,
                  validation_data=(xv, yv), patience=3, restore_best=True, progress=False)
    assert r.stop_reason == "patience"
    vl = r.history["val_loss"]
    best = int(np.argmin(vl))
    assert len(vl) == best + 1 + 3
    assert train.evaluate(net, r.params, xv, yv)[0] == pytest.approx(vl[best], rel=1e-5)


# ---------------------------------------------------------------------------------------
# Bad data
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["loop", "scan"])
def test_non_finite_loss_stops_with_error_and_keeps_last_finite_params(mode):
    x, _ = _toy(n=40)
    t = np.random.default_rng(2).normal(size=(40, 3)).astype(np.float32)
    t[20, 1] = 3e38  # finite (passes validation), but its squared error overflows to inf
    net = models.mlp([8], 3)
    params = draw.params(net, (6,))
    kw = dict(loss=losses.quadratic, optimizer=optax.sgd(0.1), batch_size=8, shuffle=False,
              epoch_mode=mode, progress=False)  # fmt: skip
    with pytest.raises(train.NonFiniteLossError, match="epoch 1, step 3 of 5") as info:
        train.fit(net, params, x, t, epochs=3, **kw)
    err = info.value
    assert (err.epoch, err.step, err.global_step) == (1, 3, 2)
    # The kept parameters are those after exactly the two good steps.
    two_steps = train.fit(net, params, x[:16], t[:16], epochs=1, **kw)
    for a, b in zip(jax.tree_util.tree_leaves(err.state.params),
                    jax.tree_util.tree_leaves(two_steps.params), strict=True):  # fmt: skip
        assert np.all(np.isfinite(a))
        np.testing.assert_array_equal(a, b)


def test_nan_in_data_and_bad_labels_rejected_before_training():
    x, y = _toy(n=40)
    net = models.mlp([8], 3)
    params = draw.params(net, (6,))
    counting = CountingLoss()

    def fit(x_, y_, **kw):
        return train.fit(net, params, x_, y_, loss=counting, epochs=1, progress=False, **kw)

    bad = x.copy()
    bad[17, 2] = np.nan
    with pytest.raises(ValueError, match=r"training data: x contains non-finite values \(first at "
                                         r"example 17\)"):
        fit(bad, y)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\), got values in \[0, 3\]"):
        fit(x, np.where(np.arange(40) == 5, 3, y))
    with pytest.raises(ValueError, match=r"\[0, 3\), got values in \[-1, 2\]"):
        fit(x, np.where(np.arange(40) == 5, -1, y))
    with pytest.raises(ValueError, match=r"same number of examples, got 40 .* and 39"):
        fit(x, y[:39])
    with pytest.raises(ValueError, match="validation_data: x and y must have the same number"):
        fit(x, y, validation_data=(x[:10], y[:9]))
    with pytest.raises(ValueError, match="batch_size must be a positive int, got 0"):
        fit(x, y, batch_size=0)
    with pytest.raises(ValueError, match=r"epoch_mode must be one of \('auto', 'loop', 'scan'\)"):
        fit(x, y, epoch_mode="fast")
    with pytest.raises(ValueError, match=r"params\[1\]\['w'\] has shape \(6, 8\), the network "
                                         r"expects \(5, 8\)"):
        fit(x[:, :5], y)
    with pytest.raises(ValueError, match=r"does not accept inputs of shape \(6,\)"):
        train.fit(models.digits_cnn(), params, x, y, loss=counting, progress=False)
    assert counting.traces == 0  # nothing was compiled, let alone trained


def test_choose_epoch_mode():
    from funcnet import vjp

    mlp, cnn = models.mlp([8], 3), models.digits_cnn()
    assert train.choose_epoch_mode(mlp) == "scan"
    assert train.choose_epoch_mode(mlp, grad="autodiff") == "scan"
    # a conv net scans with the hand rules (its default gradient), loops with autodiff
    assert train.choose_epoch_mode(cnn) == "scan"
    assert train.choose_epoch_mode(cnn, grad="manual") == "scan"
    assert train.choose_epoch_mode(cnn, grad=vjp.value_and_grad) == "scan"
    assert train.choose_epoch_mode(cnn, grad="autodiff") == "loop"
    assert train.choose_epoch_mode(cnn, grad=train.autodiff_value_and_grad) == "loop"
    assert train.choose_epoch_mode(cnn, "scan", grad="autodiff") == "scan"
    assert train.choose_epoch_mode(cnn, "loop") == "loop"


def test_resolve_grad_takes_auto_with_the_network():
    from funcnet import vjp

    mlp, cnn = models.mlp([8], 3), models.digits_cnn()
    assert train.resolve_grad("auto", cnn) is vjp.value_and_grad  # hand rules for a conv net
    assert train.resolve_grad("auto", net=mlp) is train.autodiff_value_and_grad
    assert train.resolve_grad("manual") is vjp.value_and_grad
    assert train.resolve_grad("autodiff", cnn) is train.autodiff_value_and_grad
    with pytest.raises(ValueError, match="grad='auto' picks the gradient from the network"):
        train.resolve_grad("auto")
    with pytest.raises(ValueError, match="got 'fast'"):
        train.resolve_grad("fast", cnn)
    with pytest.raises(TypeError, match="got 3"):
        train.resolve_grad(3)


def test_fit_scans_a_conv_net_by_default_and_loops_it_with_autodiff(monkeypatch):
    # which runner fit builds, seen through EpochRunner's mode
    modes = []
    real = train.EpochRunner.__init__

    def spy(self, update, x, y, batch_size, mode, *args, **kwargs):
        modes.append(mode)
        real(self, update, x, y, batch_size, mode, *args, **kwargs)

    monkeypatch.setattr(train.EpochRunner, "__init__", spy)
    net = models.digits_cnn()
    x = np.zeros((8, 8, 8, 1), np.float32)
    y = np.arange(8) % 10
    params = draw.params(net, (8, 8, 1))
    for grad in ("auto", "autodiff"):
        train.fit(net, params, x, y, epochs=1, batch_size=4, grad=grad, progress=False)
    assert modes == ["scan", "loop"]


# ---------------------------------------------------------------------------------------
# Resume: the stopping rules continue, the run's settings are compared
# ---------------------------------------------------------------------------------------


def _assert_same_run(a, b):
    for u, v in zip(jax.tree_util.tree_leaves((a.params, a.state)),
                    jax.tree_util.tree_leaves((b.params, b.state)), strict=True):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
    for k in ("loss", "accuracy", "val_loss", "val_accuracy"):
        assert a.history[k] == b.history[k], k
    assert a.stop_reason == b.stop_reason


def _stopping_run():
    """val_loss 1.739 2.154 1.661 1.842 1.785: the best at epoch 3, patience=2 stops at 5."""
    x, y = _toy(n=24)
    net = models.mlp([8], 3)
    kw = dict(optimizer=optax.sgd(0.3), batch_size=8, validation_data=_toy(n=12, seed=9),
              patience=2, restore_best=True, progress=False)
    return net, draw.params(net, (6,)), x, y, kw


@pytest.mark.parametrize("k", [2, 3, 4])
def test_resume_with_patience_and_restore_best_is_the_uninterrupted_run(tmp_path, k):
    net, params, x, y, kw = _stopping_run()
    full = train.fit(net, params, x, y, epochs=12, **kw)
    assert full.stop_reason == "patience" and len(full.history["loss"]) == 5
    path = tmp_path / "run.ckpt"
    train.fit(net, params, x, y, epochs=k, checkpoint=path, **kw)  # interrupted after k
    resumed = train.fit(net, params, x, y, epochs=12, checkpoint=path, resume=True, **kw)
    _assert_same_run(resumed, full)  # the best epoch's params, stopped after 5 epochs


def test_resuming_a_run_that_stopped_early_returns_it_without_training(tmp_path):
    net, params, x, y, kw = _stopping_run()
    path = tmp_path / "run.ckpt"
    full = train.fit(net, params, x, y, epochs=12, checkpoint=path, **kw)
    meta = fn.checkpoint.read_metadata(path)
    assert (meta["stop_reason"], meta["best_epoch"], meta["since_best"]) == ("patience", 3, 2)
    again = train.fit(net, params, x, y, epochs=12, checkpoint=path, resume=True, **kw)
    _assert_same_run(again, full)
    assert int(again.state.step) == 5 * 3 and fn.checkpoint.read_metadata(path) == meta
    # a patience that no longer says stop lets it go on, as an uninterrupted run with it
    longer = dict(kw, patience=100)
    went_on = train.fit(net, params, x, y, epochs=8, checkpoint=path, resume=True, **longer)
    assert went_on.stop_reason == "epochs" and len(went_on.history["loss"]) == 8
    _assert_same_run(went_on, train.fit(net, params, x, y, epochs=8, **longer))

    kw = {k: v for k, v in kw.items() if k not in ("patience", "restore_best")}
    first = train.fit(net, params, x, y, epochs=12, checkpoint=path, loss_threshold=1.2, **kw)
    assert first.stop_reason == "loss_threshold"
    again = train.fit(net, params, x, y, epochs=12, checkpoint=path, loss_threshold=1.2,
                      resume=True, **kw)
    _assert_same_run(again, first)


def test_big_endian_data_trains_evaluates_and_predicts_as_native():
    # read_idx(mmap=True) maps float32 / int16 / int32 IDX data as '>f4' / '>i2' / '>i4'
    x, y = _toy(n=20)
    xb, yb = x.astype(">f4"), y.astype(">i2")
    net = models.mlp([8], 3)
    params = draw.params(net, (6,))
    kw = dict(epochs=2, batch_size=8, progress=False)
    native = train.fit(net, params, x, y, validation_data=(x, y), **kw)
    big = train.fit(net, params, xb, yb, validation_data=(xb, yb), **kw)
    _assert_same_run(big, native)
    assert train.evaluate(net, native.params, xb, yb) == train.evaluate(net, native.params, x, y)
    np.testing.assert_array_equal(train.predict(net, native.params, xb),
                                  train.predict(net, native.params, x))


def test_accuracy_is_for_class_targets_only():
    """Integer labels, one-hot and soft (label-smoothed) rows have an accuracy; float
    regression targets of the same shape (N, K) have none (were scored as one-hot)."""
    net = models.mlp([8], 3)
    params = draw.params(net, (6,))
    x, labels = _toy(n=12)
    one_hot = np.eye(3, dtype=np.float32)[labels]
    smooth = 0.9 * one_hot + 0.1 / 3
    regression = draw.normal((12, 3), seed=3)
    mse = fn.losses.quadratic
    for y, loss, has in ((labels, losses.softmax_cross_entropy, True),
                         (one_hot, losses.softmax_cross_entropy, True),
                         (smooth, losses.softmax_cross_entropy, True),
                         (regression, mse, False)):
        _, acc = train.evaluate(net, params, x, y, loss=loss)
        history = train.fit(net, params, x, y, loss=loss, epochs=1, batch_size=4,
                            progress=False, validation_data=(x, y)).history
        assert (acc is not None, history["accuracy"][0] is not None,
                history["val_accuracy"][0] is not None) == (has, has, has)
