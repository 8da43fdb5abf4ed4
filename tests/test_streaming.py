"""fit on a batch source (funcnet.streaming) and data.ArrayBatches / mnist_batches:
the same training as in-memory arrays, one batch in memory at a time, clear errors."""

import os

import draw
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import funcnet as fn
from funcnet import data, train

N, BS = 75, 16  # 5 batches, the last one of 11 rows


@pytest.fixture(scope="module")
def xy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, 6, 6, 1)).astype(np.float32)
    y = rng.integers(0, 3, size=N).astype(np.int32)
    return x, y


def mlp():
    return fn.Serial([fn.Flatten(), fn.Dense(8), fn.ReLU(), fn.Dropout(0.25), fn.Dense(3)])


def bn_conv():
    return fn.Serial([fn.Conv(3, 3), fn.BatchNorm(), fn.ReLU(), fn.Flatten(), fn.Dense(3)])


def fit(net, x, y=None, **kw):
    params = draw.params(net, (6, 6, 1), seed=1)
    kw = {"epochs": 2, "seed": 5, "progress": False, "optimizer": optax.adam(1e-2), **kw}
    return train.fit(net, params, x, y, **kw)


def assert_same_training(a, b):
    """Bitwise: the same batches through the same step body."""
    for u, v in zip(jax.tree.leaves((a.params, a.model_state, a.state.opt_state)),
                    jax.tree.leaves((b.params, b.model_state, b.state.opt_state)), strict=True):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
    assert a.history["loss"] == b.history["loss"]
    assert a.history["accuracy"] == b.history["accuracy"]
    assert int(a.state.step) == int(b.state.step)


# ---------------------------------------------------------------------------------------
# ArrayBatches
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("shuffle", [True, False])
def test_array_batches_are_fits_batches(xy, shuffle):
    x, y = xy
    src = data.ArrayBatches(x, y, BS, shuffle=shuffle, seed=7)
    assert len(src) == 5
    for epoch in (0, 3):
        idx, w = train.epoch_batches(train.epoch_key(jax.random.key(7), epoch), N, BS, shuffle)
        idx, w = np.asarray(idx), np.asarray(w)
        batches = list(src(epoch))
        assert len(batches) == 5 and [len(b[0]) for b in batches] == [16, 16, 16, 16, 11]
        for b, (xb, yb) in enumerate(batches):
            rows = idx[b][w[b] > 0]
            np.testing.assert_array_equal(xb, x[rows])
            np.testing.assert_array_equal(yb, y[rows])
        again = list(src(epoch))  # an epoch is reproducible
        np.testing.assert_array_equal(again[2][0], batches[2][0])
    if shuffle:  # a new order every epoch
        assert not np.array_equal(next(src(0))[1], next(src(1))[1])


def test_array_batches_drop_remainder_and_processes(xy):
    x, y = xy
    assert len(data.ArrayBatches(x, y, BS, drop_remainder=True)) == 4
    full = list(data.ArrayBatches(x, y, BS, seed=2)(1))
    parts = [list(data.ArrayBatches(x, y, BS, seed=2, process=(i, 2))(1)) for i in range(2)]
    for b in range(4):  # full batches: the two halves, in process order
        np.testing.assert_array_equal(np.concatenate([parts[0][b][0], parts[1][b][0]]),
                                      full[b][0])
        assert len(parts[0][b]) == 2  # (x, y): no padding
    # the last global batch has 11 rows: process 0 gets 8, process 1 gets 3 and 5 of weight 0
    (x0, y0, w0), (x1, y1, w1) = parts[0][4], parts[1][4]
    assert x0.shape == x1.shape == (8, 6, 6, 1) and y0.shape == y1.shape == (8,)
    np.testing.assert_array_equal(w0, np.ones(8))
    np.testing.assert_array_equal(w1, [1, 1, 1, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(np.concatenate([x0, x1[:3]]), full[4][0])
    np.testing.assert_array_equal(np.concatenate([y0, y1[:3]]), full[4][1])


class _IncreasingOnly:
    """An array that, like an h5py data set, takes only strictly increasing indices."""

    def __init__(self, a):
        self.a, self.shape = a, a.shape
        self.reads = []

    def __getitem__(self, idx):
        idx = np.asarray(idx)
        if np.any(np.diff(idx) <= 0):
            raise TypeError("Indexing elements must be in increasing order")
        self.reads.append(idx.size)
        return self.a[idx]


def test_array_batches_read_strictly_increasing_rows_even_when_padded(xy):
    x, y = xy
    for i in range(2):  # process 1's last batch: 3 rows padded with index 0 five times
        fx, fy = _IncreasingOnly(x), _IncreasingOnly(y)
        got = list(data.ArrayBatches(fx, fy, BS, seed=2, process=(i, 2))(1))
        want = list(data.ArrayBatches(x, y, BS, seed=2, process=(i, 2))(1))
        for g, w in zip(got, want, strict=True):
            for a, b in zip(g, w, strict=True):
                np.testing.assert_array_equal(a, b)
        assert fx.reads[-1] == (8 if i == 0 else 4)  # the padding rows read once


def test_array_batches_transform_is_seeded(xy):
    x, y = xy
    calls = []

    def jitter(xb, yb, rng):
        calls.append(1)
        return xb + rng.normal(size=xb.shape).astype(xb.dtype), yb

    src = data.ArrayBatches(x, y, BS, seed=3, transform=jitter)
    a, b, c = list(src(0)), list(src(0)), list(src(1))
    np.testing.assert_array_equal(a[1][0], b[1][0])  # same epoch, same augmentation
    assert not np.allclose(a[0][0], next(data.ArrayBatches(x, y, BS, seed=3)(0))[0])
    assert not np.allclose(a[1][0], c[1][0])
    assert len(calls) == 15


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"batch_size": 0}, ValueError, "batch_size must be a positive int, got 0"),
    ({"shuffle": 1}, TypeError, "shuffle must be a bool"),
    ({"seed": -1}, ValueError, "seed must be a non-negative int below 2\\*\\*32, got -1"),
    ({"seed": 1.5}, TypeError, "seed must be a non-negative int"),
    ({"batch_size": 2.0}, TypeError, "batch_size must be a positive int, got 2.0"),
    ({"transform": 3}, TypeError, "transform must be callable"),
    ({"process": (2, 2)}, ValueError, r"0 <= index < count, got \(2, 2\)"),
    ({"process": [0, 2]}, TypeError, "pair of ints"),
    ({"batch_size": 15, "process": (0, 2)}, ValueError, "batch_size=15 must divide by the 2"),
    ({"batch_size": 100, "drop_remainder": True}, ValueError, "leaves no batch of the 75"),
])
def test_array_batches_bad_arguments(xy, kwargs, exc, match):
    x, y = xy
    kw = {"batch_size": BS, **kwargs}
    with pytest.raises(exc, match=match):
        data.ArrayBatches(x, y, kw.pop("batch_size"), **kw)


def test_array_batches_bad_arrays(xy):
    x, y = xy
    with pytest.raises(ValueError, match="same number of examples, got 75"):
        data.ArrayBatches(x, y[:-1], BS)
    with pytest.raises(TypeError, match="y must be an array with a first"):
        data.ArrayBatches(x, list(y), BS)
    with pytest.raises(ValueError, match="empty"):
        data.ArrayBatches(x[:0], y[:0], BS)


# ---------------------------------------------------------------------------------------
# fit on a source = fit on arrays
# ---------------------------------------------------------------------------------------


SLOW = pytest.mark.slow  # CI's slow tier runs these; the default run keeps one case


@pytest.mark.parametrize("grad", ["autodiff", pytest.param("manual", marks=SLOW)])
@pytest.mark.parametrize("make", [pytest.param(mlp, marks=SLOW), bn_conv],
                         ids=["mlp-dropout", "conv-batchnorm"])
def test_fit_on_array_batches_equals_fit_on_arrays(xy, make, grad):
    """Padded last batch (MLP) and true-size last batch (BatchNorm), Dropout keys, both
    gradient modes: bitwise the same training."""
    x, y = xy
    net = make()
    on_arrays = fit(net, x, y, batch_size=BS, grad=grad, epoch_mode="loop",
                    validation_data=(x[:20], y[:20]))
    streamed = fit(net, data.ArrayBatches(x, y, BS, seed=5), grad=grad,
                   validation_data=(x[:20], y[:20]))
    assert_same_training(on_arrays, streamed)
    assert on_arrays.history["val_loss"] == streamed.history["val_loss"]


def test_fit_streams_a_memory_mapped_idx_file(tmp_path):
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, size=(N, 6, 6), dtype=np.uint8)
    labels = rng.integers(0, 3, size=N).astype(np.uint8)
    data.write_idx(tmp_path / "images", pixels, compress=False)
    data.write_idx(tmp_path / "labels", labels, compress=False)
    x, y = data.load_mnist(tmp_path / "images", tmp_path / "labels", num_classes=3)
    src = data.mnist_batches(tmp_path / "images", tmp_path / "labels", BS, num_classes=3,
                             seed=5)
    assert isinstance(src.x, np.memmap)
    xb, yb = next(src(0))
    assert xb.dtype == np.float32 and xb.shape == (BS, 6, 6, 1) and yb.dtype == np.int32
    assert_same_training(fit(bn_conv(), x, y, batch_size=BS), fit(bn_conv(), src))


class OneBatchAtATime:
    """Array-like over ``x`` that records every read and refuses to be materialised."""

    def __init__(self, a):
        self.a, self.shape, self.dtype, self.reads = a, a.shape, a.dtype, []

    def __getitem__(self, idx):
        idx = np.asarray(idx)
        assert idx.ndim == 1 and np.all(np.diff(idx) > 0), "reads must be increasing rows"
        self.reads.append(idx.size)
        return self.a[idx]

    def __len__(self):
        return len(self.a)

    def __array__(self, *args, **kwargs):
        raise AssertionError("the whole data set was materialised")


def test_fit_reads_one_batch_at_a_time(xy):
    x, y = xy
    xs, ys = OneBatchAtATime(x), OneBatchAtATime(y)
    result = fit(mlp(), data.ArrayBatches(xs, ys, BS, seed=5), epochs=3)
    assert max(xs.reads) <= BS and max(ys.reads) <= BS
    # epochs x N rows: the first batch, read for the checks, is trained on, not read again
    assert sum(xs.reads) == 3 * N
    assert int(result.state.step) == 15


def test_fit_on_a_callable_and_on_a_list(xy):
    x, y = xy
    batches = [(x[i:i + BS], y[i:i + BS]) for i in range(0, N, BS)]
    from_list = fit(mlp(), batches)
    from_fn = fit(mlp(), lambda epoch: iter(batches))
    on_arrays = fit(mlp(), x, y, batch_size=BS, shuffle=False, epoch_mode="loop")
    assert_same_training(from_list, on_arrays)
    assert_same_training(from_fn, on_arrays)


def test_fit_source_sees_the_epoch_and_augments(xy):
    x, y = xy
    seen = []

    def source(epoch):
        seen.append(epoch)
        rng = np.random.default_rng(epoch)
        for i in range(0, N, 25):
            flip = rng.random() < 0.5
            yield (x[i:i + 25, :, ::-1] if flip else x[i:i + 25]), y[i:i + 25]

    result = fit(mlp(), source, epochs=3)
    assert seen == [0, 1, 2]  # once per epoch: epoch 0 goes on from the checked batch
    assert int(result.state.step) == 9 and len(result.history["loss"]) == 3


def test_fit_resumes_a_streamed_run_bitwise(xy, tmp_path):
    x, y = xy
    ck = str(tmp_path / "run.ckpt")
    net = mlp()  # Dropout: the resumed run must also continue the step keys
    whole = fit(net, data.ArrayBatches(x, y, BS, seed=5), epochs=3)
    fit(net, data.ArrayBatches(x, y, BS, seed=5), epochs=1, checkpoint=ck)
    resumed = fit(net, data.ArrayBatches(x, y, BS, seed=5), epochs=3, checkpoint=ck,
                  resume=True)
    assert_same_training(whole, resumed)


def test_fit_source_non_finite_batch_keeps_the_last_finite_state(xy):
    """A NaN in a device batch (not checked on the host) stops training at that step."""
    x, y = xy

    def source(epoch):
        for b in range(4):
            xb = jnp.asarray(x[b * BS:(b + 1) * BS])
            if epoch == 1 and b == 2:
                xb = xb.at[0, 0, 0, 0].set(jnp.nan)
            yield xb, y[b * BS:(b + 1) * BS]

    with pytest.raises(train.NonFiniteLossError, match="epoch 2, step 3 of 4") as err:
        fit(mlp(), source, epochs=3)
    assert int(err.value.state.step) == 6
    good = fit(mlp(), lambda e: ((jnp.asarray(x[b * BS:(b + 1) * BS]), y[b * BS:(b + 1) * BS])
                                 for b in range(4)), epochs=1)
    assert np.all(np.isfinite(jax.tree.leaves(err.value.state.params)[0]))
    assert int(good.state.step) == 4


# ---------------------------------------------------------------------------------------
# Bad sources and bad batches
# ---------------------------------------------------------------------------------------


def _batches(x, y, bad=None, at=2):
    def source(epoch):
        for b in range(4):
            xb, yb = x[b * BS:(b + 1) * BS], y[b * BS:(b + 1) * BS]
            if epoch == 0 and b == at and bad is not None:
                yield bad(xb.copy(), yb.copy())  # (x, y) or (x, y, w)
                continue
            yield xb, yb
    return source


@pytest.mark.parametrize("bad, exc, match", [
    (lambda x, y: (x[:, :5], y), ValueError, r"epoch 1, batch 3: x has shape \(16, 5, 6, 1\); "
                                             r"every batch must be \(B, 6, 6, 1\)"),
    (lambda x, y: (x, y[:3]), ValueError, r"epoch 1, batch 3: y has shape \(3,\)"),
    (lambda x, y: (np.concatenate([x, x]), np.concatenate([y, y])), ValueError,
     "a batch must have 1 to batch_size=16 rows"),
    (lambda x, y: (x.astype(np.float64), y), TypeError, "dtype float64; every batch"),
    (lambda x, y: (x, y.astype(np.float32)), TypeError,
     "epoch 1, batch 3: y has dtype float32; every batch must have the first batch's dtype "
     "int32"),
    (lambda x, y: (x, y.astype(np.int64)), None, None),  # any integer width: taken as int32
    (lambda x, y: (np.where(x > 1, np.inf, x), y), ValueError,
     "epoch 1, batch 3: x contains non-finite values"),
    (lambda x, y: (x, y + 5), ValueError, r"epoch 1, batch 3: labels must lie in \[0, 3\)"),
    (lambda x, y: (x, y, np.zeros(len(y))), ValueError,
     r"epoch 1, batch 3: w are all 0, so the batch's weighted mean loss is undefined"),
    (lambda x, y: (x, y, np.full(len(y), 1e39)), ValueError,
     r"epoch 1, batch 3: w overflows the training dtype float32: weights up to 1e\+39"),
])
def test_fit_refuses_a_bad_batch_naming_it(xy, bad, exc, match):
    x, y = xy
    if exc is None:
        assert_same_training(fit(mlp(), _batches(x, y, bad)), fit(mlp(), _batches(x, y)))
        return
    with pytest.raises(exc, match=match):
        fit(mlp(), _batches(x, y, bad))


def test_fit_refuses_bad_sources(xy):
    x, y = xy
    net = mlp()
    with pytest.raises(TypeError, match="one-shot iterator"):
        fit(net, iter([(x, y)]))
    with pytest.raises(TypeError, match=r"y is missing: .* got x of shape \(75, 6, 6, 1\)"):
        fit(net, x)
    with pytest.raises(TypeError, match="x is a batch source"):
        fit(net, data.ArrayBatches(x, y, BS), y)
    with pytest.raises(ValueError, match="epoch_mode='scan' needs the data set as arrays"):
        fit(net, data.ArrayBatches(x, y, BS), epoch_mode="scan")
    with pytest.raises(ValueError, match="batch_size=32, but the batch source's first batch "
                                         "has 16 rows"):
        fit(net, data.ArrayBatches(x, y, BS), batch_size=32)
    with pytest.raises(ValueError, match="gave no batch for epoch 0"):
        fit(net, lambda epoch: iter([]))
    with pytest.raises(TypeError, match=r"a batch must be a tuple \(x, y\) or \(x, y, w\)"):
        fit(net, [x])
    with pytest.raises(TypeError, match="returned int for epoch 0"):
        fit(net, lambda epoch: 3)


def test_epoch_0_trains_every_batch_of_the_iterator_fit_read_first(xy):
    """fit reads the first batch of source(0) for its checks and trains epoch 0 on the same
    iterator: a source that hands out one shared stream (a loader with persistent
    workers resets and returns the same iterator) loses no batch (its first was lost)."""
    x, y = xy
    reference = fit(mlp(), _batches(x, y), epochs=1)

    class SharedStream:  # a re-iterable whose __iter__ hands out one shared stream
        def __init__(self):
            self.it = None

        def __iter__(self):
            if self.it is None:
                self.it = iter(list(_batches(x, y)(0)))
            return self.it

    gen = _batches(x, y)(0)
    for source in (lambda epoch: gen, SharedStream()):
        result = fit(mlp(), source, epochs=1)
        assert int(result.state.step) == 4
        assert_same_training(result, reference)


def test_fit_refuses_a_generator_that_has_already_run(xy):
    x, y = xy
    started = _batches(x, y)(0)
    next(started)
    fresh = "the source must return a fresh iterable of the epoch's batches every time"
    with pytest.raises(TypeError, match=rf"fit: the batch source gave, for epoch 1, a "
                                        rf"generator that was already advanced .*{fresh}"):
        fit(mlp(), lambda epoch: started, epochs=1)
    made = []

    def spent_for_epoch_2(epoch):  # a fresh generator for epoch 0, the spent one for 1
        if epoch == 0:
            made.append(_batches(x, y)(0))
        return made[-1]

    with pytest.raises(TypeError, match=rf"for epoch 2, a generator that was already "
                                        rf"advanced .*{fresh}"):
        fit(mlp(), spent_for_epoch_2, epochs=2)


def test_padding_weights_are_refused_for_batchnorm(xy):
    x, y = xy
    src = data.ArrayBatches(x, y, BS, process=(1, 2))  # its last part is padded
    with pytest.raises(ValueError, match=r"rows of weight 0 .* mixes the batch"):
        fit(bn_conv(), src)
    result = fit(mlp(), src, epochs=1)  # zero weights are fine without BatchNorm
    assert int(result.state.step) == 5


def test_big_endian_memory_maps_train_as_native_arrays(xy, tmp_path):
    # read_idx(mmap=True) maps float32 / int16 data in the file's big-endian order ('>f4')
    x, y = xy
    data.write_idx(tmp_path / "x.idx", x, compress=False)
    data.write_idx(tmp_path / "y.idx", y.astype(np.int16), compress=False)
    xm, ym = data.read_idx(tmp_path / "x.idx", mmap=True), data.read_idx(tmp_path / "y.idx",
                                                                           mmap=True)
    assert (xm.dtype.str, ym.dtype.str) == (">f4", ">i2")
    xb, yb = next(data.ArrayBatches(xm, ym, BS)(0))
    assert xb.dtype == np.float32 and xb.dtype.isnative and yb.dtype.isnative
    native = fit(mlp(), data.ArrayBatches(x, y, BS, seed=5), validation_data=(x, y))
    mapped = fit(mlp(), data.ArrayBatches(xm, ym, BS, seed=5), validation_data=(xm, ym))
    assert_same_training(native, mapped)
    assert native.history["val_loss"] == mapped.history["val_loss"]
    # a source of big-endian batches of its own
    own = fit(mlp(), lambda epoch: ((b[0].astype(">f4"), b[1].astype(">i4"))
                                    for b in data.ArrayBatches(x, y, BS, seed=5)(epoch)))
    assert_same_training(fit(mlp(), data.ArrayBatches(x, y, BS, seed=5)), own)


def test_read_idx_mmap(tmp_path):
    a = np.arange(24, dtype=np.int32).reshape(2, 3, 4)
    data.write_idx(tmp_path / "a.idx", a, compress=False)
    m = data.read_idx(tmp_path / "a.idx", mmap=True)
    assert isinstance(m, np.memmap) and m.shape == (2, 3, 4)
    np.testing.assert_array_equal(m, a)
    data.write_idx(tmp_path / "a.idx.gz", a)
    with pytest.raises(ValueError, match="needs a raw IDX file, got a gzip-compressed one"):
        data.read_idx(tmp_path / "a.idx.gz", mmap=True)
    with open(tmp_path / "short.idx", "wb") as f:
        f.write(open(tmp_path / "a.idx", "rb").read()[:-4])
    with pytest.raises(ValueError, match="file truncated"):
        data.read_idx(tmp_path / "short.idx", mmap=True)
    with pytest.raises(TypeError, match="mmap must be a bool"):
        data.read_idx(tmp_path / "a.idx", mmap="yes")
    assert os.path.exists(tmp_path / "a.idx")


def test_device_labels_out_of_range_stop_training(xy):
    """Labels already on the device are not checked on the host: the step refuses them."""
    x, y = xy

    def source(epoch):
        for b in range(4):
            yb = jnp.asarray(y[b * BS:(b + 1) * BS])
            yield x[b * BS:(b + 1) * BS], (yb.at[0].set(-1) if b == 1 else yb)

    with pytest.raises(train.NonFiniteLossError, match="epoch 1, step 2 of 4") as err:
        fit(mlp(), source, epochs=1)
    assert int(err.value.state.step) == 1
