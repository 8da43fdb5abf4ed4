"""Ship a trained network's forward pass as a self-contained StableHLO file.

``save(path, net, params, input_shape)`` traces ``x -> net.apply(params, x)`` with the
trained ``params`` baked in as constants, exports it with :func:`jax.export.export`
(StableHLO, with a symbolic batch dimension by default) and writes one file, atomically.
``load(path)`` needs none of the network's code: it returns an :class:`ExportedNet`
that checks the input's shape and dtype and runs the deserialized program.

File layout (format version :data:`FORMAT_VERSION`)::

    b"FUNCNETX"                      8 bytes, magic
    format version                   4 bytes, little-endian unsigned
    header length                    8 bytes, little-endian unsigned
    header                           UTF-8 JSON: shapes, dtypes, batch, versions,
                                     payload length and SHA-256, the network's repr
    payload                          jax.export's serialized program

A file that is not one of these, has another format version, is truncated or whose
payload does not match its checksum raises :class:`ExportFormatError` (a ``ValueError``)
saying which; a program jax cannot deserialize (e.g. from a newer jax) raises it too.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["FORMAT_VERSION", "ExportFormatError", "ExportedNet", "load", "save"]

MAGIC = b"FUNCNETX"
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<8sIQ")  # magic, format version, header length


class ExportFormatError(ValueError):
    """The file is not a funcnet export this version can read (or it is damaged)."""


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that ``path`` is either the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def save(
    path: str | os.PathLike,
    net: Any,
    params: Any,
    input_shape: Sequence[int],
    batch: int | str = "dynamic",
    *,
    dtype: Any = jnp.float32,
    platforms: Sequence[str] | None = None,
    metadata: dict[str, Any] | None = None,
    state: Any = None,
) -> Path:
    """Export the evaluation-mode forward pass ``x -> net.apply_with_state(params, state,
    x)[0]`` to ``path`` (written atomically), params and state folded in as constants.

    Args:
      path: destination file (conventionally ``*.fnx``); parent directories are created.
      net: a funcnet layer or network.
      params: its trained parameters (baked into the program as constants).
      input_shape: unbatched input shape, e.g. ``(28, 28, 1)``.
      batch: ``"dynamic"`` (default) for a symbolic batch dimension, any batch size
        ``>= 1`` works when loaded; or a positive int to fix it.
      dtype: the input dtype the program takes.
      platforms: platforms to lower for (e.g. ``("cpu", "cuda")``); default: jax's
        default backend here.
      metadata: extra JSON-serializable information stored in the header.
      state: the network's state (BatchNorm's running statistics, e.g.
        ``fit(...).model_state``); default ``net.init_state(input_shape)``.

    Returns:
      The path written.
    """
    from funcnet import _checks
    from funcnet.layers import Layer

    if not isinstance(net, Layer):
        raise TypeError(f"export.save: net must be a funcnet layer or Serial, got {net!r}")
    shape = _checks.input_shape_tuple(input_shape, "export.save")
    dtype = jnp.dtype(dtype)
    if batch == "dynamic":
        (b,) = jax.export.symbolic_shape("batch", constraints=("batch >= 1",))
    elif isinstance(batch, int) and not isinstance(batch, bool) and batch > 0:
        b = batch
    else:
        raise ValueError(f"export.save: batch must be 'dynamic' or a positive int, got {batch!r}")
    # Check params and state against the network before tracing.
    if state is None:
        state = net.init_state(shape)
    for what, tree, expected in (("params", params, net.param_shapes(shape)),
                                 ("state", state, net.state_shapes(shape))):
        got = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), a.dtype), tree)
        if jax.tree_util.tree_structure(got) != jax.tree_util.tree_structure(expected) or any(
            g.shape != e.shape
            for g, e in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(expected),
                            strict=True)
        ):
            raise ValueError(
                f"export.save: {what} do not match {type(net).__name__} for input shape "
                f"{shape}: expected {expected}, got {got}"
            )
    params = jax.tree_util.tree_map(jnp.asarray, params)
    state = jax.tree_util.tree_map(jnp.asarray, state)

    def forward(x):
        return net.apply_with_state(params, state, x)[0]

    spec = jax.ShapeDtypeStruct((b, *shape), dtype)
    kwargs = {} if platforms is None else {"platforms": tuple(platforms)}
    exported = jax.export.export(jax.jit(forward), **kwargs)(spec)
    try:
        payload = bytes(exported.serialize())
    except ImportError as e:  # jax needs the optional 'flatbuffers' package for this
        raise ImportError(f"export.save: {e} (pip install flatbuffers)") from e
    out = exported.out_avals[0]
    from funcnet import __version__

    header = {
        "format": "funcnet.export",
        "format_version": FORMAT_VERSION,
        "funcnet_version": __version__,
        "jax_version": jax.__version__,
        "input_shape": list(shape),
        "dtype": dtype.name,
        "output_shape": [int(d) for d in out.shape[1:]],
        "output_dtype": jnp.dtype(out.dtype).name,
        "batch": "dynamic" if batch == "dynamic" else int(batch),
        "platforms": list(exported.platforms),
        "network": repr(net),
        "metadata": metadata or {},
        "payload_bytes": len(payload),
        "payload_sha256": hashlib.sha256(payload).hexdigest(),
    }
    try:
        head = json.dumps(header).encode()
    except TypeError as e:
        raise TypeError(f"export.save: metadata must be JSON-serializable: {e}") from e
    path = Path(path)
    _atomic_write(path, _PREFIX.pack(MAGIC, FORMAT_VERSION, len(head)) + head + payload)
    return path


class ExportedNet:
    """A loaded forward pass: ``y = exported_net(x)`` for ``x`` of ``(N, *input_shape)``.

    Attributes: ``input_shape``, ``output_shape`` (unbatched), ``dtype``, ``batch``
    (``"dynamic"`` or the fixed size), ``header`` (everything recorded at save time) and
    ``exported`` (the :class:`jax.export.Exported`, e.g. for ``.mlir_module()``).
    """

    def __init__(self, header: dict[str, Any], exported: jax.export.Exported, path: str):
        self.header = header
        self.exported = exported
        self.path = path
        self.input_shape = tuple(header["input_shape"])
        self.output_shape = tuple(header["output_shape"])
        self.dtype = np.dtype(header["dtype"])
        self.batch = header["batch"]
        self._call = jax.jit(exported.call)

    def __repr__(self) -> str:
        return (
            f"ExportedNet({self.path!r}, input (N, *{self.input_shape}) {self.dtype.name} -> "
            f"output (N, *{self.output_shape}), batch={self.batch!r})"
        )

    def __call__(self, x: Any) -> jax.Array:
        """Run the program on ``x`` of shape ``(N, *input_shape)``.

        Floating inputs of another precision are cast to the exported dtype; the shape
        must match exactly (and ``N`` the fixed batch, if one was exported).
        """
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            x = np.asarray(x)
        expected = ("N", *self.input_shape) if self.batch == "dynamic" else (
            self.batch, *self.input_shape)
        shape = tuple(x.shape)
        bad_batch = self.batch != "dynamic" and (len(shape) < 1 or shape[0] != self.batch)
        if len(shape) != len(expected) or shape[1:] != self.input_shape or bad_batch or (
            len(shape) >= 1 and shape[0] < 1
        ):
            which = "any batch size N >= 1" if self.batch == "dynamic" else "fixed batch"
            raise ValueError(
                f"exported network ({self.path}): expected input of shape {expected} "
                f"({which}), got shape {shape}"
            )
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(
                f"exported network ({self.path}): expected a floating input ({self.dtype.name}), "
                f"got dtype {x.dtype}"
            )
        if x.dtype != self.dtype:
            x = jnp.asarray(x, self.dtype)
        return self._call(x)


def _read_header(path: str, data: bytes) -> tuple[dict[str, Any], bytes]:
    if len(data) < _PREFIX.size:
        raise ExportFormatError(
            f"{path}: not a funcnet export or truncated: {len(data)} bytes, shorter than the "
            f"{_PREFIX.size}-byte file prefix"
        )
    magic, version, head_len = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise ExportFormatError(
            f"{path}: not a funcnet export (magic {magic!r}, expected {MAGIC!r})"
        )
    if version != FORMAT_VERSION:
        raise ExportFormatError(
            f"{path}: funcnet export format version {version}; this funcnet reads version "
            f"{FORMAT_VERSION} (re-export the network with this funcnet, or upgrade)"
        )
    start = _PREFIX.size
    if len(data) < start + head_len:
        raise ExportFormatError(
            f"{path}: truncated: the header needs {head_len} bytes, the file has "
            f"{len(data) - start} after the prefix"
        )
    try:
        header = json.loads(data[start:start + head_len].decode())
        n_payload = int(header["payload_bytes"])
        digest = header["payload_sha256"]
        for key in ("input_shape", "output_shape", "dtype", "batch"):
            _ = header[key]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise ExportFormatError(f"{path}: corrupt header ({type(e).__name__}: {e})") from e
    payload = data[start + head_len:]
    if len(payload) != n_payload:
        raise ExportFormatError(
            f"{path}: {'truncated' if len(payload) < n_payload else 'trailing bytes'}: the "
            f"program should have {n_payload} bytes, the file has {len(payload)}"
        )
    if hashlib.sha256(payload).hexdigest() != digest:
        raise ExportFormatError(f"{path}: corrupt: the program's SHA-256 does not match")
    return header, payload


def load(path: str | os.PathLike) -> ExportedNet:
    """Load an export written by :func:`save`; no network code is needed.

    Raises:
      FileNotFoundError: no such file.
      ExportFormatError: not a funcnet export, another format version, truncated,
        corrupt, or a program this jax cannot deserialize.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        data = f.read()
    header, payload = _read_header(path, data)
    try:
        exported = jax.export.deserialize(bytearray(payload))
    except ImportError as e:
        raise ImportError(f"export.load: {e} (pip install flatbuffers)") from e
    except Exception as e:
        raise ExportFormatError(
            f"{path}: jax {jax.__version__} cannot deserialize this program (saved with jax "
            f"{header.get('jax_version', '?')}): {type(e).__name__}: {e}"
        ) from e
    return ExportedNet(header, exported, path)
