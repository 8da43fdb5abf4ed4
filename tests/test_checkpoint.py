"""funcnet.checkpoint: exact round trips, template checks, corrupt files, atomic saves."""

from __future__ import annotations

import json
import os
import zipfile

import draw
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from funcnet import checkpoint, models, train


def _tree():
    net = models.mlp([5], 3)
    params = draw.params(net, (4,))
    opt_state = optax.adam(1e-3).init(params)
    return {
        "state": train.TrainState(params, opt_state, jnp.asarray(7, jnp.int32)),
        "key": jax.random.key(42),
        "np64": np.linspace(0, 1, 6).reshape(2, 3),  # float64 numpy survives as float64
        "flags": np.array([True, False]),
        "bf16": jnp.asarray([1.5, -2.25], jnp.bfloat16),
        "count": 3,
    }


def _leaves(tree):
    def raw(a):
        if hasattr(a, "dtype") and jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
            return np.asarray(jax.random.key_data(a))
        return np.asarray(a)

    return [raw(a) for a in jax.tree_util.tree_leaves(tree)]


def test_round_trip_is_exact(tmp_path):
    tree = _tree()
    path = tmp_path / "a.ckpt"
    checkpoint.save(path, tree, metadata={"epoch": 3, "note": "hi"})
    restored, meta = checkpoint.restore(path, tree)
    assert meta == {"epoch": 3, "note": "hi"}
    assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(tree)
    for a, b in zip(_leaves(restored), _leaves(tree), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)
    assert isinstance(restored["state"].params[1]["w"], jax.Array)
    assert isinstance(restored["np64"], np.ndarray) and restored["np64"].dtype == np.float64
    assert jax.random.key_impl(restored["key"]) == jax.random.key_impl(tree["key"])
    # The restored key draws the same numbers.
    np.testing.assert_array_equal(
        jax.random.normal(restored["key"], (3,)), jax.random.normal(tree["key"], (3,))
    )
    assert checkpoint.read_metadata(path)["epoch"] == 3


def test_restored_arrays_are_committed_where_the_template_is(tmp_path):
    """A fresh template (``init``, ``jnp``: uncommitted) gives uncommitted arrays, which
    mix with arrays on any device as the template's did; a template placed on a device
    gives arrays committed there."""
    device = jax.devices()[0]
    loose = {"w": jnp.arange(3.0), "key": jax.random.key(1)}
    placed = jax.device_put(loose, device)
    path = tmp_path / "c.ckpt"
    checkpoint.save(path, loose)
    for template, committed in ((loose, False), (placed, True)):
        assert [a.committed for a in jax.tree_util.tree_leaves(template)] == [committed] * 2
        restored, _ = checkpoint.restore(path, template)
        leaves = jax.tree_util.tree_leaves(restored)
        assert [a.committed for a in leaves] == [committed] * 2, committed
        assert all(a.devices() == {device} for a in leaves)
        for a, b in zip(_leaves(restored), _leaves(loose), strict=True):
            np.testing.assert_array_equal(a, b)


def test_format_is_plain_npz_with_json_manifest_keyed_by_paths(tmp_path):
    path = tmp_path / "a.ckpt"
    tree = {"layer": {"w": np.ones((2, 2), np.float32), "b": np.zeros(2, np.float32)}}
    checkpoint.save(path, tree)
    with zipfile.ZipFile(path) as zf:
        manifest = json.loads(zf.read(checkpoint.MANIFEST))
    assert manifest["format"] == "funcnet-checkpoint" and manifest["version"] == 1
    assert [e["path"] for e in manifest["leaves"]] == ["['layer']['b']", "['layer']['w']"]
    # Readable by numpy with pickling disabled.
    with np.load(path, allow_pickle=False) as f:
        np.testing.assert_array_equal(f["leaf_00001"], np.ones((2, 2)))
    leaves, _ = checkpoint.load(path)
    np.testing.assert_array_equal(leaves["['layer']['w']"], np.ones((2, 2)))


def test_mismatched_template_raises_clear_errors(tmp_path):
    tree = _tree()
    path = tmp_path / "a.ckpt"
    checkpoint.save(path, tree)

    wider = dict(tree)
    wider["state"] = tree["state"]._replace(params=draw.params(models.mlp([6], 3), (4,)))
    with pytest.raises(checkpoint.CheckpointError, match=r"\.params\[1\]\['b'\].*\(5,\).*\(6,\)"):
        checkpoint.restore(path, wider)

    deeper = dict(tree)
    deeper["state"] = tree["state"]._replace(params=draw.params(models.mlp([5, 5], 3), (4,)))
    with pytest.raises(checkpoint.CheckpointError, match="tree structure differs"):
        checkpoint.restore(path, deeper)

    as_f64 = dict(tree, np64=tree["np64"].astype(np.float32))
    with pytest.raises(checkpoint.CheckpointError, match=r"\['np64'\].*float64.*float32"):
        checkpoint.restore(path, as_f64)

    missing = {k: v for k, v in tree.items() if k != "count"}
    with pytest.raises(checkpoint.CheckpointError, match=r"not in the template: \[\"\['count'\]\"\]"):
        checkpoint.restore(path, missing)


def test_truncated_and_corrupt_files_raise_clear_errors(tmp_path):
    tree = _tree()
    path = tmp_path / "a.ckpt"
    checkpoint.save(path, tree)
    blob = path.read_bytes()

    for cut in (len(blob) // 2, len(blob) - 30, 10, 0):
        bad = tmp_path / f"cut{cut}.ckpt"
        bad.write_bytes(blob[:cut])
        with pytest.raises(checkpoint.CheckpointError, match="truncated or corrupt"):
            checkpoint.restore(bad, tree)

    # Flip one byte inside the first array's data: the CRC-32 check catches it.
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("leaf_00000.npy")
    offset = info.header_offset + 30 + len(info.filename) + len(info.extra) + info.file_size - 1
    flipped = bytearray(blob)
    flipped[offset] ^= 0xFF
    bad = tmp_path / "flip.ckpt"
    bad.write_bytes(bytes(flipped))
    with pytest.raises(checkpoint.CheckpointError, match="truncated or corrupt"):
        checkpoint.restore(bad, tree)

    with pytest.raises(checkpoint.CheckpointError, match="no such file"):
        checkpoint.restore(tmp_path / "nope.ckpt", tree)
    other = tmp_path / "other.npz"
    np.savez(other, a=np.ones(2))
    with pytest.raises(checkpoint.CheckpointError, match="not a funcnet checkpoint"):
        checkpoint.restore(other, tree)


@pytest.mark.parametrize("where", ["mid_write", "replace"])
def test_failed_save_leaves_old_checkpoint_readable(tmp_path, monkeypatch, where):
    path = tmp_path / "a.ckpt"
    old = {"w": np.arange(6, dtype=np.float32), "b": np.ones(3, np.float32)}
    checkpoint.save(path, old, metadata={"version": "old"})
    new = {"w": -np.arange(6, dtype=np.float32), "b": np.zeros(3, np.float32)}

    if where == "mid_write":  # the second array write dies half-way through the archive
        real = np.lib.format.write_array
        calls = []

        def flaky(fp, array, **kw):
            calls.append(1)
            if len(calls) == 2:
                fp.write(b"partial")
                raise OSError("disk full (simulated)")
            return real(fp, array, **kw)

        monkeypatch.setattr(np.lib.format, "write_array", flaky)
    else:

        def boom(src, dst):
            raise OSError("rename failed (simulated)")

        monkeypatch.setattr(os, "replace", boom)

    with pytest.raises(OSError, match="simulated"):
        checkpoint.save(path, new, metadata={"version": "new"})
    monkeypatch.undo()

    restored, meta = checkpoint.restore(path, old)
    assert meta == {"version": "old"}
    np.testing.assert_array_equal(restored["w"], old["w"])
    assert os.listdir(tmp_path) == ["a.ckpt"]  # no temporary file left behind
    checkpoint.save(path, new, metadata={"version": "new"})
    restored, meta = checkpoint.restore(path, new)
    assert meta == {"version": "new"}
    np.testing.assert_array_equal(restored["w"], new["w"])


def test_save_argument_errors(tmp_path):
    with pytest.raises(TypeError, match="JSON-serialisable"):
        checkpoint.save(tmp_path / "a.ckpt", {"w": np.ones(2)}, metadata={"f": object()})
    with pytest.raises(ValueError, match="does not exist"):
        checkpoint.save(tmp_path / "no" / "a.ckpt", {"w": np.ones(2)})
    with pytest.raises(TypeError, match="leaves must be arrays"):
        checkpoint.save(tmp_path / "a.ckpt", {"w": "text"})
    assert os.listdir(tmp_path) == []


def test_restore_into_an_abstract_template_with_prng_keys(tmp_path):
    tree = {"key": jax.random.key(3), "keys": jax.random.split(jax.random.key(1), 2),
            "rbg": jax.random.key(5, impl="rbg"), "w": jnp.arange(3.0)}  # fmt: skip
    path = tmp_path / "k.ckpt"
    checkpoint.save(path, tree)
    restored, _ = checkpoint.restore(path, jax.eval_shape(lambda: tree))
    for name in ("key", "keys", "rbg"):
        assert jax.random.key_impl(restored[name]) == jax.random.key_impl(tree[name])
        np.testing.assert_array_equal(jax.random.key_data(restored[name]),
                                      jax.random.key_data(tree[name]))  # fmt: skip
    np.testing.assert_array_equal(restored["w"], tree["w"])
    # An abstract key with a sharding: the restored keys have it.
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    key_type = jax.eval_shape(lambda: tree["key"]).dtype
    template = {**jax.eval_shape(lambda: tree),
                "keys": jax.ShapeDtypeStruct((2,), key_type, sharding=sharding)}  # fmt: skip
    restored, _ = checkpoint.restore(path, template)
    assert restored["keys"].sharding == sharding
    # A wrong abstract key (another impl) is a clear mismatch.
    template = {**jax.eval_shape(lambda: tree), "rbg": jax.eval_shape(lambda: tree["key"])}
    with pytest.raises(checkpoint.CheckpointError, match=r"leaf \['rbg'\] is prng_key:rbg"):
        checkpoint.restore(path, template)


def test_byte_order_is_not_compared_and_restores_native(tmp_path):
    path = tmp_path / "be.ckpt"
    checkpoint.save(path, {"a": np.arange(3, dtype=">i4"), "b": np.arange(2, dtype="<f8")})
    template = {"a": np.zeros(3, ">i4"), "b": np.zeros(2, ">f8")}
    restored, _ = checkpoint.restore(path, template)
    assert restored["a"].dtype == np.dtype("int32") and restored["a"].dtype.isnative
    assert restored["b"].dtype == np.dtype("float64") and restored["b"].dtype.isnative
    np.testing.assert_array_equal(restored["a"], [0, 1, 2])
    np.testing.assert_array_equal(restored["b"], [0.0, 1.0])
    # A real dtype difference still raises, and says two different dtypes.
    with pytest.raises(checkpoint.CheckpointError, match=r"int32\(3,\) in the file but array "
                       r"int64\(3,\) in the template"):  # fmt: skip
        checkpoint.restore(path, {"a": np.zeros(3, ">i8"), "b": template["b"]})


@pytest.mark.parametrize("metadata, key, where", [
    ({1: "one", "1": "uno"}, "1", r"in metadata$"),
    ({"config": {"layers": [{"sizes": {3: 4}}]}}, "3", r"in metadata\['config'\]\['layers'\]\[0\]\['sizes'\]"),
    ([{"a": 1}, {1.5: 0}], r"1\.5", r"in metadata\[1\]$"),
    ({None: 0}, "None", "in metadata"),
], ids=["int", "nested", "float-in-list", "none"])  # fmt: skip
def test_metadata_dict_keys_must_be_strings(tmp_path, metadata, key, where):
    with pytest.raises(TypeError, match=rf"checkpoint.save: metadata must have str dict keys.* "
                                        rf"the key {key} .*{where}"):  # fmt: skip
        checkpoint.save(tmp_path / "a.ckpt", {"w": np.ones(2)}, metadata=metadata)
    assert os.listdir(tmp_path) == []


def test_resume_from_mid_run_checkpoint_is_bitwise_identical(tmp_path):
    s = np.random.default_rng(0)
    x = s.normal(size=(40, 6)).astype(np.float32)
    y = s.integers(0, 3, size=40).astype(np.int32)
    net = models.mlp([8], 3)
    params = draw.params(net, (6,), seed=1)
    kw = dict(optimizer=optax.adam(1e-2), batch_size=16, seed=3, progress=False,
              epoch_mode="loop")  # fmt: skip

    full = train.fit(net, params, x, y, epochs=4, **kw)
    path = tmp_path / "run.ckpt"
    first = train.fit(net, params, x, y, epochs=2, checkpoint=path, **kw)
    assert checkpoint.read_metadata(path)["epoch"] == 2
    resumed = train.fit(net, params, x, y, epochs=4, checkpoint=path, resume=True, **kw)

    assert not np.array_equal(first.params[-1]["w"], full.params[-1]["w"])
    for a, b in zip(jax.tree_util.tree_leaves(resumed.state),
                    jax.tree_util.tree_leaves(full.state), strict=True):  # fmt: skip
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert resumed.history["loss"] == full.history["loss"]
    assert int(resumed.state.step) == 4 * 3
