"""Data sets as NHWC float32 arrays with integer labels: the bundled digits, npz and IDX.

- :func:`digits` — scikit-learn's bundled 8x8 handwritten digits (1,797 images, no
  download), scaled to ``[0, 1]``, split train / test stratified and seeded.
- :func:`load_npz` — a user's ``.npz`` with an image array and a label array.
- :func:`read_idx` / :func:`load_mnist` — the MNIST IDX format, raw or gzip-compressed.
- :func:`check_dataset` — the validation :func:`funcnet.train.fit` runs before training:
  same number of examples in ``x`` and ``y``, floating finite ``x``, integer labels in
  ``[0, num_classes)``.

Every reader returns plain numpy arrays: ``x`` of shape ``(N, H, W, C)`` float32 and ``y``
of shape ``(N,)`` int32. Bad input raises ``ValueError`` / ``TypeError`` naming the file or
argument, what was expected and what was found, before any array is returned: a corrupt or
truncated file (gzip stream included), a wrong magic number, a header shape that does not
match the payload, pixels of a dtype with no agreed scale, a non-finite ``scale``.
"""

from __future__ import annotations

import gzip
import math
import numbers
import os
import zipfile
import zlib
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from funcnet import _checks

# IDX type codes (third byte of the magic number) -> big-endian numpy dtype.
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
GZIP_MAGIC = b"\x1f\x8b"
NPY_MAGIC = b"\x93NUMPY"
ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")  # a member first, or an empty archive
# scale=None: the pixel dtypes with an agreed full scale (other integers need a scale).
DEFAULT_SCALES: dict[np.dtype, float] = {
    np.dtype(np.uint8): 255.0,
    np.dtype(np.uint16): 65535.0,
}


class Split(NamedTuple):
    """A train / test split: ``x_*`` ``(N, H, W, C)`` float32, ``y_*`` ``(N,)`` int32."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


# ---------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------


def _as_array(v: Any, name: str, where: str) -> np.ndarray:
    try:
        return _native(np.asarray(v))
    except (TypeError, ValueError) as e:  # ragged nested lists and the like
        raise ValueError(f"{where}: {name} is not a rectangular array ({e})") from e


def _native(a: Any) -> Any:
    """``a`` in the machine's byte order: a numpy array of big-endian dtype (``'>f4'``, what
    ``read_idx(mmap=True)`` maps for float and int16 / int32 files), which JAX cannot take,
    as a native copy; anything else as it is."""
    if isinstance(a, np.ndarray) and not a.dtype.isnative:
        return np.asarray(a, dtype=a.dtype.newbyteorder("="))
    return a


def _check_num_classes(num_classes: Any, where: str) -> None:
    if num_classes is None:
        return
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral):
        raise TypeError(f"{where}: num_classes must be a positive int or None, got "
                        f"{num_classes!r}")
    if num_classes <= 0:
        raise ValueError(f"{where}: num_classes must be a positive int or None, got "
                         f"{num_classes!r}")


def _fspath(path: Any, where: str, name: str = "path") -> str:
    if not isinstance(path, str | os.PathLike):
        raise TypeError(f"{where}: {name} must be a str or os.PathLike, got {path!r}")
    path = os.fspath(path)
    if not isinstance(path, str):
        raise TypeError(f"{where}: {name} must be a str or os.PathLike, got bytes {path!r}")
    return path


def check_labels(y: Any, num_classes: int | None = None, where: str = "labels") -> np.ndarray:
    """Validate integer class labels ``(N,)``; return them as int32.

    Raises ``TypeError`` for a non-integer dtype (or a ``num_classes`` that is not a
    positive int) and ``ValueError`` for a wrong rank or a label outside
    ``[0, num_classes)`` (``num_classes=None``: outside ``[0, 2**31)``, the int32 range).
    """
    _check_num_classes(num_classes, where)
    arr = _as_array(y, "labels", where)
    if not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{where}: labels must have an integer dtype, got {arr.dtype}")
    if arr.ndim != 1:
        raise ValueError(f"{where}: labels must have shape (N,), got {arr.shape}")
    if arr.size:
        lo, hi = int(arr.min()), int(arr.max())
        top = num_classes if num_classes is not None else int(np.iinfo(np.int32).max) + 1
        if lo < 0 or hi >= top:
            rng = f"[0, {num_classes})" if num_classes is not None else "[0, 2**31) (int32)"
            raise ValueError(
                f"{where}: labels must lie in {rng}, got values in [{lo}, {hi}]"
            )
    return arr.astype(np.int32)


def check_x_dtype(dtype: Any, integer_x: bool, where: str, name: str = "x") -> None:
    """Integer ids when ``integer_x`` (an Embedding-first network), else floating."""
    if integer_x:
        if not jnp.issubdtype(dtype, jnp.integer):
            raise TypeError(
                f"{where}: the network's first layer takes integer input (ids), got {name} of "
                f"dtype {dtype}"
            )
    elif not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
            f"{where}: {name} must have a floating dtype (e.g. float32), got {dtype}; "
            f"convert it with {name}.astype(np.float32)"
        )


def check_examples(x_shape: tuple, y_shape: tuple, where: str) -> None:
    """``x`` and ``y`` have the same number of examples (first axis), and at least one."""
    x_shape, y_shape = tuple(x_shape), tuple(y_shape)
    if x_shape[0] != y_shape[0]:
        raise ValueError(f"{where}: x and y must have the same number of examples, got "
                         f"{x_shape[0]} (x shape {x_shape}) and {y_shape[0]} (y shape "
                         f"{y_shape})")
    if x_shape[0] == 0:
        raise ValueError(f"{where}: the data set is empty (x shape {x_shape})")


def check_dataset(
    x: Any, y: Any, num_classes: int | None = None, where: str = "data",
    integer_x: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Validate a data set before any training; return ``(x, y)`` as numpy arrays.

    ``x``: ``(N, ...)`` floating and finite (integer with ``integer_x``: ids for a network
    that starts with an ``Embedding``). ``y``: ``(N,)`` integer labels in
    ``[0, num_classes)``, or a floating target array with ``N`` rows.
    """
    _check_num_classes(num_classes, where)
    x = _as_array(x, "x", where)
    y = _as_array(y, "y", where)
    if x.ndim < 1 or y.ndim < 1:
        raise ValueError(
            f"{where}: x and y must be batched arrays (N, ...), got shapes {x.shape} and {y.shape}"
        )
    check_examples(x.shape, y.shape, where)
    check_x_dtype(x.dtype, integer_x, where)
    if not integer_x and not np.all(np.isfinite(x)):
        bad = int(np.argwhere(~np.isfinite(x.reshape(x.shape[0], -1)))[0, 0])
        raise ValueError(f"{where}: x contains non-finite values (first at example {bad})")
    if np.issubdtype(y.dtype, np.integer):
        y = check_labels(y, num_classes, where)
    elif np.issubdtype(y.dtype, np.floating):
        if not np.all(np.isfinite(y)):
            raise ValueError(f"{where}: y contains non-finite values")
    else:
        raise TypeError(
            f"{where}: y must be integer labels or floating targets, got dtype {y.dtype}"
        )
    return x, y


# ---------------------------------------------------------------------------------------
# The bundled digits
# ---------------------------------------------------------------------------------------


def digits(test_size: float = 0.2, seed: int = 0) -> Split:
    """scikit-learn's bundled 8x8 digits, NHWC float32 in ``[0, 1]``, split stratified.

    Args:
      test_size: fraction of the 1,797 images held out for testing, in ``(0, 1)``.
      seed: seed of the stratified shuffle split (the same seed gives the same split).

    Returns:
      :class:`Split` with ``x_*`` of shape ``(N, 8, 8, 1)`` (pixel values ``/ 16``) and
      ``y_*`` of shape ``(N,)`` int32 in ``[0, 10)``. With ``test_size=0.2``: 1,437 train,
      360 test.
    """
    if isinstance(test_size, bool) or not isinstance(test_size, int | float) or not (
        0.0 < test_size < 1.0
    ):
        raise ValueError(f"digits: test_size must be a fraction in (0, 1), got {test_size!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not (
        0 <= seed < 2**32
    ):
        raise ValueError(f"digits: seed must be an int in [0, 2**32), got {seed!r}")
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:
        raise ImportError(
            "digits: needs scikit-learn: pip install 'funcnet[data]' (or scikit-learn)"
        ) from e
    bunch = load_digits()
    x = (bunch.images.astype(np.float32) / 16.0)[..., None]
    y = bunch.target.astype(np.int32)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=test_size, random_state=seed, stratify=y
    )
    return Split(x_tr, y_tr, x_te, y_te)


# ---------------------------------------------------------------------------------------
# .npz
# ---------------------------------------------------------------------------------------


def load_npz(
    path: str | os.PathLike,
    x_key: str = "x",
    y_key: str = "y",
    num_classes: int | None = None,
    scale: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Load images and labels from an ``.npz`` file (pickle disabled).

    Args:
      path: the ``.npz`` archive (``np.savez``); a single-array ``.npy`` file is refused.
      x_key, y_key: names of the image and label arrays in it.
      num_classes: if given, labels must lie in ``[0, num_classes)``.
      scale: a positive finite number to divide the images by (e.g. 255 for 0..255
        pixels); ``None`` divides uint8 images by 255 and uint16 images by 65535, leaves
        floating images as they are, and refuses other integer dtypes (int32 / int64
        pixels have no agreed full scale: pass ``scale``).

    Returns:
      ``x`` ``(N, H, W, C)`` float32 (a ``(N, H, W)`` array gets ``C = 1``) and ``y``
      ``(N,)`` int32. Floating images must be finite.
    """
    where = f"load_npz({_fspath(path, 'load_npz')!r})"
    path = os.fspath(path)
    for name, key in (("x_key", x_key), ("y_key", y_key)):
        if not isinstance(key, str):
            raise TypeError(f"{where}: {name} must be a str, got {key!r}")
    _check_num_classes(num_classes, where)
    scale = _check_scale(scale, where)
    try:
        with open(path, "rb") as fh:
            head = fh.read(len(NPY_MAGIC))
    except OSError as e:
        raise ValueError(f"{where}: not a readable .npz file ({e})") from e
    if head.startswith(NPY_MAGIC):
        raise ValueError(
            f"{where}: expected an .npz archive (np.savez), got a single .npy array; load it "
            f"with np.load and pass the images and labels yourself, or save both with np.savez"
        )
    if not head.startswith(ZIP_MAGICS):
        raise ValueError(
            f"{where}: not an .npz archive (expected a zip file written by np.savez, the file "
            f"starts with {head[:4]!r})"
        )
    try:
        f = np.load(path, allow_pickle=False)
    except (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error) as e:
        raise ValueError(f"{where}: not a readable .npz file ({e})") from e
    if not hasattr(f, "files"):  # pragma: no cover - the magic check above rules it out
        raise ValueError(f"{where}: expected an .npz archive, got a single .npy array")
    with f:
        missing = [k for k in (x_key, y_key) if k not in f.files]
        if missing:
            raise ValueError(
                f"{where}: no array named {missing[0]!r}; the file has {sorted(f.files)}"
            )
        try:
            x, y = f[x_key], f[y_key]
        except (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error) as e:
            raise ValueError(f"{where}: corrupt array in the .npz file ({e})") from e
    return _images_and_labels(x, y, where, num_classes, scale)


def _check_scale(scale: Any, where: str) -> float | None:
    if scale is None:
        return None
    if isinstance(scale, bool | np.bool_) or not isinstance(scale, numbers.Real):
        raise TypeError(f"{where}: scale must be a positive finite number or None, got "
                        f"{scale!r}")
    value = float(scale)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{where}: scale must be a positive finite number or None, got "
                         f"{scale!r}")
    return value


def _images_and_labels(x, y, where, num_classes, scale, images_where=None, labels_where=None):
    images_where = images_where or where
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4:
        raise ValueError(
            f"{images_where}: images must have shape (N, H, W) or (N, H, W, C), got {x.shape}"
        )
    is_int, is_float = np.issubdtype(x.dtype, np.integer), np.issubdtype(x.dtype, np.floating)
    if not (is_int or is_float):
        raise TypeError(
            f"{images_where}: images must be integer pixels or floating, got dtype {x.dtype}"
        )
    if scale is None:
        if is_float:
            scale = 1.0
        elif x.dtype.newbyteorder("=") in DEFAULT_SCALES:
            scale = DEFAULT_SCALES[x.dtype.newbyteorder("=")]
        else:
            raise TypeError(
                f"{images_where}: images of dtype {x.dtype} have no agreed full scale; pass "
                f"scale= (e.g. scale=255 for 0..255 pixels). Without scale: uint8 (/255), "
                f"uint16 (/65535) or floating images"
            )
    y = check_labels(y, num_classes, labels_where or where)
    if x.shape[0] != y.shape[0]:
        raise ValueError(
            f"{where}: {x.shape[0]} images but {y.shape[0]} labels; they must match"
        )
    if is_float and not np.all(np.isfinite(x)):
        bad = int(np.argwhere(~np.isfinite(x.reshape(x.shape[0], -1)))[0, 0])
        raise ValueError(
            f"{images_where}: images contain non-finite values (first at example {bad})"
        )
    return (x.astype(np.float32) / np.float32(scale)), y


# ---------------------------------------------------------------------------------------
# IDX (the MNIST format)
# ---------------------------------------------------------------------------------------


def read_idx(path: str | os.PathLike, mmap: bool = False) -> np.ndarray:
    """Read an IDX file (raw, or gzip-compressed: detected from its first bytes).

    Format (big-endian): two zero bytes, a type code (``0x08`` uint8, ``0x09`` int8,
    ``0x0B`` int16, ``0x0C`` int32, ``0x0D`` float32, ``0x0E`` float64), the number of
    dimensions ``d``, then ``d`` uint32 sizes, then the data in C order.

    ``mmap=True`` memory-maps a raw (uncompressed) file read-only instead of reading it:
    nothing is read until it is indexed (the input of :class:`ArrayBatches`, which reads
    one batch at a time). Its dtype is then the file's big-endian one (uint8 for images);
    a gzip file cannot be mapped and is refused (``gunzip`` it once).

    Returns:
      The array with the shape given by the header: in native byte order, or a read-only
      ``np.memmap`` with ``mmap=True``.
    """
    where = f"read_idx({_fspath(path, 'read_idx')!r})"
    path = os.fspath(path)
    if not isinstance(mmap, bool):
        raise TypeError(f"{where}: mmap must be a bool, got {type(mmap).__name__} {mmap!r}")
    try:
        with open(path, "rb") as f:
            raw = f.read(4 + 4 * 255) if mmap else f.read()
            size = os.fstat(f.fileno()).st_size
    except OSError as e:
        raise ValueError(f"{where}: cannot read the file ({e})") from e
    if mmap and raw[:2] == GZIP_MAGIC:
        raise ValueError(
            f"{where}: mmap=True needs a raw IDX file, got a gzip-compressed one; decompress "
            f"it once (gunzip -k {path!r}) and map the result"
        )
    if raw[:2] == GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
            raise ValueError(
                f"{where}: cannot read the file: corrupt or truncated gzip stream "
                f"({type(e).__name__}: {e})"
            ) from e
    if len(raw) < 4:
        raise ValueError(f"{where}: file too short for an IDX header ({len(raw)} bytes)")
    if raw[0] != 0 or raw[1] != 0:
        raise ValueError(
            f"{where}: bad magic number {raw[:4].hex()}; an IDX file starts with 00 00 "
            f"<type> <ndim>"
        )
    code, ndim = raw[2], raw[3]
    if code not in IDX_DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in IDX_DTYPES)
        raise ValueError(f"{where}: unknown IDX type code 0x{code:02X}; expected one of {known}")
    if ndim == 0:
        raise ValueError(f"{where}: IDX header declares 0 dimensions")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{where}: file truncated inside the header ({len(raw)} bytes)")
    shape = tuple(int(v) for v in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = IDX_DTYPES[code]
    expected = math.prod(shape) * dtype.itemsize  # Python ints: no overflow
    got = (size if mmap else len(raw)) - header
    if got != expected:
        state = "truncated" if got < expected else "has trailing bytes"
        raise ValueError(
            f"{where}: file {state}: header shape {shape} of {dtype.name} needs {expected} "
            f"data bytes, found {got}"
        )
    if mmap:
        return np.memmap(path, dtype=dtype, mode="r", offset=header, shape=shape)
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="))


def write_idx(path: str | os.PathLike, array: Any, compress: bool | None = None) -> None:
    """Write ``array`` as an IDX file; gzip it if ``compress`` (default: path ends ``.gz``).

    The file is replaced atomically (never half-written), as :func:`funcnet.checkpoint.save`.
    """
    from funcnet.checkpoint import _atomic_file, _check_target

    path = _check_target(path, "write_idx")
    arr = np.asarray(array)
    codes = {dt.newbyteorder("=").str: c for c, dt in IDX_DTYPES.items()}
    key = arr.dtype.newbyteorder("=").str
    if key not in codes:
        raise TypeError(f"write_idx: unsupported dtype {arr.dtype} for IDX")
    if arr.ndim == 0 or arr.ndim > 255:
        raise ValueError(f"write_idx: array must have 1 to 255 dimensions, got {arr.ndim}")
    code = codes[key]
    payload = (
        bytes([0, 0, code, arr.ndim])
        + np.asarray(arr.shape, dtype=">u4").tobytes()
        + arr.astype(IDX_DTYPES[code]).tobytes()
    )
    if compress is None:
        compress = path.endswith(".gz")
    if compress:
        payload = gzip.compress(payload)
    with _atomic_file(path) as f:
        f.write(payload)


def load_mnist(
    images_path: str | os.PathLike,
    labels_path: str | os.PathLike,
    num_classes: int = 10,
) -> tuple[np.ndarray, np.ndarray]:
    """MNIST-format images and labels from two IDX files (raw or gzip), e.g. MNIST or
    Fashion-MNIST.

    Images: a uint8 IDX array ``(N, H, W)`` (type code ``0x08``, pixels 0..255), returned
    as ``(N, H, W, 1)`` float32 in ``[0, 1]``; any other IDX type is refused (its scale is
    unknown: read it with :func:`read_idx` and scale it yourself). Labels: an integer IDX
    array ``(N,)`` in ``[0, num_classes)``, as int32.
    """
    images_where = f"load_mnist: images file {_fspath(images_path, 'load_mnist', 'images_path')!r}"
    labels_where = f"load_mnist: labels file {_fspath(labels_path, 'load_mnist', 'labels_path')!r}"
    _check_num_classes(num_classes, "load_mnist")
    if num_classes is None:
        raise TypeError("load_mnist: num_classes must be a positive int, got None")
    x = read_idx(images_path)
    y = read_idx(labels_path)
    where = f"load_mnist({os.fspath(images_path)!r}, {os.fspath(labels_path)!r})"
    if x.ndim != 3:
        raise ValueError(
            f"{images_where}: images must be a 3-D IDX array (N, H, W), got shape {x.shape}"
        )
    if x.dtype != np.uint8:
        raise TypeError(
            f"{images_where}: images must be uint8 pixels (IDX type code 0x08), got "
            f"{x.dtype}; for other IDX data use read_idx and scale it yourself"
        )
    if y.ndim != 1:
        raise ValueError(
            f"{labels_where}: labels must be a 1-D IDX array (N,), got shape {y.shape}"
        )
    return _images_and_labels(x, y, where, num_classes, 255.0, images_where, labels_where)


# ---------------------------------------------------------------------------------------
# Streaming: one batch at a time
# ---------------------------------------------------------------------------------------


def _check_process(process: Any, batch_size: int, where: str) -> tuple[int, int] | None:
    if process is None:
        return None
    ok = (isinstance(process, tuple) and len(process) == 2
          and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in process))
    if not ok:
        raise TypeError(f"{where}: process must be None or a pair of ints (index, count), e.g. "
                        f"(jax.process_index(), jax.process_count()), got {process!r}")
    index, count = int(process[0]), int(process[1])
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"{where}: process=(index, count) needs count >= 1 and 0 <= index < "
                         f"count, got {process!r}")
    if batch_size % count:
        raise ValueError(f"{where}: batch_size={batch_size} must divide by the {count} "
                         f"processes (each reads batch_size / count rows of every batch)")
    return index, count


class ArrayBatches:
    """A batch source for :func:`funcnet.train.fit` over arrays that need not fit in memory.

    ``ArrayBatches(x, y, batch_size)`` reads a batch's rows of ``x`` and ``y`` only when
    the batch is asked for: from numpy arrays, memory-mapped files
    (``np.load(path, mmap_mode="r")``, ``read_idx(path, mmap=True)``) or anything with a
    ``shape`` that takes a strictly increasing integer index array along its first axis
    (an ``h5py`` data set). Training from a memory map then holds about one batch of the data
    in memory, where ``fit(net, params, x, y)`` holds a copy of the data set on the device.

    ``source(epoch)`` returns an iterator over the batches of ``epoch`` (0-based):
    ``(x_batch, y_batch)`` numpy pairs of ``batch_size`` rows, the last one shorter when
    ``batch_size`` does not divide ``N`` (left out with ``drop_remainder=True``), in the
    machine's byte order (the rows of a big-endian IDX map are converted as they are read);
    ``len(source)`` is the number of batches per epoch. The order is :func:`fit`'s own:
    epoch ``e`` takes the rows in the order ``jax.random.permutation(fold_in(key(seed),
    e), N)`` (``range(N)`` with ``shuffle=False``), so
    ``fit(net, params, ArrayBatches(x, y, 128, seed=s), seed=s)`` trains exactly as
    ``fit(net, params, x, y, batch_size=128, seed=s)``. The same epoch always gives the
    same batches (``fit`` relies on it to replay an epoch; resume gives the same result).

    ``transform(x, y, rng) -> (x, y)`` is applied to every batch after it is read
    (conversion, augmentation), ``rng`` a ``numpy.random.Generator`` seeded by
    ``(seed, epoch, batch index)`` and, with ``process=``, the process index (so the
    processes draw different augmentations; a random ``transform`` then differs from one
    process's run): reproducible augmentation.

    ``process=(index, count)``: data-parallel training over several processes
    (``jax.distributed``). Every process draws the same permutation and the same global
    batches of ``batch_size`` rows and reads only its own ``batch_size / count``
    consecutive rows of each (``batch_size`` must divide by ``count``), so the processes
    together train on exactly the batches one process would. A partial last global batch
    is split the same way, each process's part padded to ``batch_size / count`` rows of
    weight 0: that batch is a triple ``(x, y, w)`` in every process.
    """

    def __init__(self, x: Any, y: Any, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                 drop_remainder: bool = False, transform: Any = None, process: Any = None):
        where = "ArrayBatches"
        for name, a in (("x", x), ("y", y)):
            shape = getattr(a, "shape", None)
            if not isinstance(shape, tuple) or len(shape) < 1 or not hasattr(a, "__getitem__"):
                raise TypeError(f"{where}: {name} must be an array with a first (example) "
                                f"axis, e.g. a numpy array or np.load(path, mmap_mode='r'), "
                                f"got {type(a).__name__}")
        check_examples(x.shape, y.shape, where)
        if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral):
            raise TypeError(f"{where}: batch_size must be a positive int, got {batch_size!r}")
        if batch_size < 1:
            raise ValueError(f"{where}: batch_size must be a positive int, got {batch_size!r}")
        for name, flag in (("shuffle", shuffle), ("drop_remainder", drop_remainder)):
            if not isinstance(flag, bool):
                raise TypeError(f"{where}: {name} must be a bool, got {type(flag).__name__} "
                                f"{flag!r}")
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise TypeError(f"{where}: seed must be a non-negative int, got {seed!r}")
        if not 0 <= seed < 2**32:
            raise ValueError(f"{where}: seed must be a non-negative int below 2**32, got {seed}")
        if transform is not None and not callable(transform):
            raise TypeError(f"{where}: transform must be callable (x, y, rng) -> (x, y) or "
                            f"None, got {type(transform).__name__}")
        self.x, self.y = x, y
        self.n, self.batch_size = int(x.shape[0]), int(batch_size)
        self.shuffle, self.seed, self.drop_remainder = shuffle, int(seed), drop_remainder
        self.transform = transform
        self.process = _check_process(process, self.batch_size, where)
        if drop_remainder and self.n < self.batch_size:
            raise ValueError(f"{where}: drop_remainder=True with batch_size={batch_size} "
                             f"leaves no batch of the {self.n} examples")

    def __len__(self) -> int:
        full, rest = divmod(self.n, self.batch_size)
        return full + (1 if rest and not self.drop_remainder else 0)

    def order(self, epoch: int) -> np.ndarray:
        """The example indices of ``epoch`` in the order they are batched."""
        if isinstance(epoch, bool) or not isinstance(epoch, numbers.Integral) or epoch < 0:
            raise TypeError(f"ArrayBatches: epoch must be a non-negative int, got {epoch!r}")
        if not self.shuffle:
            return np.arange(self.n)
        key = jax.random.fold_in(jax.random.key(self.seed), int(epoch))
        return np.asarray(jax.random.permutation(key, self.n))

    def _read(self, a: Any, idx: np.ndarray) -> np.ndarray:
        if idx.size == 0:
            return _native(np.asarray(a[np.arange(0)]))
        # each row read once, in strictly increasing order (h5py refuses anything else;
        # a process's padded last batch repeats index 0); big-endian rows (a mapped IDX
        # file) in native byte order, as JAX takes them
        unique, inverse = np.unique(idx, return_inverse=True)
        return _native(np.asarray(a[unique]))[inverse.reshape(-1)]

    def __call__(self, epoch: int):
        order = self.order(epoch)
        return self._batches(int(epoch), order)

    def _batches(self, epoch: int, order: np.ndarray):
        bs = self.batch_size
        for b in range(len(self)):
            idx = order[b * bs:(b + 1) * bs]
            w = None
            if self.process is not None:
                index, count = self.process
                local = bs // count
                partial = idx.size < bs  # the last global batch: a triple in every process
                idx = idx[index * local:(index + 1) * local]
                if partial:  # this process's part, padded to local rows of weight 0
                    w = np.zeros(local, np.float32)
                    w[:idx.size] = 1.0
                    idx = np.concatenate([idx, np.zeros(local - idx.size, idx.dtype)])
            xb, yb = self._read(self.x, idx), self._read(self.y, idx)
            if self.transform is not None:
                part = () if self.process is None else (self.process[0],)
                rng = np.random.default_rng([self.seed, epoch, b, *part])
                xb, yb = self._transformed(xb, yb, rng, epoch, b)
            yield (xb, yb) if w is None else (xb, yb, w)

    def _transformed(self, xb: np.ndarray, yb: np.ndarray, rng: Any, epoch: int,
                     b: int) -> tuple[Any, Any]:
        """``transform(xb, yb, rng)``, its failures and a result that is not an ``(x, y)``
        pair of as many rows each named with the batch (not numpy's unpacking errors). It
        may drop rows (a filter), except with ``process=`` (the weights pad to the batch)."""
        where = f"ArrayBatches: transform, epoch {epoch + 1}, batch {b + 1}"
        try:
            out = self.transform(xb, yb, rng)
        except TypeError as e:
            if "positional argument" in str(e) or "keyword argument" in str(e):
                raise TypeError(f"{where}: transform must take (x, y, rng) and return (x, y): "
                                f"{e}") from e
            raise
        if not isinstance(out, tuple | list) or len(out) != 2:
            got = (f"a {type(out).__name__} of {len(out)} items"
                   if isinstance(out, tuple | list) else f"an array of shape {out.shape}"
                   if isinstance(out, np.ndarray) else _checks.describe(out))
            raise TypeError(f"{where}: transform must return the pair (x, y), got {got}")
        rows, (x, y) = xb.shape[0], out
        if np.ndim(x) < 1 or np.ndim(y) < 1 or np.shape(x)[0] != np.shape(y)[0]:
            raise ValueError(f"{where}: transform must return x and y with one row per "
                             f"example, got shapes {np.shape(x)} and {np.shape(y)}")
        if self.process is not None and np.shape(x)[0] != rows:  # w pads to these rows
            raise ValueError(f"{where}: with process=, transform must keep the batch's "
                             f"{rows} rows (their weights are fixed), got {np.shape(x)[0]}")
        return x, y

    def __repr__(self) -> str:
        return (f"ArrayBatches(N={self.n}, batch_size={self.batch_size}, "
                f"shuffle={self.shuffle}, seed={self.seed}, process={self.process})")


def mnist_batches(
    images_path: str | os.PathLike,
    labels_path: str | os.PathLike,
    batch_size: int,
    *,
    num_classes: int = 10,
    transform: Any = None,
    **kwargs: Any,
) -> ArrayBatches:
    """:class:`ArrayBatches` streaming MNIST-format IDX files from disk (memory-mapped).

    The images file must be raw (``gunzip -k`` a ``.gz`` once): it is mapped, never read
    whole, and each batch comes out as :func:`load_mnist` gives it, ``(B, H, W, 1)``
    float32 in ``[0, 1]``; ``transform(x, y, rng)`` then applies to that. The labels
    (``N`` bytes) are read and checked up front. Other keywords go to
    :class:`ArrayBatches` (``shuffle``, ``seed``, ``drop_remainder``, ``process``).
    """
    images_where = f"mnist_batches: images file {_fspath(images_path, 'mnist_batches')!r}"
    _check_num_classes(num_classes, "mnist_batches")
    x = read_idx(images_path, mmap=True)
    if x.ndim != 3 or x.dtype != np.uint8:
        raise ValueError(f"{images_where}: images must be a 3-D uint8 IDX array (N, H, W), "
                         f"got shape {x.shape} of {x.dtype}")
    y = check_labels(read_idx(labels_path), num_classes,
                     f"mnist_batches: labels file {os.fspath(labels_path)!r}")
    check_examples(x.shape, y.shape, "mnist_batches")
    if transform is not None and not callable(transform):
        raise TypeError(f"mnist_batches: transform must be callable (x, y, rng) -> (x, y) or "
                        f"None, got {type(transform).__name__}")

    def to_float(xb, yb, rng):
        xb = xb[..., None].astype(np.float32) / np.float32(255.0)
        return (xb, yb) if transform is None else transform(xb, yb, rng)

    return ArrayBatches(x, y, batch_size, transform=to_float, **kwargs)


# ---------------------------------------------------------------------------------------
# Fashion-MNIST
# ---------------------------------------------------------------------------------------

#: Where Debian's ``dataset-fashion-mnist`` package puts the four files.
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
#: The ten classes, in label order.
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                         "Shirt", "Sneaker", "Bag", "Ankle boot")


def fashion_mnist(path: str | os.PathLike | None = None) -> Split:
    """Fashion-MNIST (Xiao et al., 2017): 60,000 + 10,000 grayscale 28x28 images, 10 classes.

    Reads the four MNIST-format IDX files (gzip or raw: the names of
    :data:`FASHION_MNIST_FILES`, or the same without ``.gz``) from ``path``, by default
    :data:`FASHION_MNIST_DIR`, where Debian's package puts them::

        apt-get update && apt-get install -y dataset-fashion-mnist

    Returns:
      :class:`Split` with ``x_*`` of shape ``(N, 28, 28, 1)`` float32 in ``[0, 1]`` and
      ``y_*`` of shape ``(N,)`` int32 in ``[0, 10)`` (names: :data:`FASHION_MNIST_CLASSES`).
    """
    folder = FASHION_MNIST_DIR if path is None else _fspath(path, "fashion_mnist")
    files = {}
    missing = []
    for key, name in FASHION_MNIST_FILES.items():
        for candidate in (name, name[: -len(".gz")]):
            full = os.path.join(folder, candidate)
            if os.path.isfile(full):
                files[key] = full
                break
        else:
            missing.append(name)
    if missing:
        how = ("install them with: apt-get update && apt-get install -y dataset-fashion-mnist "
               f"(Debian / Ubuntu; they land in {FASHION_MNIST_DIR})")
        if path is not None:
            how += ", or pass the folder that holds them as path="
        raise FileNotFoundError(
            f"fashion_mnist: {len(missing)} of the 4 Fashion-MNIST files are missing from "
            f"{folder!r}: {', '.join(missing)}; {how}"
        )
    x_train, y_train = load_mnist(files["train_images"], files["train_labels"])
    x_test, y_test = load_mnist(files["test_images"], files["test_labels"])
    return Split(x_train, y_train, x_test, y_test)
