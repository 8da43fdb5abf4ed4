"""Data parallelism (funcnet.parallel, ``devices=``): on 4 simulated CPU devices, fit,
make_step, evaluate and predict give the one-device results, shard the batch, replicate
the state and compile once; checkpoints come back with the template's shardings and fit
resumes bitwise on the mesh; bad ``devices`` arguments are named errors.

JAX fixes its device count when it starts, so the 4-device checks run in one subprocess
(tests/parallel_checks.py, which prints JSON); this session keeps its single device.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import chex
import draw
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import funcnet as fn
from funcnet import parallel, train

HELPER = os.path.join(os.path.dirname(__file__), "parallel_checks.py")


def _run_helper():
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    proc = subprocess.run([sys.executable, HELPER], capture_output=True, text=True,
                          env=env, timeout=600)
    if proc.returncode != 0:
        pytest.fail(f"{HELPER} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="session")
def four(tmp_path_factory):
    """The 4-device results: one subprocess per test run, also under pytest-xdist, whose
    workers share the run's temporary folder (the first one runs it, the others wait for
    its JSON)."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        text = _run_helper()
    else:
        import fcntl

        shared = tmp_path_factory.getbasetemp().parent / "parallel_checks.json"
        with open(f"{shared}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not shared.is_file():
                shared.write_text(_run_helper())
            text = shared.read_text()
    result = json.loads(text)
    assert result["devices"] == 4
    return result


def _sharded_batch(seen, rows, parts=4):
    """What the network's first layer received in each program compiled under one label:
    ``rows`` (an int, or one per program) split ``parts`` ways."""
    assert seen is not None, "the probe layer was not compiled"
    rows = (rows,) if isinstance(rows, int) else rows
    assert seen == [{"sharding": "P('data',)", "devices": 4, "parts": parts, "rows": r,
                     "rows_per_device": -(-r // parts)} for r in rows]


# ---------------------------------------------------------------------------------------
# 4 devices
# ---------------------------------------------------------------------------------------


CASES = ["fit autodiff bs=16 scan", "fit autodiff bs=30 loop", "fit manual bs=16 loop",
         "fit manual bs=30 scan"]


@pytest.mark.parametrize("case", CASES)
def test_fit_on_four_devices_gives_the_one_device_result(four, case):
    # BatchNorm + Dropout; 68 examples: batches of 16 (divides by 4) or 30 (does not),
    # the last one partial; both gradient modes
    (r,) = [f for f in four["fit"] if f["name"] == case]
    assert r["state"] is None, r["state"]  # params, opt state, BN statistics, step
    assert r["history"] is None, r["history"]
    assert r["loss_moved"]
    assert r["params_replicated"] and r["params_devices"] == 4
    # the step receives its batch split across the 4 devices (30 rows: 8, 8, 8, 6), and
    # the partial last batch (68 = 4 * 16 + 4 = 2 * 30 + 8) at its true size: the net has
    # BatchNorm, which must not see padding rows ...
    bs = int(case.split("bs=")[1].split()[0])
    _sharded_batch(r["batch"], (bs, 68 % bs))
    # ... each compiled once for the 3 epochs: the full batches (a step, or the scanned
    # epoch) and the last batch (a step)
    full = {"one_step": 2, "scan_epoch": 0} if case.endswith("loop") else {
        "one_step": 1, "scan_epoch": 1}
    assert r["compilations"] == full


def test_fit_on_a_batch_source_on_four_devices_gives_the_one_device_result(four):
    r = four["stream"]
    assert r["state"] is None, r["state"]
    assert r["history"] is None, r["history"]
    assert r["params_replicated"]
    # 30 rows (split 8, 8, 8, 6) and the last batch of 8 at its true size (BatchNorm)
    _sharded_batch(r["batch"], (30, 8))
    assert r["compilations"] == 2


def test_fit_keeps_sharded_data_on_the_devices(four):
    r = four["sharded_input"]
    assert r["x_shards"] == [[17, 6]] * 4  # shard_batch split the 68 rows
    assert r["copied_to_host"] == []  # fit checked and used the data where it was


def test_make_step_on_four_devices(four):
    r = four["make_step"]
    for s in r["steps"]:  # 16 rows, and 30 rows that travel padded to 32
        assert s["state"] is None and s["metrics"] is None, s
        _sharded_batch(s["batch"], s["rows"])
    assert r["inputs"] == ["P('data',)"] * 3 and r["input_devices"] == 4  # x, y, weights
    assert r["state_inputs_replicated"] and r["state_out_replicated"]
    assert r["x_shard_rows"] == [8, 8, 8, 8]
    assert r["new_programs"] == 0  # more batches of a size already seen


def test_a_mesh_with_a_model_axis_shards_over_the_data_axis(four):
    r = four["mesh_2x2"]
    assert r["state"] is None, r["state"]
    _sharded_batch(r["batch"], 30, parts=2)


def test_evaluate_and_predict_on_four_devices(four):
    r = four["evaluate_predict"]
    assert r["evaluate"] is None and r["predict"] is None, r
    assert r["predict_shape"] == [68, 3]
    _sharded_batch(r["evaluate_batch"], 30)
    _sharded_batch(r["predict_batch"], 30)


def test_restore_gives_the_template_shardings_on_four_devices(four):
    # saved from arrays of every sharding; restored into zeros (other keys) laid out alike
    r = four["checkpoint"]
    leaves = r["leaves"]
    for name, leaf in leaves.items():
        assert leaf["same_sharding"], name  # sharding == the template leaf's
        assert leaf["same_values"] and leaf["file_values"], name  # bitwise, dtype kept
    rows4 = lambda n, *rest: [[[i, i + n // 4], [n // 4, *rest]]  # noqa: E731
                              for i in range(0, n, n // 4)]
    everywhere = lambda *shape: [[[0, shape[0]] if shape else [], list(shape)]] * 4  # noqa: E731
    assert {name: leaf["shards"] for name, leaf in leaves.items()} == {
        "['params']['w']": everywhere(6, 3), "['params']['b']": everywhere(3),
        "['step']": everywhere(), "['key']": everywhere(),  # replicated (a typed key too)
        "['batch']": rows4(8, 5), "['bf16']": rows4(8), "['keys']": rows4(8),  # by rows
        "['struct']": rows4(12, 2),  # a ShapeDtypeStruct's sharding
        "['last_device']": [[[0, 4], [4]]],  # one device, the template's
    }
    assert leaves["['last_device']"]["devices"] == [3]
    assert all(leaf["devices"] == [0, 1, 2, 3] for name, leaf in leaves.items()
               if name != "['last_device']")
    assert r["metadata"] == {"step": 7} and r["keys_draw_alike"]
    # a template sharding that cannot hold the stored leaf: a named error, not XLA's
    assert r["indivisible_error"].startswith(
        f"checkpoint {r['bad_path']!r}: leaf ['batch'] (float32(6, 5)) cannot take the "
        f"template's sharding NamedSharding("), r["indivisible_error"]
    assert "partitioned 4 times, but the dimension size is 6" in r["indivisible_error"]


def test_fit_on_four_devices_resumes_bitwise(four):
    # 3 epochs straight vs 2 epochs + a checkpoint + 1 resumed epoch (BatchNorm, Dropout);
    # the resumed run starts from other parameters, which the checkpoint must replace
    r = four["resume"]
    assert r["first_differs"]  # the comparison is not trivially equal
    assert r["state"] is None, r["state"]  # params, opt state, BN statistics, step: bitwise
    assert r["history"] and r["step"] == 3 * 5
    assert r["replicated"]  # the resumed state lives on the 4 devices
    assert r["checkpoint_epoch"] == 3 and r["checkpoint_is_final"] is None, r


# ---------------------------------------------------------------------------------------
# This session's single device: the API, the errors
# ---------------------------------------------------------------------------------------


def _toy(n=12):
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, 4)).astype(np.float32), rng.integers(0, 3, n).astype(np.int32)


NET = fn.Serial([fn.Dense(5), fn.BatchNorm(), fn.ReLU(), fn.Dense(3)])


def _calls():
    x, y = _toy()
    params = draw.params(NET, (4,))
    loss, opt = fn.losses.softmax_cross_entropy, optax.sgd(0.1)
    return {
        "fit": lambda d: train.fit(NET, params, x, y, epochs=1, progress=False, devices=d),
        "make_step": lambda d: train.make_step(NET, loss, opt, devices=d),
        "evaluate": lambda d: train.evaluate(NET, params, x, y, devices=d),
        "predict": lambda d: train.predict(NET, params, x, devices=d),
    }


def _two_axes():
    return jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("batch", "model"))


BAD = [
    ("int", lambda: 4, TypeError, r"devices must be None, 'all', a sequence of jax devices, "
     r"or a jax.sharding.Mesh with a 'data' axis, got int 4"),
    ("string", lambda: "gpu", ValueError, r"devices must be .*, got the string 'gpu'"),
    ("one-device", lambda: jax.devices()[0], TypeError,
     r"devices must be .*, got a single device .*; pass a sequence, \[device\]"),
    ("empty", lambda: [], ValueError, r"devices must name at least one device, got an empty"),
    ("not-devices", lambda: [0, 1], TypeError,
     r"devices\[0\] must be a jax device \(e.g. from jax.devices\(\)\), got int 0"),
    ("duplicates", lambda: [jax.devices()[0]] * 2, ValueError, r"devices must be distinct"),
    ("mesh-axes", _two_axes, ValueError,
     r"devices: a Mesh needs an axis named 'data' \(or a single axis\), got axes "
     r"\('batch', 'model'\)"),
]


@pytest.mark.parametrize("where", ["fit", "make_step", "evaluate", "predict"])
@pytest.mark.parametrize(("value", "error", "match"), [b[1:] for b in BAD],
                         ids=[b[0] for b in BAD])
def test_bad_devices_are_named_errors(where, value, error, match):
    with pytest.raises(error, match=rf"^{where}: {match}"):
        _calls()[where](value())


def test_one_device_mesh_matches_no_mesh():
    x, y = _toy(10)  # batches of 4: the last one partial
    params = draw.params(NET, (4,), seed=1)
    kw = dict(epochs=2, batch_size=4, progress=False, optimizer=optax.sgd(0.1, momentum=0.9))
    plain = train.fit(NET, params, x, y, **kw)
    meshed = train.fit(NET, params, x, y, devices=[jax.devices()[0]], **kw)
    chex.assert_trees_all_close(meshed.state, plain.state, rtol=1e-6, atol=1e-7)
    mesh = parallel.data_mesh("all")
    assert parallel.data_mesh(mesh) is mesh and parallel.data_axis(mesh) == "data"
    assert parallel.num_shards(mesh) == jax.local_device_count()
    np.testing.assert_allclose(
        train.predict(NET, plain.params, x, state=plain.model_state, devices=mesh),
        train.predict(NET, plain.params, x, state=plain.model_state), rtol=1e-6, atol=1e-7)


def test_data_on_devices_is_checked_where_it_lives():
    x, y = _toy()
    params = draw.params(NET, (4,))
    xd = jnp.asarray(x).at[5, 2].set(jnp.nan)
    kw = dict(epochs=1, progress=False, devices="all")
    with pytest.raises(ValueError, match=r"^fit: training data: x contains non-finite values "
                                         r"\(first at example 5\)$"):
        train.fit(NET, params, xd, y, **kw)
    with pytest.raises(ValueError, match=r"^fit: training data: labels must lie in \[0, 3\), "
                                         r"got values in \[0, 7\]$"):
        train.fit(NET, params, jnp.asarray(x), jnp.asarray(y).at[0].set(7), **kw)
    with pytest.raises(ValueError, match=r"^evaluate: y contains non-finite values$"):
        train.evaluate(NET, params, jnp.asarray(x), jnp.full((12, 3), jnp.nan),
                       loss=fn.losses.quadratic, devices="all")


def test_shard_batch_and_pad_rows():
    mesh = parallel.data_mesh([jax.devices()[0]])
    x = np.arange(6.0).reshape(3, 2)
    assert parallel.pad_rows(x, 4).shape == (4, 2) and parallel.pad_rows(x, 3) is x
    np.testing.assert_array_equal(parallel.pad_rows(jnp.asarray(x), 2)[3], 0.0)
    xs = parallel.shard_batch(x, mesh)
    assert xs.sharding == parallel.batch_sharding(mesh)
    assert parallel.replicate(xs, mesh).sharding.is_fully_replicated
    if jax.local_device_count() > 1:  # pragma: no cover (the session has one device)
        with pytest.raises(ValueError, match="shard_batch: every array needs"):
            parallel.shard_batch(x, parallel.data_mesh("all"))


def test_parallel_helpers_name_a_bad_argument():
    """Were ZeroDivisionError, IndexError, numpy's TypeError, AttributeError."""
    with pytest.raises(ValueError, match=r"pad_rows: multiple must be a positive int, got 0"):
        parallel.pad_rows(np.ones(3), 0)
    for a in (np.float32(1), [1, 2, 3]):
        with pytest.raises(TypeError, match=r"pad_rows: a must be a numpy or jax array"):
            parallel.pad_rows(a, 4)
    for call in (parallel.replicate, parallel.shard_batch):
        with pytest.raises(TypeError, match=r"mesh must be a jax.sharding.Mesh .* got str "
                                            r"'all'"):
            call({"a": jnp.ones(2)}, "all")
