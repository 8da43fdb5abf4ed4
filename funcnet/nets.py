"""Combinators. ``Serial`` is the lecture's network ``f = f_{L+1} o f_L o ... o f_1``."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax

from funcnet import _checks
from funcnet.layers import Layer, Shape


def _prefix(i: int, layer: Layer, err: Exception) -> Exception:
    msg = str(err)
    named = msg.startswith(repr(layer)) or msg.startswith("Serial layer")
    return type(err)(
        f"Serial layer {i}: {msg}" if named else f"Serial layer {i} ({layer!r}): {msg}"
    )


@dataclasses.dataclass(frozen=True, repr=False)
class Serial(Layer):
    """Layers applied in order: ``Serial([f_1, ..., f_{L+1}])(x) = f_{L+1}(...f_1(x))``.

    Params are a tuple aligned with ``layers`` (``params[i]`` belongs to ``layers[i]``).
    A ``Serial`` is itself a layer, so networks nest. Errors raised by a layer are
    re-raised with its index in the network.
    """

    layers: tuple[Layer, ...]

    def __post_init__(self):
        layers = self.layers
        if isinstance(layers, Layer) or not isinstance(layers, Sequence):
            raise TypeError(f"Serial: layers must be a list or tuple of layers, got {layers!r}")
        for i, layer in enumerate(layers):
            if not isinstance(layer, Layer):
                hint = (
                    " (did you pass the class instead of an instance?)"
                    if isinstance(layer, type)
                    else ""
                )
                raise TypeError(f"Serial: layers[{i}] is not a funcnet layer: {layer!r}{hint}")
        object.__setattr__(self, "layers", tuple(layers))

    def __repr__(self) -> str:
        inner = ",\n".join(f"  {layer!r}" for layer in self.layers)
        return f"Serial([\n{inner},\n])" if self.layers else "Serial([])"

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, i):
        return self.layers[i]

    def shapes(self, input_shape: Shape) -> list[Shape]:
        """Unbatched shapes ``[input, after layer 0, ..., output]``; validates each layer."""
        shape = _checks.input_shape_tuple(input_shape, "Serial")
        out = [shape]
        for i, layer in enumerate(self.layers):
            try:
                shape = layer.output_shape(shape)
            except (ValueError, TypeError) as e:
                raise _prefix(i, layer, e) from e
            out.append(shape)
        return out

    def output_shape(self, input_shape: Shape) -> Shape:
        return self.shapes(input_shape)[-1]

    def param_shapes(self, input_shape: Shape) -> tuple:
        shapes = self.shapes(input_shape)
        return tuple(
            layer.param_shapes(s) for layer, s in zip(self.layers, shapes[:-1], strict=True)
        )

    def param_specs(self, input_shape: Shape):
        raise TypeError("Serial: use param_shapes(); a network's params are a tuple per layer")

    def init(self, key: jax.Array, input_shape: Shape) -> tuple:
        """A tuple of each layer's params, initialised with independent keys."""
        shapes = self.shapes(input_shape)
        keys = jax.random.split(key, max(len(self.layers), 1))
        return tuple(
            layer.init(k, s) for layer, k, s in zip(self.layers, keys, shapes[:-1], strict=False)
        )

    def apply(self, params: Any, x: jax.Array, *, key: jax.Array | None = None) -> jax.Array:
        """``f_{L+1}(... f_1(x))``; ``key`` (if given) is split among the layers."""
        if not isinstance(params, tuple | list) or len(params) != len(self.layers):
            got = (
                f"{type(params).__name__} of length {len(params)}"
                if isinstance(params, tuple | list)
                else type(params).__name__
            )
            raise ValueError(
                f"Serial: params must be a tuple with one entry per layer ({len(self.layers)}), "
                f"got {got}"
            )
        keys = [None] * len(self.layers) if key is None else jax.random.split(key, len(self.layers))
        for i, (layer, p, k) in enumerate(zip(self.layers, params, keys, strict=True)):
            try:
                x = layer.apply(p, x, key=k)
            except (ValueError, TypeError) as e:
                raise _prefix(i, layer, e) from e
        return x
