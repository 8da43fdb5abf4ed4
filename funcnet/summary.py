"""A per-layer table of a network computed from shapes alone (nothing is allocated).

``summary(net, input_shape)`` gives one row per layer (nested networks are expanded,
their rows numbered ``2.0``, ``2.1``, ... like the params tree ``params[2][0]``; a
``Parallel`` or ``Residual`` adds a row for its merge after its parts):

- the layer with its hyper-parameters (its ``repr``), the output shape (no batch axis),
- the parameter count (and the shape of each parameter), and the state count (shown
  when the network has state),
- the FLOPs of the forward pass for **one example** (see *Counting convention*),
- the receptive field of one output unit with respect to the network input, its jump
  (effective stride) and the centre of unit ``(0, 0)``'s field in input pixels.

Counting convention (chosen to agree with XLA's ``cost_analysis``):

- a multiply-add is 2 FLOPs; every other add, multiply, divide, compare, max or select
  is 1 FLOP; ``exp``, ``log``, ``sqrt``, ``tanh``, ``pow`` are counted separately as
  *transcendentals* (as XLA does) and not as FLOPs;
Each layer reports its own count (``layer.flops(input_shape)``; its docstring gives the
formula) and its own receptive-field rule (``layer.receptive_field``): nothing here
switches on layer types. The counts:

- ``Dense``: ``2 * in * out`` per position plus ``out`` for the bias;
- ``Conv`` / ``LocallyConnected``: ``2 * C_in * C_out`` per kernel tap that lands on a
  real input pixel (taps on the zero padding are not counted, as XLA does not count
  them), plus one add per output for the bias. The locally connected count is the
  maths, not funcnet's patch-extraction implementation (which XLA counts as more);
- window pools: ``PH * PW - 1`` reductions per output (``+1`` divide for average,
  ``+1`` square per input and a ``sqrt`` plus 3 guarding ops per output for L2/Lp);
- ``ReLU`` 1 per element, ``Sigmoid`` 3 + 1 transcendental, ``Tanh`` 1 transcendental,
  softmax 4 + 1 transcendental per element; ``Flatten`` 0;
- combinators add a row of their own for the merge: ``Residual`` one add per output,
  ``Parallel`` concat 0 and sum one add per output and extra branch;
- any layer without a count of its own (including ``Activation(fn)``) is measured by
  compiling its forward pass on abstract inputs (``jax.ShapeDtypeStruct``: still nothing
  is allocated) and reading XLA's cost analysis; such rows are marked ``*``.

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
from typing import Any

import jax

from funcnet import _checks
from funcnet.nn.base import RF, Layer, Shape, param_count

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
      state: number of scalar state entries (BatchNorm's running statistics).
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
    state: int = 0

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
    def total_state(self) -> int:
        """Scalar state entries (BatchNorm's running statistics)."""
        return sum(r.state for r in self.rows)

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
        show_state = self.total_state > 0
        header = ["#", "layer", "output shape", "params"]
        if show_state:
            header.append("state")
        header.append("FLOPs")
        if show_tr:
            header.append("transc.")
        header += ["RF", "jump"]
        right = set(range(3, len(header) - 2))

        def cells(idx, layer, shape, params, state, flops, tr, rf, jump):
            out = [idx, layer, shape, params]
            if show_state:
                out.append(state)
            out.append(flops)
            if show_tr:
                out.append(tr)
            return [*out, rf, jump]

        unit = _fmt_pair((1,) * len(_spatial(self.input_shape)))
        body = [cells("", "input", str(self.input_shape), "", "", "", "", unit, unit)]
        for r in self.rows:
            mark = "*" if r.flops_source == "xla" else ""
            body.append(cells(
                ".".join(map(str, r.path)) or str(r.index), r.layer, str(r.output_shape),
                f"{r.params:,}", f"{r.state:,}", _fmt_int(r.flops) + mark,
                _fmt_int(r.transcendentals), _fmt_pair(r.receptive_field), _fmt_pair(r.jump),
            ))
        footer = cells("", "total", str(self.output_shape), f"{self.total_params:,}",
                       f"{self.total_state:,}", f"{self.total_flops:,}",
                       f"{self.total_transcendentals:,}",
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


def _layer_flops(layer: Layer, in_shape: Shape) -> tuple[int, int, str]:
    """``(flops, transcendentals, source)`` for one example: the layer's own count, or
    XLA's cost analysis when the layer has none."""
    own = layer.flops(in_shape)
    if own is not None:
        return int(own[0]), int(own[1]), "analytic"
    from funcnet import graph  # graph imports summary's siblings only; avoid a cycle

    cost = graph.cost_analysis(layer, in_shape, batch=1)
    return round(cost.flops), round(cost.transcendentals), "xla"


# ---------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------


def _spatial(shape: Shape) -> Shape:
    """The spatial axes of an unbatched input: ``H, W`` of ``(H, W, C)``, else all but the
    last (feature) axis."""
    return shape[:2] if len(shape) == 3 else shape[:-1]


def _count(tree: Any) -> tuple[int, int]:
    leaves = jax.tree_util.tree_leaves(tree)
    return (sum(math.prod(leaf.shape) for leaf in leaves),
            sum(math.prod(leaf.shape) * leaf.dtype.itemsize for leaf in leaves))


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
        raise TypeError(f"summary: net must be a funcnet layer or network, got {net!r}")
    net.output_shape(shape)  # validates the whole network, errors name the layer
    rows: list[Row] = []
    top = bool(net.sublayers())

    def visit(path, layer, in_shape, field, own):
        leaf = not layer.sublayers()
        out = layer.output_shape(in_shape)
        specs = layer.param_shapes(in_shape) if leaf else {}
        leaves = jax.tree_util.tree_leaves_with_path(specs)
        pshapes = {jax.tree_util.keystr(p).strip("[]'\""): s.shape for p, s in leaves}
        params, pbytes = _count(specs)
        state, _ = _count(layer.state_shapes(in_shape) if leaf else {})
        flops, tr, source = _layer_flops(layer, in_shape)
        rows.append(Row(
            index=len(rows),
            layer=layer.label(),
            output_shape=out,
            params=params,
            param_shapes=pshapes,
            path=path if top else (),
            name=type(layer).__name__,
            input_shape=in_shape,
            flops=flops,
            transcendentals=tr,
            flops_source=source,
            receptive_field=field.rf,
            jump=field.jump,
            rf_center=field.center,
            param_bytes=pbytes,
            state=state,
        ))

    net.walk(shape, RF.start(_spatial(shape)), (), visit)
    return Summary(shape, tuple(rows))
