"""funcnet.train under bad input: every wrong argument of fit, make_step (and its step),
init_state, evaluate, predict, epoch_batches, choose_epoch_mode and check_params raises a
ValueError / TypeError naming the argument, what was expected and what was given, before
any step is run; and the silent failures (an overflowing float16 update, out-of-range
labels inside a compiled step, a per-example loss, restore_best without patience, an
empty predict, integer input) behave as documented."""

from __future__ import annotations

import os
import tempfile
import types

import draw
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_train import CountingLoss

import funcnet as fn
from funcnet import losses, regularizers, train


@pytest.fixture(scope="module")
def d():
    """Tiny data: 4 examples of shape (2, 2, 1), 3 classes, a Flatten-Dense network."""
    net = fn.Serial([fn.Flatten(), fn.Dense(3)])
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 2, 2, 1)).astype(np.float32)
    y = np.array([0, 1, 2, 0], np.int32)
    params = draw.params(net, (2, 2, 1))
    sgd = optax.sgd(0.1)
    tmp = tempfile.TemporaryDirectory()
    a_file = os.path.join(tmp.name, "a_file")
    with open(a_file, "w") as f:
        f.write("not a folder")
    ns = types.SimpleNamespace(
        net=net, x=x, y=y, params=params, sgd=sgd, loss=CountingLoss(), tmp=tmp.name,
        a_file=a_file, state=train.init_state(params, sgd),
        list_params=jax.tree_util.tree_map(lambda a: np.asarray(a).tolist(), params),
        x_big=np.zeros((4, 3, 3, 1), np.float32),
    )
    ns.step = train.make_step(net, losses.softmax_cross_entropy, sgd, donate=False)
    yield ns
    tmp.cleanup()


def fit(d, **kw):
    args = {"loss": d.loss, "epochs": 1, "progress": False, **kw}
    x, y = args.pop("x", d.x), args.pop("y", d.y)
    return train.fit(d.net, args.pop("params", d.params), x, y, **args)


def make_step(d, **kw):
    args = {"loss": losses.softmax_cross_entropy, "optimizer": d.sgd, **kw}
    return train.make_step(d.net, args.pop("loss"), args.pop("optimizer"), **args)


PER_EXAMPLE = optax.softmax_cross_entropy_with_integer_labels
SCALAR_PER_EXAMPLE = r"loss must return a scalar \(the mean over the batch\), but softmax_cross_entropy_with_integer_labels returned shape"


def _can_write_in(folder):
    try:
        fd, probe = tempfile.mkstemp(dir=folder)
    except OSError:
        return False
    os.close(fd)
    os.remove(probe)
    return True


SYS_WRITABLE = _can_write_in("/sys")  # read-only for everyone, root included, on Linux

CASES = [
    # -- fit: seed ------------------------------------------------------------------------
    ("fit-seed-None", lambda d: fit(d, seed=None), TypeError, r"fit: seed must be an int, got None"),
    ("fit-seed-str", lambda d: fit(d, seed="0"), TypeError, r"fit: seed must be an int, got '0'"),
    ("fit-seed-float", lambda d: fit(d, seed=1.5), TypeError, r"fit: seed must be an int, got 1\.5"),
    ("fit-seed-bool", lambda d: fit(d, seed=True), TypeError, r"fit: seed must be an int, got True"),
    ("fit-seed-too-big", lambda d: fit(d, seed=2**64), ValueError, r"fit: seed must be an int in \[-2\*\*63, 2\*\*63\), got 18446744073709551616"),
    # -- fit: params, data ----------------------------------------------------------------
    ("fit-params-list-leaves", lambda d: fit(d, params=d.list_params), ValueError, r"fit: params\[1\]\['b'\] is a Python list, expected an array of shape \(3,\)"),
    ("fit-params-list-container", lambda d: fit(d, params=list(d.params)), ValueError, r"fit: params do not have the network's structure.*params is a list, the network's are a tuple"),
    ("fit-params-is-trainstate", lambda d: fit(d, params=d.state), TypeError, r"fit: params must be the parameters.*got a TrainState; pass state\.params"),
    ("fit-params-string-leaf", lambda d: fit(d, params=({}, {"w": "w", "b": d.params[1]["b"]})), TypeError, r"fit: params\[1\]\['w'\] must be a numeric array, got str"),
    ("fit-params-missing-entry", lambda d: fit(d, params=({}, {"w": d.params[1]["w"]})), ValueError, r"fit: params\[1\]\['b'\] is missing"),
    ("fit-params-wrong-shape", lambda d: fit(d, x=d.x_big), ValueError, r"fit: params\[1\]\['w'\] has shape \(4, 3\), the network expects \(9, 3\) for inputs of shape \(3, 3, 1\)"),
    ("fit-x-None", lambda d: fit(d, x=None), TypeError, r"fit: training data: x must be an array, got None"),
    ("fit-x-int", lambda d: fit(d, x=d.x.astype(np.int32)), TypeError, r"fit: training data: x must have a floating dtype.*got int32"),
    ("fit-x-nan", lambda d: fit(d, x=np.where(np.arange(4)[:, None, None, None] == 2, np.nan, d.x).astype(np.float32)), ValueError, r"fit: training data: x contains non-finite values \(first at example 2\)"),
    ("fit-y-ragged-list", lambda d: fit(d, y=[0, [1, 2], 2, 0]), TypeError, r"fit: training data: y must be an array .*got list that numpy cannot convert"),
    ("fit-y-strings", lambda d: fit(d, y=["a", "b", "c", "a"]), TypeError, r"fit: training data: y must be integer labels or floating targets, got dtype <U1"),
    ("fit-y-out-of-range", lambda d: fit(d, y=[0, 1, 12, 0]), ValueError, r"fit: training data: labels must lie in \[0, 3\), got values in \[0, 12\]"),
    ("fit-y-negative", lambda d: fit(d, y=[0, -1, 2, 0]), ValueError, r"labels must lie in \[0, 3\), got values in \[-1, 2\]"),
    ("fit-y-rows", lambda d: fit(d, y=d.y[:3]), ValueError, r"fit: training data: x and y must have the same number of examples, got 4 .* and 3"),
    ("fit-x-empty", lambda d: fit(d, x=d.x[:0], y=d.y[:0]), ValueError, r"fit: training data: the data set is empty"),
    # -- fit: state / model_state ---------------------------------------------------------
    ("fit-state-is-params", lambda d: fit(d, state=d.params), TypeError, r"fit: state must be a funcnet\.train\.TrainState .*got tuple \(it looks like parameters"),
    ("fit-state-and-model-state", lambda d: fit(d, state=d.state, model_state=({}, {})), ValueError, r"fit: give model_state or state, not both"),
    ("fit-state-other-optimizer", lambda d: fit(d, state=train.init_state(d.params, optax.adam(1e-3))), ValueError, r"fit: state\.opt_state does not match the optimizer"),
    ("fit-state-step-float", lambda d: fit(d, state=d.state._replace(step=jnp.zeros(()))), TypeError, r"fit: state\.step must be an integer scalar"),
    ("fit-model-state-wrong", lambda d: fit(d, model_state=[1.0]), ValueError, r"fit: state do not have the network's structure.*state is a list"),
    # -- fit: validation data (all checked before the first step) --------------------------
    ("fit-val-not-a-pair", lambda d: fit(d, validation_data=(d.x,)), TypeError, r"fit: validation_data must be a pair \(x_val, y_val\), got tuple"),
    ("fit-val-x-shape", lambda d: fit(d, validation_data=(d.x_big, d.y)), ValueError, r"fit: validation_data: x_val of shape \(4, 3, 3, 1\) does not fit the parameters: params\[1\]\['w'\] has shape \(4, 3\), the network expects \(9, 3\)"),
    ("fit-val-x-rank", lambda d: fit(d, validation_data=(d.x.reshape(4, 4), d.y)), ValueError, r"fit: validation_data: x_val must have the rank of x, \(4, 2, 2, 1\), got shape \(4, 4\)"),
    ("fit-val-x-int", lambda d: fit(d, validation_data=(d.x.astype(np.int64), d.y)), TypeError, r"fit: validation_data: x must have a floating dtype.*got int64"),
    ("fit-val-y-range", lambda d: fit(d, validation_data=(d.x, d.y + 3)), ValueError, r"fit: validation_data: labels must lie in \[0, 3\), got values in \[3, 5\]"),
    ("fit-val-y-width", lambda d: fit(d, validation_data=(d.x, np.eye(4, dtype=np.float32))), ValueError, r"fit: validation_data: x_val \(4, 2, 2, 1\) / y_val \(4, 4\) do not fit the network and the loss: .*same shape"),
    ("fit-val-rows", lambda d: fit(d, validation_data=(d.x, d.y[:2])), ValueError, r"fit: validation_data: x and y must have the same number of examples"),
    # -- fit: checkpoint (checked before training: a probe file is made and removed) --------
    ("fit-checkpoint-missing-folder", lambda d: fit(d, checkpoint=os.path.join(d.tmp, "no", "run.ckpt")), ValueError, r"fit: checkpoint '.*run\.ckpt': its folder '.*no' does not exist"),
    ("fit-checkpoint-is-folder", lambda d: fit(d, checkpoint=d.tmp), ValueError, r"fit: checkpoint must be a file path, got the folder"),
    ("fit-checkpoint-under-a-file", lambda d: fit(d, checkpoint=os.path.join(d.a_file, "run.ckpt")), ValueError, r"fit: checkpoint '.*': its folder '.*a_file' is not a folder"),
    pytest.param("fit-checkpoint-not-writable", lambda d: fit(d, checkpoint="/sys/funcnet-run.ckpt"), ValueError, r"fit: checkpoint '/sys/funcnet-run\.ckpt': cannot write in its folder '/sys'",
                 marks=pytest.mark.skipif(SYS_WRITABLE, reason="/sys is writable here")),
    ("fit-checkpoint-int", lambda d: fit(d, checkpoint=3), TypeError, r"fit: checkpoint must be a file path \(str or os\.PathLike\), got 3"),
    ("fit-resume-without-checkpoint", lambda d: fit(d, resume=True), ValueError, r"fit: resume=True needs a checkpoint path"),
    # -- fit: numbers and flags -----------------------------------------------------------
    ("fit-batch-size-0", lambda d: fit(d, batch_size=0), ValueError, r"fit: batch_size must be a positive int, got 0"),
    ("fit-batch-size-float", lambda d: fit(d, batch_size=2.0), TypeError, r"fit: batch_size must be a positive int, got 2\.0"),
    ("fit-batch-size-str", lambda d: fit(d, batch_size="4"), TypeError, r"fit: batch_size must be a positive int, got '4'"),
    ("fit-epochs-negative", lambda d: fit(d, epochs=-1), ValueError, r"fit: epochs must be a non-negative int, got -1"),
    ("fit-epochs-float", lambda d: fit(d, epochs=1.0), TypeError, r"fit: epochs must be a non-negative int, got 1\.0"),
    ("fit-epochs-bool", lambda d: fit(d, epochs=True), TypeError, r"fit: epochs must be a non-negative int, got True"),
    ("fit-patience-0", lambda d: fit(d, patience=0, validation_data=(d.x, d.y)), ValueError, r"fit: patience must be a positive int, got 0"),
    ("fit-patience-float", lambda d: fit(d, patience=1.5, validation_data=(d.x, d.y)), TypeError, r"fit: patience must be a positive int, got 1\.5"),
    ("fit-patience-no-validation", lambda d: fit(d, patience=2), ValueError, r"fit: patience needs validation_data"),
    ("fit-loss-threshold-str", lambda d: fit(d, loss_threshold="0.1"), TypeError, r"fit: loss_threshold must be a number or None, got '0\.1'"),
    ("fit-loss-threshold-nan", lambda d: fit(d, loss_threshold=float("nan")), ValueError, r"fit: loss_threshold must be a number or None, got nan"),
    ("fit-loss-threshold-bool", lambda d: fit(d, loss_threshold=True), TypeError, r"fit: loss_threshold must be a number or None, got True"),
    ("fit-restore-best-no-validation", lambda d: fit(d, restore_best=True), ValueError, r"fit: restore_best=True needs validation_data"),
    ("fit-restore-best-str", lambda d: fit(d, restore_best="yes"), TypeError, r"fit: restore_best must be True or False, got 'yes'"),
    ("fit-shuffle-str", lambda d: fit(d, shuffle="no"), TypeError, r"fit: shuffle must be True or False, got 'no'"),
    ("fit-progress-int", lambda d: fit(d, progress=1), TypeError, r"fit: progress must be True or False, got 1"),
    # -- fit: optimizer, loss, grad, mode, regularizer ------------------------------------
    ("fit-optimizer-str", lambda d: fit(d, optimizer="adam"), TypeError, r"fit: optimizer must be an optax\.GradientTransformation .*got 'adam'"),
    ("fit-optimizer-uncalled", lambda d: fit(d, optimizer=optax.adam), TypeError, r"fit: optimizer must be an optax\.GradientTransformation .*got <function adam"),
    ("fit-optimizer-class", lambda d: fit(d, optimizer=optax.GradientTransformation), TypeError, r"fit: optimizer must be an optax\.GradientTransformation"),
    ("fit-loss-not-callable", lambda d: fit(d, loss="softmax"), TypeError, r"fit: loss must be a function \(outputs, y\) -> scalar.*got 'softmax'"),
    ("fit-loss-per-example", lambda d: fit(d, loss=PER_EXAMPLE), TypeError, r"fit: " + SCALAR_PER_EXAMPLE + r" \(1,\).*jnp\.mean\(softmax_cross_entropy_with_integer_labels\(o, y\)\)"),
    ("fit-loss-per-example-with-validation", lambda d: fit(d, loss=PER_EXAMPLE, validation_data=(d.x, d.y)), TypeError, r"fit: " + SCALAR_PER_EXAMPLE),
    ("fit-grad-unknown", lambda d: fit(d, grad="numeric"), ValueError, r"fit: grad must be one of \['autodiff', 'manual'\].*got 'numeric'"),
    ("fit-grad-int", lambda d: fit(d, grad=3), TypeError, r"fit: grad must be one of \['autodiff', 'manual'\] or a callable.*got 3"),
    ("fit-epoch-mode-unknown", lambda d: fit(d, epoch_mode="fast"), ValueError, r"epoch_mode must be one of \('auto', 'loop', 'scan'\), got 'fast'"),
    ("fit-epoch-mode-None", lambda d: fit(d, epoch_mode=None), ValueError, r"epoch_mode must be one of .*got None"),
    ("fit-regularizer-not-callable", lambda d: fit(d, regularizer="l2", lam=0.1), TypeError, r"fit: regularizer must be a function params -> Omega.*got 'l2'"),
    ("fit-lam-negative", lambda d: fit(d, regularizer=regularizers.l2, lam=-0.1), ValueError, r"fit: lam must be a finite non-negative number, got -0\.1"),
    ("fit-lam-nan", lambda d: fit(d, regularizer=regularizers.l2, lam=float("nan")), ValueError, r"fit: lam must be a finite non-negative number, got nan"),
    ("fit-lam-str", lambda d: fit(d, regularizer=regularizers.l2, lam="0.1"), TypeError, r"fit: lam must be a finite non-negative number, got '0\.1'"),
    ("fit-lam-without-regularizer", lambda d: fit(d, lam=0.1), ValueError, r"fit: lam=0\.1 needs a regularizer"),
    # -- make_step ------------------------------------------------------------------------
    ("make_step-seed-None", lambda d: make_step(d, seed=None), TypeError, r"make_step: seed must be an int, got None"),
    ("make_step-seed-str", lambda d: make_step(d, seed="1"), TypeError, r"make_step: seed must be an int, got '1'"),
    ("make_step-seed-float", lambda d: make_step(d, seed=1.0), TypeError, r"make_step: seed must be an int, got 1\.0"),
    ("make_step-optimizer", lambda d: make_step(d, optimizer=0.1), TypeError, r"make_step: optimizer must be an optax\.GradientTransformation .*got 0\.1"),
    ("make_step-loss-None", lambda d: make_step(d, loss=None), TypeError, r"make_step: loss must be a function .*got None"),
    ("make_step-grad-unknown", lambda d: make_step(d, grad="finite-differences"), ValueError, r"make_step: grad must be one of .*got 'finite-differences'"),
    ("make_step-regularizer", lambda d: make_step(d, regularizer=5, lam=0.1), TypeError, r"make_step: regularizer must be a function .*got 5"),
    ("make_step-lam-negative", lambda d: make_step(d, regularizer=regularizers.l2, lam=-1), ValueError, r"make_step: lam must be a finite non-negative number, got -1"),
    ("make_step-donate-str", lambda d: make_step(d, donate="yes"), TypeError, r"make_step: donate must be True or False, got 'yes'"),
    # -- the step make_step returns (checked in Python before the compiled step) ------------
    ("step-params-not-state", lambda d: d.step(d.params, d.x, d.y), TypeError, r"make_step step: state must be a funcnet\.train\.TrainState .*got tuple \(it looks like parameters"),
    ("step-weights-length", lambda d: d.step(d.state, d.x, d.y, jnp.ones(3)), ValueError, r"make_step step: weights must have shape \(B,\) = \(4,\), one per example of x \(4, 2, 2, 1\), got shape \(3,\)"),
    ("step-weights-2d", lambda d: d.step(d.state, d.x, d.y, np.ones((4, 1))), ValueError, r"make_step step: weights must have shape \(B,\) = \(4,\).*got shape \(4, 1\)"),
    ("step-label-too-big", lambda d: d.step(d.state, d.x, np.array([0, 1, 12, 0])), ValueError, r"make_step step: y: integer labels must lie in \[0, 3\) for a network with 3 outputs, got values in \[0, 12\]"),
    ("step-label-negative", lambda d: d.step(d.state, d.x, [0, -1, 2, 0]), ValueError, r"make_step step: y: integer labels must lie in \[0, 3\).*got values in \[-1, 2\]"),
    ("step-y-rows", lambda d: d.step(d.state, d.x, d.y[:3]), ValueError, r"make_step step: y must have one row per example of x, got 3 rows"),
    ("step-x-shape", lambda d: d.step(d.state, d.x_big, d.y), ValueError, r"make_step step: x of shape \(4, 3, 3, 1\) does not fit the parameters: params\[1\]\['w'\] has shape \(4, 3\), the network expects \(9, 3\)"),
    ("step-x-ragged", lambda d: d.step(d.state, [[1.0], [1.0, 2.0]], d.y), TypeError, r"make_step step: x must be an array"),
    ("step-x-scalar", lambda d: d.step(d.state, 1.0, d.y), ValueError, r"make_step step: x and y must be batched arrays \(B, \.\.\.\), got shapes \(\) and \(4,\)"),
    ("step-loss-per-example", lambda d: make_step(d, loss=PER_EXAMPLE)(d.state, d.x, d.y), TypeError, r"make_step: " + SCALAR_PER_EXAMPLE + r" \(4,\) for a batch of 4"),
    ("step-loss-returns-tuple", lambda d: make_step(d, loss=lambda o, y: (jnp.mean(o), 0.0))(d.state, d.x, d.y), TypeError, r"make_step: loss must return a scalar array .*returned tuple"),
    # -- init_state, step_keys ------------------------------------------------------------
    ("init_state-optimizer", lambda d: train.init_state(d.params, "sgd"), TypeError, r"init_state: optimizer must be an optax\.GradientTransformation .*got 'sgd'"),
    ("init_state-string-leaf", lambda d: train.init_state({"w": "abc"}, d.sgd), TypeError, r"init_state: params\['w'\] must be a numeric array, got str"),
    ("init_state-trainstate", lambda d: train.init_state(d.state, d.sgd), TypeError, r"init_state: params must be the parameters \(a pytree of arrays\), got a TrainState"),
    ("step_keys-str", lambda d: train.step_keys("0"), TypeError, r"step_keys: seed must be an int, got '0'"),
    # -- evaluate -------------------------------------------------------------------------
    ("evaluate-params-list-leaves", lambda d: train.evaluate(d.net, d.list_params, d.x, d.y), ValueError, r"evaluate: x of shape \(4, 2, 2, 1\) does not fit the parameters: params\[1\]\['b'\] is a Python list"),
    ("evaluate-params-trainstate", lambda d: train.evaluate(d.net, d.state, d.x, d.y), TypeError, r"evaluate: params must be the parameters .*got a TrainState; pass state\.params"),
    ("evaluate-x-shape", lambda d: train.evaluate(d.net, d.params, d.x_big, d.y), ValueError, r"evaluate: x of shape \(4, 3, 3, 1\) does not fit the parameters: params\[1\]\['w'\] has shape \(4, 3\), the network expects \(9, 3\) for inputs of shape \(3, 3, 1\)"),
    ("evaluate-y-list-out-of-range", lambda d: train.evaluate(d.net, d.params, d.x, [0, 1, 3, 0]), ValueError, r"evaluate: labels must lie in \[0, 3\), got values in \[0, 3\]"),
    ("evaluate-y-ragged", lambda d: train.evaluate(d.net, d.params, d.x, [[0], [1, 2], 0, 0]), TypeError, r"evaluate: y must be an array"),
    ("evaluate-empty", lambda d: train.evaluate(d.net, d.params, d.x[:0], d.y[:0]), ValueError, r"evaluate: the data set is empty"),
    ("evaluate-batch-size", lambda d: train.evaluate(d.net, d.params, d.x, d.y, batch_size=0), ValueError, r"evaluate: batch_size must be a positive int, got 0"),
    ("evaluate-loss-not-callable", lambda d: train.evaluate(d.net, d.params, d.x, d.y, loss=1), TypeError, r"evaluate: loss must be a function .*got 1"),
    ("evaluate-loss-per-example", lambda d: train.evaluate(d.net, d.params, d.x, d.y, loss=PER_EXAMPLE), TypeError, r"evaluate: " + SCALAR_PER_EXAMPLE),
    ("evaluate-state-is-trainstate", lambda d: train.evaluate(d.net, d.params, d.x, d.y, state=d.state), TypeError, r"evaluate: state is the network's state .*got a TrainState; pass its \.model_state"),
    # -- predict --------------------------------------------------------------------------
    ("predict-x-shape", lambda d: train.predict(d.net, d.params, d.x_big), ValueError, r"predict: x of shape \(4, 3, 3, 1\) does not fit the parameters: params\[1\]\['w'\] has shape \(4, 3\), the network expects \(9, 3\)"),
    ("predict-x-int", lambda d: train.predict(d.net, d.params, d.x.astype(np.int32)), TypeError, r"predict: x must have a floating dtype \(e\.g\. float32\), got int32"),
    ("predict-x-scalar", lambda d: train.predict(d.net, d.params, 1.0), ValueError, r"predict: x must be a batch \(N, \.\.\.\), got shape \(\)"),
    ("predict-x-ragged", lambda d: train.predict(d.net, d.params, [[1.0, 2.0], [3.0]]), TypeError, r"predict: x must be an array"),
    ("predict-params-list-leaves", lambda d: train.predict(d.net, d.list_params, d.x), ValueError, r"predict: x of shape \(4, 2, 2, 1\) does not fit the parameters: params\[1\]\['b'\] is a Python list"),
    ("predict-batch-size", lambda d: train.predict(d.net, d.params, d.x, batch_size=-1), ValueError, r"predict: batch_size must be a positive int, got -1"),
    ("predict-state-is-trainstate", lambda d: train.predict(d.net, d.params, d.x, state=d.state), TypeError, r"predict: state is the network's state"),
    ("predict-rank-for-network", lambda d: train.predict(fn.Serial([fn.Conv(2, 1), fn.Flatten(), fn.Dense(3)]), d.params, d.x.reshape(4, 4)), ValueError, r"predict: x has shape \(4, 4\): the network does not accept inputs of shape \(4,\)"),
    # -- epoch_batches, choose_epoch_mode, check_params ------------------------------------
    ("epoch_batches-n-negative", lambda d: train.epoch_batches(jax.random.key(0), -1, 2), ValueError, r"epoch_batches: n must be a non-negative int, got -1"),
    ("epoch_batches-n-float", lambda d: train.epoch_batches(jax.random.key(0), 2.5, 2), TypeError, r"epoch_batches: n must be a non-negative int, got 2\.5"),
    ("epoch_batches-batch-size-0", lambda d: train.epoch_batches(jax.random.key(0), 4, 0), ValueError, r"epoch_batches: batch_size must be a positive int, got 0"),
    ("epoch_batches-key-int", lambda d: train.epoch_batches(0, 4, 2), TypeError, r"epoch_batches: key must be a JAX PRNG key \(jax\.random\.key\(seed\)\), got int"),
    ("epoch_batches-shuffle-str", lambda d: train.epoch_batches(jax.random.key(0), 4, 2, shuffle="yes"), TypeError, r"epoch_batches: shuffle must be True or False, got 'yes'"),
    ("choose_epoch_mode-unknown", lambda d: train.choose_epoch_mode(d.net, "fast"), ValueError, r"epoch_mode must be one of \('auto', 'loop', 'scan'\), got 'fast'"),
    ("choose_epoch_mode-list", lambda d: train.choose_epoch_mode(d.net, ["loop"]), ValueError, r"epoch_mode must be one of .*got \['loop'\]"),
    ("check_params-list-leaves", lambda d: train.check_params(d.net, d.list_params, (2, 2, 1)), ValueError, r"fit: params\[1\]\['b'\] is a Python list, expected an array of shape \(3,\)"),
    ("check_params-shape", lambda d: train.check_params(d.net, d.params, (3, 3, 1), where="mine"), ValueError, r"mine: params\[1\]\['w'\] has shape \(4, 3\), the network expects \(9, 3\)"),
    ("check_params-trainstate", lambda d: train.check_params(d.net, d.state, (2, 2, 1)), TypeError, r"fit: params is a TrainState; pass state\.params"),
    ("check_params-what", lambda d: train.check_params(d.net, d.params, (2, 2, 1), what="weights"), ValueError, r"check_params: what must be 'params' or 'state', got 'weights'"),
]  # fmt: skip

# Rows whose error can only show when something is traced (never run): the loss contract,
# and the validation program traced before training.
TRACED = {"fit-loss-per-example", "fit-loss-per-example-with-validation", "fit-val-y-width"}


def _id(case):
    return case.values[0] if hasattr(case, "values") else case[0]


@pytest.mark.parametrize("name,call,exc,pattern", CASES, ids=[_id(c) for c in CASES])
def test_bad_input_is_rejected_before_training_with_a_named_error(d, name, call, exc, pattern):
    traces = d.loss.traces
    with pytest.raises(exc, match=pattern):
        call(d)
    if name not in TRACED:
        assert d.loss.traces == traces, "the loss was traced: the error came too late"


def test_the_table_is_large_enough():
    assert len(CASES) >= 60
    assert len({_id(c) for c in CASES}) == len(CASES)


# ---------------------------------------------------------------------------------------
# The silent failures
# ---------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
@pytest.mark.parametrize("mode", ["loop", "scan"])
def test_float16_update_overflow_keeps_the_last_finite_state(d, mode):
    # The gradient and the loss are finite, but lr * grad overflows float16 to +-inf.
    params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float16), d.params)
    x = np.concatenate([d.x, d.x])
    y = np.concatenate([d.y, d.y])
    with pytest.raises(train.NonFiniteLossError, match=r"epoch 1, step 1 of 2") as info:
        train.fit(d.net, params, x, y, optimizer=optax.sgd(1e5), epochs=2, batch_size=4,
                  epoch_mode=mode, progress=False)
    err = info.value
    assert (err.epoch, err.step, err.global_step) == (1, 1, 0)
    assert np.isfinite(err.value)  # the loss itself was finite
    for a, b in zip(jax.tree_util.tree_leaves(err.state.params),
                    jax.tree_util.tree_leaves(params), strict=True):
        assert a.dtype == jnp.float16 and np.all(np.isfinite(np.asarray(a, np.float32)))
        np.testing.assert_array_equal(a, b)  # no update was applied


def test_out_of_range_labels_inside_the_compiled_step_do_not_update(d):
    step = train.make_step(d.net, losses.softmax_cross_entropy, d.sgd, donate=False)
    state = train.init_state(d.params, d.sgd)
    def no_update(run, labels):
        new, metrics = run(state, d.x, labels)
        assert np.isnan(metrics["loss"]) and np.isnan(metrics["objective"])
        assert int(new.step) == 0
        for a, b in zip(jax.tree_util.tree_leaves(new.params),
                        jax.tree_util.tree_leaves(state.params), strict=True):
            np.testing.assert_array_equal(a, b)

    for bad in ([0, 1, 12, 0], [0, -1, 2, 0]):  # -1 would silently be class 2 under jit
        no_update(step, jnp.asarray(bad, jnp.int32))  # on the device: no Python check
        no_update(step.jitted, np.asarray(bad, np.int32))  # the bare compiled step
    new, metrics = step(state, d.x, jnp.asarray(d.y))  # good labels: one update
    assert np.isfinite(metrics["loss"]) and int(new.step) == 1
    assert not np.allclose(new.params[1]["w"], state.params[1]["w"])


def test_a_mean_of_the_per_example_loss_trains_like_the_batch_mean(d):
    mean_loss = lambda o, y: jnp.mean(PER_EXAMPLE(o, y))  # noqa: E731
    kw = dict(epochs=2, batch_size=2, progress=False, optimizer=d.sgd)
    a = train.fit(d.net, d.params, d.x, d.y, loss=losses.softmax_cross_entropy, **kw)
    b = train.fit(d.net, d.params, d.x, d.y, loss=mean_loss, **kw)
    for u, v in zip(jax.tree_util.tree_leaves(a.params), jax.tree_util.tree_leaves(b.params),
                    strict=True):
        np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def overfit():
    """A BatchNorm network whose validation loss gets worse after a few epochs."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(24, 2, 2, 1)).astype(np.float32)
    y = rng.integers(0, 3, 24).astype(np.int32)
    xv = rng.normal(size=(16, 2, 2, 1)).astype(np.float32)
    yv = rng.integers(0, 3, 16).astype(np.int32)
    net = fn.Serial([fn.Flatten(), fn.Dense(16), fn.BatchNorm(), fn.ReLU(), fn.Dense(3)])
    return net, net.init(jax.random.key(0), (2, 2, 1)), x, y, xv, yv


@pytest.mark.parametrize("stop", ["epochs", "loss_threshold"])
def test_restore_best_returns_the_best_epoch_without_patience(overfit, stop):
    net, params, x, y, xv, yv = overfit
    kw = dict(optimizer=optax.adam(5e-2), epochs=12, batch_size=8, progress=False,
              validation_data=(xv, yv), restore_best=True)
    if stop == "loss_threshold":
        kw["loss_threshold"] = 0.7  # reached at epoch 8, after the best epoch (6)
    r = train.fit(net, params, x, y, **kw)
    assert r.stop_reason == stop
    vl = r.history["val_loss"]
    best = int(np.argmin(vl))
    assert best < len(vl) - 1, vl  # the last epoch is not the best: restoring matters
    # params and the BatchNorm statistics of that epoch, together
    assert r.state.params is r.params
    got = train.evaluate(net, r.params, xv, yv, state=r.model_state)[0]
    assert got == pytest.approx(vl[best], rel=1e-5)
    assert int(r.state.step) == len(vl) * 3  # the optimizer state and step stay the last


def test_predict_on_an_empty_batch_returns_an_empty_array(d):
    out = train.predict(d.net, d.params, d.x[:0])
    assert out.shape == (0, 3) and out.dtype == jnp.float32


def test_integer_input_works_through_fit_evaluate_predict_and_make_step():
    net = fn.Serial([fn.Embedding(5, 2), fn.Flatten(), fn.Dense(3)])
    x = np.array([[0, 1], [2, 3], [4, 0], [1, 1]], np.int32)
    y = np.array([0, 1, 2, 0], np.int32)
    params = draw.params(net, (2,))
    r = train.fit(net, params, x, y, epochs=2, batch_size=2, progress=False,
                  validation_data=(x, y), restore_best=True)
    loss, acc = train.evaluate(net, r.params, x, y)
    assert loss == pytest.approx(min(r.history["val_loss"]), rel=1e-5) and acc is not None
    assert train.predict(net, r.params, x).shape == (4, 3)
    assert train.predict(net, r.params, x[:0]).shape == (0, 3)
    step = train.make_step(net, losses.softmax_cross_entropy, optax.sgd(0.1))
    state, metrics = step(train.init_state(params, optax.sgd(0.1)), x, y)
    assert int(state.step) == 1 and np.isfinite(metrics["loss"])
    with pytest.raises(TypeError, match=r"fit: training data: the network's first layer takes "
                                        r"integer input \(ids\), got x of dtype float32"):
        train.fit(net, params, x.astype(np.float32), y, progress=False)


def test_fit_leaves_the_callers_state_valid(d):
    state = train.init_state(d.params, d.sgd)
    r = train.fit(d.net, None, d.x, d.y, state=state, epochs=1, progress=False)
    assert int(r.state.step) == 1
    assert not state.params[1]["w"].is_deleted() and int(state.step) == 0


# ---------------------------------------------------------------------------------------
# fit's checkpoint file: only its own checkpoints are resumed or replaced
# ---------------------------------------------------------------------------------------


def _refused_before_training(d, exc, pattern, path, **kw):
    traces = d.loss.traces
    before = open(path, "rb").read()
    with pytest.raises(exc, match=pattern):
        fit(d, **kw)
    if "validation_data" not in kw:  # whose check traces the loss (without a step)
        assert d.loss.traces == traces, "the loss was traced: the error came too late"
    assert open(path, "rb").read() == before, "the file was changed"


@pytest.mark.parametrize("meta, missing", [
    (None, r"it has no metadata"),
    ({"note": "mine"}, r"its metadata has no 'epoch', 'history', 'seed' \(keys \['note'\]\)"),
    ({"epoch": 1}, r"its metadata has no 'history', 'seed'"),
    ({"epoch": 1, "history": {"loss": [1.0]}, "seed": 0},
     r"its metadata's 'history' must hold the lists .* got the keys \['loss'\]"),
], ids=["none", "other", "epoch-only", "short-history"])
def test_fit_resume_refuses_a_checkpoint_without_fits_metadata(d, tmp_path, meta, missing):
    path = str(tmp_path / "mine.ckpt")
    fn.checkpoint.save(path, {"state": d.state}, metadata=meta)  # the right tree, not fit's
    _refused_before_training(
        d, ValueError, rf"fit: resume=True: checkpoint '{path}' is not a checkpoint that fit "
        rf"wrote: {missing}", path, checkpoint=path, resume=True, optimizer=d.sgd)


def test_an_older_checkpoint_that_validated_late_is_fits_own_but_not_resumed(d, tmp_path):
    """An older fit let validation_data be added on resume: val_loss shorter than the
    epochs. Its own file still (replaced with resume=False), but not resumable."""
    path = str(tmp_path / "old.ckpt")
    history = {"loss": [1.0, 0.9], "accuracy": [0.5, 0.6], "val_loss": [0.8],
               "val_accuracy": [0.6], "time": [0.1, 0.1]}
    fn.checkpoint.save(path, {"state": d.state},
                       metadata={"epoch": 2, "history": history, "seed": 0})
    _refused_before_training(
        d, ValueError, r"resume=True: checkpoint .* validated 1 of its 2 epochs", path,
        checkpoint=path, resume=True, optimizer=d.sgd)
    fit(d, checkpoint=path, optimizer=d.sgd)  # resume=False: fit's own file, replaced
    assert fn.checkpoint.read_metadata(path)["epoch"] == 1


def test_fit_refuses_to_overwrite_a_file_it_did_not_write(d, tmp_path):
    data_set = str(tmp_path / "data.npz")
    np.savez(data_set, x=d.x, y=d.y)
    _refused_before_training(
        d, ValueError, rf"fit: checkpoint '{data_set}' exists and is not a checkpoint that "
        rf"fit wrote \(no __funcnet_checkpoint__\.json member; not a funcnet checkpoint\); "
        rf"fit would replace it", data_set, checkpoint=data_set)
    np.testing.assert_array_equal(np.load(data_set)["x"], d.x)
    saved = str(tmp_path / "params.ckpt")  # the user's own checkpoint.save
    fn.checkpoint.save(saved, d.params, metadata={"note": "best so far"})
    _refused_before_training(d, ValueError, r"exists and is not a checkpoint that fit wrote "
                             r"\(its metadata has no 'epoch'", saved, checkpoint=saved)
    # fit's own checkpoint (and an empty file) are replaced by a run with resume=False
    run = str(tmp_path / "run.ckpt")
    fit(d, checkpoint=run, epochs=2, optimizer=d.sgd)
    assert fn.checkpoint.read_metadata(run)["epoch"] == 2
    fit(d, checkpoint=run, epochs=1, optimizer=d.sgd)
    assert fn.checkpoint.read_metadata(run)["epoch"] == 1
    empty = str(tmp_path / "empty.ckpt")
    open(empty, "wb").close()
    fit(d, checkpoint=empty, optimizer=d.sgd)
    assert fn.checkpoint.read_metadata(empty)["epoch"] == 1


def test_fit_resume_refuses_other_settings(d, tmp_path):
    path = str(tmp_path / "run.ckpt")
    kw = dict(checkpoint=path, optimizer=d.sgd, batch_size=2, seed=3)
    fit(d, **kw)
    resume = dict(kw, resume=True, epochs=2)
    for change, pattern in [
        ({"seed": 4}, r"seed: 3 in the checkpoint, 4 given"),
        ({"batch_size": 4}, r"batch_size: 2 in the checkpoint, 4 given"),
        ({"x": d.x[:3], "y": d.y[:3]}, r"examples: 4 in the checkpoint, 3 given"),
        ({"shuffle": False}, r"shuffle: True in the checkpoint, False given"),
        ({"epoch_mode": "loop"}, r"epoch_mode: 'scan' in the checkpoint, 'loop' given"),
        ({"validation_data": (d.x, d.y)},
         r"validation_data: none in the checkpoint, 4 examples given"),
        ({"seed": 4, "batch_size": 4}, r"batch_size: 2 .* 4 given; seed: 3 .* 4 given"),
    ]:
        _refused_before_training(
            d, ValueError, rf"fit: resume=True: checkpoint '{path}' was written by a run with "
            rf"other settings \({pattern}\); .* give the same arguments", path,
            **{**resume, **change})
    # a run with validation data resumed without it, or asking for a best it did not keep
    fit(d, **kw, validation_data=(d.x, d.y))
    _refused_before_training(d, ValueError, r"validation_data: 4 examples in the checkpoint, "
                             r"none given", path, **resume)
    _refused_before_training(
        d, ValueError, rf"fit: resume=True with restore_best=True: checkpoint '{path}' holds "
        rf"no best parameters \(its run had restore_best=False\)", path, **resume,
        validation_data=(d.x, d.y), restore_best=True)
    r = fit(d, **resume, validation_data=(d.x, d.y))  # the same settings resume
    assert len(r.history["val_loss"]) == 2 and int(r.state.step) == 4


@pytest.mark.parametrize("grad", ["autodiff", "manual"])
def test_a_loss_that_refuses_the_batch_is_named_with_the_batch_shapes(grad):
    """fit and evaluate apply the loss to each example; its refusal of y (N,) against
    outputs (N, 1) is said for the batch, as make_step says it, not for one example (the
    hand rules apply the loss's rule per example too)."""
    net = fn.Serial([fn.Dense(1)])
    params = net.init(jax.random.key(0), (3,))
    x, y = np.ones((16, 3), np.float32), np.ones(16, np.float32)
    with pytest.raises(ValueError, match=r"^fit: the loss refuses the network's outputs of "
                                         r"shape \(8, 1\) and y of shape \(8,\): quadratic: "
                                         r"y and target must have the same shape, got \(8, 1\)"):
        train.fit(net, params, x, y, loss=fn.losses.quadratic, epochs=1, batch_size=8,
                  progress=False, grad=grad)
    with pytest.raises(ValueError, match=r"^evaluate: the loss refuses the network's outputs "
                                         r"of shape \(16, 1\) and y of shape \(16,\)"):
        train.evaluate(net, params, x, y, loss=fn.losses.quadratic)


def test_a_custom_grad_is_refused_for_dropout_and_state():
    """A custom ``grad`` callable gets (params, x, y): no key, no state, evaluation mode.
    Dropout trained silently without dropping; BatchNorm failed inside apply."""
    def my_grad(net, loss_fn):
        return lambda p, x, y: jax.value_and_grad(lambda q: loss_fn(net.apply(q, x), y))(p)

    x, y = np.ones((8, 3), np.float32), np.arange(8) % 3
    for layer, match in ((fn.Dropout(0.5), r"so Dropout\(0\.5\) would never drop anything"),
                         (fn.BatchNorm(), r"would never be updated")):
        net = fn.Serial([fn.Dense(4), layer, fn.Dense(3)])
        params = net.init(jax.random.key(0), (3,))
        with pytest.raises(ValueError, match=r"^fit: a custom grad callable .*" + match):
            train.fit(net, params, x, y, grad=my_grad, epochs=1, progress=False)
    net = fn.Serial([fn.Dense(4), fn.ReLU(), fn.Dense(3)])  # still trains a plain network
    plain = train.fit(net, net.init(jax.random.key(0), (3,)), x, y, grad=my_grad, epochs=1,
                      progress=False)
    assert np.isfinite(plain.history["loss"][0])


def test_a_last_batch_batchnorm_refuses_is_named_before_the_first_step():
    """15 examples in batches of 7 leave a last batch of one row, which BatchNorm over
    features refuses in training: said before training (it came after an epoch's steps,
    without naming batch_size). A conv BatchNorm has H x W values per channel: fine."""
    x, y = np.random.default_rng(0).normal(size=(15, 6)).astype(np.float32), np.arange(15) % 3
    net = fn.Serial([fn.Dense(8), fn.BatchNorm(), fn.ReLU(), fn.Dense(3)])
    loss = CountingLoss()
    with pytest.raises(ValueError, match=r"^fit: the last batch of each epoch has 1 row\(s\) "
                                         r"\(15 examples, batch_size=7\), which the network "
                                         r"refuses in training: .*BatchNorm"):
        train.fit(net, net.init(jax.random.key(0), (6,)), x, y, loss=loss, batch_size=7,
                  progress=False)
    assert loss.traces == 0
    conv = fn.Serial([fn.Conv(2, 3), fn.BatchNorm(), fn.Flatten(), fn.Dense(3)])
    images = np.ones((15, 4, 4, 1), np.float32)
    result = train.fit(conv, conv.init(jax.random.key(0), (4, 4, 1)), images, y, batch_size=7,
                       epochs=1, progress=False)
    assert int(result.state.step) == 3
