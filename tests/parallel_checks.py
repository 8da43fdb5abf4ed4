"""Data-parallel checks on 4 simulated CPU devices, run by tests/test_parallel.py in a
subprocess (JAX must see the 4 devices from the start; the test session keeps one).

Prints one JSON object: for every check what was compared, and either ``None`` (equal
within the float32 tolerance) or the assertion message. The tests assert on it.
Run it alone with ``python tests/parallel_checks.py``.
"""

from __future__ import annotations

import os

# 4 CPU devices; LLVM's optimisation level 0 compiles in 2/3 of the time (every program
# compared is compiled alike, and sharding is decided before LLVM runs)
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_"
                           "device_count=4 --xla_backend_optimization_level=0").strip()
os.environ["JAX_PLATFORMS"] = "cpu"

import dataclasses
import json
import logging
import tempfile
import time

import jax
import jax.numpy as jnp
import jax_session
import numpy as np
import optax
from compile_log import CompileLog

import funcnet as fn
from funcnet import checkpoint, parallel, train

jax.config.update("jax_enable_compilation_cache", False)  # count real compilations
jax_session.share_identical_programs()  # as in the test processes (tests/conftest.py)
jax_session.share_one_mlir_context()

RTOL, ATOL = 1e-5, 1e-6  # float32, as the loop-vs-scan comparisons of test_train_state


def mismatch(a, b, rtol=RTOL, atol=ATOL):
    """``None`` if the pytrees ``a`` and ``b`` agree leaf by leaf, else the message."""
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    if len(la) != len(lb):
        return f"{len(la)} leaves vs {len(lb)}"
    try:
        for u, v in zip(la, lb, strict=True):
            np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=rtol, atol=atol)
    except AssertionError as e:
        return str(e)
    return None


# What the network's first layer receives, recorded when the program is compiled
# (jax.debug.inspect_array_sharding): under LABEL, the sharding of the batch.
SEEN: dict[str, list[dict]] = {}
LABEL = [""]


def _record(label, shape):
    def callback(sharding):
        if not hasattr(sharding, "spec"):  # one device: a GSPMDSharding, nothing to record
            return
        axes = sharding.spec[0] if len(sharding.spec) else None
        axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        parts = int(np.prod([sharding.mesh.shape[a] for a in axes]))
        SEEN.setdefault(label, []).append(  # one entry per compiled program
            {"sharding": str(sharding.spec), "devices": len(sharding.device_set),
             "parts": parts, "rows": int(shape[0]),
             "rows_per_device": -(-int(shape[0]) // parts)})  # XLA pads the last
    return callback


@dataclasses.dataclass(frozen=True, repr=False)
class Probe(fn.Layer):
    """The identity, recording the sharding of its input when compiled."""

    def forward(self, params, state, x, *, key=None, train=False):
        jax.debug.inspect_array_sharding(x, callback=_record(LABEL[0], x.shape))
        return x, state


def mlp():
    return fn.Serial([Probe(), fn.Dense(16, use_bias=False), fn.BatchNorm(), fn.ReLU(),
                      fn.Dropout(0.3), fn.Dense(3)])


def main():
    t0 = time.perf_counter()
    out: dict = {"devices": jax.device_count()}
    rng = np.random.default_rng(0)
    n = 68  # = 4 * 16 + 4 = 2 * 30 + 8: a partial last batch for both batch sizes
    x = rng.normal(size=(n, 6)).astype(np.float32)
    y = rng.integers(0, 3, n).astype(np.int32)
    mesh = parallel.data_mesh("all")
    net = mlp()
    params = net.init(jax.random.key(0), (6,))
    # a bias before BatchNorm has a zero gradient up to rounding, which an optimizer that
    # normalises (Adam) turns into full steps of either sign: SGD with momentum here
    opt = optax.sgd(0.1, momentum=0.9)
    log = CompileLog()
    logging.getLogger("jax").addHandler(log)
    logging.getLogger("jax").setLevel(logging.DEBUG)

    # the data already sharded along the batch, the parameters replicated (the first fit)
    xs, ys = parallel.shard_batch((jnp.asarray(x), jnp.asarray(y)), mesh)
    to_host = []  # shapes of the jax arrays numpy is asked to copy to the host
    array_impl = type(xs)
    original = array_impl.__array__

    def spy(self, *args, **kwargs):
        to_host.append(tuple(self.shape))
        return original(self, *args, **kwargs)

    # -- fit: 4 devices == 1 device; both gradient modes x batch sizes 16 and 30 (the
    # epoch modes alternate); 3 epochs of 5 or 3 steps, the last batch partial -----------
    fits, reference = [], {}
    for grad, bs, mode in [("autodiff", 16, "scan"), ("autodiff", 30, "loop"),
                           ("manual", 16, "loop"), ("manual", 30, "scan")]:
        kw = dict(epochs=3, batch_size=bs, grad=grad, optimizer=opt, epoch_mode=mode,
                  progress=False, seed=1)
        one = reference[grad, bs, mode] = train.fit(net, params, x, y, **kw)
        name = LABEL[0] = f"fit {grad} bs={bs} {mode}"
        log.messages.clear()
        with jax.log_compiles(True):
            if not fits:  # given sharded data and replicated parameters
                array_impl.__array__ = spy
                try:
                    four = train.fit(net, parallel.replicate(params, mesh), xs, ys,
                                     devices=mesh, **kw)
                finally:
                    array_impl.__array__ = original
            else:
                four = train.fit(net, params, x, y, devices="all", **kw)
        leaf = four.params[1]["w"]
        fits.append({
            "name": name, "state": mismatch(four.state, one.state),
            "history": mismatch(four.history["loss"], one.history["loss"]),
            "params_replicated": bool(leaf.sharding.is_fully_replicated),
            "params_devices": len(leaf.sharding.device_set),
            "compilations": {"one_step": log.count("one_step"),
                             "scan_epoch": log.count("scan_epoch")},
            "batch": SEEN.get(name),
            "loss_moved": one.history["loss"][-1] < one.history["loss"][0],
        })
    out["fit"] = fits

    # -- fit on a batch source on 4 devices == fit on arrays on one device (batches of
    # 30: 30, 30, 8, the last at its true size for BatchNorm) ---------------------------
    LABEL[0] = "fit stream"
    log.messages.clear()
    with jax.log_compiles(True):
        streamed = train.fit(net, params, fn.data.ArrayBatches(x, y, 30, seed=1),
                             devices="all", epochs=3, grad="autodiff", optimizer=opt,
                             progress=False, seed=1)
    one = reference["autodiff", 30, "loop"]
    out["stream"] = {
        "state": mismatch(streamed.state, one.state),
        "history": mismatch(streamed.history["loss"], one.history["loss"]),
        "params_replicated": bool(streamed.params[1]["w"].sharding.is_fully_replicated),
        "batch": SEEN.get("fit stream"), "compilations": log.count("step"),
    }

    out["sharded_input"] = {  # the first fit's
        "x_shards": [list(s.data.shape) for s in xs.addressable_shards],
        "copied_to_host": [list(s) for s in to_host if s and s[0] == n],
    }

    # -- make_step: sharded inputs, one compilation per batch shape, equal steps ---------
    loss = fn.losses.softmax_cross_entropy
    state0 = train.init_state(params, opt, net.init_state((6,)))
    single = train.make_step(net, loss, opt, donate=False)
    multi = train.make_step(net, loss, opt, devices=mesh)
    s1, s4 = state0, train.init_state(params, opt, net.init_state((6,)))
    steps = []
    for lo, hi in [(0, 16), (16, 46)]:  # 16 and 30 rows
        w = np.ones(hi - lo, np.float32)
        w[-2:] = 0.0  # the caller's own zero weights go through as they are
        LABEL[0] = f"make_step rows={hi - lo}"
        s1, m1 = single(s1, x[lo:hi], y[lo:hi], w)
        s4, m4 = multi(s4, x[lo:hi], y[lo:hi], w)
        steps.append({"rows": hi - lo, "state": mismatch(s4, s1), "metrics": mismatch(m4, m1),
                      "batch": SEEN.get(LABEL[0])})
    before = multi._cache_size()
    for lo in (38, 8):  # two more batches of 30 rows: no new program
        s4, _ = multi(s4, x[lo:lo + 30], y[lo:lo + 30], np.ones(30, np.float32))
    # what the compiled program receives: 30 rows travel as 32 (zero rows, cut off inside)
    xb, yb, wb = parallel.shard_batch([parallel.pad_rows(a, 4) for a in
                                       (x[:30], y[:30], np.ones(30, np.float32))], mesh)
    shardings = multi.jitted.lower(parallel.replicate(s4, mesh), xb, yb, wb,
                                   30).compile().input_shardings[0]
    out["make_step"] = {
        "steps": steps,
        "inputs": [str(shardings[i].spec) for i in (1, 2, 3)],
        "input_devices": len(shardings[1].device_set),
        "state_inputs_replicated": all(s.is_fully_replicated
                                       for s in jax.tree_util.tree_leaves(shardings[0])),
        "x_shard_rows": [s.data.shape[0] for s in xb.addressable_shards],
        "new_programs": multi._cache_size() - before,
        "state_out_replicated": all(a.sharding.is_fully_replicated
                                    for a in jax.tree_util.tree_leaves(s4)),
    }

    # -- a 2 x 2 mesh: data x model (the model axis holds replicas) ----------------------
    grid = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "model"))
    LABEL[0] = "make_step 2x2"
    w = np.ones(30, np.float32)
    s2, _ = train.make_step(net, loss, opt, donate=False, devices=grid)(state0, x[:30], y[:30], w)
    ref, _ = single(state0, x[:30], y[:30], w)
    out["mesh_2x2"] = {"state": mismatch(s2, ref), "batch": SEEN.get(LABEL[0])}

    # -- evaluate / predict: 4 devices == 1 device (batches of 30: 30, 30, 8) ------------
    trained = reference["autodiff", 16, "scan"]
    kw = dict(batch_size=30, state=trained.model_state)
    e1 = train.evaluate(net, trained.params, x, y, **kw)
    p1 = train.predict(net, trained.params, x, **kw)
    LABEL[0] = "evaluate"
    e4 = train.evaluate(net, trained.params, xs, ys, devices="all", **kw)
    LABEL[0] = "predict"
    p4 = train.predict(net, trained.params, x, devices=list(jax.devices()), **kw)
    out["evaluate_predict"] = {
        "evaluate": mismatch(e4, e1), "predict": mismatch(p4, p1),
        "predict_shape": list(p4.shape), "evaluate_batch": SEEN.get("evaluate"),
        "predict_batch": SEEN.get("predict"),
    }

    # -- checkpoints: restored with the template's shardings; fit resumes bitwise --------
    LABEL[0] = "checkpoint"
    with tempfile.TemporaryDirectory() as tmp:
        out["checkpoint"] = checkpoint_checks(tmp, mesh, rng)
        out["resume"] = resume_checks(tmp, mesh, net, params, x, y, opt)
    out["seconds"] = time.perf_counter() - t0
    print(json.dumps(out))


def _raw(a):
    """A leaf as numpy (a typed PRNG key as its key data)."""
    if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
        a = jax.random.key_data(a)
    return np.asarray(a)


def checkpoint_checks(tmp, mesh, rng):
    """Save arrays of every sharding, restore them into a template of zeros (other keys)
    with the same shardings: per leaf, whether the sharding is the template's, the values
    the saved ones (bitwise), and where the shards are. Plus a template sharding that
    cannot hold its leaf."""
    rep, rows = parallel.replicated(mesh), parallel.batch_sharding(mesh)
    last = jax.sharding.SingleDeviceSharding(jax.devices()[3])
    normal = lambda *shape: rng.normal(size=shape).astype(np.float32)  # noqa: E731
    saved = {
        "params": {"w": jax.device_put(normal(6, 3), rep), "b": jax.device_put(normal(3), rep)},
        "step": jax.device_put(np.int32(7), rep),
        "batch": jax.device_put(normal(8, 5), rows),
        "bf16": jax.device_put(normal(8).astype(jnp.bfloat16), rows),
        "keys": jax.device_put(jax.random.split(jax.random.key(1), 8), rows),
        "key": jax.device_put(jax.random.key(2), rep),
        "last_device": jax.device_put(normal(4), last),
        "struct": jax.device_put(normal(12, 2), rows),
    }
    path = os.path.join(tmp, "sharded.ckpt")
    checkpoint.save(path, saved, metadata={"step": 7})

    def blank(a):
        if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
            other = jax.random.split(jax.random.key(9), a.shape) if a.shape else jax.random.key(9)
            return jax.device_put(other, a.sharding)
        return jax.device_put(jnp.zeros(a.shape, a.dtype), a.sharding)

    template = jax.tree_util.tree_map(blank, saved)
    template["struct"] = jax.ShapeDtypeStruct((12, 2), jnp.float32, sharding=rows)
    restored, meta = checkpoint.restore(path, template)
    on_host, _ = checkpoint.load(path)  # every leaf as numpy, keys as their key data
    leaves = {}
    for (p, r), t, s in zip(jax.tree_util.tree_leaves_with_path(restored),
                            jax.tree_util.tree_leaves(template),
                            jax.tree_util.tree_leaves(saved), strict=True):
        name = jax.tree_util.keystr(p)
        leaves[name] = {
            "same_sharding": r.sharding == t.sharding,
            "same_values": bool(np.array_equal(_raw(r), _raw(s))) and r.dtype == s.dtype,
            "file_values": bool(np.array_equal(on_host[name], _raw(s))),
            "devices": sorted(d.id for d in r.sharding.device_set),
            "shards": sorted([list(x.index[0].indices(r.shape[0]))[:2] if r.ndim else [],
                              list(x.data.shape)] for x in r.addressable_shards),
        }
    # a key restored into a sharded template draws what the saved key draws
    draws = bool(np.array_equal(jax.random.normal(restored["keys"][5], (3,)),
                                jax.random.normal(saved["keys"][5], (3,))))
    bad = os.path.join(tmp, "six_rows.ckpt")
    checkpoint.save(bad, {"batch": normal(6, 5)})
    try:
        checkpoint.restore(bad, {"batch": jax.ShapeDtypeStruct((6, 5), jnp.float32,
                                                               sharding=rows)})
        error = None
    except checkpoint.CheckpointError as e:
        error = str(e)
    return {"leaves": leaves, "metadata": meta, "keys_draw_alike": draws,
            "indivisible_error": error, "path": path, "bad_path": bad}


def resume_checks(tmp, mesh, net, params, x, y, opt):
    """fit on the mesh for 3 epochs, against 2 epochs with a checkpoint then a resumed
    third epoch that starts from other parameters (which the checkpoint must replace)."""
    path = os.path.join(tmp, "run.ckpt")
    kw = dict(batch_size=16, optimizer=opt, seed=3, progress=False, epoch_mode="loop",
              devices=mesh)
    full = train.fit(net, params, x, y, epochs=3, **kw)
    first = train.fit(net, params, x, y, epochs=2, checkpoint=path, **kw)
    others = net.init(jax.random.key(5), (6,))
    resumed = train.fit(net, others, x, y, epochs=3, checkpoint=path, resume=True, **kw)
    stored, _ = checkpoint.load(path)
    return {
        "state": mismatch(resumed.state, full.state, rtol=0, atol=0),
        "history": resumed.history["loss"] == full.history["loss"],
        "first_differs": mismatch(first.state, full.state, rtol=0, atol=0) is not None,
        "replicated": all(a.sharding.is_fully_replicated and len(a.sharding.device_set) == 4
                          for a in jax.tree_util.tree_leaves(resumed.state)),
        "step": int(resumed.state.step),
        "checkpoint_epoch": checkpoint.read_metadata(path)["epoch"],
        "checkpoint_is_final": mismatch(list(stored.values()),
                                        jax.tree_util.tree_leaves(full.state), rtol=0, atol=0),
    }


if __name__ == "__main__":
    main()
