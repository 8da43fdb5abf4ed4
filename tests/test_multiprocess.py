"""Two processes, one JAX runtime (``jax.distributed`` over localhost, gloo collectives,
2 simulated CPU devices each): the runtime sums across processes; checkpoints of state
spread over both processes are written once by process 0, restored by every process
with the template's global shardings, and read back bitwise by a single process; a
failed write fails every process instead of hanging one. (And a single process saving
host arrays never starts a jax backend to ask for the process count.)

Each test starts tests/multiprocess_checks.py twice (one scenario, process 0 and 1) and
asserts on the JSON / npz files they write. A new scenario is a function registered
there plus a test here calling :func:`run_scenario`. Those tests are in the slow tier
(``-m slow``, which CI runs): each starts two JAX processes.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from funcnet import checkpoint

HELPER = os.path.join(os.path.dirname(__file__), "multiprocess_checks.py")
TIMEOUT = 120  # seconds for a whole scenario; jax starts in ~2-4 s per process


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(name: str, outdir, num_processes: int, timeout: float) -> tuple[list, list]:
    """Start the processes and wait for all of them; as soon as one fails (or the time is
    up) kill the rest, which would otherwise wait for it in a collective. Returns the
    exit codes (``None``: killed on timeout) and each process's output."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    port = _free_port()
    procs, logs = [], []
    for pid in range(num_processes):
        log = open(os.path.join(outdir, f"{name}.{pid}.log"), "w+")
        logs.append(log)
        procs.append(subprocess.Popen(
            [sys.executable, HELPER, name, str(pid), str(num_processes), str(port),
             str(outdir)], stdout=log, stderr=subprocess.STDOUT, env=env))
    deadline = time.monotonic() + timeout
    try:
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            if any(p.returncode not in (None, 0) for p in procs):
                break
            time.sleep(0.05)
    finally:
        codes = [p.poll() for p in procs]
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    outputs = []
    for log in logs:
        log.seek(0)
        outputs.append(log.read())
        log.close()
    return codes, outputs


def run_scenario(name: str, outdir, num_processes: int = 2,
                 timeout: float = TIMEOUT) -> list[dict]:
    """Run scenario ``name`` in ``num_processes`` processes writing to ``outdir``; return
    each process's JSON result, in process order. Fails the test with every process's
    output when one exits non-zero or they do not finish within ``timeout`` seconds."""
    for _attempt in range(3):
        codes, outputs = _launch(name, outdir, num_processes, timeout)
        # the port picked was taken in between by someone else: pick another
        if not any(c not in (None, 0) and "already in use" in out.lower()
                   for c, out in zip(codes, outputs, strict=True)):
            break
    if codes != [0] * num_processes:
        what = {None: f"killed after {timeout} s"}
        report = "\n".join(
            f"--- process {pid}: {what.get(c, f'exit code {c}')}\n{out[-3000:]}"
            for pid, (c, out) in enumerate(zip(codes, outputs, strict=True)))
        pytest.fail(f"multi-process scenario {name!r} failed:\n{report}")
    results = []
    for pid in range(num_processes):
        with open(os.path.join(outdir, f"{name}.{pid}.json")) as f:
            results.append(json.load(f))
    return results


def _temporaries(outdir) -> list[str]:
    return [n for n in os.listdir(outdir) if n.startswith(".") or n.endswith(".tmp")]


@pytest.mark.slow  # two JAX processes each: the slow tier, which CI runs
def test_a_jitted_sum_spans_both_processes(tmp_path):
    results = run_scenario("psum", tmp_path)
    for pid, r in enumerate(results):
        assert r["process_index"] == pid and r["process_count"] == 2
        assert r["device_count"] == 4 and r["local_device_count"] == 2
        assert r["device_processes"] == [0, 0, 1, 1] and not r["x_fully_addressable"]
        # each process supplied only its own rows, and got the sum of all of them
        assert r["local_rows"] == [[4 * pid, 4 * pid + 2], [4 * pid + 2, 4 * pid + 4]]
        assert r["sum"] == r["expected"] == float(sum(i * i for i in range(1, 9)))


@pytest.mark.slow  # two JAX processes each: the slow tier, which CI runs
def test_checkpoint_of_state_spread_over_two_processes(tmp_path):
    results = run_scenario("checkpoint", tmp_path)
    names = ["['batch']", "['key']", "['keys']", "['params']['dense']['b']",
             "['params']['dense']['w']", "['step']"]
    for r in results:
        # process 0 wrote slowly: save returned on process 1 only once the file was there
        assert r["exists_after_save"] and r["metadata"] == {"epoch": 2}
        assert sorted(r["leaves"]) == names
        for name, leaf in r["leaves"].items():
            assert leaf["same_sharding"], (name, leaf)  # the template's global sharding
            assert not leaf["fully_addressable"], (name, leaf)  # spread over both
            assert leaf["local_devices"] == r["local_device_ids"], (name, leaf)
            assert leaf["values"] and leaf["template_differs"], (name, leaf)  # bitwise
            assert leaf["key"] == (name in ("['key']", "['keys']")), (name, leaf)
    assert results[0]["local_device_ids"] != results[1]["local_device_ids"]
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["state.ckpt", "expected.npz"]
        + [f"checkpoint.{p}.{e}" for p in (0, 1) for e in ("json", "log")])  # no temporaries

    # one process, one device: the file holds exactly what the two processes held
    path = tmp_path / "state.ckpt"
    with np.load(tmp_path / "expected.npz") as f:
        expected = dict(f)
    template = {
        "params": {"dense": {"w": np.zeros((6, 3), np.float32),
                             "b": np.zeros(3, np.float32)}},
        "step": np.int32(0),
        "key": jax.random.key(0),
        "batch": jax.numpy.zeros((8, 5), np.float32),
        "keys": jax.random.split(jax.random.key(0), 8),
    }
    restored, meta = checkpoint.restore(path, template)
    assert meta == {"epoch": 2}
    for p, leaf in jax.tree_util.tree_leaves_with_path(restored):
        name = jax.tree_util.keystr(p)
        raw = jax.random.key_data(leaf) if name in ("['key']", "['keys']") else leaf
        assert np.asarray(raw).dtype == expected[name].dtype, name
        np.testing.assert_array_equal(np.asarray(raw), expected[name], err_msg=name)
    assert isinstance(restored["params"]["dense"]["w"], np.ndarray)
    assert restored["batch"].sharding == template["batch"].sharding  # this process's device
    assert int(restored["step"]) == 7


@pytest.mark.slow  # two JAX processes each: the slow tier, which CI runs
def test_a_failed_write_on_process_zero_fails_every_process(tmp_path):
    first, second = run_scenario("save_error", tmp_path)
    # process 0 raised its own error, process 1 did not wait forever but raised as well
    assert first["error"] == {"type": "OSError",
                              "message": "[Errno 28] No space left on device (simulated)"}
    path = os.path.join(tmp_path, "state.ckpt")
    assert second["error"] == {
        "type": "RuntimeError",
        "message": f"checkpoint.save: process 0 failed to write {path!r} (its own error "
                   f"says why)"}
    # the failed save left nothing; both still in step afterwards: the next save worked
    assert first["left_after_failure"] == second["left_after_failure"] == []
    assert first["epoch_after_retry"] == second["epoch_after_retry"] == 2
    assert _temporaries(tmp_path) == []
    assert checkpoint.read_metadata(path) == {"epoch": 2}


def test_saving_host_arrays_alone_does_not_start_jax(tmp_path):
    # save asks for the process count only where jax runs already (a jax.Array leaf) or
    # jax.distributed was set up: saving numpy arrays must not start a backend (on a GPU
    # machine that would take the GPU's memory)
    script = (
        "import numpy as np\n"
        "from jax._src import xla_bridge\n"
        "from funcnet import checkpoint\n"
        "path = __import__('sys').argv[1]\n"
        "checkpoint.save(path, {'w': np.arange(3.0)}, metadata={'epoch': 1})\n"
        "tree, meta = checkpoint.restore(path, {'w': np.zeros(3)})\n"
        "assert meta == {'epoch': 1} and tree['w'].tolist() == [0.0, 1.0, 2.0]\n"
        "print(xla_bridge.backends_are_initialized())\n")
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "a.ckpt")],
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "False"


@pytest.mark.slow  # two JAX processes each: the slow tier, which CI runs
def test_fit_over_two_processes_is_the_one_process_fit(tmp_path):
    """Data-parallel fit over 2 processes x 2 devices (arrays, and a memory-mapped stream
    that each process reads its part of) trains as one process does, and the checkpoint
    it wrote restores in this single process."""
    import optax

    sys.path.insert(0, os.path.dirname(__file__))
    from multiprocess_checks import FIT_KW, fit_problem

    from funcnet import train

    results = run_scenario("fit", tmp_path)
    x, y, mlp, bn = fit_problem()
    mlp_ref = train.fit(mlp, mlp.init(jax.random.key(1), (6, 6, 1)), x, y, batch_size=16,
                        optimizer=optax.adam(1e-2), validation_data=(x[:20], y[:20]), **FIT_KW)
    bn_ref = train.fit(bn, bn.init(jax.random.key(2), (6, 6, 1)), x[:64], y[:64],
                       batch_size=16, optimizer=optax.sgd(0.05), **FIT_KW)
    assert [r["steps"] for r in results] == [[10, 8]] * 2
    assert results[0]["batch_rows"] == 8
    with np.load(tmp_path / "fit_params.0.npz") as f0, \
            np.load(tmp_path / "fit_params.1.npz") as f1:
        got = [dict(f0), dict(f1)]
    for name, ref in (("mlp", mlp_ref), ("bn", bn_ref)):
        leaves = jax.tree.leaves((ref.params, ref.model_state))
        for i, leaf in enumerate(leaves):
            np.testing.assert_array_equal(got[0][f"{name}.{i}"], got[1][f"{name}.{i}"])
            np.testing.assert_allclose(got[0][f"{name}.{i}"], np.asarray(leaf), rtol=1e-5,
                                       atol=1e-6, err_msg=f"{name} leaf {i}")
        for r in results:
            for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
                np.testing.assert_allclose(
                    np.asarray(r[f"{name}_history"][key], float),
                    np.asarray(ref.history[key], float), rtol=1e-5, err_msg=key)
    # the checkpoint fit wrote (process 0, after every epoch) restores here, on one device
    template = {"state": train.init_state(mlp.init(jax.random.key(9), (6, 6, 1)),
                                          optax.adam(1e-2))}
    restored, meta = checkpoint.restore(tmp_path / "fit.ckpt", template)
    assert meta["epoch"] == 2 and int(restored["state"].step) == 10
    for i, leaf in enumerate(jax.tree.leaves(restored["state"].params)):
        np.testing.assert_array_equal(np.asarray(leaf), got[0][f"mlp.{i}"])
