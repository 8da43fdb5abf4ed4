"""The Fashion-MNIST loader, on small IDX files the test writes (the suite never needs the
real data set)."""

import os

import numpy as np
import pytest

import funcnet as fn
from funcnet import data


def _write(folder, n_train=6, n_test=4, gz=True, skip=()):
    rng = np.random.default_rng(0)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_labels": (np.arange(n_train) % 10).astype(np.uint8),
        "test_images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_labels": (np.arange(n_test)[::-1] % 10).astype(np.uint8),
    }
    for key, name in data.FASHION_MNIST_FILES.items():
        if key in skip:
            continue
        data.write_idx(folder / (name if gz else name[:-3]), arrays[key])
    return arrays


@pytest.mark.parametrize("gz", [True, False], ids=["gzip", "raw"])
def test_reads_the_four_files_from_a_folder(tmp_path, gz):
    arrays = _write(tmp_path, gz=gz)
    split = fn.data.fashion_mnist(tmp_path)
    assert split.x_train.shape == (6, 28, 28, 1) and split.x_test.shape == (4, 28, 28, 1)
    assert split.x_train.dtype == np.float32 and split.y_train.dtype == np.int32
    np.testing.assert_array_equal(split.x_train[..., 0],
                                  (arrays["train_images"] / np.float32(255)).astype(np.float32))
    np.testing.assert_array_equal(split.y_test, arrays["test_labels"])
    assert len(data.FASHION_MNIST_CLASSES) == 10


def test_missing_files_say_how_to_install_them(tmp_path):
    _write(tmp_path, skip=("test_labels",))
    with pytest.raises(FileNotFoundError, match=r"1 of the 4 .* t10k-labels-idx1-ubyte\.gz; "
                       r"install them with: apt-get update && apt-get install -y "
                       r"dataset-fashion-mnist"):
        fn.data.fashion_mnist(tmp_path)
    with pytest.raises(FileNotFoundError, match="4 of the 4"):
        fn.data.fashion_mnist(tmp_path / "nowhere")


def test_bad_labels_in_the_files_are_named(tmp_path):
    arrays = _write(tmp_path)
    bad = arrays["train_labels"].copy()
    bad[2] = 11
    data.write_idx(tmp_path / data.FASHION_MNIST_FILES["train_labels"], bad)
    with pytest.raises(ValueError, match="train-labels"):
        fn.data.fashion_mnist(tmp_path)


def test_train_fashion_augment_mirrors_and_shifts():
    """experiments/train_fashion.py --augment: every output image is its input, mirrored
    or not, shifted by at most 2 pixels per axis (zeros shifted in); all the choices occur."""
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments"))
    from train_fashion import augment

    rng = np.random.default_rng(0)
    x = rng.random((600, 7, 7, 1)).astype(np.float32)
    y = np.arange(600)
    out, y_out = augment(x, y, np.random.default_rng(1))
    assert out.shape == x.shape and out.dtype == x.dtype
    np.testing.assert_array_equal(y_out, y)
    seen = set()
    for i in range(len(x)):
        found = []
        for mirror in (False, True):
            img = np.pad(x[i, :, ::-1] if mirror else x[i], ((2, 2), (2, 2), (0, 0)))
            for dy in range(-2, 3):
                for dx in range(-2, 3):
                    if np.array_equal(out[i], img[2 - dy:9 - dy, 2 - dx:9 - dx]):
                        found.append((mirror, dy, dx))
        assert len(found) == 1, (i, found)
        seen.add(found[0])
    assert len(seen) == 2 * 5 * 5
