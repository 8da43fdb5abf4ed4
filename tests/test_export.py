"""export: round trip in a fresh process that never defines the network, symbolic batch,
clear errors for damaged files and wrong inputs, atomic writes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import draw
import jax
import numpy as np
import pytest

import funcnet as fn
from funcnet import export

SHAPE = (8, 8, 1)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    net = fn.models.digits_cnn()
    params = draw.params(net, SHAPE)
    path = tmp_path_factory.mktemp("export") / "digits.fnx"
    export.save(path, net, params, SHAPE, metadata={"note": "test"})
    return net, params, path


@pytest.mark.slow  # heavier integration check; CI runs the slow tier
def test_round_trip_in_a_fresh_process_for_two_batch_sizes(saved, tmp_path):
    net, params, path = saved
    xs = {f"x{n}": np.asarray(jax.random.normal(jax.random.key(n), (n, *SHAPE))) for n in (1, 5)}
    np.savez(tmp_path / "in.npz", **xs)
    script = textwrap.dedent(
        """
        import sys
        import numpy as np
        from funcnet.export import load  # the loader only: no layers, no network code

        model = load(sys.argv[1])
        xs = np.load(sys.argv[2])
        np.savez(sys.argv[3], **{k: np.asarray(model(xs[k])) for k in xs.files})
        print(model)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(path), str(tmp_path / "in.npz"),
         str(tmp_path / "out.npz")],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "input (N, *(8, 8, 1)) float32 -> output (N, *(10,))" in out.stdout
    ys = np.load(tmp_path / "out.npz")
    for k, x in xs.items():
        assert ys[k].shape == (x.shape[0], 10)
        np.testing.assert_allclose(ys[k], net.apply(params, x), rtol=1e-5, atol=1e-5)


def test_header_records_the_format_and_the_shapes(saved):
    net, _, path = saved
    model = export.load(path)
    h = model.header
    assert h["format_version"] == export.FORMAT_VERSION
    assert (h["input_shape"], h["output_shape"], h["dtype"]) == ([8, 8, 1], [10], "float32")
    assert h["batch"] == "dynamic" and h["metadata"] == {"note": "test"}
    assert h["network"] == repr(net)
    assert model.input_shape == SHAPE and model.output_shape == (10,)
    assert "batch" in str(model.exported.in_avals[0])  # symbolic, not a number


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda d: d[: len(d) // 2], "truncated"),
        (lambda d: d[:30], "truncated"),
        (lambda d: d[:5], "truncated"),
        (lambda d: d[:-1] + bytes([d[-1] ^ 0xFF]), "SHA-256"),
        (lambda d: b"NOTAFILE" + d[8:], "not a funcnet export"),
        (lambda d: d[:8] + (99).to_bytes(4, "little") + d[12:], "format version 99"),
        (lambda d: d + b"junk", "trailing bytes"),
    ],
    ids=["half", "inside-header", "inside-prefix", "flipped-byte", "magic", "version", "junk"],
)
def test_damaged_files_raise_a_clear_error(saved, tmp_path, damage, message):
    _, _, path = saved
    bad = tmp_path / "bad.fnx"
    bad.write_bytes(damage(path.read_bytes()))
    with pytest.raises(export.ExportFormatError, match=message):
        export.load(bad)


def test_wrong_inputs_raise_before_reaching_xla(saved):
    _, _, path = saved
    model = export.load(path)
    with pytest.raises(ValueError, match=r"expected input of shape \('N', 8, 8, 1\).*got shape "
                                         r"\(2, 8, 8\)"):
        model(np.ones((2, 8, 8), np.float32))
    with pytest.raises(ValueError, match=r"got shape \(2, 8, 9, 1\)"):
        model(np.ones((2, 8, 9, 1), np.float32))
    with pytest.raises(TypeError, match="floating"):
        model(np.ones((2, 8, 8, 1), np.int32))
    # float64 (numpy's default) is cast to the exported float32.
    assert model(np.ones((2, 8, 8, 1))).dtype == np.float32


def test_fixed_batch(tmp_path):
    net = fn.Serial([fn.Flatten(), fn.Dense(3)])
    params = draw.params(net, (2, 2))
    path = export.save(tmp_path / "fixed.fnx", net, params, (2, 2), batch=4)
    model = export.load(path)
    assert model(np.ones((4, 2, 2), np.float32)).shape == (4, 3)
    with pytest.raises(ValueError, match=r"expected input of shape \(4, 2, 2\)"):
        model(np.ones((3, 2, 2), np.float32))
    with pytest.raises(ValueError, match="batch"):
        export.save(tmp_path / "x.fnx", net, params, (2, 2), batch=0)


def test_save_checks_params_and_never_leaves_half_written_files(saved, tmp_path, monkeypatch):
    net, params, _ = saved
    target = tmp_path / "model.fnx"
    export.save(target, net, params, SHAPE)
    before = target.read_bytes()
    with pytest.raises(ValueError, match="params do not match"):
        export.save(target, net, params[:-1], SHAPE)
    with pytest.raises(TypeError, match="JSON"):
        export.save(target, net, params, SHAPE, metadata={"bad": object()})

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        export.save(target, net, params, SHAPE)
    assert target.read_bytes() == before  # the old file is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.fnx"]  # no temp files left
