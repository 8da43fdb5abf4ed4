"""Save and restore pytrees (params, optimizer state, step, metadata) atomically, pickle-free.

File format (version 1)
-----------------------
A checkpoint is one ZIP archive (stored, uncompressed), readable by ``np.load`` as an
``.npz``, with these members:

- ``__funcnet_checkpoint__.json`` — UTF-8 JSON::

      {"format": "funcnet-checkpoint", "version": 1,
       "treedef": "<str(treedef), informative only>",
       "leaves": [{"path": "[0]['w']", "member": "leaf_00000.npy",
                   "shape": [64, 10], "dtype": "float32", "kind": "array"}, ...],
       "metadata": {... user JSON ...}}

  ``path`` is ``jax.tree_util.keystr`` of the leaf's path in the pytree, in flattening
  order; ``kind`` is ``"array"`` or ``"prng_key:<impl>"`` for a typed PRNG key array
  (stored as its ``jax.random.key_data``).
- ``leaf_NNNNN.npy`` — each leaf in the ``.npy`` format (``allow_pickle=False``). The ZIP
  CRC-32 of every member is checked on read.

Writing is atomic: the archive goes to a temporary file in the same directory, is flushed
and ``fsync``-ed, then ``os.replace``-d over the target (and the directory is fsync-ed
where the OS allows). An interrupted save leaves the previous checkpoint untouched.

:func:`restore` rebuilds the pytree of a *template* (e.g. freshly initialised params and
optimizer state) and checks that paths, shapes and dtypes agree; a mismatch or a truncated
/ corrupt file raises :class:`CheckpointError` (a ``ValueError``) naming the file and the
first difference.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
import zipfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

FORMAT = "funcnet-checkpoint"
VERSION = 1
MANIFEST = "__funcnet_checkpoint__.json"


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, corrupt, or does not match the template."""


def _is_prng_key(leaf: Any) -> bool:
    dtype = getattr(leaf, "dtype", None)
    return dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key)


def _leaf_to_numpy(leaf: Any) -> tuple[np.ndarray, str]:
    if _is_prng_key(leaf):
        impl = str(jax.random.key_impl(leaf))
        return np.asarray(jax.random.key_data(leaf)), f"prng_key:{impl}"
    arr = np.asarray(leaf)
    if arr.dtype.kind not in "biufcV" or (arr.dtype.kind == "V" and not _is_ml_dtype(arr.dtype)):
        raise TypeError(
            f"checkpoint.save: leaves must be arrays or numbers, got {type(leaf).__name__} "
            f"of dtype {arr.dtype}"
        )
    return arr.astype(arr.dtype.newbyteorder("=")), "array"


def _is_ml_dtype(dtype: np.dtype) -> bool:
    # bfloat16, float8_*, int4 ...: numpy's .npy format would store them as raw void.
    return type(dtype).__module__.startswith("ml_dtypes") or dtype.type.__module__.startswith(
        "ml_dtypes"
    )


def _storable(arr: np.ndarray) -> np.ndarray:
    """A view ``.npy`` can hold exactly: ml_dtypes (bfloat16...) as unsigned ints."""
    if _is_ml_dtype(arr.dtype):
        return arr.view(f"u{arr.dtype.itemsize}")
    return arr


def _fsync_dir(directory: str) -> None:
    # Makes the rename durable on POSIX; not possible (nor needed) everywhere.
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_archive(f, tree: Any, metadata: Any) -> None:
    leaves_with_paths, treedef = jax.tree_util.tree_flatten_with_path(tree)
    entries = []
    with zipfile.ZipFile(f, mode="w", compression=zipfile.ZIP_STORED) as zf:
        for i, (path, leaf) in enumerate(leaves_with_paths):
            arr, kind = _leaf_to_numpy(leaf)
            member = f"leaf_{i:05d}.npy"
            buf = io.BytesIO()
            np.lib.format.write_array(buf, _storable(arr), allow_pickle=False)
            zf.writestr(member, buf.getvalue())
            entries.append({
                "path": jax.tree_util.keystr(path),
                "member": member,
                "shape": list(arr.shape),
                "dtype": arr.dtype.name,
                "kind": kind,
            })  # fmt: skip
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "treedef": str(treedef),
            "leaves": entries,
            "metadata": metadata,
        }
        zf.writestr(MANIFEST, json.dumps(manifest, indent=1))


def save(path: str | os.PathLike, tree: Any, metadata: Any = None) -> None:
    """Write ``tree`` (any pytree of arrays / numbers) to ``path`` atomically.

    Args:
      path: the checkpoint file (conventionally ``*.ckpt`` or ``*.npz``); its directory
        must exist. An existing file is replaced only once the new one is complete.
      tree: pytree whose leaves are arrays, numpy scalars, Python numbers or typed PRNG
        keys.
      metadata: JSON-serialisable value stored alongside (epoch, history, config...).
    """
    path = os.fspath(path)
    try:
        json.dumps(metadata)
    except (TypeError, ValueError) as e:
        raise TypeError(f"checkpoint.save: metadata must be JSON-serialisable ({e})") from e
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise ValueError(f"checkpoint.save: directory {directory!r} does not exist")
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            _write_archive(f, tree, metadata)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    _fsync_dir(directory)


def _open(path: str) -> tuple[zipfile.ZipFile, dict]:
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path!r}: no such file")
    try:
        zf = zipfile.ZipFile(path, mode="r")
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise CheckpointError(
            f"checkpoint {path!r}: not a readable checkpoint (truncated or corrupt: {e})"
        ) from e
    try:
        manifest = json.loads(zf.read(MANIFEST).decode("utf-8"))
    except KeyError as e:
        zf.close()
        raise CheckpointError(
            f"checkpoint {path!r}: no {MANIFEST} member; not a funcnet checkpoint"
        ) from e
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, UnicodeDecodeError) as e:
        zf.close()
        raise CheckpointError(f"checkpoint {path!r}: corrupt manifest ({e})") from e
    if (
        not isinstance(manifest, dict)
        or manifest.get("format") != FORMAT
        or not isinstance(manifest.get("leaves"), list)
    ):
        zf.close()
        raise CheckpointError(f"checkpoint {path!r}: manifest is not a {FORMAT} manifest")
    if manifest.get("version") != VERSION:
        zf.close()
        raise CheckpointError(
            f"checkpoint {path!r}: format version {manifest.get('version')!r}, this funcnet "
            f"reads version {VERSION}"
        )
    return zf, manifest


def _read_leaf(zf: zipfile.ZipFile, entry: dict, path: str) -> np.ndarray:
    try:
        raw = zf.read(entry["member"])
        arr = np.lib.format.read_array(io.BytesIO(raw), allow_pickle=False)
    except (KeyError, zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise CheckpointError(
            f"checkpoint {path!r}: leaf {entry.get('path')!r} is unreadable (truncated or "
            f"corrupt: {e})"
        ) from e
    try:
        dtype = np.dtype(entry["dtype"])
    except TypeError as e:
        raise CheckpointError(
            f"checkpoint {path!r}: leaf {entry['path']!r} has unknown dtype {entry['dtype']!r}"
        ) from e
    if _is_ml_dtype(dtype) and arr.dtype == np.dtype(f"u{dtype.itemsize}"):
        arr = arr.view(dtype)
    if list(arr.shape) != list(entry["shape"]) or dtype != arr.dtype:
        raise CheckpointError(
            f"checkpoint {path!r}: leaf {entry['path']!r} holds {arr.dtype}{list(arr.shape)}, "
            f"its manifest says {entry['dtype']}{entry['shape']} (corrupt file)"
        )
    return arr


def read_metadata(path: str | os.PathLike) -> Any:
    """The ``metadata`` stored with :func:`save`, without reading any array."""
    zf, manifest = _open(os.fspath(path))
    zf.close()
    return manifest.get("metadata")


def load(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], Any]:
    """Every leaf as ``{keystr path: numpy array}`` (flattening order) and the metadata.

    Typed PRNG keys come back as their raw key data. Use :func:`restore` to rebuild a
    pytree.
    """
    path = os.fspath(path)
    zf, manifest = _open(path)
    with zf:
        leaves = {e["path"]: _read_leaf(zf, e, path) for e in manifest["leaves"]}
    return leaves, manifest.get("metadata")


def _template_leaf_info(leaf: Any) -> tuple[tuple[int, ...], np.dtype, str]:
    if _is_prng_key(leaf):
        data = jax.random.key_data(leaf)
        return tuple(data.shape), np.dtype(data.dtype), f"prng_key:{jax.random.key_impl(leaf)}"
    if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):  # jax / numpy arrays, ShapeDtypeStruct
        return tuple(leaf.shape), np.dtype(leaf.dtype), "array"
    arr = np.asarray(leaf)
    return arr.shape, arr.dtype, "array"


def restore(path: str | os.PathLike, template: Any) -> tuple[Any, Any]:
    """Read a checkpoint into the structure of ``template``; return ``(tree, metadata)``.

    ``template`` is a pytree with the expected structure whose leaves give the expected
    shape and dtype (arrays, ``jax.ShapeDtypeStruct``, numbers or PRNG keys). The result
    has the template's structure; a leaf is a ``jax.Array`` where the template has a jax
    array or ``ShapeDtypeStruct``, a numpy array where it has a numpy array, and a numpy
    scalar array for a Python number. Raises :class:`CheckpointError` if the paths, a
    shape or a dtype differ, or if the file is truncated or corrupt.
    """
    path = os.fspath(path)
    zf, manifest = _open(path)
    with zf:
        t_leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
        entries = manifest["leaves"]
        t_paths = [jax.tree_util.keystr(p) for p, _ in t_leaves]
        c_paths = [e.get("path") for e in entries]
        if t_paths != c_paths:
            missing = [p for p in t_paths if p not in c_paths]
            extra = [p for p in c_paths if p not in t_paths]
            detail = (
                f"missing from the file: {missing[:5]}" if missing else ""
            ) + (f"{'; ' if missing else ''}not in the template: {extra[:5]}" if extra else "")
            if not detail:
                detail = "same leaves in a different order"
            raise CheckpointError(
                f"checkpoint {path!r}: tree structure differs from the template "
                f"({len(c_paths)} leaves in the file, {len(t_paths)} in the template; "
                f"{detail})"
            )
        out = []
        for (p, t_leaf), entry in zip(t_leaves, entries, strict=True):
            shape, dtype, kind = _template_leaf_info(t_leaf)
            if list(shape) != list(entry["shape"]) or np.dtype(entry["dtype"]) != dtype or (
                kind != entry.get("kind", "array")
            ):
                raise CheckpointError(
                    f"checkpoint {path!r}: leaf {jax.tree_util.keystr(p)} is "
                    f"{entry.get('kind')} {entry['dtype']}{tuple(entry['shape'])} in the file "
                    f"but {kind} {dtype.name}{tuple(shape)} in the template"
                )
            arr = _read_leaf(zf, entry, path)
            if kind.startswith("prng_key:"):
                impl = kind.split(":", 1)[1]
                out.append(jax.random.wrap_key_data(jnp.asarray(arr), impl=impl))
            elif isinstance(t_leaf, np.ndarray | np.generic | int | float | bool | complex):
                out.append(arr)
            else:
                out.append(jnp.asarray(arr))
    return jax.tree_util.tree_unflatten(treedef, out), manifest.get("metadata")
