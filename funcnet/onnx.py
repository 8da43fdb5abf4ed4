"""Export a network's evaluation-mode forward pass to ONNX.

Optional: ``pip install 'funcnet[onnx]'`` brings ``jax2onnx`` (the converter) and
``onnxruntime`` (to run and check the file).

``save_onnx(path, net, params, input_shape)`` writes one ``.onnx`` file, atomically, whose
graph computes ``x -> net.apply_with_state(params, state, x, train=False)[0]`` with the
params and state (BatchNorm's running statistics) baked in as constants. Its input
``"x"`` is ``(N, *input_shape)`` (NHWC images; float32, or int32 ids for a network that
starts with ``Embedding``) with a symbolic batch size ``N`` unless ``batch`` fixes it; its
output is ``"y"``. ``check_onnx(path, net, params, x)`` runs the file with onnxruntime and
returns the largest absolute difference from funcnet's own output.

How: funcnet traces the forward pass to a jaxpr itself and replays the jaxpr's primitives
inside ``jax2onnx.to_onnx``, rather than handing jax2onnx the forward function, because

- while it traces, jax2onnx monkeypatches ``jax.numpy`` (``jnp.shape`` then returns a
  traced array), which breaks funcnet's argument checks; a finished jaxpr has no
  funcnet code left in it to break;
- the replay can inline ``jit`` / ``custom_jvp`` / ``custom_vjp`` calls (a forward pass
  needs no derivative rules) and rewrite the pools. jax2onnx 0.17.1 lowers a windowed
  max over an NHWC operand to a 4-D ``MaxPool`` over ``(1, 1, N, H, W, C)``, which
  onnxruntime cannot run: its pools have at most 3 spatial dimensions ("Unsupported
  pooling size"). The replay merges the batch and channel axes, which the window leaves
  alone, into one, so that jax2onnx sees a 3-D pool over ``(N*C, H, W)`` (windowed sums,
  which jax2onnx lowers to a ``Conv``, get the same treatment).

What converts (run with onnxruntime 1.32 at opsets 17, 18 and 23 when this was written;
``tests/test_onnx.py`` checks them all at the default opset): every network of
``funcnet.models``, ``funcnet.zoo_cnn`` and ``funcnet.zoo_vit`` (LeNet-5, the MLPs,
AlexNet in both variants, so grouped convolutions and ``LocalResponseNorm``, VGG with and
without BatchNorm, GoogLeNet with its ceil-mode pools, ResNet-18/50, ViT with exact erf
GELU) and every public layer.

What does not:

- a primitive jax2onnx has no plugin for, e.g. a custom ``jax.extend.core.Primitive``
  inside an ``Activation``, or ``lax.reduce_window`` with a reducer other than add, max
  or min (jax2onnx: "reduce_window currently supports reducer jaxpr primitives:
  add/max/min"). ``save_onnx`` raises ``NotImplementedError`` naming the first layer
  that fails to convert on its own and jax2onnx's reason, which names the primitive;
- opsets below :data:`MIN_OPSET` (17, the lowest checked) are refused: at 13 jax2onnx
  emits ``Shape(start=...)`` (opset 15), and onnxruntime rejects the graph as invalid;
- networks over 2 GiB of constants: one ONNX protobuf file cannot hold them.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.metadata
import logging
import math
import numbers
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jcore

from funcnet.nn.conv import plain_formulations

__all__ = ["DEFAULT_OPSET", "MIN_OPSET", "check_onnx", "save_onnx"]

#: The ONNX opset ``save_onnx`` targets by default (onnxruntime >= 1.14 runs it).
DEFAULT_OPSET = 18
#: The lowest opset allowed: the lowest tested (at 13, onnxruntime rejects jax2onnx's graphs).
MIN_OPSET = 17
# The primitives that call a sub-jaxpr, with the parameter holding it: inlined.
_CALLS = {
    "jit": "jaxpr",
    "pjit": "jaxpr",
    "closed_call": "call_jaxpr",
    "custom_jvp_call": "call_jaxpr",
    "custom_vjp_call": "call_jaxpr",
}
_POOLS = ("reduce_window_max", "reduce_window_min", "reduce_window_sum")
_WINDOW = ("window_dimensions", "window_strides", "base_dilation", "window_dilation")


def _require(module: str, where: str) -> Any:
    """Import an optional dependency, or say which extra brings it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"{where} needs the optional package {module!r}, which is not installed ({e}); "
            f"install it with: pip install 'funcnet[onnx]'"
        ) from e


# ---------------------------------------------------------------------------------------
# Replaying a jaxpr for jax2onnx
# ---------------------------------------------------------------------------------------


def _pool_rank3(prim: Any, x: jax.Array, params: dict[str, Any]) -> jax.Array:
    """The windowed reduction ``prim`` over ``x`` (rank > 3) computed over rank 3.

    The axes the window leaves alone (size and stride 1, no padding or dilation: the
    batch and channel axes of a pool) move to the front and merge into one.
    """

    def untouched(i: int) -> bool:
        return all(params[k][i] == 1 for k in _WINDOW) and tuple(params["padding"][i]) == (0, 0)

    passive = [i for i in range(x.ndim) if untouched(i)]
    active = [i for i in range(x.ndim) if not untouched(i)]
    if not passive or len(active) > 2:
        return prim.bind(x, **params)  # not a 2-D pool: left to jax2onnx as it is
    perm = (*passive, *active)
    lead = [x.shape[i] for i in passive]
    y = lax.transpose(x, perm).reshape(math.prod(lead), *(x.shape[i] for i in active))
    sub = dict(params, padding=((0, 0), *(tuple(params["padding"][i]) for i in active)))
    sub.update({k: (1, *(params[k][i] for i in active)) for k in _WINDOW})
    y = prim.bind(y, **sub)
    y = y.reshape(*lead, *y.shape[1:])
    return lax.transpose(y, tuple(int(i) for i in np.argsort(perm)))


def _replay(jaxpr: Any, consts: Sequence[Any], *args: Any) -> list[Any]:
    """Evaluate ``jaxpr`` primitive by primitive (as ``jax.core.eval_jaxpr`` does),
    inlining sub-jaxpr calls and computing pools over rank 3 (module docstring)."""
    env: dict[Any, Any] = {}

    def read(v: Any) -> Any:
        return v.val if isinstance(v, jcore.Literal) else env[v]

    env.update(zip(jaxpr.constvars, consts, strict=True))
    env.update(zip(jaxpr.invars, args, strict=True))
    for eqn in jaxpr.eqns:
        ins = [read(v) for v in eqn.invars]
        name = eqn.primitive.name
        called = eqn.params.get(_CALLS.get(name, ""))
        if isinstance(called, jcore.ClosedJaxpr):
            outs = _replay(called.jaxpr, called.consts, *ins)
        elif name in _POOLS and ins[0].ndim > 3:
            outs = [_pool_rank3(eqn.primitive, ins[0], eqn.params)]
        else:
            outs = eqn.primitive.bind(*ins, **eqn.params)
            if not eqn.primitive.multiple_results:
                outs = [outs]
        for v, out in zip(eqn.outvars, outs, strict=True):
            if not isinstance(v, jcore.DropVar):
                env[v] = out
    return [read(v) for v in jaxpr.outvars]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Keep jax2onnx's logging to itself for the duration: onnx_ir warns, on every
    export, about the internal shape tensors jax2onnx leaves untyped, and jax2onnx calls
    ``logging.info``, which gives the root logger a stderr handler if it had none."""
    serde = logging.getLogger("onnx_ir.serde")
    root = logging.getLogger()
    level, handlers = serde.level, root.handlers[:]
    serde.setLevel(logging.ERROR)
    try:
        yield
    finally:
        serde.setLevel(level)
        root.handlers[:] = handlers


def _trace(
    net: Any, params: Any, state: Any, shape: tuple[int, ...], batch: int | None
) -> tuple[Any, jax.ShapeDtypeStruct]:
    """The jaxpr of ``net``'s evaluation-mode forward pass and its input's spec
    (funcnet checks params and state here, naming the layer they do not fit)."""
    if batch is None:
        (batch,) = jax.export.symbolic_shape("N", constraints=("N >= 1",))
    spec = jax.ShapeDtypeStruct((batch, *shape), jnp.int32 if net.takes_integers() else jnp.float32)
    closed = jax.make_jaxpr(lambda x: net.apply_with_state(params, state, x, train=False)[0])
    with plain_formulations():  # ONNX Conv nodes, not the banded matmul's reshapes
        return closed(spec), spec


def _to_model(jax2onnx: Any, closed: Any, spec: jax.ShapeDtypeStruct, name: str, opset: int) -> Any:
    """The ``onnx.ModelProto`` of the jaxpr ``closed`` (see :func:`_replay`)."""

    def replay(x):
        return _replay(closed.jaxpr, closed.consts, x)[0]

    with _quiet():
        return jax2onnx.to_onnx(
            replay, [spec], model_name=name, opset=opset, input_names=["x"], output_names=["y"]
        )


def _first_failing_layer(jax2onnx: Any, net: Any, shape: tuple[int, ...], opset: int) -> str:
    """Which leaf layer of ``net`` fails to convert on its own (zero params), for an
    error message; ``""`` if none does alone."""
    from funcnet.nn.base import RF

    leaves: list[tuple[tuple, Any, tuple]] = []

    def visit(path, layer, in_shape, rf, own):
        if not layer.sublayers():
            leaves.append((path, layer, in_shape))

    with contextlib.suppress(Exception):  # a diagnosis must never hide the real error
        net.walk(shape, RF.start(shape[:2] if len(shape) == 3 else shape[:-1]), (), visit)
    for path, layer, in_shape in leaves:
        try:
            zeros = jax.tree_util.tree_map(
                lambda s: jnp.zeros(s.shape, s.dtype), layer.param_shapes(in_shape)
            )
            closed, spec = _trace(layer, zeros, layer.init_state(in_shape), in_shape, 1)
        except Exception:
            continue  # it does not even trace alone: no verdict on it
        try:
            _to_model(jax2onnx, closed, spec, type(layer).__name__, opset)
        except Exception:
            at = f" at path {path}" if path else ""
            return f" (layer {layer!r}{at}, input shape {in_shape})"
    return ""


def _positive_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value > 0


def save_onnx(
    path: str | os.PathLike,
    net: Any,
    params: Any,
    input_shape: Sequence[int],
    *,
    state: Any = None,
    batch: int | None = None,
    opset: int = DEFAULT_OPSET,
) -> Path:
    """Write the evaluation-mode forward pass of ``net`` to an ONNX file at ``path``.

    Args:
      path: destination file (conventionally ``*.onnx``); parent directories are created.
      net: a funcnet layer or network.
      params: its trained parameters (baked into the graph as constants).
      input_shape: unbatched input shape, e.g. ``(28, 28, 1)``.
      state: the network's state (BatchNorm's running statistics, e.g.
        ``fit(...).model_state``); default ``net.init_state(input_shape)``.
      batch: ``None`` (default) for a symbolic batch size ``N`` (any ``N >= 1`` runs), or
        a positive int to fix it.
      opset: the ONNX opset version, from :data:`MIN_OPSET` to the newest one the
        installed ``onnx`` knows (default :data:`DEFAULT_OPSET`).

    Returns:
      The path written: a graph from input ``"x"`` of shape ``(N, *input_shape)``
      (float32, or int32 for a network whose first layer takes integer ids) to ``"y"``.

    Raises:
      ImportError: jax2onnx is not installed (``pip install 'funcnet[onnx]'``).
      TypeError / ValueError: a bad argument, naming it, before anything is converted or
        written; params or state that do not fit the network (funcnet's message, naming
        the layer).
      NotImplementedError: jax2onnx cannot convert part of the network; the message names
        the layer and gives jax2onnx's reason (which names the JAX primitive).
    """
    where = "onnx.save_onnx"
    from funcnet import _checks
    from funcnet.checkpoint import _check_target
    from funcnet.export import _atomic_write
    from funcnet.layers import Layer

    target = _check_target(path, where, create_parents=True)
    if not isinstance(net, Layer):
        raise TypeError(f"{where}: net must be a funcnet layer or network, got {net!r}")
    shape = _checks.input_shape_tuple(input_shape, where)
    if batch is not None and not _positive_int(batch):
        raise ValueError(
            f"{where}: batch must be None (a symbolic batch size) or a positive int, got {batch!r}"
        )
    jax2onnx = _require("jax2onnx", where)
    newest = _require("onnx", where).defs.onnx_opset_version()
    if not _positive_int(opset) or not MIN_OPSET <= opset <= newest:
        raise ValueError(
            f"{where}: opset must be an int from {MIN_OPSET} to {newest} (the ONNX opset "
            f"version; default {DEFAULT_OPSET}), got {opset!r}"
        )
    net.output_shape(shape)  # an input shape the network does not take: names the layer
    if state is None:
        state = net.init_state(shape)
    closed, spec = _trace(net, params, state, shape, batch)
    try:
        model = _to_model(jax2onnx, closed, spec, type(net).__name__, opset)
    except Exception as e:
        version = importlib.metadata.version("jax2onnx")
        layer = _first_failing_layer(jax2onnx, net, shape, opset)
        raise NotImplementedError(
            f"{where}: jax2onnx {version} cannot convert {type(net).__name__}{layer}: "
            f"{type(e).__name__}: {e}"
        ) from e
    from funcnet import __version__

    model.doc_string = f"funcnet {__version__}: {net!r}"
    try:
        data = model.SerializeToString()
    except ValueError as e:  # protobuf's 2 GiB limit on one message
        raise ValueError(f"{where}: the ONNX model does not fit in one file: {e}") from e
    out = Path(target)
    _atomic_write(out, data)
    return out


@functools.partial(jax.jit, static_argnums=0)
def _evaluate(net: Any, params: Any, state: Any, x: jax.Array) -> jax.Array:
    # One compiled program: op-by-op dispatch of a deep network takes seconds.
    return net.apply_with_state(params, state, x, train=False)[0]


def check_onnx(
    path: str | os.PathLike,
    net: Any,
    params: Any,
    x: Any,
    *,
    state: Any = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
) -> float:
    """Run the ONNX file at ``path`` on the batch ``x`` with onnxruntime (CPU) and compare
    with funcnet's ``net.apply_with_state(params, state, x, train=False)[0]``.

    ``x`` must have the model's input shape (its batch size too, for a model exported with
    a fixed ``batch``). For a network that takes integer ids (e.g. ``Embedding``) its values
    must be whole numbers in the int32 range (floats such as ``3.0`` are accepted); they
    are passed as int32. NaNs compare equal to NaNs at the same places (``equal_nan``).

    Returns:
      The largest absolute difference between the two outputs (0 where both are NaN or
      the same infinity).

    Raises:
      ImportError: onnxruntime is not installed (``pip install 'funcnet[onnx]'``).
      FileNotFoundError: there is no file at ``path``.
      ValueError: ``x`` does not have the model's input shape, or (integer ids) holds a
        value that is not a whole number in the int32 range.
      AssertionError: the shapes differ, NaNs are at different places, or the outputs
        differ by more than ``atol + rtol * |funcnet's output|`` somewhere (the message
        says by how much).
    """
    where = "onnx.check_onnx"
    ort = _require("onnxruntime", where)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{where}: no such ONNX file: {os.fspath(path)!r}")
    x = _ids(x, where) if net.takes_integers() else np.asarray(x, np.float32)
    session = ort.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
    model_input = session.get_inputs()[0]
    _check_input_shape(where, path, model_input.shape, x.shape)
    if state is None:
        state = net.init_state(tuple(x.shape[1:]))
    want = np.asarray(_evaluate(net, params, state, x))
    got = session.run(None, {model_input.name: x})[0]
    if got.shape != want.shape:
        raise AssertionError(
            f"{where}: {path}: onnxruntime's output has shape {got.shape}, funcnet's {want.shape}"
        )
    got, want = got.astype(np.float64), want.astype(np.float64)
    nan_got, nan_want = np.isnan(got), np.isnan(want)
    apart = nan_got != nan_want
    if apart.any():
        first = tuple(int(i) for i in np.argwhere(apart)[0])
        raise AssertionError(
            f"{where}: {path}: onnxruntime's output has NaN at {int(nan_got.sum())} "
            f"places, funcnet's at {int(nan_want.sum())}; they differ at "
            f"{int(apart.sum())} places (first at index {first}: onnxruntime "
            f"{got[first]}, funcnet {want[first]})"
        )
    with np.errstate(invalid="ignore"):  # NaN - NaN and inf - inf: NaN, left out below
        gap = np.abs(got - want)
    diff = float(np.nanmax(gap, initial=0.0))
    if not np.allclose(got, want, rtol=rtol, atol=atol, equal_nan=True):
        raise AssertionError(
            f"{where}: {path}: onnxruntime's output differs from funcnet's by up to "
            f"{diff:.3g} (rtol={rtol}, atol={atol})"
        )
    return diff


def _ids(x: Any, where: str) -> np.ndarray:
    """``x`` as int32 ids, refusing values a cast would change (fractions, NaN, too big)."""
    arr = np.asarray(x)
    if arr.dtype.kind not in "biuf":
        raise TypeError(
            f"{where}: x must hold integer ids (the network's first layer takes ids), got "
            f"dtype {arr.dtype}"
        )
    if arr.dtype.kind == "f" and arr.size:
        bad = ~np.isfinite(arr) | (arr != np.round(arr))
        if bad.any():
            first = tuple(int(i) for i in np.argwhere(bad)[0])
            raise ValueError(
                f"{where}: x must hold integer ids (the network's first layer takes ids), got "
                f"{arr.dtype} values that are not whole numbers, e.g. {arr[first].item()!r} "
                f"at index {first}"
            )
    info = np.iinfo(np.int32)
    low, high = (arr.min().item(), arr.max().item()) if arr.size else (0, 0)
    if low < info.min or high > info.max:
        raise ValueError(
            f"{where}: x must hold int32 ids, got values in [{low}, {high}], outside "
            f"[{info.min}, {info.max}]"
        )
    return arr.astype(np.int32)


def _check_input_shape(where: str, path: Any, expected: Sequence[Any], given: tuple) -> None:
    """Raise ``ValueError`` if ``given`` does not fit the model's input shape ``expected``
    (onnxruntime's: ints for fixed sizes, names or None for symbolic ones)."""
    fits = len(expected) == len(given) and all(
        not isinstance(e, int) or e == g for e, g in zip(expected, given, strict=False)
    )
    if not fits:
        shown = tuple(e if isinstance(e, int) else (e or "?") for e in expected)
        fixed = isinstance(expected[0], int) if expected else False
        raise ValueError(
            f"{where}: {path}: the model takes x of shape {shown}"
            + (f" (its batch size is fixed at {expected[0]})" if fixed else "")
            + f", got x of shape {tuple(given)}"
        )
