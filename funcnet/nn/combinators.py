"""Combinators: networks made of layers, each single-input and single-output.

- :class:`Serial` is the lecture's network ``f = f_{L+1} o f_L o ... o f_1``;
- :class:`Parallel` runs branches on the same input and merges them (GoogLeNet's
  inception block): ``"concat"`` along the channels or ``"sum"``;
- :class:`Residual` adds a shortcut around a body (ResNet): ``y = body(x) + shortcut(x)``.

Their hand-written back-propagation is the lecture's patterns in gradient flow: a
fan-out (the same ``x`` into several branches) is the **copy gate**, whose gradients
add; a sum is the **add gate**, which distributes the upstream gradient unchanged to
each summand; a concatenation splits the upstream gradient among its parts.

Params and state are tuples with one entry per part (``Residual``: ``(body, shortcut)``,
``{}`` for an identity shortcut).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from funcnet import _checks
from funcnet.nn.base import (
    RF,
    Layer,
    Shape,
    _default_state,
    cast_cotangent,
    prefixed,
    rule_forward,
    split_key,
    static,
)

__all__ = ["Parallel", "Residual", "Serial"]


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.split("\n"))


def _check_layer(value: Any, what: str, where: str) -> Layer:
    if not isinstance(value, Layer):
        hint = ""
        if isinstance(value, type):
            hint = " (did you pass the class instead of an instance?)"
        raise TypeError(f"{where}: {what} is not a funcnet layer: {value!r}{hint}")
    return value


def _check_layers(layers: Any, what: str, where: str) -> tuple[Layer, ...]:
    if isinstance(layers, Layer) or not isinstance(layers, Sequence) or isinstance(layers, str):
        raise TypeError(f"{where}: {what} must be a list or tuple of layers, got {layers!r}")
    return tuple(_check_layer(layer, f"{what}[{i}]", where) for i, layer in enumerate(layers))


def _check_parts(where: str, what: str, value: Any, n: int) -> None:
    if not isinstance(value, tuple | list) or len(value) != n:
        got = (
            f"{type(value).__name__} of length {len(value)}"
            if isinstance(value, tuple | list)
            else type(value).__name__
        )
        raise ValueError(f"{where}: {what} must be a tuple with one entry per {_PART[where]} "
                         f"({n}), got {got}")


_PART = {"Serial": "layer", "Parallel": "branch", "Residual": "part (body, shortcut)"}


class _Combinator(Layer):
    """What the three combinators share: parts, shapes, params and state as tuples."""

    def parts(self) -> tuple[Layer | None, ...]:
        raise NotImplementedError

    def sublayers(self) -> tuple[Layer, ...]:
        return tuple(p for p in self.parts() if p is not None)

    def part_name(self, i: int) -> str:
        raise NotImplementedError

    def _where(self, i: int, err: Exception) -> Exception:
        part = self.parts()[i]
        msg = str(err)
        named = msg.startswith((repr(part), _short_repr(part), "Serial", "Parallel", "Residual"))
        name = self.part_name(i)
        return prefixed(err, name if named else f"{name} ({_short_repr(part)})")

    def param_specs(self, input_shape: Shape):
        raise TypeError(
            f"{type(self).__name__}: use param_shapes(); a network's params are a tuple "
            f"per part"
        )

    # the part-wise trees ------------------------------------------------------------------
    def part_shapes(self, input_shape: Shape) -> list[Shape]:
        """The input shape of each part (``None`` parts get ``None``)."""
        raise NotImplementedError

    def _map_parts(self, fn: Callable, input_shape: Shape, empty: Any = None) -> tuple:
        shapes = self.part_shapes(input_shape)
        out = []
        for i, (part, shape) in enumerate(zip(self.parts(), shapes, strict=True)):
            if part is None:
                out.append({} if empty is None else empty)
                continue
            try:
                out.append(fn(part, shape, i))
            except (ValueError, TypeError) as e:
                raise self._where(i, e) from e
        return tuple(out)

    def _map_trees(self, fn: Callable, input_shape: Shape) -> tuple:
        """:meth:`_map_parts` for the parameter and state trees, once the parts are known
        to fit together (a Residual's sum, a Parallel's merge), as a leaf layer's
        ``param_specs`` validates its input shape."""
        self.output_shape(input_shape)
        return self._map_parts(fn, input_shape)

    def param_shapes(self, input_shape: Shape) -> tuple:
        return self._map_trees(lambda p, s, i: p.param_shapes(s), input_shape)

    def state_shapes(self, input_shape: Shape) -> tuple:
        return self._map_trees(lambda p, s, i: p.state_shapes(s), input_shape)

    def init_state(self, input_shape: Shape) -> tuple:
        return self._map_trees(lambda p, s, i: p.init_state(s), input_shape)

    def init_params(self, key: jax.Array, input_shape: Shape) -> tuple:
        """A tuple of each part's params, initialised with independent keys (``init``,
        inherited, checks the key and :data:`funcnet.nn.base.PARAM_LIMIT` first and runs
        this as one program)."""
        n = len(self.parts())
        keys = jax.random.split(key, max(n, 1))
        return self._map_trees(lambda p, s, i: p.init(keys[i], s), input_shape)

    def check_input(self, x: Any) -> jax.Array:
        first = next(iter(self.sublayers()), None)
        return super().check_input(x) if first is None else first.check_input(x)

    def check(self, params: Any, state: Any, x: Any) -> tuple[jax.Array, Any]:
        # only the top-level structure: every part checks its own as it runs
        where = type(self).__name__
        n = len(self.parts())
        x = self.check_input(x)
        in_shape = tuple(x.shape[1:])
        self.output_shape(in_shape)
        state = _default_state(self, state, in_shape)
        _check_parts(where, "params", params, n)
        _check_parts(where, "state", state, n)
        return x, state

    def check_values(self, x):
        for i, part in enumerate(self.parts()):
            if part is None:  # an identity branch
                continue
            try:
                part.check_values(x)
            except (ValueError, TypeError) as e:
                raise self._where(i, e) from e

    def _run(self, i, params, state, x, key, train):
        try:
            return self.parts()[i].apply_with_state(params, state, x, key=key, train=train)
        except (ValueError, TypeError) as e:
            raise self._where(i, e) from e

    def _run_fwd(self, i, params, state, x, key, train):
        """Part ``i``'s ``fwd``; its residuals keep the dtypes of its input and output for
        :meth:`_run_bwd`."""
        try:
            y, s, res = rule_forward(self.parts()[i], params, state, x, key=key, train=train)
        except (ValueError, TypeError) as e:
            raise self._where(i, e) from e
        return y, s, PartResiduals(res, _Dtypes(_dtype(x), _dtype(y)))

    def _run_bwd(self, i, res, g, need_dx):
        """Part ``i``'s ``bwd`` with ``g`` in the part's output dtype and ``dL/dx`` in its
        input's, as autodiff gives them: a part's rule computes in the promoted dtype where
        a bfloat16 layer meets a float32 one, which the next rule would not accept. (The
        parameter gradients are cast once, for the whole network, by
        :func:`funcnet.vjp.value_and_grad_with_state`.)"""
        dx, dparams = self.parts()[i].bwd(res.res, cast_cotangent(g, res.dtypes.y), need_dx)
        return cast_cotangent(dx, res.dtypes.x), dparams

    def label(self) -> str:
        return type(self).__name__


@static
class _Dtypes:
    x: Any
    y: Any


class PartResiduals(NamedTuple):
    """A part's residuals inside a combinator's, with its dtypes (static)."""

    res: Any
    dtypes: _Dtypes


def _dtype(a: Any) -> Any:
    dtype = getattr(a, "dtype", None)
    return jnp.dtype(dtype) if dtype is not None else None


def _short_repr(layer: Layer) -> str:
    text = repr(layer)
    return text if "\n" not in text else f"{type(layer).__name__}(...)"


# ---------------------------------------------------------------------------------------
# Serial
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, repr=False)
class Serial(_Combinator):
    """Layers applied in order: ``Serial([f_1, ..., f_{L+1}])(x) = f_{L+1}(...f_1(x))``.

    Params (and state) are a tuple aligned with ``layers`` (``params[i]`` belongs to
    ``layers[i]``). A ``Serial`` is itself a layer, so networks nest. Errors raised by a
    layer are re-raised with its index in the network. The key (if any) is split among
    the layers.
    """

    layers: tuple[Layer, ...]

    def __post_init__(self):
        object.__setattr__(self, "layers", _check_layers(self.layers, "layers", "Serial"))

    def __repr__(self) -> str:
        inner = ",\n".join(_indent(repr(layer)) for layer in self.layers)
        return f"Serial([\n{inner},\n])" if self.layers else "Serial([])"

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, i):
        return self.layers[i]

    def parts(self):
        return self.layers

    def part_name(self, i: int) -> str:
        return f"Serial layer {i}"

    def shapes(self, input_shape: Shape) -> list[Shape]:
        """Unbatched shapes ``[input, after layer 0, ..., output]``; validates each layer."""
        shape = _checks.input_shape_tuple(input_shape, "Serial")
        out = [shape]
        for i, layer in enumerate(self.layers):
            try:
                shape = layer.output_shape(shape)
            except (ValueError, TypeError) as e:
                raise self._where(i, e) from e
            out.append(shape)
        return out

    def part_shapes(self, input_shape: Shape) -> list[Shape]:
        return self.shapes(input_shape)[:-1]

    def output_shape(self, input_shape: Shape) -> Shape:
        return self.shapes(input_shape)[-1]

    def forward(self, params, state, x, *, key=None, train=False):
        keys = split_key(key, len(self.layers))
        new_state = []
        for i in range(len(self.layers)):
            x, s = self._run(i, params[i], state[i], x, keys[i], train)
            new_state.append(s)
        return x, tuple(new_state)

    # back-propagation: feed-forward keeping residuals, then last layer to first
    def fwd(self, params, state, x, *, key=None, train=False):
        keys = split_key(key, len(self.layers))
        new_state, residuals = [], []
        for i in range(len(self.layers)):
            x, s, res = self._run_fwd(i, params[i], state[i], x, keys[i], train)
            new_state.append(s)
            residuals.append(res)
        return x, tuple(new_state), tuple(residuals)

    def bwd(self, res, g, need_dx):
        grads = [None] * len(self.layers)
        for i in reversed(range(len(self.layers))):
            g, grads[i] = self._run_bwd(i, res[i], g, need_dx or i > 0)
        return g, tuple(grads)

    def flops(self, input_shape: Shape) -> tuple[int, int] | None:
        total = [0, 0]
        for layer, shape in zip(self.layers, self.part_shapes(input_shape), strict=True):
            f = layer.flops(shape)
            if f is None:
                return None
            total[0] += f[0]
            total[1] += f[1]
        return total[0], total[1]

    def receptive_field(self, input_shape: Shape, rf: RF) -> RF:
        for layer, shape in zip(self.layers, self.part_shapes(input_shape), strict=True):
            rf = layer.receptive_field(shape, rf)
        return rf

    def walk(self, input_shape, rf, path, visit):
        for i, (layer, shape) in enumerate(zip(self.layers, self.part_shapes(input_shape),
                                               strict=True)):
            rf = layer.walk(shape, rf, (*path, i), visit)
        return rf


# ---------------------------------------------------------------------------------------
# Parallel
# ---------------------------------------------------------------------------------------

MERGES = ("concat", "sum")


class ParallelResiduals(NamedTuple):
    branches: tuple  # each branch's residuals


@dataclasses.dataclass(frozen=True, repr=False)
class Parallel(_Combinator):
    """Branches on the same input, merged: ``concat`` along the last (channel) axis, or
    ``sum``. GoogLeNet's inception block is a ``Parallel`` of four ``Serial`` branches.

    Every branch must give the same output shape (``"concat"``: all but the last axis).
    Back-propagation: each branch gets its slice of the upstream gradient (concat) or all
    of it (sum: the add gate), and the input's gradient is the sum of the branches'
    (the copy gate). FLOPs of the merge: 0 for concat, one add per output and extra
    branch for sum.
    """

    branches: tuple[Layer, ...]
    merge: str = "concat"

    def __post_init__(self):
        branches = _check_layers(self.branches, "branches", "Parallel")
        if not branches:
            raise ValueError("Parallel: needs at least one branch")
        object.__setattr__(self, "branches", branches)
        if self.merge not in MERGES:
            raise ValueError(f"Parallel: merge must be one of {MERGES}, got {self.merge!r}")

    def __repr__(self) -> str:
        inner = ",\n".join(_indent(repr(b)) for b in self.branches)
        extra = "" if self.merge == "concat" else f", merge={self.merge!r}"
        return f"Parallel([\n{inner},\n]{extra})"

    def parts(self):
        return self.branches

    def part_name(self, i: int) -> str:
        return f"Parallel branch {i}"

    def part_shapes(self, input_shape: Shape) -> list[Shape]:
        shape = _checks.input_shape_tuple(input_shape, "Parallel")
        return [shape] * len(self.branches)

    def branch_shapes(self, input_shape: Shape) -> list[Shape]:
        return list(self._map_parts(lambda p, s, i: p.output_shape(s), input_shape))

    def output_shape(self, input_shape: Shape) -> Shape:
        outs = self.branch_shapes(input_shape)
        first = outs[0]
        if self.merge == "sum":
            if any(o != first for o in outs):
                raise ValueError(
                    f"Parallel(merge='sum'): every branch must give the same shape, got {outs}"
                )
            return first
        if any(len(o) != len(first) or o[:-1] != first[:-1] for o in outs):
            raise ValueError(
                f"Parallel(merge='concat'): branches must agree on all but the last "
                f"(channel) axis, got {outs}"
            )
        return (*first[:-1], sum(o[-1] for o in outs))

    def forward(self, params, state, x, *, key=None, train=False):
        keys = split_key(key, len(self.branches))
        outs, new_state = [], []
        for i in range(len(self.branches)):
            y, s = self._run(i, params[i], state[i], x, keys[i], train)
            outs.append(y)
            new_state.append(s)
        return self._merge(outs), tuple(new_state)

    def _merge(self, outs):
        if self.merge == "sum":
            y = outs[0]
            for o in outs[1:]:
                y = y + o
            return y
        return jnp.concatenate(outs, axis=-1)

    def fwd(self, params, state, x, *, key=None, train=False):
        keys = split_key(key, len(self.branches))
        outs, new_state, residuals = [], [], []
        for i in range(len(self.branches)):
            y, s, r = self._run_fwd(i, params[i], state[i], x, keys[i], train)
            outs.append(y)
            new_state.append(s)
            residuals.append(r)
        widths = tuple(int(o.shape[-1]) for o in outs)
        return self._merge(outs), tuple(new_state), (ParallelResiduals(tuple(residuals)), widths)

    def bwd(self, res, g, need_dx):
        res, widths = res
        if self.merge == "sum":  # add gate: every branch gets all of g
            parts = [g] * len(self.branches)
        else:  # concat: each branch gets its slice of g
            bounds = [0]
            for w in widths:
                bounds.append(bounds[-1] + w)
            parts = [g[..., a:b] for a, b in itertools.pairwise(bounds)]
        dx, grads = None, []
        for i, (r, gi) in enumerate(zip(res.branches, parts, strict=True)):
            dxi, dp = self._run_bwd(i, r, gi, need_dx)
            grads.append(dp)
            if need_dx:  # copy gate: the fan-out's gradients add
                dx = dxi if dx is None else dx + dxi
        return dx, tuple(grads)

    def flops(self, input_shape: Shape) -> tuple[int, int]:
        if self.merge == "concat":
            return 0, 0
        n = 1
        for d in self.output_shape(input_shape):
            n *= d
        return (len(self.branches) - 1) * n, 0

    def receptive_field(self, input_shape: Shape, rf: RF) -> RF:
        return RF.union([b.receptive_field(input_shape, rf) for b in self.branches])

    def walk(self, input_shape, rf, path, visit):
        fields = [b.walk(input_shape, rf, (*path, i), visit) for i, b in enumerate(self.branches)]
        out = RF.union(fields)
        visit(path, self, input_shape, out, True)
        return out

    def label(self) -> str:
        return f"Parallel {self.merge} of {len(self.branches)}"


# ---------------------------------------------------------------------------------------
# Residual
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, repr=False)
class Residual(_Combinator):
    """``y = body(x) + shortcut(x)``; the shortcut is the identity when ``None`` (ResNet).

    A projection shortcut (e.g. a strided 1x1 ``Conv``, with BatchNorm in a ``Serial``)
    matches shapes when the body changes them. Params and state are
    ``(body's, shortcut's)``, the latter ``{}`` for the identity. Back-propagation: the
    sum is the add gate (both paths get ``g``), the fan-out of ``x`` the copy gate (their
    input gradients add). FLOPs of the merge: one add per output.
    """

    body: Layer
    shortcut: Layer | None = None

    def __post_init__(self):
        _check_layer(self.body, "body", "Residual")
        if self.shortcut is not None:
            _check_layer(self.shortcut, "shortcut", "Residual")

    def __repr__(self) -> str:
        text = f"Residual(\n{_indent(repr(self.body))},\n"
        if self.shortcut is not None:
            text += f"{_indent('shortcut=' + repr(self.shortcut))},\n"
        return text + ")"

    def parts(self):
        return (self.body, self.shortcut)

    def part_name(self, i: int) -> str:
        return ("Residual body", "Residual shortcut")[i]

    def part_shapes(self, input_shape: Shape) -> list[Shape]:
        shape = _checks.input_shape_tuple(input_shape, "Residual")
        return [shape, shape]

    def output_shape(self, input_shape: Shape) -> Shape:
        shape = _checks.input_shape_tuple(input_shape, "Residual")
        outs = self._map_parts(lambda p, s, i: p.output_shape(s), shape, empty=shape)
        if outs[0] != outs[1]:
            what = "the shortcut's" if self.shortcut is not None else "the input's (identity)"
            raise ValueError(
                f"Residual: the body's output shape {outs[0]} differs from {what} "
                f"{outs[1]}; use a projection shortcut (e.g. a 1x1 Conv with the body's "
                f"stride and features)"
            )
        return outs[0]

    def forward(self, params, state, x, *, key=None, train=False):
        k_body, k_short = split_key(key, 2)
        y, s_body = self._run(0, params[0], state[0], x, k_body, train)
        if self.shortcut is None:
            return y + x, (s_body, state[1])
        z, s_short = self._run(1, params[1], state[1], x, k_short, train)
        return y + z, (s_body, s_short)

    def fwd(self, params, state, x, *, key=None, train=False):
        k_body, k_short = split_key(key, 2)
        y, s_body, r_body = self._run_fwd(0, params[0], state[0], x, k_body, train)
        if self.shortcut is None:
            return y + x, (s_body, state[1]), (r_body, None)
        z, s_short, r_short = self._run_fwd(1, params[1], state[1], x, k_short, train)
        return y + z, (s_body, s_short), (r_body, r_short)

    def bwd(self, res, g, need_dx):
        r_body, r_short = res
        dx_body, d_body = self._run_bwd(0, r_body, g, need_dx)  # add gate: g to both paths
        if self.shortcut is None:
            return (dx_body + g if need_dx else None), (d_body, {})
        dx_short, d_short = self._run_bwd(1, r_short, g, need_dx)
        return (dx_body + dx_short if need_dx else None), (d_body, d_short)  # copy gate

    def flops(self, input_shape: Shape) -> tuple[int, int]:
        n = 1
        for d in self.output_shape(input_shape):
            n *= d
        return n, 0

    def receptive_field(self, input_shape: Shape, rf: RF) -> RF:
        short = rf if self.shortcut is None else self.shortcut.receptive_field(input_shape, rf)
        return RF.union([self.body.receptive_field(input_shape, rf), short])

    def walk(self, input_shape, rf, path, visit):
        body = self.body.walk(input_shape, rf, (*path, 0), visit)
        short = rf if self.shortcut is None else self.shortcut.walk(
            input_shape, rf, (*path, 1), visit)
        out = RF.union([body, short])
        visit(path, self, input_shape, out, True)
        return out

    def label(self) -> str:
        return "Residual add" + ("" if self.shortcut is not None else " (identity shortcut)")
