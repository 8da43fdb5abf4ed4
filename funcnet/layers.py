"""Layers: immutable descriptions of hyper-parameters with ``init`` / ``apply`` / ``output_shape``.

A layer holds no arrays. It is a frozen dataclass (hashable, comparable, printable), so it
can be a static argument to ``jax.jit``. Parameters are plain pytrees: a dict with named
leaves (``{"w": ..., "b": ...}``) per layer, ``{}`` for parameter-free layers.

- ``init(key, input_shape) -> params``: ``input_shape`` excludes the batch dimension.
- ``apply(params, x, *, key=None) -> y``: ``x`` is batched (axis 0). ``key`` only matters
  to stochastic layers; every layer here is deterministic and ignores it.
- ``output_shape(input_shape) -> shape``: computed from the hyper-parameters alone, no
  allocation; it also validates the input and raises an error naming the layer.

Initializers (``jax.nn.initializers``, overridable per layer with ``w_init`` / ``b_init``):
weights ``lecun_normal()`` (variance ``1 / fan_in``, as Flax), biases ``zeros``. For deep
ReLU networks ``jax.nn.initializers.he_normal()`` is a common override.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from funcnet import _checks, ops
from funcnet.ops import pool as _pool

Initializer = Callable[..., jax.Array]
Shape = tuple[int, ...]

DEFAULT_W_INIT: Initializer = jax.nn.initializers.lecun_normal()
DEFAULT_B_INIT: Initializer = jax.nn.initializers.zeros
# Locally connected kernels (H_out, W_out, KH, KW, C_in, C_out): fan-in is KH * KW * C_in.
LOCAL_W_INIT: Initializer = jax.nn.initializers.lecun_normal(
    in_axis=(2, 3, 4), out_axis=5, batch_axis=(0, 1)
)


def _short(value: Any) -> str:
    if callable(value) and not isinstance(value, type):
        return getattr(value, "__name__", repr(value))
    if isinstance(value, type):
        return value.__name__
    return repr(value)


def _is_default(value: Any, default: Any) -> bool:
    if value is default or value == default:
        return True
    return (
        isinstance(value, tuple) and isinstance(default, int) and value == (default,) * len(value)
    )


@dataclasses.dataclass(frozen=True, repr=False)
class Layer:
    """Base class. Subclasses implement ``output_shape`` and ``_apply``."""

    def __repr__(self) -> str:
        parts = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.default is dataclasses.MISSING:
                parts.append(_short(value))
            elif not _is_default(value, f.default):
                parts.append(f"{f.name}={_short(value)}")
        return f"{type(self).__name__}({', '.join(parts)})"

    # -- shape logic ---------------------------------------------------------------------
    def output_shape(self, input_shape: Shape) -> Shape:
        """Unbatched output shape for an unbatched ``input_shape``; validates it."""
        return _checks.input_shape_tuple(input_shape, repr(self))

    # -- parameters ----------------------------------------------------------------------
    def param_specs(self, input_shape: Shape) -> dict[str, Shape]:
        """Name -> shape of each parameter for this input shape (validated); no allocation."""
        self.output_shape(input_shape)
        return {}

    def param_shapes(self, input_shape: Shape) -> dict[str, jax.ShapeDtypeStruct]:
        """``init``'s pytree as ``jax.ShapeDtypeStruct`` leaves, allocating nothing."""
        dtype = getattr(self, "param_dtype", jnp.float32)
        return {
            name: jax.ShapeDtypeStruct(shape, dtype)
            for name, shape in self.param_specs(input_shape).items()
        }

    def init(self, key: jax.Array, input_shape: Shape) -> dict:
        """Parameters for inputs of (unbatched) ``input_shape``; ``{}`` if there are none."""
        specs = self.param_specs(input_shape)
        if not specs:
            return {}
        init_fns = {"w": self.w_init, "b": self.b_init}
        keys = dict(zip(("w", "b"), jax.random.split(key), strict=True))
        return {
            name: init_fns[name](keys[name], shape, self.param_dtype)
            for name, shape in specs.items()
        }

    # -- forward -------------------------------------------------------------------------
    def apply(self, params: Any, x: jax.Array, *, key: jax.Array | None = None) -> jax.Array:
        """Forward pass on a batched input ``x`` of shape ``(N, *input_shape)``."""
        where = repr(self)
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            x = jnp.asarray(x)
        if x.ndim < 1:
            raise ValueError(f"{where}: expected a batched input (N, ...), got a scalar")
        _checks.check_floating(x, "input x", where)
        specs = self.param_specs(x.shape[1:])
        self._check_params(params, specs, x.shape[1:])
        return self._apply(params, x)

    def _check_params(self, params: Any, specs: dict[str, Shape], input_shape: Shape) -> None:
        if not isinstance(params, dict) or set(params) != set(specs):
            got = sorted(params) if isinstance(params, dict) else type(params).__name__
            raise ValueError(f"{self!r}: expected params with keys {sorted(specs)}, got {got}")
        for name, shape in specs.items():
            if jnp.shape(params[name]) != shape:
                raise ValueError(
                    f"{self!r}: param {name!r} has shape {jnp.shape(params[name])}, expected "
                    f"{shape} for input shape {tuple(input_shape)}"
                )

    def _apply(self, params: Any, x: jax.Array) -> jax.Array:
        raise NotImplementedError


# ---------------------------------------------------------------------------------------
# Parametrised layers
# ---------------------------------------------------------------------------------------


def _check_init_fn(value: Any, name: str, where: str) -> None:
    if not callable(value):
        raise TypeError(
            f"{where}: {name} must be an initializer (key, shape, dtype), got {value!r}"
        )


def _check_dtype(value: Any, where: str) -> None:
    try:
        ok = jnp.issubdtype(value, jnp.floating)
    except TypeError:
        ok = False
    if not ok:
        raise TypeError(f"{where}: param_dtype must be a floating dtype, got {value!r}")


@dataclasses.dataclass(frozen=True, repr=False)
class Dense(Layer):
    """Fully connected layer over the last axis: ``y = x W + b``.

    Params: ``w`` of shape ``(in, features)``, ``b`` of shape ``(features,)``.
    Input ``(N, ..., in)`` -> output ``(N, ..., features)``.
    """

    features: int
    use_bias: bool = True
    w_init: Initializer = DEFAULT_W_INIT
    b_init: Initializer = DEFAULT_B_INIT
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        where = type(self).__name__
        object.__setattr__(self, "features", _checks.positive_int(self.features, "features", where))
        _check_init_fn(self.w_init, "w_init", where)
        _check_init_fn(self.b_init, "b_init", where)
        _check_dtype(self.param_dtype, where)

    def output_shape(self, input_shape: Shape) -> Shape:
        shape = super().output_shape(input_shape)
        return (*shape[:-1], self.features)

    def param_specs(self, input_shape: Shape) -> dict[str, Shape]:
        shape = _checks.input_shape_tuple(input_shape, repr(self))
        specs = {"w": (shape[-1], self.features)}
        if self.use_bias:
            specs["b"] = (self.features,)
        return specs

    def _apply(self, params, x):
        return ops.dense(x, params["w"], params.get("b"))


@dataclasses.dataclass(frozen=True, repr=False)
class _Windowed(Layer):
    """Shared geometry of conv-like layers on NHWC inputs."""

    features: int
    kernel_size: Any
    stride: Any = 1
    padding: Any = "VALID"
    dilation: Any = 1
    use_bias: bool = True
    w_init: Initializer = DEFAULT_W_INIT
    b_init: Initializer = DEFAULT_B_INIT
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        where = type(self).__name__
        set_ = object.__setattr__
        set_(self, "features", _checks.positive_int(self.features, "features", where))
        set_(self, "kernel_size", _checks.ntuple(self.kernel_size, 2, "kernel_size", where))
        set_(self, "stride", _checks.ntuple(self.stride, 2, "stride", where))
        set_(self, "dilation", _checks.ntuple(self.dilation, 2, "dilation", where))
        set_(self, "padding", _checks.normalize_padding(self.padding, 2, where))
        _check_init_fn(self.w_init, "w_init", where)
        _check_init_fn(self.b_init, "b_init", where)
        _check_dtype(self.param_dtype, where)

    def pads(self, input_shape: Shape) -> _checks.PadPairs:
        """Explicit ``((top, bottom), (left, right))`` padding for this input."""
        return _checks.resolve_padding(
            self.padding, input_shape[:2], self.kernel_size, self.stride, self.dilation
        )

    def output_shape(self, input_shape: Shape) -> Shape:
        where = repr(self)
        shape = _checks.input_shape_tuple(input_shape, where)
        _checks.check_rank(shape, 3, "input_shape", where, "H, W, C; no batch dimension")
        pads = self.pads(shape)
        _checks.check_window_fits(shape[:2], self.kernel_size, pads, where, self.dilation)
        out = _checks.conv_output_size(
            shape[:2], self.kernel_size, self.stride, pads, self.dilation
        )
        return (*out, self.features)


@dataclasses.dataclass(frozen=True, repr=False)
class Conv(_Windowed):
    """2-D convolution (cross-correlation, as the lecture) with ``features`` filters.

    Params: ``w`` of shape ``(KH, KW, C_in, features)`` (HWIO), ``b`` of shape
    ``(features,)``. Input ``(N, H, W, C_in)`` -> ``(N, H_out, W_out, features)``.
    Padding: ``"VALID"``, ``"SAME"``, an int, two ints or two ``(low, high)`` pairs.
    """

    def param_specs(self, input_shape: Shape) -> dict[str, Shape]:
        self.output_shape(input_shape)
        specs = {"w": (*self.kernel_size, tuple(input_shape)[2], self.features)}
        if self.use_bias:
            specs["b"] = (self.features,)
        return specs

    def _apply(self, params, x):
        return ops.conv2d(x, params["w"], params.get("b"), self.stride, self.padding, self.dilation)


@dataclasses.dataclass(frozen=True, repr=False)
class LocallyConnected(_Windowed):
    """Sparse interactions without parameter sharing: an own filter at each output position.

    Params: ``w`` of shape ``(H_out, W_out, KH, KW, C_in, features)``, ``b`` of shape
    ``(H_out, W_out, features)``. Shapes otherwise as :class:`Conv`. Default ``w_init``
    is LeCun-normal with fan-in ``KH * KW * C_in``.
    """

    w_init: Initializer = LOCAL_W_INIT

    def param_specs(self, input_shape: Shape) -> dict[str, Shape]:
        out = self.output_shape(input_shape)
        c_in = tuple(input_shape)[2]
        specs = {"w": (out[0], out[1], *self.kernel_size, c_in, self.features)}
        if self.use_bias:
            specs["b"] = out
        return specs

    def _apply(self, params, x):
        return ops.locally_connected2d(
            x, params["w"], params.get("b"), self.stride, self.padding, self.dilation
        )


# ---------------------------------------------------------------------------------------
# Pooling
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, repr=False)
class _Pool(Layer):
    """Spatial pooling geometry: window, stride (default: the window), padding."""

    window: Any
    stride: Any = None
    padding: Any = "VALID"

    def __post_init__(self):
        where = type(self).__name__
        window = _checks.ntuple(self.window, 2, "window", where)
        object.__setattr__(self, "window", window)
        stride = window if self.stride is None else self.stride
        object.__setattr__(self, "stride", _checks.ntuple(stride, 2, "stride", where))
        object.__setattr__(self, "padding", _checks.normalize_padding(self.padding, 2, where))

    def __repr__(self) -> str:
        text = super().__repr__()
        # stride defaults to the window; don't print it when it is that default.
        return text.replace(f", stride={self.stride!r}", "") if self.stride == self.window else text

    def pads(self, input_shape: Shape) -> _checks.PadPairs:
        return _checks.resolve_padding(self.padding, input_shape[:2], self.window, self.stride)

    def output_shape(self, input_shape: Shape) -> Shape:
        where = repr(self)
        shape = _checks.input_shape_tuple(input_shape, where)
        _checks.check_rank(shape, 3, "input_shape", where, "H, W, C; no batch dimension")
        pads = self.pads(shape)
        _checks.check_window_fits(shape[:2], self.window, pads, where)
        return (*_checks.conv_output_size(shape[:2], self.window, self.stride, pads), shape[2])


@dataclasses.dataclass(frozen=True, repr=False)
class MaxPool(_Pool):
    """Max pooling ``h(x, y) = max_{N(x, y)} h'``; pads with ``-inf``. NHWC -> NHWC."""

    def _apply(self, params, x):
        return ops.max_pool(x, self.window, self.stride, self.padding)


@dataclasses.dataclass(frozen=True, repr=False)
class AvgPool(_Pool):
    """Average pooling ``1/K sum_{N(x, y)} h'``.

    ``count_include_pad=True`` (default) divides by the window size everywhere;
    ``False`` divides by the number of real input pixels in each window.
    """

    count_include_pad: bool = True

    def _apply(self, params, x):
        return ops.avg_pool(x, self.window, self.stride, self.padding, self.count_include_pad)


@dataclasses.dataclass(frozen=True, repr=False)
class LpPool(_Pool):
    """Lp pooling ``(sum_{N(x, y)} |h'|^p)^(1/p)``, ``p >= 1``; 0 (and gradient 0) on zeros."""

    p: float = 2.0

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "p", _pool._check_p(self.p, type(self).__name__))

    def _apply(self, params, x):
        return ops.lp_pool(x, self.p, self.window, self.stride, self.padding)


@dataclasses.dataclass(frozen=True, repr=False)
class L2Pool(_Pool):
    """L2 pooling ``sqrt(sum_{N(x, y)} h'^2)``; 0 (and gradient 0) on an all-zero window."""

    def _apply(self, params, x):
        return ops.l2_pool(x, self.window, self.stride, self.padding)


@dataclasses.dataclass(frozen=True, repr=False)
class _FeaturePool(Layer):
    """Pooling over groups of ``group_size`` consecutive features (last axis)."""

    group_size: int

    def __post_init__(self):
        where = type(self).__name__
        object.__setattr__(
            self, "group_size", _checks.positive_int(self.group_size, "group_size", where)
        )

    def output_shape(self, input_shape: Shape) -> Shape:
        shape = super().output_shape(input_shape)
        if shape[-1] % self.group_size:
            raise ValueError(
                f"{self!r}: the number of features (last axis) {shape[-1]} is not "
                f"divisible by group_size {self.group_size} (input shape {shape})"
            )
        return (*shape[:-1], shape[-1] // self.group_size)


@dataclasses.dataclass(frozen=True, repr=False)
class FeatureL2Pool(_FeaturePool):
    """L2 pooling over features ``h_j = sqrt(sum_{k in N(j)} h'_k^2)``: ``C -> C / g``."""

    def _apply(self, params, x):
        return ops.feature_l2_pool(x, self.group_size)


@dataclasses.dataclass(frozen=True, repr=False)
class FeatureMaxPool(_FeaturePool):
    """Maxout: max over groups of ``group_size`` consecutive features, ``C -> C / g``."""

    def _apply(self, params, x):
        return ops.feature_max_pool(x, self.group_size)


# ---------------------------------------------------------------------------------------
# Activations and reshaping
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, repr=False)
class Activation(Layer):
    """Any elementwise function ``fn(x)`` (shape-preserving), e.g. ``jax.nn.gelu``."""

    fn: Callable[[jax.Array], jax.Array]

    def __post_init__(self):
        if not callable(self.fn):
            raise TypeError(f"Activation: fn must be callable, got {self.fn!r}")

    def _apply(self, params, x):
        y = self.fn(x)
        if jnp.shape(y) != x.shape:
            raise ValueError(
                f"{self!r}: fn must be elementwise (shape-preserving); it mapped {x.shape} "
                f"to {jnp.shape(y)}"
            )
        return y


@dataclasses.dataclass(frozen=True, repr=False)
class _Elementwise(Layer):
    fn: ClassVar[Callable[[jax.Array], jax.Array]]

    def _apply(self, params, x):
        return type(self).fn(x)


@dataclasses.dataclass(frozen=True, repr=False)
class Sigmoid(_Elementwise):
    """``1 / (1 + exp(-x))`` elementwise."""

    fn = staticmethod(ops.sigmoid)


@dataclasses.dataclass(frozen=True, repr=False)
class Tanh(_Elementwise):
    """``tanh(x)`` elementwise."""

    fn = staticmethod(ops.tanh)


@dataclasses.dataclass(frozen=True, repr=False)
class ReLU(_Elementwise):
    """``max(0, x)`` elementwise (derivative 0 at 0)."""

    fn = staticmethod(ops.relu)


@dataclasses.dataclass(frozen=True, repr=False)
class _AxisLayer(Layer):
    axis: int = -1

    def output_shape(self, input_shape: Shape) -> Shape:
        shape = super().output_shape(input_shape)
        if self.axis == 0 or not -len(shape) - 1 <= self.axis <= len(shape):
            raise ValueError(
                f"{self!r}: axis {self.axis} is not a feature axis of a batched input of "
                f"shape (N, *{shape}); axis 0 is the batch"
            )
        return shape


@dataclasses.dataclass(frozen=True, repr=False)
class Softmax(_AxisLayer):
    """``y_k = exp(b_k) / sum_l exp(b_l)`` along ``axis`` (default the last)."""

    def _apply(self, params, x):
        return ops.softmax(x, axis=self.axis)


@dataclasses.dataclass(frozen=True, repr=False)
class LogSoftmax(_AxisLayer):
    """``log softmax`` along ``axis`` (default the last)."""

    def _apply(self, params, x):
        return ops.log_softmax(x, axis=self.axis)


@dataclasses.dataclass(frozen=True, repr=False)
class Flatten(Layer):
    """``(N, d1, d2, ...) -> (N, d1 * d2 * ...)``."""

    def output_shape(self, input_shape: Shape) -> Shape:
        return (math.prod(super().output_shape(input_shape)),)

    def _apply(self, params, x):
        return x.reshape(x.shape[0], -1)
