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

Writing is atomic: the archive goes to a temporary file
``.funcnet.<12 hex digits of the target name's SHA-256>.<8 random chars>.tmp`` in the same
directory (a short name, so any legal target name works), is flushed and ``fsync``-ed, gets
the permissions a plain ``open()`` would give the file (``0o666`` less the umask, or those of
the file it replaces), then is ``os.replace``-d over the target (and the directory is
fsync-ed where the OS allows). A path that is a symbolic link is written through: the link
keeps pointing at its target, which gets the new content. An interrupted save leaves the
previous checkpoint untouched; a save killed outright (power loss, ``SIGKILL``) can leave
its temporary file behind, and the next save of the same target removes it (only files of
exactly that pattern, and on POSIX only those no running save holds a lock on).

Bad arguments (a path that is a directory, an existing non-regular file such as a FIFO or
a device, or whose folder is missing; metadata that is not JSON or has dict keys that are
not strings; leaves that are not arrays) raise before anything is written. A manifest with a
missing field or an unknown dtype raises :class:`CheckpointError` naming the file and the
field.

:func:`restore` rebuilds the pytree of a *template* (e.g. freshly initialised params and
optimizer state) and checks that paths, shapes and dtypes agree; a mismatch or a truncated
/ corrupt file raises :class:`CheckpointError` (a ``ValueError``) naming the file and the
first difference.

Sharded arrays, many processes
------------------------------
:func:`restore` gives each leaf the sharding of its template leaf when that leaf is a
``jax.Array`` (or a ``jax.ShapeDtypeStruct`` with a ``sharding``): a replicated template
comes back replicated, a batch-sharded one sharded the same way, on the same devices.
Each process materialises only its own (addressable) shards, so the template may span
the devices of several processes. A template sharding that cannot hold the stored shape
raises :class:`CheckpointError` naming the file and the leaf.

:func:`save` takes arrays of any sharding, also arrays spread over several processes
(``jax.distributed``): a replicated array is read from one local copy, a sharded one is
gathered (a collective). The file is the same single archive, in the same format.

In a multi-process run **every process calls** :func:`save` **and** :func:`restore`
**with the same arguments** (same path, same tree structure, same metadata), in the
same order: saving gathers sharded leaves across the processes. Only process 0
(``jax.process_index() == 0``) writes the file, atomically as above; every process
returns from :func:`save` only once it is written (a barrier), so a :func:`restore` right
after sees it, and if process 0 could not write it the others raise too. The path must
be on a file system that every process sees (each process reads the whole file when
restoring).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import stat
import tempfile
import zipfile
from collections.abc import Iterator
from typing import IO, Any

import jax
import jax.numpy as jnp
import numpy as np

try:  # POSIX: a save holds a lock on its temporary file, see _remove_stale_temporaries
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

FORMAT = "funcnet-checkpoint"
VERSION = 1
MANIFEST = "__funcnet_checkpoint__.json"


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, corrupt, or does not match the template."""


def _is_prng_key(leaf: Any) -> bool:
    dtype = getattr(leaf, "dtype", None)
    return dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key)


def _to_host(a: Any) -> np.ndarray:
    """``a`` as one numpy array. An array spread over several processes is read from a
    local copy when it is replicated, else gathered from every process (a collective:
    every process must make the same call)."""
    if isinstance(a, jax.Array) and not a.is_fully_addressable:
        if a.is_fully_replicated:
            return np.asarray(a.addressable_data(0))
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(a, tiled=True))
    return np.asarray(a)


def _leaf_to_numpy(leaf: Any) -> tuple[np.ndarray, str]:
    if _is_prng_key(leaf):
        impl = str(jax.random.key_impl(leaf))
        return _to_host(jax.random.key_data(leaf)), f"prng_key:{impl}"
    arr = _to_host(leaf)
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


def _check_leaf(leaf: Any, where: str) -> None:
    """Raise the ``TypeError`` :func:`_leaf_to_numpy` would, without converting ``leaf``."""
    if _is_prng_key(leaf):
        return
    dtype = getattr(leaf, "dtype", None)
    if dtype is None or not hasattr(leaf, "shape"):
        try:
            dtype = np.asarray(leaf).dtype
        except (TypeError, ValueError) as e:
            raise TypeError(
                f"{where}: leaves must be arrays or numbers, got {type(leaf).__name__} ({e})"
            ) from e
    dtype = np.dtype(dtype)
    if dtype.kind not in "biufcV" or (dtype.kind == "V" and not _is_ml_dtype(dtype)):
        raise TypeError(
            f"{where}: leaves must be arrays or numbers, got {type(leaf).__name__} "
            f"of dtype {dtype}"
        )


# ---------------------------------------------------------------------------------------
# Atomic writes (shared with funcnet.export and funcnet.data.write_idx)
# ---------------------------------------------------------------------------------------


def _tmp_prefix(name: str) -> str:
    """The start of the temporary files' names for the target ``name``: short whatever the
    length of ``name`` (a name of the longest legal length must work too), and distinct per
    target, so that only this target's stale temporaries are removed."""
    digest = hashlib.sha256(os.fsencode(name)).hexdigest()[:12]
    return f".funcnet.{digest}."


_TMP_SUFFIX = ".tmp"


def _stale_pattern(name: str) -> re.Pattern[str]:
    """The names ``tempfile.mkstemp(prefix=_tmp_prefix(name), suffix=_TMP_SUFFIX)`` makes:
    8 characters of ``[a-z0-9_]`` between prefix and suffix, nothing else."""
    return re.compile(re.escape(_tmp_prefix(name)) + r"[a-z0-9_]{8}" + re.escape(_TMP_SUFFIX))


def _remove_stale_temporaries(directory: str, name: str) -> list[str]:
    """Delete the temporary files an interrupted save of ``directory/name`` left behind.

    Only regular files named exactly like this target's temporaries are considered; on
    POSIX a temporary a running save still writes (it holds an ``flock``) is left alone.
    Returns the names removed.
    """
    pattern = _stale_pattern(name)
    try:
        entries = os.listdir(directory)
    except OSError:
        return []
    removed = []
    for entry in entries:
        if not pattern.fullmatch(entry):
            continue
        full = os.path.join(directory, entry)
        try:
            if not stat.S_ISREG(os.lstat(full).st_mode):
                continue
            fd = os.open(full, os.O_RDONLY)
        except OSError:
            continue
        try:
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    continue  # a save in progress (another process) is writing it
            with contextlib.suppress(OSError):
                os.unlink(full)
                removed.append(entry)
        finally:
            os.close(fd)
    return removed


def _umask() -> int:
    """The process's umask, read without changing it where the OS says (Linux), else by
    setting and restoring it."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _new_file_mode(path: str) -> int:
    """The permissions ``path`` gets from an atomic write: those of the file it replaces,
    else what ``open(path, "w")`` would create (``0o666`` less the umask)."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return 0o666 & ~_umask()


def _locked_temporary(directory: str, name: str) -> tuple[int, str]:
    """A new temporary file for ``directory/name``, locked (POSIX) while it is written."""
    while True:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=_tmp_prefix(name), suffix=_TMP_SUFFIX)
        if fcntl is None:  # pragma: no cover - Windows
            return fd, tmp
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # pragma: no cover - file systems without flock
            return fd, tmp
        if os.fstat(fd).st_nlink > 0:
            return fd, tmp
        # Another save's cleanup took it for a stale file between mkstemp and flock.
        os.close(fd)  # pragma: no cover - needs that race


@contextlib.contextmanager
def _atomic_file(path: str) -> Iterator[IO[bytes]]:
    """Yield a binary file whose content replaces ``path`` only once it is complete.

    A symbolic link is written through (its resolved target gets the content, the link
    stays); the file gets the permissions of the one it replaces, else those a plain
    ``open()`` gives. Removes this target's stale temporaries first. On any error (or
    ``KeyboardInterrupt``) the temporary file is deleted and ``path`` keeps its old content.
    """
    target = os.path.realpath(path)
    directory, name = os.path.split(target)
    _remove_stale_temporaries(directory, name)
    try:
        fd, tmp = _locked_temporary(directory, name)
    except OSError as e:  # name the user's path, not the temporary's
        if e.errno is None:
            raise
        raise OSError(  # the subclass of e.errno (PermissionError...)
            e.errno, f"cannot write {path!r}: creating its temporary file failed: {e.strerror}"
        ) from e
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            if hasattr(os, "fchmod"):  # mkstemp makes 0o600
                os.fchmod(f.fileno(), _new_file_mode(target))
            os.fsync(f.fileno())
            if fcntl is None:  # pragma: no cover - Windows cannot replace an open file
                f.close()
            os.replace(tmp, target)  # POSIX: still locked, so no cleanup can take it
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    _fsync_dir(directory)


def _check_target(path: Any, where: str, create_parents: bool = False) -> str:
    """Validate a destination file path before any work; return it as a ``str``.

    Raises ``TypeError`` if it is not a path, ``ValueError`` if it is (or ends like) a
    directory, exists but is not a regular file (a FIFO, a device, a socket), has a name
    longer than its folder allows, or if its folder is missing (unless ``create_parents``
    and ``path`` is not a symbolic link) or is a file. A symbolic link is checked by its
    resolved target, which is what gets written.
    """
    if not isinstance(path, str | os.PathLike):
        raise TypeError(f"{where}: path must be a str or os.PathLike, got {path!r}")
    path = os.fspath(path)
    if not isinstance(path, str):
        raise TypeError(f"{where}: path must be a str or os.PathLike, got bytes {path!r}")
    if path == "" or path.endswith(("/", os.sep)) or (os.altsep and path.endswith(os.altsep)):
        raise ValueError(f"{where}: path {path!r} names a directory; expected a file path")
    if os.path.isdir(path):
        raise ValueError(f"{where}: path {path!r} is a directory; expected a file path")
    real = os.path.realpath(path)
    via = f" (a symbolic link to {real!r})" if os.path.islink(path) else ""
    try:
        mode = os.stat(real).st_mode
    except OSError:
        mode = None
    if mode is not None and not stat.S_ISREG(mode):
        kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a character device" if stat.S_ISCHR(mode)
                else "a block device" if stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode)
                else "not a regular file")
        raise ValueError(
            f"{where}: path {path!r}{via} is {kind}; expected a regular file to write or "
            f"replace (refusing to replace it)"
        )
    if via and not os.path.isdir(os.path.dirname(real)):
        raise ValueError(
            f"{where}: path {path!r}{via}: the directory {os.path.dirname(real)!r} of its "
            f"target does not exist"
        )
    directory = os.path.dirname(os.path.abspath(path))
    limit = None
    if os.path.isdir(os.path.dirname(real)):
        with contextlib.suppress(OSError, ValueError, AttributeError):  # not on every OS
            limit = os.pathconf(os.path.dirname(real), "PC_NAME_MAX")
    size = len(os.fsencode(os.path.basename(real)))
    if limit is not None and 0 < limit < size:
        raise ValueError(
            f"{where}: path {path!r}{via}: the file name is {size} bytes long, longer than the "
            f"{limit} bytes its folder allows"
        )
    if not os.path.isdir(directory):
        ancestor = directory
        while not os.path.exists(ancestor) and os.path.dirname(ancestor) != ancestor:
            ancestor = os.path.dirname(ancestor)
        if os.path.exists(ancestor) and not os.path.isdir(ancestor):
            raise ValueError(
                f"{where}: cannot write {path!r}: {ancestor!r} is a file, not a directory"
            )
        if not create_parents:
            raise ValueError(
                f"{where}: directory {directory!r} does not exist (for path {path!r}); "
                f"create it first"
            )
    return path


def _check_json_keys(value: Any, where: str, arg: str = "metadata") -> None:
    """Raise ``TypeError`` naming ``arg`` and the key if a dict inside ``value`` (at any
    depth) has a key that is not a ``str``: ``json`` would turn it into a string (and drop
    all but one of keys that then collide), so what is read back would differ."""
    stack = [(value, arg)]
    while stack:
        v, at = stack.pop()
        if isinstance(v, dict):
            for k, item in v.items():
                if not isinstance(k, str):
                    raise TypeError(
                        f"{where}: {arg} must have str dict keys (JSON would rewrite the others "
                        f"as strings), got the key {k!r} ({type(k).__name__}) in {at}"
                    )
                stack.append((item, f"{at}[{k!r}]"))
        elif isinstance(v, list | tuple):
            stack.extend((item, f"{at}[{i}]") for i, item in enumerate(v))


def _host_leaves(leaves_with_paths: list) -> Iterator[tuple[str, np.ndarray, str]]:
    """``(keystr path, numpy array, kind)`` for each leaf, converted one at a time."""
    for path, leaf in leaves_with_paths:
        yield (jax.tree_util.keystr(path), *_leaf_to_numpy(leaf))


def _write_archive(f, leaves, treedef: Any, metadata: Any) -> None:
    """Write the archive of ``leaves`` (``(path, array, kind)``, see :func:`_host_leaves`)."""
    entries = []
    with zipfile.ZipFile(f, mode="w", compression=zipfile.ZIP_STORED) as zf:
        for i, (path, arr, kind) in enumerate(leaves):
            member = f"leaf_{i:05d}.npy"
            buf = io.BytesIO()
            np.lib.format.write_array(buf, _storable(arr), allow_pickle=False)
            zf.writestr(member, buf.getvalue())
            entries.append({
                "path": path,
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
      metadata: JSON-serialisable value stored alongside (epoch, history, config...);
        its dicts must have ``str`` keys (JSON would rewrite others), at any depth.

    Leaves may be sharded ``jax.Array``s, also arrays spread over several processes: then
    every process must call ``save`` with the same arguments; sharded leaves are gathered,
    process 0 writes the file and every process returns once it is written (see the
    module docstring).

    Raises:
      ValueError: ``path`` is a directory or an existing file that is not a regular one
        (a FIFO, a device), its name is too long, or its directory does not exist. A
        symbolic link is written through: its target gets the checkpoint.
      TypeError: ``path`` is not a path, ``metadata`` is not JSON-serialisable or has a
        dict key that is not a ``str``, or a leaf is not an array or a number. All checked
        before anything is written.
      RuntimeError: (several processes, on every process but 0) process 0 failed to
        write the file; process 0 raises its own error.
    """
    path = _check_target(path, "checkpoint.save")
    try:
        json.dumps(metadata)
    except (TypeError, ValueError) as e:
        raise TypeError(f"checkpoint.save: metadata must be JSON-serialisable ({e})") from e
    _check_json_keys(metadata, "checkpoint.save")
    leaves_with_paths, treedef = jax.tree_util.tree_flatten_with_path(tree)
    for key_path, leaf in leaves_with_paths:
        _check_leaf(leaf, f"checkpoint.save: leaf {jax.tree_util.keystr(key_path)}")
    if _process_count(leaves_with_paths) == 1:  # converted leaf by leaf while writing
        with _atomic_file(path) as f:
            _write_archive(f, _host_leaves(leaves_with_paths), treedef, metadata)
        return
    _save_from_process_zero(path, leaves_with_paths, treedef, metadata)


def _process_count(leaves_with_paths: list) -> int:
    """``jax.process_count()``, without starting a backend (a GPU's, say) only to save a
    tree of host arrays in a run that ``jax.distributed`` has not set up."""
    if jax.distributed.is_initialized() or any(
        isinstance(leaf, jax.Array) for _, leaf in leaves_with_paths
    ):
        return jax.process_count()
    return 1


def _save_from_process_zero(path: str, leaves_with_paths: list, treedef: Any,
                            metadata: Any) -> None:
    """:func:`save` in a multi-process run: every process gathers every leaf (the same
    collectives in the same order), process 0 writes, then all wait for its outcome."""
    from jax.experimental import multihost_utils

    # All collectives happen here, before any writing: an error while process 0 writes
    # cannot leave the others waiting in a gather.
    leaves = list(_host_leaves(leaves_with_paths))
    error = None
    if jax.process_index() == 0:
        try:
            with _atomic_file(path) as f:
                _write_archive(f, leaves, treedef, metadata)
        except Exception as e:  # reported to the other processes, then raised here
            error = e
    # A barrier (a gather, like multihost_utils.sync_global_devices) that carries process
    # 0's outcome: no process returns before the file is in place.
    outcome = multihost_utils.process_allgather(np.int32(error is None))
    if error is not None:
        raise error
    if not int(np.asarray(outcome).reshape(-1)[0]):
        raise RuntimeError(f"checkpoint.save: process 0 failed to write {path!r} (its own "
                           f"error says why)")


def _source(path: Any, where: str) -> str:
    if not isinstance(path, str | os.PathLike):
        raise TypeError(f"{where}: path must be a str or os.PathLike, got {path!r}")
    path = os.fspath(path)
    if not isinstance(path, str):
        raise TypeError(f"{where}: path must be a str or os.PathLike, got bytes {path!r}")
    return path


def _manifest_dtype(name: Any) -> np.dtype | None:
    """The numpy dtype a manifest's ``dtype`` field names, or ``None`` if it is not a
    numeric dtype a checkpoint can hold (never a default for a missing name)."""
    if not isinstance(name, str):
        return None
    try:
        dtype = np.dtype(name)
    except (TypeError, ValueError):
        return None
    if dtype.kind in "biufc" or _is_ml_dtype(dtype):
        return dtype
    return None


def _check_manifest(path: str, manifest: Any, members: set[str]) -> None:
    """Every field :func:`load` / :func:`restore` read, present and well-formed."""
    def bad(msg: str) -> CheckpointError:
        return CheckpointError(f"checkpoint {path!r}: {msg}")

    if not isinstance(manifest, dict):
        raise bad(f"manifest is not a {FORMAT} manifest (a JSON {type(manifest).__name__})")
    for field in ("format", "version", "leaves"):
        if field not in manifest:
            raise bad(f"manifest is missing the field {field!r}; not a {FORMAT} manifest")
    if manifest["format"] != FORMAT:
        raise bad(
            f"manifest field 'format' is {manifest['format']!r}, expected {FORMAT!r}; "
            f"not a {FORMAT} manifest"
        )
    if manifest["version"] != VERSION:
        raise bad(
            f"format version {manifest['version']!r}, this funcnet reads version {VERSION}"
        )
    if not isinstance(manifest["leaves"], list):
        raise bad(
            f"manifest field 'leaves' must be a list, got {type(manifest['leaves']).__name__}"
        )
    for i, entry in enumerate(manifest["leaves"]):
        if not isinstance(entry, dict):
            raise bad(f"manifest leaf {i} must be a JSON object, got {entry!r}")
        for field in ("path", "member", "shape", "dtype"):
            if field not in entry:
                raise bad(f"manifest leaf {i} is missing the field {field!r}")
        leaf = f"manifest leaf {i} ({entry['path']!r})"
        if not isinstance(entry["path"], str):
            raise bad(f"{leaf}: field 'path' must be a string, got {entry['path']!r}")
        if entry["member"] not in members:
            raise bad(
                f"{leaf}: field 'member' names {entry['member']!r}, which the archive does "
                f"not contain"
            )
        shape = entry["shape"]
        if not isinstance(shape, list) or any(
            isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in shape
        ):
            raise bad(f"{leaf}: field 'shape' must be a list of sizes >= 0, got {shape!r}")
        if _manifest_dtype(entry["dtype"]) is None:
            raise bad(
                f"{leaf}: field 'dtype' is {entry['dtype']!r}, not a known numeric dtype "
                f"(expected e.g. 'float32', 'int32', 'bool', 'bfloat16')"
            )
        kind = entry.get("kind", "array")
        if not isinstance(kind, str) or not (kind == "array" or kind.startswith("prng_key:")):
            raise bad(
                f"{leaf}: field 'kind' is {kind!r}, expected 'array' or 'prng_key:<impl>'"
            )


def _open(path: str) -> tuple[zipfile.ZipFile, dict]:
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path!r}: is a directory, not a checkpoint file")
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path!r}: no such file")
    try:
        zf = zipfile.ZipFile(path, mode="r")
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
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
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, UnicodeDecodeError,
            RecursionError, NotImplementedError) as e:  # fmt: skip
        zf.close()
        raise CheckpointError(f"checkpoint {path!r}: corrupt manifest ({e})") from e
    try:
        _check_manifest(path, manifest, set(zf.namelist()))
    except BaseException:
        zf.close()
        raise
    return zf, manifest


def _read_leaf(zf: zipfile.ZipFile, entry: dict, path: str) -> np.ndarray:
    try:
        raw = zf.read(entry["member"])
        arr = np.lib.format.read_array(io.BytesIO(raw), allow_pickle=False)
    except (KeyError, zipfile.BadZipFile, OSError, EOFError, ValueError,
            NotImplementedError) as e:  # fmt: skip
        raise CheckpointError(
            f"checkpoint {path!r}: leaf {entry.get('path')!r} is unreadable (truncated or "
            f"corrupt: {e})"
        ) from e
    dtype = _manifest_dtype(entry["dtype"])  # not None: _check_manifest checked it
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
    zf, manifest = _open(_source(path, "checkpoint.read_metadata"))
    zf.close()
    return manifest.get("metadata")


def load(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], Any]:
    """Every leaf as ``{keystr path: numpy array}`` (flattening order) and the metadata.

    Typed PRNG keys come back as their raw key data. Use :func:`restore` to rebuild a
    pytree.
    """
    path = _source(path, "checkpoint.load")
    zf, manifest = _open(path)
    with zf:
        leaves = {e["path"]: _read_leaf(zf, e, path) for e in manifest["leaves"]}
    return leaves, manifest.get("metadata")


def _template_leaf_info(leaf: Any) -> tuple[tuple[int, ...], np.dtype, str]:
    """``(shape, dtype, kind)`` of what the file must hold for this template leaf; the
    dtype in native byte order (save stores native order, so byte order is not compared)."""
    if _is_prng_key(leaf):
        impl = []

        def key_data(key):  # also for an abstract key (a ShapeDtypeStruct of a key dtype)
            impl.append(str(jax.random.key_impl(key)))
            return jax.random.key_data(key)

        data = jax.eval_shape(key_data, leaf)
        return tuple(data.shape), np.dtype(data.dtype), f"prng_key:{impl[0]}"
    if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):  # jax / numpy arrays, ShapeDtypeStruct
        shape, dtype = tuple(leaf.shape), np.dtype(leaf.dtype)
    else:
        arr = np.asarray(leaf)
        shape, dtype = arr.shape, arr.dtype
    return shape, dtype.newbyteorder("="), "array"


def restore(path: str | os.PathLike, template: Any) -> tuple[Any, Any]:
    """Read a checkpoint into the structure of ``template``; return ``(tree, metadata)``.

    ``template`` is a pytree with the expected structure whose leaves give the expected
    shape and dtype (arrays, ``jax.ShapeDtypeStruct``, numbers or PRNG keys). The result
    has the template's structure; a leaf is a ``jax.Array`` where the template has a jax
    array or ``ShapeDtypeStruct``, a numpy array where it has a numpy array, and a numpy
    scalar array for a Python number. A ``jax.Array`` comes back with the template leaf's
    sharding (replicated, batch-sharded, on one device...; a ``ShapeDtypeStruct``'s when it
    has one, else the default device), also a sharding over several processes, of which
    each process builds only its own shards; an uncommitted template leaf (as ``init`` and
    ``jnp`` make them) gives an uncommitted array on the default device. A typed PRNG key
    template leaf may be abstract too (``jax.eval_shape`` of a tree holding keys). Byte
    order is not compared: a big-endian numpy template leaf (``'>i4'``) takes a stored
    ``int32`` and gets it in native byte order (as every restored leaf is). Raises
    :class:`CheckpointError` if the paths, a shape or a dtype differ, if a template's
    sharding cannot hold its leaf, or if the file is truncated or corrupt.
    """
    path = _source(path, "checkpoint.restore")
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
            if list(shape) != list(entry["shape"]) or _manifest_dtype(entry["dtype"]) != dtype or (
                kind != entry.get("kind", "array")
            ):
                raise CheckpointError(
                    f"checkpoint {path!r}: leaf {jax.tree_util.keystr(p)} is "
                    f"{entry.get('kind')} {entry['dtype']}{tuple(entry['shape'])} in the file "
                    f"but {kind} {dtype.name}{tuple(shape)} in the template"
                )
            arr = _read_leaf(zf, entry, path)
            sharding = _template_sharding(t_leaf)
            if sharding is not None:  # the template's devices and layout
                arr = _on_devices(arr, sharding, path, jax.tree_util.keystr(p))
            if kind.startswith("prng_key:"):
                impl = kind.split(":", 1)[1]
                keys = jax.random.wrap_key_data(jnp.asarray(arr), impl=impl)
                if isinstance(t_leaf, jax.ShapeDtypeStruct) and isinstance(
                    getattr(t_leaf, "sharding", None), jax.sharding.Sharding
                ):  # an abstract key's sharding is that of the keys, not of their data
                    keys = jax.device_put(keys, t_leaf.sharding)
                out.append(keys)
            elif sharding is not None or isinstance(
                t_leaf, np.ndarray | np.generic | int | float | bool | complex
            ):
                out.append(arr)
            else:
                out.append(jnp.asarray(arr))
    return jax.tree_util.tree_unflatten(treedef, out), manifest.get("metadata")


def _template_sharding(leaf: Any) -> jax.sharding.Sharding | None:
    """Where a template leaf's restored array goes: the sharding of a ``jax.Array`` (for a
    typed PRNG key, that of its key data) or of a ``ShapeDtypeStruct`` that has one. None
    for an uncommitted array (what ``init`` and ``jnp`` return: the default device, free to
    follow its operands elsewhere), so the restored leaf is uncommitted too and mixes with
    arrays on other devices as the template did."""
    if isinstance(leaf, jax.Array) and not getattr(leaf, "committed", True):
        return None
    if _is_prng_key(leaf):
        return jax.random.key_data(leaf).sharding if isinstance(leaf, jax.Array) else None
    if isinstance(leaf, jax.Array | jax.ShapeDtypeStruct):
        sharding = getattr(leaf, "sharding", None)
        return sharding if isinstance(sharding, jax.sharding.Sharding) else None
    return None


def _on_devices(arr: np.ndarray, sharding: jax.sharding.Sharding, path: str,
                leaf: str) -> jax.Array:
    """``arr`` as a ``jax.Array`` with ``sharding``; each process builds only its own
    (addressable) shards, so ``sharding`` may span the devices of several processes."""
    try:
        return jax.make_array_from_callback(arr.shape, sharding, lambda index: arr[index])
    except (ValueError, TypeError, IndexError) as e:
        raise CheckpointError(
            f"checkpoint {path!r}: leaf {leaf} ({arr.dtype.name}{tuple(arr.shape)}) cannot "
            f"take the template's sharding {sharding}: {e}"
        ) from e
