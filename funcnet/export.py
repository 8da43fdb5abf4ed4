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
saying which; a program jax cannot deserialize (e.g. from a newer jax), a header field that
is missing or malformed, or a header that disagrees with its program raise it too.

``save`` checks its arguments (path, platforms, dtype, batch, metadata, params) before
tracing anything, and writes atomically as :mod:`funcnet.checkpoint` does: through a short
temporary file ``.funcnet.<12 hex>.<8 chars>.tmp`` that the next save of the same target
removes if a killed save left it behind, with the permissions a plain ``open()`` gives (or
those of the file replaced), through a symbolic link to its target, and never over a FIFO
or device.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import numbers
import os
import struct
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
# The platforms jax.export lowers for (jax.export.export's ``platforms``).
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")


class ExportFormatError(ValueError):
    """The file is not a funcnet export this version can read (or it is damaged)."""


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that ``path`` is either the old file or the new one
    (parents created; this target's stale temporaries removed first)."""
    from funcnet.checkpoint import _atomic_file

    path.parent.mkdir(parents=True, exist_ok=True)
    with _atomic_file(os.fspath(path)) as f:
        f.write(data)


def _check_platforms(platforms: Any) -> tuple[str, ...] | None:
    if platforms is None:
        return None
    if isinstance(platforms, str) or not isinstance(platforms, Sequence):
        raise TypeError(
            f"export.save: platforms must be a sequence of platform names such as "
            f"('cpu', 'cuda'), got {platforms!r}"
        )
    if len(platforms) == 0:
        raise ValueError(
            f"export.save: platforms must name at least one of {PLATFORMS}, got {platforms!r}"
        )
    for p in platforms:
        if not isinstance(p, str) or p not in PLATFORMS:
            hint = ""
            if p == "gpu":
                hint = "; name the GPU kind: 'cuda' (NVIDIA) or 'rocm' (AMD)"
            elif isinstance(p, str):
                close = difflib.get_close_matches(p.lower(), PLATFORMS, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(
                f"export.save: unknown platform {p!r} in platforms={tuple(platforms)!r}; "
                f"jax.export lowers for {', '.join(repr(q) for q in PLATFORMS)}{hint}"
            )
    if len(set(platforms)) != len(platforms):
        raise ValueError(f"export.save: platforms has duplicates: {tuple(platforms)!r}")
    return tuple(platforms)


def _check_dtype(dtype: Any, integer_input: bool, net: Any) -> np.dtype:
    if dtype is None:
        return np.dtype(np.int32 if integer_input else np.float32)
    try:
        dt = np.dtype(jnp.dtype(dtype))
    except (TypeError, ValueError) as e:
        raise TypeError(f"export.save: dtype must be a numpy / jax dtype, got {dtype!r}") from e
    if integer_input:
        if not jnp.issubdtype(dt, np.integer):
            raise TypeError(
                f"export.save: {type(net).__name__} takes integer ids (its first layer is "
                f"{_first_layer(net)!r}); dtype must be an integer dtype such as int32, got "
                f"{dt.name}"
            )
    elif not jnp.issubdtype(dt, np.floating):
        raise TypeError(
            f"export.save: {type(net).__name__} takes floating input; dtype must be a "
            f"floating dtype such as float32, got {dt.name}"
        )
    return dt


def _first_layer(net: Any) -> Any:
    while True:
        subs = net.sublayers()
        if not subs:
            return net
        net = subs[0]


def save(
    path: str | os.PathLike,
    net: Any,
    params: Any,
    input_shape: Sequence[int],
    batch: int | str = "dynamic",
    *,
    dtype: Any = None,
    platforms: Sequence[str] | None = None,
    metadata: dict[str, Any] | None = None,
    state: Any = None,
) -> Path:
    """Export the evaluation-mode forward pass ``x -> net.apply_with_state(params, state,
    x)[0]`` to ``path`` (written atomically), params and state folded in as constants.

    Args:
      path: destination file (conventionally ``*.fnx``); parent directories are created
        (a path that is a directory, or below a file, raises ``ValueError``).
      net: a funcnet layer or network.
      params: its trained parameters (baked into the program as constants).
      input_shape: unbatched input shape, e.g. ``(28, 28, 1)``.
      batch: ``"dynamic"`` (default) for a symbolic batch dimension, any batch size
        ``>= 1`` works when loaded; or a positive int to fix it.
      dtype: the input dtype the program takes; default ``int32`` for a network whose
        first layer takes integer ids (``net.takes_integers()``, e.g. ``Embedding``),
        else ``float32``. It must be an integer dtype for such a network and a floating
        one otherwise.
      platforms: platforms to lower for, a sequence of ``"cpu"``, ``"cuda"``, ``"rocm"``,
        ``"tpu"`` (e.g. ``("cpu", "cuda")``); default: jax's default backend here.
      metadata: extra JSON-serializable information stored in the header; its dicts must
        have ``str`` keys (JSON would rewrite others), at any depth.
      state: the network's state (BatchNorm's running statistics, e.g.
        ``fit(...).model_state``); default ``net.init_state(input_shape)``.

    Returns:
      The path written.

    Raises:
      TypeError / ValueError: a bad argument, naming it, before anything is traced or
        written.
    """
    from funcnet import _checks
    from funcnet.checkpoint import _check_json_keys, _check_target
    from funcnet.layers import Layer

    target = _check_target(path, "export.save", create_parents=True)
    if not isinstance(net, Layer):
        raise TypeError(f"export.save: net must be a funcnet layer or Serial, got {net!r}")
    shape = _checks.input_shape_tuple(input_shape, "export.save")
    dtype = _check_dtype(dtype, net.takes_integers(), net)
    lowering_platforms = _check_platforms(platforms)
    if isinstance(batch, str) and batch == "dynamic":
        (b,) = jax.export.symbolic_shape("batch", constraints=("batch >= 1",))
    elif isinstance(batch, numbers.Integral) and not isinstance(batch, bool) and batch > 0:
        b = batch = int(batch)
    else:
        raise ValueError(f"export.save: batch must be 'dynamic' or a positive int, got {batch!r}")
    try:
        json.dumps(metadata or {})
    except (TypeError, ValueError) as e:
        raise TypeError(f"export.save: metadata must be JSON-serializable: {e}") from e
    _check_json_keys(metadata, "export.save")
    # Check params and state against the network before tracing.
    if state is None:
        state = net.init_state(shape)

    def struct(a):
        if not hasattr(a, "dtype"):
            a = np.asarray(a)
        return jax.ShapeDtypeStruct(jnp.shape(a), a.dtype)

    for what, tree, expected in (("params", params, net.param_shapes(shape)),
                                 ("state", state, net.state_shapes(shape))):
        try:
            got = jax.tree_util.tree_map(struct, tree)
        except (TypeError, ValueError) as e:
            raise TypeError(
                f"export.save: {what} must be a pytree of arrays, got a leaf it cannot read "
                f"({type(e).__name__}: {e})"
            ) from e
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
    kwargs = {} if lowering_platforms is None else {"platforms": lowering_platforms}
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
    head = json.dumps(header).encode()
    path = Path(target)
    _atomic_write(path, _PREFIX.pack(MAGIC, FORMAT_VERSION, len(head)) + head + payload)
    return path


def _platform_ok(platforms: Sequence[str], x: Any) -> str | None:
    """``None`` if the program can run where ``x`` will be computed, else that platform."""
    if isinstance(x, jax.core.Tracer):
        return None  # inside a trace: jax checks the lowering platform itself
    if isinstance(x, jax.Array):
        here = {d.platform for d in x.devices()}
    else:
        here = {jax.default_backend()}
    for p in here:
        names = ("cuda", "rocm") if p == "gpu" else (p,)
        if not any(n in platforms for n in names):
            return jax.export.default_export_platform() if p == "gpu" else p
    return None


class ExportedNet:
    """A loaded forward pass: ``y = exported_net(x)`` for ``x`` of ``(N, *input_shape)``.

    Attributes: ``input_shape``, ``output_shape`` (unbatched), ``dtype``, ``batch``
    (``"dynamic"`` or the fixed size), ``platforms``, ``header`` (everything recorded at
    save time) and ``exported`` (the :class:`jax.export.Exported`, e.g. for
    ``.mlir_module()``).
    """

    def __init__(self, header: dict[str, Any], exported: jax.export.Exported, path: str):
        self.header = header
        self.exported = exported
        self.path = path
        self.input_shape = tuple(header["input_shape"])
        self.output_shape = tuple(header["output_shape"])
        self.dtype = np.dtype(header["dtype"])
        self.batch = header["batch"]
        self.platforms = tuple(exported.platforms)
        self._call = jax.jit(exported.call)

    def __repr__(self) -> str:
        return (
            f"ExportedNet({self.path!r}, input (N, *{self.input_shape}) {self.dtype.name} -> "
            f"output (N, *{self.output_shape}), batch={self.batch!r})"
        )

    def _cast(self, x: Any) -> Any:
        """``x`` in the exported dtype, or a ``TypeError`` / ``ValueError`` saying why not.

        A floating program takes any floating input, cast to its dtype (float64, numpy's
        default, becomes float32). An integer program (ids, e.g. an ``Embedding``) takes
        integer input: its own dtype as is, a narrower one widened, and a wider one (e.g.
        numpy's int64) only when its values are concrete and fit the exported dtype.
        Bool, complex and every other kind are refused, as are floats for an integer
        program and integers for a floating one.
        """
        who = f"exported network ({self.path})"
        try:
            got = np.dtype(x.dtype)
        except TypeError as e:
            raise TypeError(
                f"{who}: x must be a numpy or jax array, got {type(x).__name__} of dtype "
                f"{x.dtype!r}"
            ) from e
        want = self.dtype
        if got == want:
            return x
        if jnp.issubdtype(want, np.floating):
            if not jnp.issubdtype(got, np.floating):
                raise TypeError(
                    f"{who}: expected a floating input ({want.name}), got dtype {got.name}"
                )
            return jnp.asarray(x, want)
        if not jnp.issubdtype(got, np.integer):
            raise TypeError(
                f"{who}: expected integer ids of dtype {want.name}, got dtype {got.name}"
                + ("; the network was exported for integer input (its first layer takes "
                   "ids), convert them with x.astype(np.int32)"
                   if jnp.issubdtype(got, np.floating) else "")
            )
        if np.can_cast(got, want, casting="safe"):
            return jnp.asarray(x, want)
        if isinstance(x, jax.core.Tracer):
            raise TypeError(
                f"{who}: expected integer ids of dtype {want.name}, got traced {got.name}; "
                f"cast them to {want.name} first"
            )
        arr = np.asarray(x)
        info = np.iinfo(want)
        if arr.size and (int(arr.min()) < info.min or int(arr.max()) > info.max):
            raise ValueError(
                f"{who}: expected integer ids of dtype {want.name}, got {got.name} values in "
                f"[{int(arr.min())}, {int(arr.max())}], outside the {want.name} range "
                f"[{info.min}, {info.max}]"
            )
        return jnp.asarray(arr.astype(want))

    def __call__(self, x: Any) -> jax.Array:
        """Run the program on ``x`` of shape ``(N, *input_shape)``.

        The shape must match exactly (and ``N`` the fixed batch, if one was exported). The
        dtype rules are :meth:`_cast`'s: floating inputs of another precision are cast to
        a floating program's dtype; an integer program accepts integer ids that fit its
        dtype. Everything is checked before the program runs.
        """
        who = f"exported network ({self.path})"
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            try:
                x = np.asarray(x)
            except (TypeError, ValueError) as e:
                raise TypeError(f"{who}: x must be an array, got {type(x).__name__} ({e})") from e
        expected = ("N", *self.input_shape) if self.batch == "dynamic" else (
            self.batch, *self.input_shape)
        shape = tuple(x.shape)
        bad_batch = self.batch != "dynamic" and (len(shape) < 1 or shape[0] != self.batch)
        if len(shape) != len(expected) or shape[1:] != self.input_shape or bad_batch or (
            len(shape) >= 1 and shape[0] < 1
        ):
            which = "any batch size N >= 1" if self.batch == "dynamic" else "fixed batch"
            raise ValueError(
                f"{who}: expected input of shape {expected} ({which}), got shape {shape}"
            )
        x = self._cast(x)
        here = _platform_ok(self.platforms, x)
        if here is not None:
            raise ValueError(
                f"{who}: the program was exported for platforms {self.platforms}, it cannot "
                f"run on {here!r}; export it again with platforms=(..., {here!r})"
            )
        return self._call(x)


def _header_error(path: str, field: str, msg: str) -> ExportFormatError:
    return ExportFormatError(f"{path}: corrupt header: field {field!r} {msg}")


def _check_header(path: str, header: Any) -> None:
    """Every header field :class:`ExportedNet` uses, present and well-formed."""
    if not isinstance(header, dict):
        raise ExportFormatError(
            f"{path}: corrupt header: a JSON {type(header).__name__}, expected an object"
        )
    for field in ("payload_bytes", "payload_sha256", "input_shape", "output_shape", "dtype",
                  "batch"):
        if field not in header:
            raise _header_error(path, field, "is missing")

    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if not is_int(header["payload_bytes"]) or header["payload_bytes"] < 0:
        raise _header_error(path, "payload_bytes",
                            f"must be a size, got {header['payload_bytes']!r}")
    if not isinstance(header["payload_sha256"], str):
        raise _header_error(path, "payload_sha256",
                            f"must be a hex digest, got {header['payload_sha256']!r}")
    for field, low in (("input_shape", 1), ("output_shape", 0)):
        v = header[field]
        if not isinstance(v, list) or not all(is_int(d) and d >= low for d in v):
            raise _header_error(path, field, f"must be a list of sizes >= {low}, got {v!r}")
    try:
        dtype = np.dtype(header["dtype"]) if isinstance(header["dtype"], str) else None
    except (TypeError, ValueError):
        dtype = None
    if dtype is None or not (
        jnp.issubdtype(dtype, np.floating) or jnp.issubdtype(dtype, np.integer)
    ):
        raise _header_error(path, "dtype", f"must name a floating or integer dtype, got "
                                           f"{header['dtype']!r}")
    batch = header["batch"]
    if batch != "dynamic" and not (is_int(batch) and batch >= 1):
        raise _header_error(path, "batch", f"must be 'dynamic' or a positive int, got {batch!r}")


def _check_program(path: str, header: dict[str, Any], exported: jax.export.Exported) -> None:
    """The header describes the program it came with (a hand-edited header would not)."""
    if len(exported.in_avals) != 1 or len(exported.out_avals) != 1:
        raise ExportFormatError(
            f"{path}: the program takes {len(exported.in_avals)} inputs and returns "
            f"{len(exported.out_avals)} outputs; a funcnet export has one of each"
        )
    (inp,), (out,) = exported.in_avals, exported.out_avals
    dims = tuple(inp.shape)
    batch = dims[0] if dims else None
    prog_batch = batch if isinstance(batch, int) else "dynamic"
    checks = (
        ("input_shape", list(header["input_shape"]), [int(d) for d in dims[1:]]),
        ("dtype", header["dtype"], np.dtype(inp.dtype).name),
        ("batch", header["batch"], prog_batch),
        ("output_shape", list(header["output_shape"]), [int(d) for d in tuple(out.shape)[1:]]),
    )
    for field, said, real in checks:
        if said != real:
            raise ExportFormatError(
                f"{path}: corrupt header: field {field!r} says {said!r} but the program "
                f"has {real!r}"
            )


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
    except (ValueError, RecursionError, UnicodeDecodeError) as e:
        raise ExportFormatError(f"{path}: corrupt header ({type(e).__name__}: {e})") from e
    _check_header(path, header)
    n_payload = header["payload_bytes"]
    payload = data[start + head_len:]
    if len(payload) != n_payload:
        raise ExportFormatError(
            f"{path}: {'truncated' if len(payload) < n_payload else 'trailing bytes'}: the "
            f"program should have {n_payload} bytes, the file has {len(payload)}"
        )
    if hashlib.sha256(payload).hexdigest() != header["payload_sha256"]:
        raise ExportFormatError(f"{path}: corrupt: the program's SHA-256 does not match")
    return header, payload


def load(path: str | os.PathLike) -> ExportedNet:
    """Load an export written by :func:`save`; no network code is needed.

    Raises:
      FileNotFoundError: no such file.
      TypeError: ``path`` is not a path.
      ExportFormatError: a directory, not a funcnet export, another format version,
        truncated, corrupt (header fields included), or a program this jax cannot
        deserialize.
    """
    if not isinstance(path, str | os.PathLike):
        raise TypeError(f"export.load: path must be a str or os.PathLike, got {path!r}")
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ExportFormatError(f"{path}: is a directory, not a funcnet export file")
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
    _check_program(path, header, exported)
    return ExportedNet(header, exported, path)
