"""funcnet.data: the bundled digits, IDX and npz readers, data-set validation."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest

from funcnet import data


def _idx_bytes(arr: np.ndarray, code: int, be_dtype: str) -> bytes:
    """An IDX file written independently of funcnet: magic, big-endian dims, data."""
    header = struct.pack(">BBBB", 0, 0, code, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(be_dtype).tobytes()


# ---------------------------------------------------------------------------------------
# digits
# ---------------------------------------------------------------------------------------


def test_digits_shapes_dtypes_ranges():
    s = data.digits()
    assert s.x_train.shape == (1437, 8, 8, 1) and s.x_test.shape == (360, 8, 8, 1)
    assert s.y_train.shape == (1437,) and s.y_test.shape == (360,)
    assert s.x_train.dtype == np.float32 and s.y_train.dtype == np.int32
    assert s.x_train.min() == 0.0 and s.x_train.max() == 1.0
    assert set(np.unique(s.y_test)) == set(range(10))


def test_digits_split_is_stratified_and_seeded():
    a, b, c = data.digits(seed=0), data.digits(seed=0), data.digits(seed=1)
    np.testing.assert_array_equal(a.x_test, b.x_test)
    assert not np.array_equal(a.y_test, c.y_test)
    # Stratified: every class count in the test split is within 1 of 20% of its total.
    y_all = np.concatenate([a.y_train, a.y_test])
    for k in range(10):
        assert abs(np.sum(a.y_test == k) - 0.2 * np.sum(y_all == k)) <= 1
    # The two parts together are the whole data set (sum of all pixels is preserved).
    from sklearn.datasets import load_digits

    total = load_digits().images.sum() / 16.0
    got = a.x_train.sum(dtype=np.float64) + a.x_test.sum(dtype=np.float64)
    assert got == pytest.approx(total)


@pytest.mark.parametrize("bad", [0, 1, 1.5, -0.1, "0.2", True])
def test_digits_rejects_bad_test_size(bad):
    with pytest.raises(ValueError, match="test_size"):
        data.digits(test_size=bad)


# ---------------------------------------------------------------------------------------
# IDX
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gzip"])
def test_load_mnist_from_handwritten_idx(tmp_path, compress):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(7, 5, 4), dtype=np.uint8)
    labels = np.array([0, 9, 3, 3, 1, 7, 2], dtype=np.uint8)
    blobs = {"img": _idx_bytes(images, 0x08, ">u1"), "lab": _idx_bytes(labels, 0x08, ">u1")}
    paths = {}
    for name, blob in blobs.items():
        p = tmp_path / (f"{name}.idx" + (".gz" if compress else ""))
        p.write_bytes(gzip.compress(blob) if compress else blob)
        paths[name] = p
    x, y = data.load_mnist(paths["img"], paths["lab"])
    assert x.shape == (7, 5, 4, 1) and x.dtype == np.float32
    np.testing.assert_allclose(x[..., 0], images / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(y, labels)
    assert y.dtype == np.int32


@pytest.mark.parametrize(
    "dtype,code,be",
    [(np.uint8, 0x08, ">u1"), (np.int8, 0x09, ">i1"), (np.int16, 0x0B, ">i2"),
     (np.int32, 0x0C, ">i4"), (np.float32, 0x0D, ">f4"), (np.float64, 0x0E, ">f8")],
    ids=["u8", "i8", "i16", "i32", "f32", "f64"],
)  # fmt: skip
def test_read_idx_every_type_and_write_idx_round_trip(tmp_path, dtype, code, be):
    arr = (np.arange(24).reshape(2, 3, 4) - (0 if dtype == np.uint8 else 5)).astype(dtype)
    p = tmp_path / "a.idx"
    p.write_bytes(_idx_bytes(arr, code, be))
    got = data.read_idx(p)
    assert got.dtype == np.dtype(dtype) and got.shape == (2, 3, 4)
    np.testing.assert_array_equal(got, arr)
    data.write_idx(tmp_path / "b.idx.gz", arr)
    assert (tmp_path / "b.idx.gz").read_bytes()[:2] == b"\x1f\x8b"
    np.testing.assert_array_equal(data.read_idx(tmp_path / "b.idx.gz"), arr)
    data.write_idx(tmp_path / "c.idx", arr)
    assert (tmp_path / "c.idx").read_bytes() == _idx_bytes(arr, code, be)


def test_read_idx_errors(tmp_path):
    good = _idx_bytes(np.zeros((4, 3), np.uint8), 0x08, ">u1")
    cases = {
        "truncated": good[:-2],
        "trailing bytes": good + b"\x00",
        "bad magic": b"\x01" + good[1:],
        "unknown IDX type code": good[:2] + b"\x07" + good[3:],
        "too short": good[:3],
        "truncated inside the header": good[:9],
    }
    for message, blob in cases.items():
        p = tmp_path / "bad.idx"
        p.write_bytes(blob)
        with pytest.raises(ValueError, match=message):
            data.read_idx(p)
    p = tmp_path / "bad.idx.gz"
    p.write_bytes(gzip.compress(good)[:-10])
    with pytest.raises(ValueError, match="cannot read"):
        data.read_idx(p)


def test_load_mnist_validates_labels_and_counts(tmp_path):
    img = tmp_path / "img.idx"
    img.write_bytes(_idx_bytes(np.zeros((3, 2, 2), np.uint8), 0x08, ">u1"))
    lab = tmp_path / "lab.idx"
    lab.write_bytes(_idx_bytes(np.array([0, 10, 1], np.uint8), 0x08, ">u1"))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\), got values in \[0, 10\]"):
        data.load_mnist(img, lab)
    lab.write_bytes(_idx_bytes(np.array([0, 1], np.uint8), 0x08, ">u1"))
    with pytest.raises(ValueError, match="3 images but 2 labels"):
        data.load_mnist(img, lab)
    with pytest.raises(ValueError, match="3-D"):
        data.load_mnist(lab, lab)


# ---------------------------------------------------------------------------------------
# npz and check_dataset
# ---------------------------------------------------------------------------------------


def test_load_npz(tmp_path):
    x = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    p = tmp_path / "d.npz"
    np.savez(p, images=x, labels=np.array([1, 2]))
    xs, ys = data.load_npz(p, x_key="images", y_key="labels", num_classes=3)
    assert xs.shape == (2, 3, 3, 1) and xs.dtype == np.float32
    np.testing.assert_allclose(xs[..., 0], x / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(ys, [1, 2])
    with pytest.raises(ValueError, match="no array named 'x'"):
        data.load_npz(p)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        data.load_npz(p, x_key="images", y_key="labels", num_classes=2)
    np.savez(p, x=x, y=np.array([1, 2, 0]))
    with pytest.raises(ValueError, match="2 images but 3 labels"):
        data.load_npz(p)
    p.write_bytes(p.read_bytes()[:40])
    with pytest.raises(ValueError, match="npz"):
        data.load_npz(p)


def test_check_dataset_errors():
    x = np.zeros((4, 2), np.float32)
    with pytest.raises(ValueError, match="same number of examples, got 4"):
        data.check_dataset(x, np.zeros(3, np.int32))
    with pytest.raises(ValueError, match=r"\[0, 3\).*\[-1, 0\]"):
        data.check_dataset(x, np.array([0, 0, -1, 0]), num_classes=3)
    with pytest.raises(TypeError, match="floating dtype"):
        data.check_dataset(x.astype(np.int32), np.zeros(4, np.int32))
    bad = x.copy()
    bad[2, 1] = np.nan
    with pytest.raises(ValueError, match="non-finite values \\(first at example 2\\)"):
        data.check_dataset(bad, np.zeros(4, np.int32))
    with pytest.raises(TypeError, match="integer labels or floating targets"):
        data.check_dataset(x, np.array(["a"] * 4))
    _, ys = data.check_dataset(x, np.array([0, 1, 2, 1], np.int64), num_classes=3)
    assert ys.dtype == np.int32


@pytest.mark.parametrize("transform, exc, match", [
    (lambda x, y, rng: None, TypeError, r"transform must return the pair \(x, y\), got NoneType"),
    (lambda x, y, rng: x, TypeError, r"the pair \(x, y\), got an array of shape \(4, 3\)"),
    (lambda x, y, rng: (x, y, rng), TypeError, r"the pair \(x, y\), got a tuple of 3 items"),
    (lambda x, y: (x, y), TypeError, r"must take \(x, y, rng\) and return \(x, y\): .*"
                                     r"takes 2 positional arguments"),
    (lambda x, y, rng: (x[:2], y), ValueError, r"x and y with one row per example, got "
                                                r"shapes \(2, 3\) and \(4,\)"),
], ids=["none", "x-only", "triple", "signature", "rows"])
def test_a_misused_transform_is_named_with_its_batch(transform, exc, match):
    """Not numpy's unpacking errors ('too many values to unpack' of a batch's rows)."""
    x, y = np.zeros((10, 3), np.float32), np.arange(10) % 2
    batches = data.ArrayBatches(x, y, 4, transform=transform)
    with pytest.raises(exc, match=r"^ArrayBatches: transform, epoch 1, batch 1: .*" + match):
        next(iter(batches(0)))


def test_a_transform_may_drop_rows_but_not_with_process():
    """A filter (fewer rows, x and y alike) is a batch like the last, shorter one; with
    process= the batch's weights are fixed, so its rows must stay."""
    x, y = np.arange(30, dtype=np.float32).reshape(10, 3), np.arange(10) % 2
    keep_odd = lambda xb, yb, rng: (xb[yb == 1], yb[yb == 1])  # noqa: E731
    xb, yb = next(iter(data.ArrayBatches(x, y, 4, shuffle=False, transform=keep_odd)(0)))
    np.testing.assert_array_equal(yb, [1, 1])
    np.testing.assert_array_equal(xb, x[[1, 3]])
    with pytest.raises(ValueError, match=r"with process=, transform must keep the batch's 2 "
                                         r"rows .* got 1"):
        next(iter(data.ArrayBatches(x, y, 4, shuffle=False, transform=keep_odd,
                                    process=(0, 2))(0)))
