"""A per-layer table of a network computed from shapes alone (nothing is allocated).

``summary(net, input_shape)`` gives one row per layer (nested ``Serial`` networks are
expanded, their rows numbered ``2.0``, ``2.1``, ... like the params tree ``params[2][0]``):

- the layer with its hyper-parameters (its ``repr``), the output shape (no batch axis),
- the parameter count (and the shape of each parameter),
- the FLOPs of the forward pass for **one example** (see *Counting convention*),
- the receptive field of one output unit with respect to the network input, its jump
  (effective stride) and the centre of unit ``(0, 0)``'s field in input pixels.

Counting convention (chosen to agree with XLA's ``cost_analysis``):

- a multiply-add is 2 FLOPs; every other add, multiply, divide, compare, max or select
  is 1 FLOP; ``exp``, ``log``, ``sqrt``, ``tanh``, ``pow`` are counted separately as
  *transcendentals* (as XLA does) and not as FLOPs;
- ``Dense``: ``2 * in * out`` per position plus ``out`` for the bias;
- ``Conv`` / ``LocallyConnected``: ``2 * C_in * C_out`` per kernel tap that lands on a
  real input pixel (taps on the zero padding are not counted, as XLA does not count
  them), plus one add per output for the bias. The locally connected count is the
  maths, not funcnet's patch-extraction implementation (which XLA counts as more);
- window pools: ``PH * PW - 1`` reductions per output (``+1`` divide for average,
  ``+1`` square per input and a ``sqrt`` plus 3 guarding ops per output for L2/Lp);
- ``ReLU`` 1 per element, ``Sigmoid`` 3 + 1 transcendental, ``Tanh`` 1 transcendental,
  softmax 4 + 1 transcendental per element; ``Flatten`` 0;
- any other layer (including ``Activation(fn)``) is measured by compiling its forward
  pass on abstract inputs (``jax.ShapeDtypeStruct``: still nothing is allocated) and
  reading XLA's cost analysis; such rows are marked ``*``.

Receptive fields follow the standard recurrences over each spatial axis (``H``, ``W`` of
an ``(H, W, C)`` input), with ``k_eff = (k - 1) * dilation + 1``:
``r_out = r_in + (k_eff - 1) * j_in``, ``j_out = j_in * stride``,
``c_out = c_in + ((k_eff - 1) / 2 - pad_low) * j_in`` (``c`` the centre of unit 0).
Elementwise layers and per-position ``Dense`` layers (on an ``(H, W, C)`` input) keep
them. ``Flatten`` keeps each unit's field but ends the grid (jump ``-``); a ``Dense``
after it (or a softmax over a spatial axis) sees the whole input along those axes.
The field is the theoretical one: near a padded border part of it lies in the padding.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from typing import Any

import jax

from funcnet import _checks
from funcnet import layers as L
from funcnet.layers import Layer, Shape
from funcnet.nets import Serial

__all__ = ["Row", "Summary", "param_count", "summary"]


@dataclasses.dataclass(frozen=True)
class Row:
    """One layer of a :class:`Summary`.

    Attributes:
      index: position of the row in the table (0, 1, ...).
      layer: the layer's ``repr`` (name and hyper-parameters).
      output_shape: unbatched output shape.
      params: number of scalar parameters.
      param_shapes: name -> shape of each parameter.
      path: position in the (nested) params tree: ``params[path[0]][path[1]]...``.
      name: the layer's class name.
      input_shape: unbatched input shape.
      flops: forward FLOPs for one example (see the module's counting convention).
      transcendentals: ``exp`` / ``log`` / ``sqrt`` / ... for one example.
      flops_source: ``"analytic"``, or ``"xla"`` when measured with XLA's cost analysis.
      receptive_field: ``(rows, cols)`` of input pixels one output unit depends on, or
        ``()`` for an input without spatial axes, or ``None`` if unknown.
      jump: ``(rows, cols)`` input-pixel distance between neighbouring output units, an
        entry ``None`` once that axis is no longer a grid (after ``Flatten`` / ``Dense``);
        ``None`` if unknown.
      rf_center: centre of output unit ``(0, 0)``'s field, in input pixel coordinates
        (negative or fractional with padding and even windows); ``None`` if unknown.
      param_bytes: bytes the parameters take in their dtype.
    """

    index: int
    layer: str
    output_shape: Shape
    params: int
    param_shapes: dict[str, Shape]
    path: tuple[int, ...] = ()
    name: str = ""
    input_shape: Shape = ()
    flops: int = 0
    transcendentals: int = 0
    flops_source: str = "analytic"
    receptive_field: tuple[int, ...] | None = None
    jump: tuple[int | None, ...] | None = None
    rf_center: tuple[float, ...] | None = None
    param_bytes: int = 0

    def as_dict(self) -> dict[str, Any]:
        """The row as a plain dict (e.g. for ``pandas.DataFrame`` or JSON)."""
        return dataclasses.asdict(self)


def _fmt_int(n: int | None) -> str:
    return "?" if n is None else f"{n:,}"


def _fmt_pair(values: tuple | None) -> str:
    if values is None:
        return "?"
    if not values or all(v is None for v in values):
        return "-"
    cells = ["-" if v is None else str(v) for v in values]
    return "x".join(cells)


@dataclasses.dataclass(frozen=True)
class Summary:
    """Rows (one per layer) plus totals; ``str()`` renders a table, ``as_dicts()`` data."""

    input_shape: Shape
    rows: tuple[Row, ...]

    @property
    def total_params(self) -> int:
        return sum(r.params for r in self.rows)

    @property
    def total_flops(self) -> int:
        """Forward FLOPs for one example (multiply-add = 2)."""
        return sum(r.flops for r in self.rows)

    @property
    def total_transcendentals(self) -> int:
        return sum(r.transcendentals for r in self.rows)

    @property
    def output_shape(self) -> Shape:
        return self.rows[-1].output_shape if self.rows else self.input_shape

    @property
    def receptive_field(self) -> tuple[int, ...] | None:
        """Receptive field of one unit of the network output."""
        return self.rows[-1].receptive_field if self.rows else None

    @property
    def jump(self) -> tuple[int | None, ...] | None:
        return self.rows[-1].jump if self.rows else None

    def as_dicts(self) -> list[dict[str, Any]]:
        """One plain dict per row."""
        return [r.as_dict() for r in self.rows]

    def __str__(self) -> str:
        show_tr = self.total_transcendentals > 0
        header = ["#", "layer", "output shape", "params", "FLOPs"]
        if show_tr:
            header.append("transc.")
        header += ["RF", "jump"]
        right = {0, 3, 4, 5} if show_tr else {0, 3, 4}

        def cells(idx, layer, shape, params, flops, tr, rf, jump):
            out = [idx, layer, shape, params, flops]
            if show_tr:
                out.append(tr)
            return [*out, rf, jump]

        unit = _fmt_pair((1,) * len(_spatial(self.input_shape)))
        body = [cells("", "input", str(self.input_shape), "", "", "", unit, unit)]
        for r in self.rows:
            mark = "*" if r.flops_source == "xla" else ""
            body.append(cells(
                ".".join(map(str, r.path)) or str(r.index), r.layer, str(r.output_shape),
                f"{r.params:,}", _fmt_int(r.flops) + mark, _fmt_int(r.transcendentals),
                _fmt_pair(r.receptive_field), _fmt_pair(r.jump),
            ))
        footer = cells("", "total", str(self.output_shape), f"{self.total_params:,}",
                       f"{self.total_flops:,}", f"{self.total_transcendentals:,}",
                       _fmt_pair(self.receptive_field), _fmt_pair(self.jump))
        rows = [header, *body, footer]
        widths = [max(len(row[j]) for row in rows) for j in range(len(header))]

        def line(row):
            return "  ".join(
                c.rjust(w) if j in right else c.ljust(w)
                for j, (c, w) in enumerate(zip(row, widths, strict=True))
            ).rstrip()

        rule = "-" * len(line(header))
        pbytes = sum(r.param_bytes for r in self.rows)
        notes = [
            f"params: {self.total_params:,} ({_fmt_bytes(pbytes)}); FLOPs per example "
            f"(multiply-add = 2), padding taps not counted; RF / jump in input pixels",
        ]
        if any(r.flops_source == "xla" for r in self.rows):
            notes.append("* FLOPs measured with XLA's cost analysis (no analytic rule)")
        return "\n".join(
            [line(header), rule, *(line(b) for b in body), rule, line(footer), *notes]
        )


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def param_count(layer: Layer, input_shape: Shape) -> int:
    """Number of scalar parameters ``init`` would create, from shapes only."""
    leaves = jax.tree_util.tree_leaves(layer.param_shapes(input_shape))
    return sum(math.prod(leaf.shape) for leaf in leaves)


# ---------------------------------------------------------------------------------------
# FLOPs
# ---------------------------------------------------------------------------------------


def _real_taps(n_in: int, n_out: int, k: int, s: int, d: int, lo: int) -> int:
    """Kernel taps, summed over the ``n_out`` outputs of one axis, on real input pixels."""
    total = 0
    for i in range(n_out):
        first = i * s - lo
        total += sum(1 for t in range(k) if 0 <= first + t * d < n_in)
    return total


def _xla_cost(layer: Layer, in_shape: Shape) -> tuple[int, int]:
    """Flops and transcendentals of ``layer`` on one example, from XLA (no allocation)."""
    from funcnet import graph  # graph imports summary's siblings only; avoid a cycle

    cost = graph.cost_analysis(layer, in_shape, batch=1)
    return round(cost.flops), round(cost.transcendentals)


def _layer_flops(layer: Layer, in_shape: Shape, out_shape: Shape) -> tuple[int, int, str]:
    """``(flops, transcendentals, source)`` for one example."""
    n_in, n_out = math.prod(in_shape), math.prod(out_shape)
    if isinstance(layer, L.Dense):
        positions = math.prod(in_shape[:-1])
        bias = n_out if layer.use_bias else 0
        return 2 * positions * in_shape[-1] * layer.features + bias, 0, "analytic"
    if isinstance(layer, L.Conv | L.LocallyConnected):
        pads = layer.pads(in_shape)
        taps = 1
        for ax in range(2):
            taps *= _real_taps(in_shape[ax], out_shape[ax], layer.kernel_size[ax],
                               layer.stride[ax], layer.dilation[ax], pads[ax][0])
        bias = n_out if layer.use_bias else 0
        return 2 * taps * in_shape[2] * layer.features + bias, 0, "analytic"
    if isinstance(layer, L.MaxPool):
        return (math.prod(layer.window) - 1) * n_out, 0, "analytic"
    if isinstance(layer, L.AvgPool):
        return math.prod(layer.window) * n_out, 0, "analytic"
    if isinstance(layer, L.LpPool | L.L2Pool):
        # |x|^p (a square for p = 2), the window sum, then a guarded root (3 ops + root).
        p = getattr(layer, "p", 2.0)
        power = n_in if p == 2 else 2 * n_in
        tr = n_out + (0 if p == 2 else n_in)
        return power + (math.prod(layer.window) - 1) * n_out + 3 * n_out, tr, "analytic"
    if isinstance(layer, L.FeatureMaxPool):
        return (layer.group_size - 1) * n_out, 0, "analytic"
    if isinstance(layer, L.FeatureL2Pool):
        return n_in + (layer.group_size - 1) * n_out + 3 * n_out, n_out, "analytic"
    if isinstance(layer, L.ReLU):
        return n_in, 0, "analytic"
    if isinstance(layer, L.Sigmoid):
        return 3 * n_in, n_in, "analytic"
    if isinstance(layer, L.Tanh):
        return 0, n_in, "analytic"
    if isinstance(layer, L.Softmax | L.LogSoftmax):
        return 4 * n_in, n_in, "analytic"
    if isinstance(layer, L.Flatten):
        return 0, 0, "analytic"
    flops, tr = _xla_cost(layer, in_shape)
    return flops, tr, "xla"


# ---------------------------------------------------------------------------------------
# Receptive fields
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _RF:
    """Receptive-field state: per spatial axis of the network input."""

    extent: tuple[int, ...]  # the network input's spatial size (for "whole input")
    rf: tuple[int, ...] | None
    jump: tuple[int | None, ...] | None
    center: tuple[float, ...] | None
    grid: bool  # the current tensor's leading axes are still the input's spatial axes

    def whole(self, axes=None) -> _RF:
        """The field becomes the whole input along ``axes`` (default: all)."""
        axes = range(len(self.extent)) if axes is None else axes
        if self.rf is None:
            rf = list(self.extent)
            jump: list[int | None] = [None] * len(self.extent)
            center = [(n - 1) / 2 for n in self.extent]
            keep = set()
        else:
            rf, jump, center = list(self.rf), list(self.jump), list(self.center)
            keep = set(range(len(self.extent))) - set(axes)
        for a in range(len(self.extent)):
            if a not in keep:
                rf[a], jump[a], center[a] = self.extent[a], None, (self.extent[a] - 1) / 2
        return dataclasses.replace(self, rf=tuple(rf), jump=tuple(jump), center=tuple(center))


def _window_rf(state: _RF, k_eff, stride, pads) -> _RF:
    if state.rf is None or not state.grid:
        return dataclasses.replace(state, rf=None, jump=None, center=None)
    rf = tuple(r + (k - 1) * j for r, k, j in zip(state.rf, k_eff, state.jump, strict=True))
    center = tuple(
        c + ((k - 1) / 2 - lo) * j
        for c, k, j, (lo, _) in zip(state.center, k_eff, state.jump, pads, strict=True)
    )
    jump = tuple(j * s for j, s in zip(state.jump, stride, strict=True))
    return dataclasses.replace(state, rf=rf, jump=jump, center=center)


def _layer_rf(layer: Layer, in_shape: Shape, state: _RF) -> _RF:
    if not state.extent:  # no spatial axes in the network input: nothing to track
        return state
    if isinstance(layer, L.Conv | L.LocallyConnected):
        k_eff = _checks.effective_window(layer.kernel_size, layer.dilation)
        return _window_rf(state, k_eff, layer.stride, layer.pads(in_shape))
    if isinstance(layer, L.MaxPool | L.AvgPool | L.LpPool | L.L2Pool):
        return _window_rf(state, layer.window, layer.stride, layer.pads(in_shape))
    if isinstance(layer, L.ReLU | L.Sigmoid | L.Tanh | L.Activation):
        return state  # elementwise
    if isinstance(layer, L.Dense):
        # A Dense acts on the last axis: per position on a grid, everything once flattened.
        return state if state.grid and len(in_shape) > 1 else state.whole()
    if isinstance(layer, L.FeatureMaxPool | L.FeatureL2Pool):
        if state.grid and len(in_shape) > 1:
            return state
        return dataclasses.replace(state, rf=None, jump=None, center=None)
    if isinstance(layer, L.Softmax | L.LogSoftmax):
        axis = layer.axis - 1 if layer.axis > 0 else len(in_shape) + layer.axis
        if not state.grid:
            return state.whole()
        if axis < len(state.extent) and len(in_shape) > 1 and axis != len(in_shape) - 1:
            return state.whole([axis])
        return state
    if isinstance(layer, L.Flatten):
        if state.rf is None or len(in_shape) <= 1:
            return dataclasses.replace(state, grid=False)
        return dataclasses.replace(state, grid=False, jump=(None,) * len(state.extent))
    return dataclasses.replace(state, rf=None, jump=None, center=None)


# ---------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------


def _spatial(shape: Shape) -> Shape:
    """The spatial axes of an unbatched input: ``H, W`` of ``(H, W, C)``, else all but the
    last (feature) axis."""
    return shape[:2] if len(shape) == 3 else shape[:-1]


def _leaves(net: Layer, shape: Shape, path: tuple[int, ...]) -> Iterator[tuple]:
    """``(path, layer, input_shape)`` of every non-Serial layer, depth first."""
    if isinstance(net, Serial):
        shapes = net.shapes(shape)
        for i, layer in enumerate(net.layers):
            yield from _leaves(layer, shapes[i], (*path, i))
    else:
        yield path, net, shape


def summary(net: Any, input_shape: Shape) -> Summary:
    """Per-layer output shape, parameters, FLOPs and receptive field of ``net``.

    Args:
      net: a :class:`~funcnet.nets.Serial` (one row per layer, nested ``Serial``
        networks expanded) or a single layer.
      input_shape: unbatched input shape, e.g. ``(28, 28, 1)``.

    Returns:
      A :class:`Summary`; ``print`` it for the table, or use ``.rows`` /
      ``.as_dicts()`` and the ``total_*`` properties as data. FLOPs are per example.

    Shapes only: the 200x200 -> 40K dense layer of the lecture (1.6e9 weights) is
    summarised without allocating anything.
    """
    shape = _checks.input_shape_tuple(input_shape, "summary")
    if not isinstance(net, Layer):
        raise TypeError(f"summary: net must be a funcnet layer or Serial, got {net!r}")
    net.output_shape(shape)  # validates the whole network, errors name the layer
    spatial = _spatial(shape)
    state = _RF(
        extent=spatial,
        rf=(1,) * len(spatial),
        jump=(1,) * len(spatial),
        center=(0.0,) * len(spatial),
        grid=True,
    )
    rows = []
    top = isinstance(net, Serial)
    for index, (path, layer, in_shape) in enumerate(_leaves(net, shape, ())):
        out = layer.output_shape(in_shape)
        specs = layer.param_shapes(in_shape)
        leaves = jax.tree_util.tree_leaves_with_path(specs)
        pshapes = {jax.tree_util.keystr(p).strip("[]'\""): leaf.shape for p, leaf in leaves}
        pbytes = sum(math.prod(leaf.shape) * leaf.dtype.itemsize for _, leaf in leaves)
        flops, tr, source = _layer_flops(layer, in_shape, out)
        state = _layer_rf(layer, in_shape, state)
        row = Row(
            index=index,
            layer=repr(layer),
            output_shape=out,
            params=param_count(layer, in_shape),
            param_shapes=pshapes,
            path=path if top else (),
            name=type(layer).__name__,
            input_shape=in_shape,
            flops=flops,
            transcendentals=tr,
            flops_source=source,
            receptive_field=state.rf,
            jump=state.jump,
            rf_center=state.center,
            param_bytes=pbytes,
        )
        rows.append(row)
    return Summary(shape, tuple(rows))
