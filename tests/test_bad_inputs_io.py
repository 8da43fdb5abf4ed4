"""Bad inputs to funcnet's I/O: data readers, checkpoints, exports.

One table of (id, call, exception type, regex): every bad argument or damaged file gets a
``ValueError`` / ``TypeError`` (or ``CheckpointError`` / ``ExportFormatError``) whose message
names the argument or the file, raised before any work; never an error from inside numpy,
zipfile, gzip, zlib, json or jax, and never a silently wrong result. Then the positive side
of the same rules (what is accepted) and the cleanup of temporaries left by killed saves.

The files are written once per module into a temporary folder (Fashion-MNIST-like IDX
files, npz archives, checkpoints and exports, then damaged copies of them); only three tiny
networks are exported.
"""

from __future__ import annotations

import gzip
import json
import os
import stat
import struct
import zipfile
from pathlib import Path
from types import SimpleNamespace

import draw
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import funcnet as fn
from funcnet import checkpoint, data, export

CE = checkpoint.CheckpointError
EE = export.ExportFormatError
F_SHAPE = (2, 2)  # the float network's input
ID_SHAPE = (5,)  # the Embedding network's input: 5 ids


# ---------------------------------------------------------------------------------------
# Writing (and damaging) files independently of the code under test
# ---------------------------------------------------------------------------------------


def _idx(arr: np.ndarray, code: int, be: str, shape=None) -> bytes:
    shape = arr.shape if shape is None else shape
    header = struct.pack(">BBBB", 0, 0, code, len(shape)) + struct.pack(f">{len(shape)}I", *shape)
    return header + arr.astype(be).tobytes()


def _rewrite_manifest(src: Path, dst: Path, change) -> Path:
    """Copy a checkpoint with its JSON manifest passed through ``change(manifest)``."""
    with zipfile.ZipFile(src) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    manifest = json.loads(members[checkpoint.MANIFEST])
    manifest = change(manifest) or manifest
    members[checkpoint.MANIFEST] = json.dumps(manifest).encode()
    with zipfile.ZipFile(dst, "w") as zf:
        for name, blob in members.items():
            zf.writestr(name, blob)
    return dst


def _rewrite_header(src: Path, dst: Path, change=None, raw_header: bytes | None = None) -> Path:
    """Copy an export with its JSON header passed through ``change(header)`` (the payload
    and its checksum untouched), or replaced by ``raw_header``."""
    blob = src.read_bytes()
    magic, version, n = struct.unpack_from("<8sIQ", blob)
    header = json.loads(blob[20:20 + n])
    payload = blob[20 + n:]
    if raw_header is None:
        header = change(header) or header
        raw_header = json.dumps(header).encode()
    dst.write_bytes(struct.pack("<8sIQ", magic, version, len(raw_header)) + raw_header + payload)
    return dst


def _drop(key, leaf=None):
    def change(m):
        (m if leaf is None else m["leaves"][leaf]).pop(key)
    return change


def _set(key, value, leaf=None):
    def change(m):
        (m if leaf is None else m["leaves"][leaf])[key] = value
    return change


@pytest.fixture(scope="module")
def c(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad_io")
    rng = np.random.default_rng(0)
    ctx = SimpleNamespace(d=d, p=lambda name: d / name)

    # -- Fashion-MNIST-like IDX files, and broken relatives --------------------------
    images = rng.integers(0, 256, size=(6, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=6).astype(np.uint8)
    ctx.images, ctx.labels = images, labels
    img_blob = _idx(images, 0x08, ">u1")
    (d / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(img_blob))
    (d / "train-labels-idx1-ubyte").write_bytes(_idx(labels, 0x08, ">u1"))
    (d / "img_int32.idx").write_bytes(_idx(images.astype(np.int32), 0x0C, ">i4"))
    (d / "img_f32.idx").write_bytes(_idx(images / np.float32(255), 0x0D, ">f4"))
    (d / "img_2d.idx").write_bytes(_idx(images.reshape(6, -1), 0x08, ">u1"))
    (d / "lab_f32.idx").write_bytes(_idx(labels.astype(np.float32), 0x0D, ">f4"))
    (d / "lab_10.idx").write_bytes(_idx(np.array([0, 1, 10, 2, 3, 4], np.uint8), 0x08, ">u1"))
    (d / "lab_5.idx").write_bytes(_idx(labels[:5], 0x08, ">u1"))
    (d / "lab_2d.idx").write_bytes(_idx(labels.reshape(6, 1), 0x08, ">u1"))
    small = _idx(images[:, :4, :4], 0x08, ">u1")  # (6, 4, 4): 96 data bytes
    gz = gzip.compress(small)
    flipped = bytearray(gz)
    flipped[12] ^= 0xFF  # inside the deflate stream: zlib.error
    (d / "corrupt.gz").write_bytes(bytes(flipped))
    (d / "garbage.gz").write_bytes(b"\x1f\x8b\x08\x00" + b"\x00" * 6 + b"\xff" * 40)
    (d / "trunc.gz").write_bytes(gz[:-10])
    bad_crc = bytearray(gz)
    bad_crc[-8] ^= 0xFF
    (d / "crc.gz").write_bytes(bytes(bad_crc))
    (d / "magic.idx").write_bytes(b"\x01" + small[1:])
    (d / "code.idx").write_bytes(small[:2] + b"\x07" + small[3:])
    (d / "trunc.idx").write_bytes(small[:-2])
    (d / "shape.idx").write_bytes(_idx(images[:, :4, :4], 0x08, ">u1", shape=(7, 4, 4)))
    (d / "trailing.idx").write_bytes(small + b"\x00")
    (d / "ndim0.idx").write_bytes(b"\x00\x00\x08\x00")
    (d / "hdr.idx").write_bytes(small[:9])
    (d / "empty.idx").write_bytes(b"")
    (d / "huge.idx").write_bytes(_idx(np.zeros(4, np.uint8), 0x08, ">u1", shape=(2**32 - 1,) * 3))
    (d / "folder").mkdir()
    (d / "a_file").write_text("not a folder")

    # -- npz ---------------------------------------------------------------------------
    x8 = images[:3, :4, :4]
    np.savez(d / "ok.npz", x=x8, y=np.array([0, 1, 2]))
    np.savez(d / "int64.npz", x=x8.astype(np.int64), y=np.array([0, 1, 2]))
    np.savez(d / "obj.npz", x=np.array([None, 1], dtype=object), y=np.array([0, 1]))
    nan = x8.astype(np.float32)
    nan[1, 0, 0] = np.nan
    np.savez(d / "nan.npz", x=nan, y=np.array([0, 1, 2]))
    np.savez(d / "x5d.npz", x=np.zeros((3, 2, 2, 2, 2), np.float32), y=np.array([0, 1, 2]))
    np.savez(d / "ylen.npz", x=x8, y=np.array([0, 1]))
    np.savez(d / "yfloat.npz", x=x8, y=np.array([0.0, 1.0, 2.0]))
    np.save(d / "arr.npy", x8)
    (d / "text.npz").write_text("x,y\n1,2\n")

    # -- checkpoints -------------------------------------------------------------------
    ctx.tree = {"b": np.zeros(2, np.float32), "step": np.int32(3),
                "w": np.arange(6, dtype=np.float32).reshape(3, 2)}  # fmt: skip
    good = d / "good.ckpt"
    checkpoint.save(good, ctx.tree, metadata={"epoch": 1})
    blob = good.read_bytes()
    (d / "cut.ckpt").write_bytes(blob[: len(blob) // 2])
    np.savez(d / "plain.npz", a=np.ones(2))
    damaged = {
        "dtype_unknown": _set("dtype", "float99", leaf=2),
        "dtype_null": _set("dtype", None, leaf=2),
        "dtype_object": _set("dtype", "object", leaf=2),
        "no_shape": _drop("shape", leaf=2),
        "no_dtype": _drop("dtype", leaf=2),
        "no_member": _drop("member", leaf=2),
        "member_absent": _set("member", "leaf_99999.npy", leaf=2),
        "shape_str": _set("shape", "abc", leaf=2),
        "kind_bad": _set("kind", 5, leaf=2),
        "no_leaves": _drop("leaves"),
        "no_format": _drop("format"),
        "version_2": _set("version", 2),
        "manifest_list": lambda m: [m],
    }
    for name, change in damaged.items():
        _rewrite_manifest(good, d / f"{name}.ckpt", change)

    # -- exports: a float network, an integer-input (Embedding) one, a CUDA-only one ----
    ctx.fnet = fn.Serial([fn.Flatten(), fn.Dense(3)])
    ctx.fparams = draw.params(ctx.fnet, F_SHAPE)
    ctx.enet = fn.Serial([fn.Embedding(10, 4), fn.Flatten(), fn.Dense(3)])
    ctx.eparams = draw.params(ctx.enet, ID_SHAPE, seed=1)
    fpath = export.save(d / "f.fnx", ctx.fnet, ctx.fparams, F_SHAPE)
    epath = export.save(d / "e.fnx", ctx.enet, ctx.eparams, ID_SHAPE, dtype=jnp.int32)
    export.save(d / "cuda.fnx", ctx.fnet, ctx.fparams, F_SHAPE, platforms=("cuda",))
    ctx.fmodel, ctx.emodel = export.load(fpath), export.load(epath)
    (d / "cut.fnx").write_bytes(fpath.read_bytes()[:40])
    _rewrite_header(fpath, d / "no_dtype.fnx", _drop("dtype"))
    _rewrite_header(fpath, d / "dtype_unknown.fnx", _set("dtype", "float99"))
    _rewrite_header(fpath, d / "dtype_lies.fnx", _set("dtype", "float64"))
    _rewrite_header(fpath, d / "shape_bad.fnx", _set("input_shape", "ab"))
    _rewrite_header(fpath, d / "shape_lies.fnx", _set("input_shape", [2, 3]))
    _rewrite_header(fpath, d / "batch_bad.fnx", _set("batch", 0))
    _rewrite_header(fpath, d / "no_payload_bytes.fnx", _drop("payload_bytes"))
    _rewrite_header(fpath, d / "not_json.fnx", raw_header=b"{not json")
    return ctx


def _ids(n, dtype=np.int32, hi=10):
    return np.random.default_rng(n).integers(0, hi, size=(n, *ID_SHAPE)).astype(dtype)


# ---------------------------------------------------------------------------------------
# The table: (id, call, exception, regex naming the argument or the file)
# ---------------------------------------------------------------------------------------

P = "train-images-idx3-ubyte.gz"
L = "train-labels-idx1-ubyte"
BAD_INPUTS = [
    # -- data.read_idx -------------------------------------------------------------------
    ("read_idx/gzip-corrupt-stream", lambda c: data.read_idx(c.p("corrupt.gz")),
     ValueError, r"corrupt\.gz.*gzip"),
    ("read_idx/gzip-garbage", lambda c: data.read_idx(c.p("garbage.gz")),
     ValueError, r"garbage\.gz.*gzip"),
    ("read_idx/gzip-truncated", lambda c: data.read_idx(c.p("trunc.gz")),
     ValueError, r"trunc\.gz.*(gzip|cannot read)"),
    ("read_idx/gzip-bad-crc", lambda c: data.read_idx(c.p("crc.gz")),
     ValueError, r"crc\.gz.*(gzip|cannot read)"),
    ("read_idx/bad-magic", lambda c: data.read_idx(c.p("magic.idx")),
     ValueError, r"magic\.idx.*bad magic number 01000803"),
    ("read_idx/unknown-type-code", lambda c: data.read_idx(c.p("code.idx")),
     ValueError, r"code\.idx.*unknown IDX type code 0x07"),
    ("read_idx/payload-truncated", lambda c: data.read_idx(c.p("trunc.idx")),
     ValueError, r"trunc\.idx.*truncated.*needs 96 data bytes, found 94"),
    ("read_idx/shape-not-payload", lambda c: data.read_idx(c.p("shape.idx")),
     ValueError, r"shape\.idx.*header shape \(7, 4, 4\).*needs 112 data bytes, found 96"),
    ("read_idx/trailing-bytes", lambda c: data.read_idx(c.p("trailing.idx")),
     ValueError, r"trailing\.idx.*trailing bytes"),
    ("read_idx/huge-shape", lambda c: data.read_idx(c.p("huge.idx")),
     ValueError, r"huge\.idx.*needs 79228162458924105385300197375 data bytes, found 4"),
    ("read_idx/zero-dims", lambda c: data.read_idx(c.p("ndim0.idx")),
     ValueError, r"ndim0\.idx.*0 dimensions"),
    ("read_idx/header-truncated", lambda c: data.read_idx(c.p("hdr.idx")),
     ValueError, r"hdr\.idx.*truncated inside the header"),
    ("read_idx/empty-file", lambda c: data.read_idx(c.p("empty.idx")),
     ValueError, r"empty\.idx.*too short"),
    ("read_idx/missing-file", lambda c: data.read_idx(c.p("nope.idx")),
     ValueError, r"nope\.idx.*cannot read"),
    ("read_idx/directory", lambda c: data.read_idx(c.p("folder")),
     ValueError, r"folder.*cannot read"),
    ("read_idx/path-int", lambda c: data.read_idx(3),
     TypeError, r"read_idx: path must be a str or os\.PathLike, got 3"),
    # -- data.load_mnist ---------------------------------------------------------------
    ("load_mnist/int32-images", lambda c: data.load_mnist(c.p("img_int32.idx"), c.p(L)),
     TypeError, r"img_int32\.idx.*must be uint8.*got int32"),
    ("load_mnist/float-images", lambda c: data.load_mnist(c.p("img_f32.idx"), c.p(L)),
     TypeError, r"img_f32\.idx.*must be uint8.*got float32"),
    ("load_mnist/2d-images", lambda c: data.load_mnist(c.p("img_2d.idx"), c.p(L)),
     ValueError, r"img_2d\.idx.*3-D IDX array \(N, H, W\), got shape \(6, 784\)"),
    ("load_mnist/float-labels", lambda c: data.load_mnist(c.p(P), c.p("lab_f32.idx")),
     TypeError, r"lab_f32\.idx.*integer dtype, got float32"),
    ("load_mnist/label-10", lambda c: data.load_mnist(c.p(P), c.p("lab_10.idx")),
     ValueError, r"lab_10\.idx.*\[0, 10\), got values in \[0, 10\]"),
    ("load_mnist/5-labels-6-images", lambda c: data.load_mnist(c.p(P), c.p("lab_5.idx")),
     ValueError, r"lab_5\.idx'\): 6 images but 5 labels"),
    ("load_mnist/2d-labels", lambda c: data.load_mnist(c.p(P), c.p("lab_2d.idx")),
     ValueError, r"lab_2d\.idx.*1-D IDX array \(N,\), got shape \(6, 1\)"),
    ("load_mnist/num_classes-0", lambda c: data.load_mnist(c.p(P), c.p(L), num_classes=0),
     ValueError, r"num_classes must be a positive int.*got 0"),
    ("load_mnist/corrupt-gzip-images", lambda c: data.load_mnist(c.p("corrupt.gz"), c.p(L)),
     ValueError, r"corrupt\.gz.*gzip"),
    # -- data.load_npz -----------------------------------------------------------------
    ("load_npz/scale-nan", lambda c: data.load_npz(c.p("ok.npz"), scale=float("nan")),
     ValueError, r"ok\.npz.*scale must be a positive finite number.*nan"),
    ("load_npz/scale-inf", lambda c: data.load_npz(c.p("ok.npz"), scale=np.inf),
     ValueError, r"ok\.npz.*scale must be a positive finite number.*inf"),
    ("load_npz/scale-negative", lambda c: data.load_npz(c.p("ok.npz"), scale=-255),
     ValueError, r"ok\.npz.*scale.*-255"),
    ("load_npz/scale-str", lambda c: data.load_npz(c.p("ok.npz"), scale="255"),
     TypeError, r"ok\.npz.*scale.*'255'"),
    ("load_npz/npy-file", lambda c: data.load_npz(c.p("arr.npy")),
     ValueError, r"arr\.npy.*expected an \.npz archive.*\.npy"),
    ("load_npz/text-file", lambda c: data.load_npz(c.p("text.npz")),
     ValueError, r"text\.npz.*not an \.npz archive"),
    ("load_npz/int64-images-need-scale", lambda c: data.load_npz(c.p("int64.npz")),
     TypeError, r"int64\.npz.*int64.*scale"),
    ("load_npz/object-array", lambda c: data.load_npz(c.p("obj.npz")),
     ValueError, r"obj\.npz.*(pickle|Object arrays)"),
    ("load_npz/nan-images", lambda c: data.load_npz(c.p("nan.npz")),
     ValueError, r"nan\.npz.*non-finite.*example 1"),
    ("load_npz/missing-key", lambda c: data.load_npz(c.p("ok.npz"), x_key="images"),
     ValueError, r"ok\.npz.*no array named 'images'; the file has \['x', 'y'\]"),
    ("load_npz/5d-images", lambda c: data.load_npz(c.p("x5d.npz")),
     ValueError, r"x5d\.npz.*\(N, H, W\) or \(N, H, W, C\), got \(3, 2, 2, 2, 2\)"),
    ("load_npz/count-mismatch", lambda c: data.load_npz(c.p("ylen.npz")),
     ValueError, r"ylen\.npz.*3 images but 2 labels"),
    ("load_npz/float-labels", lambda c: data.load_npz(c.p("yfloat.npz")),
     TypeError, r"yfloat\.npz.*integer dtype, got float64"),
    ("load_npz/missing-file", lambda c: data.load_npz(c.p("nope.npz")),
     ValueError, r"nope\.npz.*not a readable \.npz"),
    ("load_npz/x_key-int", lambda c: data.load_npz(c.p("ok.npz"), x_key=0),
     TypeError, r"ok\.npz.*x_key must be a str, got 0"),
    # -- data.digits -------------------------------------------------------------------
    ("digits/test_size-1", lambda c: data.digits(test_size=1.0),
     ValueError, r"digits: test_size must be a fraction in \(0, 1\), got 1\.0"),
    ("digits/seed-negative", lambda c: data.digits(seed=-1),
     ValueError, r"digits: seed must be an int in \[0, 2\*\*32\), got -1"),
    ("digits/seed-str", lambda c: data.digits(seed="0"),
     ValueError, r"digits: seed must be an int.*'0'"),
    # -- data.check_dataset / check_labels ---------------------------------------------
    ("check_dataset/count-mismatch",
     lambda c: data.check_dataset(np.zeros((4, 2), np.float32), np.zeros(3, np.int32)),
     ValueError, r"data: x and y must have the same number of examples, got 4"),
    ("check_dataset/int-x",
     lambda c: data.check_dataset(np.zeros((4, 2), np.int32), np.zeros(4, np.int32)),
     TypeError, r"x must have a floating dtype.*got int32"),
    ("check_dataset/nan-x",
     lambda c: data.check_dataset(np.array([[0.0], [np.inf]]), np.zeros(2, np.int32)),
     ValueError, r"x contains non-finite values \(first at example 1\)"),
    ("check_dataset/float-x-for-ids",
     lambda c: data.check_dataset(np.zeros((4, 2)), np.zeros(4, np.int32), integer_x=True),
     TypeError, r"integer input \(ids\), got x of dtype float64"),
    ("check_dataset/empty",
     lambda c: data.check_dataset(np.zeros((0, 2)), np.zeros(0, np.int32)),
     ValueError, r"data set is empty"),
    ("check_dataset/ragged-x",
     lambda c: data.check_dataset([[0.0], [1.0, 2.0]], [0, 1], where="fit"),
     ValueError, r"fit: x is not a rectangular array"),
    ("check_dataset/string-y",
     lambda c: data.check_dataset(np.zeros((2, 1)), np.array(["a", "b"])),
     TypeError, r"y must be integer labels or floating targets, got dtype <U1"),
    ("check_labels/float", lambda c: data.check_labels(np.array([0.0, 1.0])),
     TypeError, r"labels: labels must have an integer dtype, got float64"),
    ("check_labels/2d", lambda c: data.check_labels(np.zeros((2, 2), np.int32)),
     ValueError, r"labels must have shape \(N,\), got \(2, 2\)"),
    ("check_labels/negative", lambda c: data.check_labels(np.array([0, -3]), 5),
     ValueError, r"labels must lie in \[0, 5\), got values in \[-3, 0\]"),
    ("check_labels/beyond-int32", lambda c: data.check_labels(np.array([0, 2**33], np.uint64)),
     ValueError, r"labels must lie in \[0, 2\*\*31\) \(int32\), got values in \[0, 8589934592\]"),
    ("check_labels/num_classes-str", lambda c: data.check_labels(np.array([0, 1]), "10"),
     TypeError, r"num_classes must be a positive int or None, got '10'"),
    # -- data.write_idx ----------------------------------------------------------------
    ("write_idx/bool", lambda c: data.write_idx(c.p("w.idx"), np.zeros(3, bool)),
     TypeError, r"write_idx: unsupported dtype bool"),
    ("write_idx/missing-folder", lambda c: data.write_idx(c.p("no/w.idx"), np.zeros(3, np.uint8)),
     ValueError, r"write_idx: directory .*no' does not exist"),
    # -- checkpoint.save ---------------------------------------------------------------
    ("ckpt.save/metadata-not-json",
     lambda c: checkpoint.save(c.p("m.ckpt"), c.tree, metadata={"f": object()}),
     TypeError, r"checkpoint\.save: metadata must be JSON-serialisable"),
    ("ckpt.save/metadata-int-key",  # json would make it "1" and drop the colliding key
     lambda c: checkpoint.save(c.p("m.ckpt"), c.tree, metadata={1: "one", "1": "uno"}),
     TypeError, r"checkpoint\.save: metadata must have str dict keys .*got the key 1 \(int\) "
                r"in metadata$"),
    ("ckpt.save/metadata-nested-key",
     lambda c: checkpoint.save(c.p("m.ckpt"), c.tree, metadata={"h": [{"ok": {2: 0}}]}),
     TypeError, r"checkpoint\.save: metadata .*got the key 2 \(int\) in metadata\['h'\]\[0\]"
                r"\['ok'\]"),
    ("ckpt.save/missing-folder", lambda c: checkpoint.save(c.p("no/x.ckpt"), c.tree),
     ValueError, r"checkpoint\.save: directory .*no' does not exist"),
    ("ckpt.save/path-is-directory", lambda c: checkpoint.save(c.p("folder"), c.tree),
     ValueError, r"checkpoint\.save: path .*folder' is a directory; expected a file path"),
    ("ckpt.save/trailing-slash", lambda c: checkpoint.save(str(c.p("new")) + "/", c.tree),
     ValueError, r"checkpoint\.save: path .*new/' names a directory"),
    ("ckpt.save/parent-is-file", lambda c: checkpoint.save(c.p("a_file/x.ckpt"), c.tree),
     ValueError, r"checkpoint\.save: cannot write .*a_file/x\.ckpt'.*a_file' is a file"),
    ("ckpt.save/leaf-string", lambda c: checkpoint.save(c.p("s.ckpt"), {"w": "text"}),
     TypeError, r"checkpoint\.save: leaf \['w'\]: leaves must be arrays or numbers, got str"),
    ("ckpt.save/path-int", lambda c: checkpoint.save(7, c.tree),
     TypeError, r"checkpoint\.save: path must be a str or os\.PathLike, got 7"),
    # -- checkpoint.restore against mismatching templates ------------------------------
    ("ckpt.restore/shape",
     lambda c: checkpoint.restore(c.p("good.ckpt"), dict(c.tree, w=np.zeros((4, 2), np.float32))),
     CE, r"good\.ckpt.*\['w'\] is array float32\(3, 2\) in the file but array float32\(4, 2\)"),
    ("ckpt.restore/dtype",
     lambda c: checkpoint.restore(c.p("good.ckpt"), dict(c.tree, b=np.zeros(2, np.float64))),
     CE, r"good\.ckpt.*\['b'\] is array float32\(2,\) in the file but array float64\(2,\)"),
    ("ckpt.restore/structure",
     lambda c: checkpoint.restore(c.p("good.ckpt"), {"w": c.tree["w"]}),
     CE, r"good\.ckpt.*tree structure differs.*not in the template: \[\"\['b'\]\""),
    ("ckpt.restore/key-for-array",
     lambda c: checkpoint.restore(c.p("good.ckpt"), dict(c.tree, step=jax.random.key(0))),
     CE, r"good\.ckpt.*\['step'\] is array int32\(\) in the file but prng_key:"),
    ("ckpt.restore/missing-file", lambda c: checkpoint.restore(c.p("nope.ckpt"), c.tree),
     CE, r"nope\.ckpt.*no such file"),
    ("ckpt.restore/directory", lambda c: checkpoint.restore(c.p("folder"), c.tree),
     CE, r"folder.*is a directory"),
    ("ckpt.restore/truncated", lambda c: checkpoint.restore(c.p("cut.ckpt"), c.tree),
     CE, r"cut\.ckpt.*truncated or corrupt"),
    ("ckpt.restore/text-file", lambda c: checkpoint.restore(c.p("text.npz"), c.tree),
     CE, r"text\.npz.*truncated or corrupt"),
    ("ckpt.restore/npz-no-manifest", lambda c: checkpoint.restore(c.p("plain.npz"), c.tree),
     CE, r"plain\.npz.*not a funcnet checkpoint"),
    # -- damaged manifests -------------------------------------------------------------
    ("ckpt.restore/dtype-unknown", lambda c: checkpoint.restore(c.p("dtype_unknown.ckpt"), c.tree),
     CE, r"dtype_unknown\.ckpt.*\['w'\].*field 'dtype' is 'float99'"),
    ("ckpt.load/dtype-unknown", lambda c: checkpoint.load(c.p("dtype_unknown.ckpt")),
     CE, r"dtype_unknown\.ckpt.*'dtype'.*'float99'"),
    ("ckpt.load/dtype-null", lambda c: checkpoint.load(c.p("dtype_null.ckpt")),
     CE, r"dtype_null\.ckpt.*field 'dtype' is None"),
    ("ckpt.load/dtype-object", lambda c: checkpoint.load(c.p("dtype_object.ckpt")),
     CE, r"dtype_object\.ckpt.*field 'dtype' is 'object'"),
    ("ckpt.restore/no-shape", lambda c: checkpoint.restore(c.p("no_shape.ckpt"), c.tree),
     CE, r"no_shape\.ckpt.*manifest leaf 2 is missing the field 'shape'"),
    ("ckpt.load/no-dtype", lambda c: checkpoint.load(c.p("no_dtype.ckpt")),
     CE, r"no_dtype\.ckpt.*manifest leaf 2 is missing the field 'dtype'"),
    ("ckpt.load/no-member", lambda c: checkpoint.load(c.p("no_member.ckpt")),
     CE, r"no_member\.ckpt.*manifest leaf 2 is missing the field 'member'"),
    ("ckpt.load/member-absent", lambda c: checkpoint.load(c.p("member_absent.ckpt")),
     CE, r"member_absent\.ckpt.*field 'member' names 'leaf_99999\.npy'"),
    ("ckpt.load/shape-str", lambda c: checkpoint.load(c.p("shape_str.ckpt")),
     CE, r"shape_str\.ckpt.*field 'shape' must be a list of sizes >= 0, got 'abc'"),
    ("ckpt.restore/kind-bad", lambda c: checkpoint.restore(c.p("kind_bad.ckpt"), c.tree),
     CE, r"kind_bad\.ckpt.*field 'kind' is 5"),
    ("ckpt.read_metadata/no-leaves", lambda c: checkpoint.read_metadata(c.p("no_leaves.ckpt")),
     CE, r"no_leaves\.ckpt.*missing the field 'leaves'"),
    ("ckpt.read_metadata/no-format", lambda c: checkpoint.read_metadata(c.p("no_format.ckpt")),
     CE, r"no_format\.ckpt.*missing the field 'format'"),
    ("ckpt.read_metadata/version-2", lambda c: checkpoint.read_metadata(c.p("version_2.ckpt")),
     CE, r"version_2\.ckpt.*format version 2, this funcnet reads version 1"),
    ("ckpt.read_metadata/manifest-list",
     lambda c: checkpoint.read_metadata(c.p("manifest_list.ckpt")),
     CE, r"manifest_list\.ckpt.*not a funcnet-checkpoint manifest"),
    ("ckpt.read_metadata/path-none", lambda c: checkpoint.read_metadata(None),
     TypeError, r"checkpoint\.read_metadata: path must be a str or os\.PathLike, got None"),
    # -- export.save -------------------------------------------------------------------
    ("export.save/platform-tpu9",
     lambda c: export.save(c.p("p.fnx"), c.fnet, c.fparams, F_SHAPE, platforms=("tpu9",)),
     ValueError, r"export\.save: unknown platform 'tpu9'.*'cpu', 'cuda', 'rocm', 'tpu'"),
    ("export.save/platform-cpuu",
     lambda c: export.save(c.p("p.fnx"), c.fnet, c.fparams, F_SHAPE, platforms=("cpu", "cpuu")),
     ValueError, r"unknown platform 'cpuu'.*did you mean 'cpu'\?"),
    ("export.save/platform-gpu",
     lambda c: export.save(c.p("p.fnx"), c.fnet, c.fparams, F_SHAPE, platforms=["gpu"]),
     ValueError, r"unknown platform 'gpu'.*'cuda' \(NVIDIA\) or 'rocm' \(AMD\)"),
    ("export.save/platforms-bare-str",
     lambda c: export.save(c.p("p.fnx"), c.fnet, c.fparams, F_SHAPE, platforms="cpu"),
     TypeError, r"export\.save: platforms must be a sequence.*got 'cpu'"),
    ("export.save/platforms-empty",
     lambda c: export.save(c.p("p.fnx"), c.fnet, c.fparams, F_SHAPE, platforms=()),
     ValueError, r"export\.save: platforms must name at least one"),
    ("export.save/platforms-duplicate",
     lambda c: export.save(c.p("p.fnx"), c.fnet, c.fparams, F_SHAPE, platforms=("cpu", "cpu")),
     ValueError, r"export\.save: platforms has duplicates"),
    ("export.save/int-dtype-float-net",
     lambda c: export.save(c.p("p.fnx"), c.fnet, c.fparams, F_SHAPE, dtype=jnp.int32),
     TypeError, r"export\.save: .*takes floating input; dtype must be a floating dtype.*int32"),
    ("export.save/float-dtype-ids-net",
     lambda c: export.save(c.p("p.fnx"), c.enet, c.eparams, ID_SHAPE, dtype=jnp.float32),
     TypeError, r"export\.save: .*takes integer ids.*Embedding.*got float32"),
    ("export.save/dtype-unknown",
     lambda c: export.save(c.p("p.fnx"), c.fnet, c.fparams, F_SHAPE, dtype="float99"),
     TypeError, r"export\.save: dtype must be a numpy / jax dtype, got 'float99'"),
    ("export.save/batch-0",
     lambda c: export.save(c.p("p.fnx"), c.fnet, c.fparams, F_SHAPE, batch=0),
     ValueError, r"export\.save: batch must be 'dynamic' or a positive int, got 0"),
    ("export.save/batch-str",
     lambda c: export.save(c.p("p.fnx"), c.fnet, c.fparams, F_SHAPE, batch="fixed"),
     ValueError, r"export\.save: batch must be 'dynamic' or a positive int, got 'fixed'"),
    ("export.save/params-mismatch",
     lambda c: export.save(c.p("p.fnx"), c.fnet, c.fparams, (3, 2)),
     ValueError, r"export\.save: params do not match Serial for input shape \(3, 2\)"),
    ("export.save/metadata-not-json",
     lambda c: export.save(c.p("p.fnx"), c.fnet, c.fparams, F_SHAPE, metadata={"f": object()}),
     TypeError, r"export\.save: metadata must be JSON-serializable"),
    ("export.save/metadata-int-key",
     lambda c: export.save(c.p("p.fnx"), c.fnet, c.fparams, F_SHAPE, metadata={"c": {3: 4}}),
     TypeError, r"export\.save: metadata must have str dict keys .*got the key 3 \(int\) in "
                r"metadata\['c'\]"),
    ("export.save/net-not-layer",
     lambda c: export.save(c.p("p.fnx"), lambda x: x, c.fparams, F_SHAPE),
     TypeError, r"export\.save: net must be a funcnet layer"),
    ("export.save/path-is-directory",
     lambda c: export.save(c.p("folder"), c.fnet, c.fparams, F_SHAPE),
     ValueError, r"export\.save: path .*folder' is a directory; expected a file path"),
    ("export.save/parent-is-file",
     lambda c: export.save(c.p("a_file/sub/m.fnx"), c.fnet, c.fparams, F_SHAPE),
     ValueError, r"export\.save: cannot write .*a_file/sub/m\.fnx'.*a_file' is a file"),
    # -- export.load of damaged files --------------------------------------------------
    ("export.load/truncated", lambda c: export.load(c.p("cut.fnx")),
     EE, r"cut\.fnx: truncated"),
    ("export.load/header-no-dtype", lambda c: export.load(c.p("no_dtype.fnx")),
     EE, r"no_dtype\.fnx: corrupt header: field 'dtype' is missing"),
    ("export.load/header-dtype-unknown", lambda c: export.load(c.p("dtype_unknown.fnx")),
     EE, r"dtype_unknown\.fnx: corrupt header: field 'dtype' must name.*'float99'"),
    ("export.load/header-dtype-lies", lambda c: export.load(c.p("dtype_lies.fnx")),
     EE, r"dtype_lies\.fnx: corrupt header: field 'dtype' says 'float64' but the program has "
         r"'float32'"),
    ("export.load/header-shape-bad", lambda c: export.load(c.p("shape_bad.fnx")),
     EE, r"shape_bad\.fnx: corrupt header: field 'input_shape' must be a list"),
    ("export.load/header-shape-lies", lambda c: export.load(c.p("shape_lies.fnx")),
     EE, r"shape_lies\.fnx: corrupt header: field 'input_shape' says \[2, 3\]"),
    ("export.load/header-batch-bad", lambda c: export.load(c.p("batch_bad.fnx")),
     EE, r"batch_bad\.fnx: corrupt header: field 'batch' must be 'dynamic' or a positive int"),
    ("export.load/header-no-payload-size", lambda c: export.load(c.p("no_payload_bytes.fnx")),
     EE, r"no_payload_bytes\.fnx: corrupt header: field 'payload_bytes' is missing"),
    ("export.load/header-not-json", lambda c: export.load(c.p("not_json.fnx")),
     EE, r"not_json\.fnx: corrupt header \(JSONDecodeError"),
    ("export.load/directory", lambda c: export.load(c.p("folder")),
     EE, r"folder: is a directory"),
    ("export.load/path-int", lambda c: export.load(5),
     TypeError, r"export\.load: path must be a str or os\.PathLike, got 5"),
    # -- calling an ExportedNet --------------------------------------------------------
    ("call/float-net-rank", lambda c: c.fmodel(np.ones((3, 4), np.float32)),
     ValueError, r"f\.fnx\): expected input of shape \('N', 2, 2\).*got shape \(3, 4\)"),
    ("call/float-net-size", lambda c: c.fmodel(np.ones((3, 2, 3), np.float32)),
     ValueError, r"f\.fnx\): expected input of shape \('N', 2, 2\).*got shape \(3, 2, 3\)"),
    ("call/float-net-empty-batch", lambda c: c.fmodel(np.ones((0, 2, 2), np.float32)),
     ValueError, r"f\.fnx\): expected input of shape.*N >= 1.*got shape \(0, 2, 2\)"),
    ("call/float-net-int-input", lambda c: c.fmodel(np.ones((3, 2, 2), np.int32)),
     TypeError, r"f\.fnx\): expected a floating input \(float32\), got dtype int32"),
    ("call/float-net-bool-input", lambda c: c.fmodel(np.ones((3, 2, 2), bool)),
     TypeError, r"f\.fnx\): expected a floating input \(float32\), got dtype bool"),
    ("call/float-net-ragged-list", lambda c: c.fmodel([[[1.0, 2.0], [3.0]]]),
     TypeError, r"f\.fnx\): x must be an array, got list"),
    ("call/ids-net-float-input", lambda c: c.emodel(_ids(2).astype(np.float32)),
     TypeError, r"e\.fnx\): expected integer ids of dtype int32, got dtype float32"),
    ("call/ids-net-bool-input", lambda c: c.emodel(np.ones((2, 5), bool)),
     TypeError, r"e\.fnx\): expected integer ids of dtype int32, got dtype bool"),
    ("call/ids-net-int64-beyond-int32",
     lambda c: c.emodel(np.array([[0, 1, 2, 3, 2**40]] * 2, np.int64)),
     ValueError, r"e\.fnx\): expected integer ids of dtype int32, got int64 values in "
                 r"\[0, 1099511627776\], outside the int32 range"),
    ("call/ids-net-shape", lambda c: c.emodel(_ids(2)[:, :4]),
     ValueError, r"e\.fnx\): expected input of shape \('N', 5\).*got shape \(2, 4\)"),
    pytest.param(
        "call/cuda-only-on-cpu", lambda c: export.load(c.p("cuda.fnx"))(np.ones((1, 2, 2))),
        ValueError, r"cuda\.fnx\): the program was exported for platforms \('cuda',\), it "
                    r"cannot run on 'cpu'",
        marks=pytest.mark.skipif(jax.default_backend() != "cpu", reason="needs a CPU backend"),
        id="call/cuda-only-on-cpu"),
]


@pytest.mark.parametrize(
    "name,call,exc,pattern",
    [r if hasattr(r, "marks") else pytest.param(*r, id=r[0]) for r in BAD_INPUTS],
)
def test_bad_input_raises_a_clear_error(c, name, call, exc, pattern):
    before = sorted(p.name for p in c.d.iterdir())
    with pytest.raises(exc, match=pattern):
        call(c)
    # Raised before any work: nothing was written (no file, no folder, no temporary).
    assert sorted(p.name for p in c.d.iterdir()) == before


def test_the_table_is_big_enough():
    assert len(BAD_INPUTS) >= 45


# ---------------------------------------------------------------------------------------
# What is accepted, on the same files
# ---------------------------------------------------------------------------------------


def test_fashion_mnist_like_files_load_and_scale_by_255(c):
    x, y = data.load_mnist(c.p(P), c.p(L))
    assert x.shape == (6, 28, 28, 1) and x.dtype == np.float32 and y.dtype == np.int32
    np.testing.assert_array_equal(x[..., 0], c.images.astype(np.float32) / np.float32(255))
    np.testing.assert_array_equal(y, c.labels)
    # Integer pixels of another dtype load with an explicit scale.
    x64, _ = data.load_npz(c.p("int64.npz"), scale=255)
    xs, _ = data.load_npz(c.p("ok.npz"))
    np.testing.assert_array_equal(x64, xs)


def test_integer_input_export_defaults_to_int32(c, tmp_path):
    assert c.enet.takes_integers()
    model = export.load(export.save(tmp_path / "e.fnx", c.enet, c.eparams, ID_SHAPE))
    assert model.header["dtype"] == "int32" and model.dtype == np.int32
    ids = _ids(2)
    np.testing.assert_allclose(model(ids), c.enet.apply(c.eparams, ids), rtol=1e-6, atol=1e-6)


def test_integer_input_export_accepts_its_dtype(c):
    assert c.emodel.header["dtype"] == "int32" and c.emodel.dtype == np.int32
    ids = _ids(3)
    expected = np.asarray(c.enet.apply(c.eparams, ids))
    np.testing.assert_allclose(c.emodel(ids), expected, rtol=1e-6, atol=1e-6)
    # numpy's default int64 ids within the int32 range, and narrower unsigned ids, are
    # cast exactly; the result is the same.
    np.testing.assert_allclose(c.emodel(ids.astype(np.int64)), expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(c.emodel(ids.astype(np.uint8)), expected, rtol=1e-6, atol=1e-6)
    # A float model still takes float64 (cast to its float32), as before.
    assert c.fmodel(np.ones((2, *F_SHAPE))).dtype == np.float32


# ---------------------------------------------------------------------------------------
# Temporaries of killed saves: the next save of the same target removes them
# ---------------------------------------------------------------------------------------


def _litter(folder: Path, target: str) -> tuple[list[str], list[str]]:
    """Fake stale temporaries of ``target`` (the exact pattern), and unrelated files that
    look alike but must survive."""
    prefix = checkpoint._tmp_prefix(target)
    stale = [f"{prefix}abcd1234.tmp", f"{prefix}x_9y_8z7.tmp"]
    keep = [
        f"{prefix}abc.tmp",  # too short for the pattern
        f"{prefix}abcd1234.tmp.keep",
        f"{prefix}ABCD1234.tmp",  # mkstemp never makes upper case
        f"{checkpoint._tmp_prefix('other' + target)}abcd1234.tmp",  # another target
        f"{prefix[1:]}abcd1234.tmp",  # not hidden
        f".{target}.abcd1234.tmp",  # not a funcnet temporary
        "notes.txt",
    ]
    for name in stale + keep:
        (folder / name).write_bytes(b"partial")
    return stale, keep


def test_save_removes_its_own_stale_temporaries_only(c, tmp_path):
    saves = {
        "a.ckpt": lambda p: checkpoint.save(p, c.tree),
        "m.fnx": lambda p: export.save(p, c.fnet, c.fparams, F_SHAPE),
        "d.idx": lambda p: data.write_idx(p, np.arange(4, dtype=np.uint8)),
    }
    for target, save in saves.items():
        folder = tmp_path / target.replace(".", "_")
        folder.mkdir()
        stale, keep = _litter(folder, target)
        save(folder / target)
        assert sorted(p.name for p in folder.iterdir()) == sorted([target, *keep]), target
        assert not any((folder / name).exists() for name in stale)
        for name in keep:
            assert (folder / name).read_bytes() == b"partial"


def test_the_temporary_a_save_writes_has_the_pattern_it_cleans(c, tmp_path, monkeypatch):
    seen = []
    real = os.replace

    def spy(src, dst):
        seen.append(os.path.basename(src))
        return real(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    checkpoint.save(tmp_path / "a.ckpt", c.tree)
    export.save(tmp_path / "m.fnx", c.fnet, c.fparams, F_SHAPE)
    assert len(seen) == 2
    assert checkpoint._stale_pattern("a.ckpt").fullmatch(seen[0]), seen
    assert checkpoint._stale_pattern("m.fnx").fullmatch(seen[1]), seen


def test_a_temporary_another_save_is_writing_is_left_alone(c, tmp_path):
    fcntl = pytest.importorskip("fcntl")  # POSIX flock

    busy = tmp_path / f"{checkpoint._tmp_prefix('a.ckpt')}busy0001.tmp"
    busy.write_bytes(b"being written")
    with open(busy, "rb") as f:  # what a running save holds
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        checkpoint.save(tmp_path / "a.ckpt", c.tree)
        assert busy.exists()
    checkpoint.save(tmp_path / "a.ckpt", c.tree)  # that save died: now it is stale
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.ckpt"]


def test_export_still_creates_missing_parent_folders(c, tmp_path):
    path = export.save(tmp_path / "x" / "y" / "m.fnx", c.fnet, c.fparams, F_SHAPE)
    assert path.is_file()
    assert export.load(path)(np.ones((1, *F_SHAPE), np.float32)).shape == (1, 3)


# ---------------------------------------------------------------------------------------
# Atomic writes behave like a plain open(): permissions, symbolic links, special files,
# long names (checkpoint.save, export.save and write_idx share them)
# ---------------------------------------------------------------------------------------


def _savers(c):
    """``(name, save(path))`` for each writer, and ``read(path)`` giving back its content."""
    return {
        "a.ckpt": (lambda p, v=1.0: checkpoint.save(p, {"w": np.full(2, v)}),
                   lambda p: float(checkpoint.load(p)[0]["['w']"][0])),
        "m.fnx": (lambda p, v=1.0: export.save(p, c.fnet, c.fparams, F_SHAPE,
                                               metadata={"v": v}),
                  lambda p: export.load(p).header["metadata"]["v"]),
        "d.idx": (lambda p, v=1.0: data.write_idx(p, np.full(3, v, np.float32)),
                  lambda p: float(data.read_idx(p)[0])),
    }  # fmt: skip


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    try:
        yield
    finally:
        os.umask(old)


def test_saves_give_the_permissions_open_would(c, tmp_path, umask_027):
    for name, (save, _) in _savers(c).items():
        new, old = tmp_path / name, tmp_path / f"old_{name}"
        save(new)  # a new file: 0o666 less the umask, not mkstemp's 0o600
        assert oct(os.stat(new).st_mode & 0o777) == oct(0o640), name
        old.write_bytes(b"previous")
        os.chmod(old, 0o604)
        save(old)  # a replaced file keeps its permissions
        assert oct(os.stat(old).st_mode & 0o777) == oct(0o604), name


def test_saves_write_through_a_symbolic_link(c, tmp_path):
    for name, (save, read) in _savers(c).items():
        real, link = tmp_path / f"epoch_10_{name}", tmp_path / f"latest_{name}"
        save(real, 1.0)
        link.symlink_to(real)
        save(link, 2.0)
        assert link.is_symlink() and os.readlink(link) == str(real), name
        assert read(real) == 2.0, name
        # A dangling link creates its target, as open() would.
        dangling = tmp_path / f"dangling_{name}"
        dangling.symlink_to(tmp_path / f"target_{name}")
        save(dangling, 3.0)
        assert dangling.is_symlink() and read(tmp_path / f"target_{name}") == 3.0, name


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo (POSIX)")
def test_saves_refuse_to_replace_a_fifo(c, tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    link = tmp_path / "to_pipe"
    link.symlink_to(fifo)
    for name, (save, _) in _savers(c).items():
        with pytest.raises(ValueError, match=rf"path '{fifo}' is a FIFO; expected a regular"):
            save(fifo)
        with pytest.raises(ValueError, match=rf"path '{link}' \(a symbolic link to "
                                             rf"'{fifo}'\) is a FIFO"):  # fmt: skip
            save(link)
        assert stat.S_ISFIFO(os.stat(fifo).st_mode) and link.is_symlink(), name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe", "to_pipe"]


def test_saves_take_a_long_legal_name_and_name_a_too_long_one(c, tmp_path):
    limit = os.pathconf(tmp_path, "PC_NAME_MAX") if hasattr(os, "pathconf") else 255
    for name, (save, read) in _savers(c).items():
        longest = tmp_path / (name[0] * (limit - len(name)) + name)  # exactly the limit
        save(longest, 4.0)
        assert read(longest) == 4.0, name
        too_long = tmp_path / (name[0] * (limit + 1 - len(name)) + name)
        with pytest.raises(ValueError, match=rf"path '{too_long}': the file name is "
                                             rf"{limit + 1} bytes long"):  # fmt: skip
            save(too_long)
    assert all(not p.name.endswith(".tmp") for p in tmp_path.iterdir())
