"""Multi-process checks over localhost, run by tests/test_multiprocess.py: two copies of
this script form one JAX runtime (``jax.distributed``, CPU collectives over gloo), each
process with 2 simulated CPU devices, 4 devices in all.

Usage::

    python tests/multiprocess_checks.py <scenario> <process_id> <num_processes> <port> <outdir>

Every process runs the scenario and writes what it found to
``<outdir>/<scenario>.<process_id>.json`` (scenarios may write more files there); the
test asserts on those files. A scenario is a function ``(outdir) -> dict`` registered in
:data:`SCENARIOS` with :func:`scenario`; every process calls it (collectives need all of
them), so it must make the same JAX calls in the same order on each.
"""

from __future__ import annotations

import os
import sys

# Before jax is imported: 2 CPU devices per process, CPU only (the collectives are gloo's)
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=2").strip()
os.environ["JAX_PLATFORMS"] = "cpu"

import json
import time
from collections.abc import Callable

import jax
import numpy as np

jax.config.update("jax_cpu_collectives_implementation", "gloo")

SCENARIOS: dict[str, Callable[[str], dict]] = {}


def scenario(fn: Callable[[str], dict]) -> Callable[[str], dict]:
    """Register ``fn`` under its name."""
    SCENARIOS[fn.__name__] = fn
    return fn


def global_mesh() -> jax.sharding.Mesh:
    """All devices of all processes along one ``"data"`` axis (process 0's first)."""
    return jax.sharding.Mesh(np.array(jax.devices()), ("data",))


def global_array(host: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
    """``host`` (the same on every process) as one array over ``sharding``'s devices;
    each process supplies only its own shards."""
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def local_shards_equal(a: jax.Array, host: np.ndarray) -> bool:
    """Whether every shard this process holds of ``a`` is ``host`` at its index (bitwise)."""
    if jax.numpy.issubdtype(a.dtype, jax.dtypes.prng_key):
        a = jax.random.key_data(a)
    return all(np.array_equal(np.asarray(s.data), host[s.index]) and s.data.dtype == host.dtype
               for s in a.addressable_shards)


# ---------------------------------------------------------------------------------------
# Scenarios
# ---------------------------------------------------------------------------------------


@scenario
def psum(outdir: str) -> dict:
    """A jitted sum over 4 devices of 2 processes: every process gets the global sum."""
    mesh = global_mesh()
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    host = np.arange(1.0, 9.0, dtype=np.float32) ** 2  # 2 rows on each device
    x = global_array(host, rows)
    total = jax.jit(jax.numpy.sum, out_shardings=jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec()))(x)
    return {
        "process_index": jax.process_index(), "process_count": jax.process_count(),
        "device_count": jax.device_count(), "local_device_count": jax.local_device_count(),
        "device_processes": [d.process_index for d in mesh.devices.flat],
        "x_fully_addressable": x.is_fully_addressable,
        "local_rows": sorted(s.index[0].indices(8)[:2] for s in x.addressable_shards),
        "sum": float(total.addressable_data(0)), "expected": float(host.sum()),
    }


def _state_tree() -> tuple[dict, dict]:
    """A params-like tree (numpy, the same on every process) and where each leaf goes:
    replicated params, step and key; a batch and per-row keys split by rows."""
    rng = np.random.default_rng(0)
    host = {
        "params": {"dense": {"w": rng.normal(size=(6, 3)).astype(np.float32),
                             "b": rng.normal(size=(3,)).astype(np.float32)}},
        "step": np.int32(7),
        "key": np.asarray(jax.random.key_data(jax.random.key(3))),
        "batch": rng.normal(size=(8, 5)).astype(np.float32),
        "keys": np.asarray(jax.random.key_data(jax.random.split(jax.random.key(4), 8))),
    }
    placement = {"params": {"dense": {"w": "replicated", "b": "replicated"}},
                 "step": "replicated", "key": "replicated", "batch": "rows", "keys": "rows"}
    return host, placement


def _on_mesh(host: dict, placement: dict, fill=None) -> dict:
    """``host`` laid out over the global mesh per ``placement`` (``fill``: the same
    shapes filled with that value instead, other keys for key leaves)."""
    mesh = global_mesh()
    shardings = {"replicated": jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()),
                 "rows": jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))}

    def place(path, a, where):
        name = jax.tree_util.keystr(path)
        if fill is not None:
            a = np.full_like(a, fill)
        arr = global_array(np.asarray(a), shardings[where])
        return jax.random.wrap_key_data(arr) if name in ("['key']", "['keys']") else arr

    return jax.tree_util.tree_map_with_path(place, host, placement)


@scenario
def checkpoint(outdir: str) -> dict:
    """Save replicated and row-sharded arrays spread over both processes (process 0
    writes), then every process restores into a template with the same global shardings."""
    from funcnet import checkpoint as ckpt

    host, placement = _state_tree()
    tree = _on_mesh(host, placement)
    if jax.process_index() == 0:
        np.savez(os.path.join(outdir, "expected.npz"),
                 **{jax.tree_util.keystr(p): a
                    for p, a in jax.tree_util.tree_leaves_with_path(host)})
    path = os.path.join(outdir, "state.ckpt")
    if jax.process_index() == 0:  # a slow file system: the others must wait for the file
        write = ckpt._write_archive

        def slow_write(*args):
            time.sleep(1.0)
            write(*args)

        ckpt._write_archive = slow_write
    try:
        ckpt.save(path, tree, metadata={"epoch": 2})
    finally:
        if jax.process_index() == 0:
            ckpt._write_archive = write
    exists_after_save = os.path.isfile(path)  # on process 1 too: save waited for process 0
    template = _on_mesh(host, placement, fill=1)
    restored, meta = ckpt.restore(path, template)
    leaves = {}
    for (p, r), t, h in zip(jax.tree_util.tree_leaves_with_path(restored),
                            jax.tree_util.tree_leaves(template),
                            jax.tree_util.tree_leaves(host), strict=True):
        leaves[jax.tree_util.keystr(p)] = {
            "same_sharding": r.sharding == t.sharding,
            "fully_addressable": r.is_fully_addressable,
            "local_devices": sorted(s.device.id for s in r.addressable_shards),
            "values": local_shards_equal(r, np.asarray(h)),
            "template_differs": not local_shards_equal(t, np.asarray(h)),
            "key": bool(jax.numpy.issubdtype(r.dtype, jax.dtypes.prng_key)),
        }
    return {"exists_after_save": exists_after_save, "metadata": meta, "leaves": leaves,
            "local_device_ids": sorted(d.id for d in jax.local_devices())}


@scenario
def save_error(outdir: str) -> dict:
    """Process 0 fails half-way through writing (a simulated full disk): it raises its
    own error, the other process does not hang but raises too, and nothing is left."""
    from funcnet import checkpoint as ckpt

    host, placement = _state_tree()
    tree = _on_mesh(host, placement)
    if jax.process_index() == 0:
        write = ckpt._write_archive

        def disk_full(f, leaves, treedef, metadata):
            f.write(b"PK partial")
            raise OSError(28, "No space left on device (simulated)")

        ckpt._write_archive = disk_full
    path = os.path.join(outdir, "state.ckpt")
    try:
        ckpt.save(path, tree, metadata={"epoch": 1})
        error = None
    except Exception as e:
        error = {"type": type(e).__name__, "message": str(e)}
    finally:
        if jax.process_index() == 0:
            ckpt._write_archive = write
    left = sorted(n for n in os.listdir(outdir) if n.startswith(".state.ckpt") or
                  n == "state.ckpt")  # no file, no temporary
    # the two processes are still in step: a second save works
    ckpt.save(path, tree, metadata={"epoch": 2})
    return {"error": error, "left_after_failure": left,
            "epoch_after_retry": ckpt.read_metadata(path)["epoch"]}


def fit_problem(n: int = 75):
    """The data and networks the "fit" scenario trains, and the test compares with one
    process: an MLP with Dropout (a partial last batch) and a conv net with BatchNorm."""
    import funcnet as fn

    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 6, 6, 1)).astype(np.float32)
    y = rng.integers(0, 3, size=n).astype(np.int32)
    mlp = fn.Serial([fn.Flatten(), fn.Dense(8), fn.ReLU(), fn.Dropout(0.25), fn.Dense(3)])
    bn = fn.Serial([fn.Conv(3, 3), fn.BatchNorm(), fn.ReLU(), fn.Flatten(), fn.Dense(3)])
    return x, y, mlp, bn


FIT_KW = {"epochs": 2, "seed": 5, "progress": False}


@scenario
def fit(outdir: str) -> dict:
    """Data-parallel ``fit`` over both processes' 4 devices: (1) the MLP on the whole data
    set given as arrays in each process (each reads its rows of every batch), with a
    checkpoint and validation; (2) the BatchNorm net streamed from a memory-mapped file
    through ``ArrayBatches(process=...)``, each process reading only its rows."""
    import optax

    from funcnet import data, train

    pid = jax.process_index()
    x, y, mlp, bn = fit_problem()
    params = mlp.init(jax.random.key(1), (6, 6, 1))
    first = train.fit(mlp, params, x, y, batch_size=16, optimizer=optax.adam(1e-2),
                      devices="all", validation_data=(x[:20], y[:20]),
                      checkpoint=os.path.join(outdir, "fit.ckpt"), **FIT_KW)
    np.save(os.path.join(outdir, f"x.{pid}.npy"), x[:64])  # each process its own copy
    np.save(os.path.join(outdir, f"y.{pid}.npy"), y[:64])
    xm = np.load(os.path.join(outdir, f"x.{pid}.npy"), mmap_mode="r")
    ym = np.load(os.path.join(outdir, f"y.{pid}.npy"), mmap_mode="r")
    source = data.ArrayBatches(xm, ym, 16, seed=5, process=(pid, jax.process_count()))
    second = train.fit(bn, bn.init(jax.random.key(2), (6, 6, 1)), source,
                       optimizer=optax.sgd(0.05), devices="all", **FIT_KW)
    leaves = {}
    for name, result in (("mlp", first), ("bn", second)):
        tree = (result.params, result.model_state)
        for i, leaf in enumerate(jax.tree.leaves(tree)):
            assert leaf.is_fully_replicated and not leaf.is_fully_addressable
            leaves[f"{name}.{i}"] = np.asarray(leaf.addressable_data(0))
    np.savez(os.path.join(outdir, f"fit_params.{pid}.npz"), **leaves)
    return {"mlp_history": first.history, "bn_history": second.history,
            "steps": [int(first.state.step.addressable_data(0)),
                      int(second.state.step.addressable_data(0))],
            "batch_rows": source.batch_size // jax.process_count()}


def main(argv: list[str]) -> None:
    if len(argv) != 5 or argv[0] not in SCENARIOS:
        sys.exit(f"usage: {os.path.basename(__file__)} <scenario> <process_id> "
                 f"<num_processes> <port> <outdir>; scenarios: {sorted(SCENARIOS)}")
    name, process_id, num_processes, port, outdir = argv
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{int(port)}",
                               num_processes=int(num_processes), process_id=int(process_id),
                               initialization_timeout=60)
    result = SCENARIOS[name](outdir)
    out = os.path.join(outdir, f"{name}.{int(process_id)}.json")
    with open(f"{out}.tmp", "w") as f:
        json.dump(result, f)
    os.replace(f"{out}.tmp", out)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1:])
