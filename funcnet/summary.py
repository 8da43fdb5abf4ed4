"""A per-layer table of a network computed from shapes alone (nothing is allocated)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax

from funcnet import _checks
from funcnet.layers import Layer, Shape
from funcnet.nets import Serial


@dataclasses.dataclass(frozen=True)
class Row:
    """One layer of a :class:`Summary`."""

    index: int
    layer: str
    output_shape: Shape
    params: int
    param_shapes: dict[str, Shape]


@dataclasses.dataclass(frozen=True)
class Summary:
    """Rows (one per layer) plus totals; ``str()`` renders a table."""

    input_shape: Shape
    rows: tuple[Row, ...]

    @property
    def total_params(self) -> int:
        return sum(r.params for r in self.rows)

    @property
    def output_shape(self) -> Shape:
        return self.rows[-1].output_shape if self.rows else self.input_shape

    def __str__(self) -> str:
        header = ("#", "layer", "output shape", "params")
        body = [(str(r.index), r.layer, str(r.output_shape), f"{r.params:,}") for r in self.rows]
        body.insert(0, ("", "input", str(self.input_shape), ""))
        footer = ("", "total", str(self.output_shape), f"{self.total_params:,}")
        cols = list(zip(header, *body, footer, strict=True))
        widths = [max(len(c) for c in col) for col in cols]

        def line(cells):
            return "  ".join(
                c.rjust(w) if j in (0, 3) else c.ljust(w)
                for j, (c, w) in enumerate(zip(cells, widths, strict=True))
            ).rstrip()

        rule = "-" * len(line(header))
        return "\n".join([line(header), rule, *(line(b) for b in body), rule, line(footer)])


def param_count(layer: Layer, input_shape: Shape) -> int:
    """Number of scalar parameters ``init`` would create, from shapes only."""
    leaves = jax.tree_util.tree_leaves(layer.param_shapes(input_shape))
    return sum(math.prod(leaf.shape) for leaf in leaves)


def summary(net: Any, input_shape: Shape) -> Summary:
    """Output shape and parameter count of every layer of ``net`` for ``input_shape``.

    ``net`` is a :class:`~funcnet.nets.Serial` (one row per layer) or a single layer.
    Works without allocating: a 200x200 -> 40K dense layer (1.6e9 weights) is fine.
    """
    shape = _checks.input_shape_tuple(input_shape, "summary")
    layers = net.layers if isinstance(net, Serial) else (net,)
    rows = []
    for i, layer in enumerate(layers):
        specs = layer.param_shapes(shape)
        out = layer.output_shape(shape)
        leaves = jax.tree_util.tree_leaves_with_path(specs)
        shapes = {jax.tree_util.keystr(p).strip("[]'\""): leaf.shape for p, leaf in leaves}
        rows.append(Row(i, repr(layer), out, param_count(layer, shape), shapes))
        shape = out
    return Summary(_checks.input_shape_tuple(input_shape, "summary"), tuple(rows))
