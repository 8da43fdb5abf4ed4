"""The layer protocol every funcnet layer and network follows.

A layer is an immutable description of hyper-parameters (a frozen dataclass: hashable,
printable, comparable, never holding arrays), so it can be a static argument to ``jit``.
Arrays live in two sibling pytrees with the nesting of the network: **params** (trained)
and **state** (carried, never differentiated: BatchNorm's running statistics).

What a layer answers for itself (override these in a subclass):

==============================  ========================================================
``output_shape(input_shape)``   the unbatched output shape; validates the input
``param_specs(input_shape)``    ``{name: shape}`` of its parameters (leaf layers)
``initializers()``              ``{name: init(key, shape, dtype)}`` for those names
``state_specs(input_shape)``    ``{name: shape}`` of its state (default none)
``init_state(input_shape)``     the initial state arrays (default ``{}``)
``forward(params, state, x, *, key, train) -> (y, state)``   the forward pass
``fwd(...) -> (y, state, res)`` / ``bwd(res, g, need_dx) -> (dx, dparams)``
                                its hand-written backward rule (default: ``jax.vjp``)
``flops(input_shape)``          ``(flops, transcendentals)`` for one example, or ``None``
``receptive_field(shape, rf)``  how it changes the receptive field (:class:`RF`)
``stochastic``                  ``True`` if ``forward`` draws from ``key`` in training
``mixes_batch``                 ``True`` if, in training, one example's output depends on
                                the other examples of the batch (BatchNorm)
==============================  ========================================================

What users call (validating, with errors that name the layer):

- ``init(key, input_shape) -> params``; ``init_state(input_shape) -> state``;
- ``apply_with_state(params, state, x, *, key=None, train=False) -> (y, state)``;
- ``apply(params, x, *, key=None, train=False) -> y`` (and ``layer(params, x)``), for
  layers and networks without state.

``input_shape`` never includes the batch axis; ``x`` always does. ``train=False`` is
evaluation: Dropout is the identity and BatchNorm uses its running statistics.

Size limit: ``init`` counts the parameters it would create from shapes alone and refuses
more than :data:`PARAM_LIMIT` (500 million, 2 GB of float32) before allocating anything,
so a typo such as ``Dense(40000)`` on a ``(40000,)`` input is a clear ``ValueError``
rather than XLA running out of memory. Raise it with ``set_param_limit(n)`` (``None``:
no limit).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterator
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp

from funcnet import _checks

Initializer = Callable[..., jax.Array]
Shape = tuple[int, ...]

DEFAULT_W_INIT: Initializer = jax.nn.initializers.lecun_normal()
DEFAULT_B_INIT: Initializer = jax.nn.initializers.zeros

#: Most scalar parameters ``init`` creates (a network's total); ``None`` for no limit.
#: Change it with :func:`set_param_limit`.
PARAM_LIMIT: int | None = 500_000_000


def set_param_limit(n: int | None) -> int | None:
    """Set :data:`PARAM_LIMIT` (a positive int, or ``None`` for no limit); returns the
    previous limit, so a caller can restore it."""
    global PARAM_LIMIT
    if n is not None:
        n = _checks.positive_int(n, "n", "set_param_limit")
    previous, PARAM_LIMIT = PARAM_LIMIT, n
    return previous


# ---------------------------------------------------------------------------------------
# Op rules: the jax.custom_vjp convention
# ---------------------------------------------------------------------------------------


class Rule(NamedTuple):
    """A hand-written rule pair in the ``jax.custom_vjp`` convention.

    ``fwd`` has the op's signature and returns ``(out, residuals)``; ``bwd(residuals, g)``
    returns one cotangent per name in ``diff`` (``None`` for an absent or integer
    argument). Every other argument of ``fwd`` is a static hyper-parameter.
    """

    fwd: Callable[..., tuple[Any, Any]]
    bwd: Callable[[Any, Any], tuple]
    diff: tuple[str, ...]


def static(cls):
    """Register a frozen dataclass as a static pytree node (no leaves).

    Residual NamedTuples keep hyper-parameters (stride, pads, axis, ...) in such fields,
    so the residuals stay a valid ``custom_vjp`` pytree of arrays while ``bwd`` still
    sees plain Python ints for shapes.
    """
    cls = dataclasses.dataclass(frozen=True)(cls)
    return jax.tree_util.register_static(cls)


# ---------------------------------------------------------------------------------------
# Receptive fields
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RF:
    """Receptive field of one unit, per spatial axis of the network input.

    ``rf``: input pixels one unit sees; ``jump``: input-pixel distance between
    neighbouring units (``None`` once an axis is no longer a grid); ``center``: centre of
    unit 0's field. ``None`` fields mean unknown. ``grid``: the current tensor's leading
    axes are still the input's spatial axes. Layers transform it with the methods below,
    which follow ``r_out = r_in + (k_eff - 1) j_in``, ``j_out = j_in s``,
    ``c_out = c_in + ((k_eff - 1) / 2 - pad_low) j_in``.
    """

    extent: tuple[int, ...]  # the network input's spatial size (for "whole input")
    rf: tuple[int, ...] | None
    jump: tuple[int | None, ...] | None
    center: tuple[float, ...] | None
    grid: bool = True

    @classmethod
    def start(cls, spatial: Shape) -> RF:
        n = len(spatial)
        return cls(tuple(spatial), (1,) * n, (1,) * n, (0.0,) * n, True)

    @property
    def tracked(self) -> bool:
        """Whether there are spatial axes to track at all."""
        return bool(self.extent)

    def unknown(self) -> RF:
        return dataclasses.replace(self, rf=None, jump=None, center=None)

    def window(self, k_eff: Shape, stride: Shape, pads) -> RF:
        """A sliding window of (effective) size ``k_eff`` over the grid."""
        if not self.tracked:
            return self
        if self.rf is None or not self.grid:
            return self.unknown()
        rf = tuple(r + (k - 1) * j for r, k, j in zip(self.rf, k_eff, self.jump, strict=True))
        center = tuple(
            c + ((k - 1) / 2 - lo) * j
            for c, k, j, (lo, _) in zip(self.center, k_eff, self.jump, pads, strict=True)
        )
        jump = tuple(j * s for j, s in zip(self.jump, stride, strict=True))
        return dataclasses.replace(self, rf=rf, jump=jump, center=center)

    def whole(self, axes=None) -> RF:
        """The field becomes the whole input along ``axes`` (default: all)."""
        if not self.tracked:
            return self
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

    def per_position(self, in_shape: Shape) -> RF:
        """A map over the last (feature) axis: keeps the field on a grid, else sees all."""
        if not self.tracked:
            return self
        return self if self.grid and len(in_shape) > 1 else self.whole()

    def flatten(self, in_shape: Shape) -> RF:
        """Each unit keeps its field, but the grid ends (jump ``-``)."""
        if not self.tracked:
            return self
        if self.rf is None or len(in_shape) <= 1:
            return dataclasses.replace(self, grid=False)
        return dataclasses.replace(self, grid=False, jump=(None,) * len(self.extent))

    @staticmethod
    def union(fields: list[RF]) -> RF:
        """The field of a unit that sees every one of ``fields`` (branches of one input)."""
        first = fields[0]
        if any(f.rf is None for f in fields):
            return first.unknown()
        if len({(f.jump, f.grid) for f in fields}) != 1:
            return first.unknown()
        rf = tuple(max(f.rf[a] for f in fields) for a in range(len(first.extent)))
        widest = max(fields, key=lambda f: f.rf)
        return dataclasses.replace(first, rf=rf, center=widest.center)


# ---------------------------------------------------------------------------------------
# The base class
# ---------------------------------------------------------------------------------------


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


class FallbackResiduals(NamedTuple):
    """Residuals of a layer without a hand-written rule: the ``jax.vjp`` closure."""

    vjp_fn: Callable


def prefixed(err: Exception, prefix: str) -> Exception:
    """``err`` with ``prefix`` in front of its message, for funcnet's own plain errors.

    Only exact ``ValueError`` / ``TypeError`` (what funcnet raises) are re-created; any
    other exception (JAX's own errors subclass these with other constructors) is returned
    unchanged, so it is re-raised as it was.
    """
    if type(err) not in (ValueError, TypeError):
        return err
    new = type(err)(f"{prefix}: {err}")
    new.__cause__ = err
    return new


#: What a subclass overrides to change a layer's function, and to give it a rule.
_COMPUTES = frozenset({"forward", "_apply", "op"})
_RULES = frozenset({"fwd", "bwd", "rule"})


@dataclasses.dataclass(frozen=True, repr=False)
class Layer:
    """Base class of every layer and network; see the module docstring for the protocol."""

    #: ``True`` for layers whose training-mode forward draws random numbers from ``key``:
    #: running one in training without a key is refused, naming the layer.
    stochastic: ClassVar[bool] = False
    #: ``True`` for convolution-like layers (``train.choose_epoch_mode`` reads it).
    convolutional: ClassVar[bool] = False
    #: ``True`` for layers whose training-mode output for one example depends on the other
    #: examples of the batch (BatchNorm's batch statistics). ``fit`` pads an epoch's last
    #: partial batch with zero-weight rows, which such a layer would see; for a network
    #: that contains one (:func:`mixes_batch`), it runs that batch at its true size instead.
    #: A user layer that mixes the batch must set it.
    mixes_batch: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """A subclass that changes what the layer computes (overrides ``forward``, or the
        override points below it: :class:`Stateless`'s ``_apply``, :class:`OpLayer`'s
        ``op``) without its own rule (``fwd`` / ``bwd``, or an ``OpLayer``'s ``rule``)
        would inherit a hand rule written for its parent's function: ``grad="manual"``
        would train the parent's function while ``apply`` runs the new one (a ``Conv``
        with standardised weights, a leaky ``ReLU`` written as ``_apply``). Such a
        subclass gets the ``jax.vjp`` fallback of its own forward instead
        (``has_hand_rule()`` is then ``False``); a subclass that keeps its parent's
        forward keeps the hand rule."""
        super().__init_subclass__(**kwargs)
        own = cls.__dict__
        if own.keys() & _COMPUTES and not own.keys() & _RULES and cls.fwd is not Layer.fwd:
            cls.fwd, cls.bwd = Layer.fwd, Layer.bwd

    def __repr__(self) -> str:
        parts = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.default is dataclasses.MISSING:
                parts.append(_short(value))
            elif not _is_default(value, f.default):
                parts.append(f"{f.name}={_short(value)}")
        return f"{type(self).__name__}({', '.join(parts)})"

    # -- shapes --------------------------------------------------------------------------
    def output_shape(self, input_shape: Shape) -> Shape:
        """Unbatched output shape for an unbatched ``input_shape``; validates it."""
        return _checks.input_shape_tuple(input_shape, repr(self))

    def sublayers(self) -> tuple[Layer, ...]:
        """The layers a combinator is made of (``()`` for a leaf layer)."""
        return ()

    def takes_integers(self) -> bool:
        """Whether the input is integer (Embedding); ``fit`` and ``evaluate`` then accept
        integer ``x``."""
        first = next(iter(self.sublayers()), None)
        return False if first is None else first.takes_integers()

    # -- parameters ----------------------------------------------------------------------
    def param_specs(self, input_shape: Shape) -> dict[str, Shape]:
        """Name -> shape of each parameter for this input shape (validated); no allocation."""
        self.output_shape(input_shape)
        return {}

    def initializers(self) -> dict[str, Initializer]:
        """Name -> initializer ``init(key, shape, dtype)`` of each parameter.

        The default reads ``w_init`` / ``b_init`` fields for ``w`` / ``b``; layers with
        other parameter names override it.
        """
        out = {}
        for name in ("w", "b"):
            fn = getattr(self, f"{name}_init", None)
            if fn is not None:
                out[name] = fn
        return out

    @property
    def dtype(self) -> Any:
        """The parameters' dtype (a ``param_dtype`` field, default float32)."""
        return getattr(self, "param_dtype", jnp.float32)

    def param_shapes(self, input_shape: Shape) -> Any:
        """``init``'s pytree as ``jax.ShapeDtypeStruct`` leaves, allocating nothing."""
        return {
            name: jax.ShapeDtypeStruct(shape, self.dtype)
            for name, shape in self.param_specs(input_shape).items()
        }

    def init(self, key: jax.Array, input_shape: Shape) -> Any:
        """Parameters for inputs of (unbatched) ``input_shape``; ``{}`` if there are none.

        Refuses (``ValueError``) more than :data:`PARAM_LIMIT` parameters, before
        allocating anything. Called outside ``jit``, a whole network is initialised by
        one compiled program per (network, input shape) (see :func:`run_init`), so the
        initializers must be traceable, as under ``jax.jit(net.init)``.
        """
        check_init_key(self, key)
        shapes = self.param_shapes(input_shape)
        check_param_limit(self, input_shape, shapes)
        return run_init(self, key, input_shape, shapes)

    def init_params(self, key: jax.Array, input_shape: Shape) -> Any:
        """What ``init`` returns, computed op by op (``init`` checks its arguments first
        and runs this traced); combinators override it to initialise their parts."""
        specs = self.param_specs(input_shape)
        if not specs:
            return {}
        fns = self.initializers()
        missing = sorted(set(specs) - set(fns))
        if missing:
            raise TypeError(
                f"{self!r}: no initializer for parameters {missing}; override "
                f"initializers() to return one per name in param_specs()"
            )
        keys = jax.random.split(key, len(specs))
        return {
            name: fns[name](k, shape, self.dtype)
            for (name, shape), k in zip(specs.items(), keys, strict=True)
        }

    # -- state ---------------------------------------------------------------------------
    def state_specs(self, input_shape: Shape) -> dict[str, Shape]:
        """Name -> shape of each state array (default: none)."""
        return {}

    def state_shapes(self, input_shape: Shape) -> Any:
        """``init_state``'s pytree as ``jax.ShapeDtypeStruct`` leaves."""
        return {
            name: jax.ShapeDtypeStruct(shape, self.dtype)
            for name, shape in self.state_specs(input_shape).items()
        }

    def init_state(self, input_shape: Shape) -> Any:
        """The initial state for inputs of ``input_shape`` (``{}`` for a stateless layer)."""
        self.output_shape(input_shape)
        return {
            name: jnp.zeros(s.shape, s.dtype)
            for name, s in self.state_shapes(input_shape).items()
        }

    def has_state(self, input_shape: Shape) -> bool:
        """Whether this layer (or any part of a network) carries state."""
        return bool(jax.tree_util.tree_leaves(self.state_shapes(input_shape)))

    # -- forward -------------------------------------------------------------------------
    def check_input(self, x: Any) -> jax.Array:
        """Validate (and convert) a batched input; floating by default."""
        x = _checks.as_array(x, "input x", _head(self))
        if x.ndim < 1:
            raise ValueError(f"{self!r}: expected a batched input (N, ...), got a scalar")
        _checks.check_floating(x, "input x", repr(self))
        return x

    def check(self, params: Any, state: Any, x: Any) -> tuple[jax.Array, Any]:
        """Validate ``params``, ``state`` and ``x`` before running: ``(x, state)`` as arrays.

        ``state`` may be ``None`` (or any empty pytree such as ``()``) for a layer without
        state; it is then replaced by ``init_state``.
        """
        x = self.check_input(x)
        in_shape = tuple(x.shape[1:])
        self.output_shape(in_shape)
        state = _default_state(self, state, in_shape)
        _check_tree(self, "params", params, self.param_shapes(in_shape), in_shape,
                    floating=True)
        _check_tree(self, "state", state, self.state_shapes(in_shape), in_shape)
        return x, state

    def forward(
        self, params: Any, state: Any, x: jax.Array, *, key: jax.Array | None, train: bool
    ) -> tuple[jax.Array, Any]:
        """``(y, new_state)``: the forward pass on a validated batch. Override this."""
        raise NotImplementedError(f"{type(self).__name__} does not implement forward()")

    def apply_with_state(
        self,
        params: Any,
        state: Any,
        x: Any,
        *,
        key: jax.Array | None = None,
        train: bool = False,
    ) -> tuple[jax.Array, Any]:
        """``(y, new_state)`` for a batched ``x`` of shape ``(N, *input_shape)``.

        ``train=True`` is training mode (Dropout drops with ``key``; BatchNorm uses the
        batch statistics and returns updated running statistics); ``train=False``
        (default) is evaluation and returns ``state`` unchanged.

        Called outside a trace (no argument is a tracer of ``jit``, ``grad``, ``vmap``),
        the forward pass runs as one compiled program, cached per (layer, ``train``,
        shapes and dtypes of the arguments), after the checks here and
        :meth:`check_values`; op by op it would compile and dispatch one small program
        per operation. A layer that cannot be hashed runs op by op; so does everything
        under ``jax.disable_jit()`` (to ``print`` inside a custom ``forward``).
        """
        _check_train(self, train)
        x, state = self.check(params, state, x)
        _check_key(self, key, train)
        if _traced((params, state, x, key)) or not _hashable(self):
            return self.forward(params, state, x, key=key, train=train)
        self.check_values(x)  # what the trace cannot see (Embedding's ids)
        from funcnet.nn.conv import formulations_key  # conv builds on this module

        y, out = _forward_program(_static(self), params, state, x, key, train,
                                  formulations_key())
        if isinstance(out, tuple):  # the state's structure changed: as the layer gave it
            return y, out[0]
        if all(o is None for o in out):  # evaluation: the very state given
            return y, state
        leaves, tree = jax.tree_util.tree_flatten(state)
        new = [old if o is None else o for old, o in zip(leaves, out, strict=True)]
        return y, jax.tree_util.tree_unflatten(tree, new)

    def check_values(self, x: Any) -> None:
        """Checks of a concrete network input's *values*, run before the compiled forward
        pass of :meth:`apply_with_state` (which cannot see them); default none. Embedding
        checks its ids here; a network asks each of its layers (every layer that takes
        integer ids sees the network's input, at most reshaped)."""
        for layer in self.sublayers():
            layer.check_values(x)

    def apply(
        self, params: Any, x: Any, *, key: jax.Array | None = None, train: bool = False
    ) -> jax.Array:
        """``y`` for a batched ``x``; for layers and networks without state.

        A network with state (BatchNorm) needs :meth:`apply_with_state`.
        """
        x = self.check_input(x)
        if self.has_state(tuple(x.shape[1:])):
            raise ValueError(
                f"{_head(self)}: this network carries state (e.g. BatchNorm running "
                f"statistics); use apply_with_state(params, state, x, key=..., train=...) "
                f"with state = net.init_state(input_shape)"
            )
        state = self.init_state(tuple(x.shape[1:]))
        return self.apply_with_state(params, state, x, key=key, train=train)[0]

    def __call__(self, params: Any, x: Any, **kwargs: Any) -> jax.Array:
        """``layer(params, x)`` is ``layer.apply(params, x)``."""
        return self.apply(params, x, **kwargs)

    # -- the hand-written backward rule --------------------------------------------------
    def fwd(
        self, params: Any, state: Any, x: jax.Array, *, key: jax.Array | None, train: bool
    ) -> tuple[jax.Array, Any, Any]:
        """``(y, new_state, residuals)``: the forward pass keeping what ``bwd`` needs.

        The default has no hand-written rule: it keeps ``jax.vjp``'s closure (the
        documented fallback for layers that do not derive their gradient by hand).
        """
        y, vjp_fn, new_state = jax.vjp(
            lambda p, x: self.forward(p, state, x, key=key, train=train), params, x,
            has_aux=True,
        )
        return y, new_state, FallbackResiduals(vjp_fn)

    def bwd(self, res: Any, g: jax.Array, need_dx: bool) -> tuple[jax.Array | None, Any]:
        """``(dL/dx, dL/dparams)`` from upstream ``g = dL/dy``; ``dx`` is ``None`` if not
        ``need_dx`` (the network's first layer)."""
        dparams, dx = res.vjp_fn(g)
        return (dx if need_dx else None), dparams

    @classmethod
    def has_hand_rule(cls) -> bool:
        """Whether ``fwd`` / ``bwd`` are written by hand (not the ``jax.vjp`` fallback)."""
        return cls.fwd is not Layer.fwd and cls.bwd is not Layer.bwd

    # -- metadata ------------------------------------------------------------------------
    def flops(self, input_shape: Shape) -> tuple[int, int] | None:
        """``(FLOPs, transcendentals)`` of the forward pass on one example, or ``None``
        (then ``summary`` measures it with XLA's cost analysis). See ``funcnet.summary``
        for the counting convention."""
        return None

    def receptive_field(self, input_shape: Shape, rf: RF) -> RF:
        """The receptive field after this layer, given the one before (default unknown)."""
        return rf.unknown()

    def walk(self, input_shape: Shape, rf: RF, path: tuple, visit: Callable) -> RF:
        """Visit ``(path, layer, input_shape, rf_after, own)`` of every leaf layer (and every
        combinator's merge) in forward order; returns the field after this layer."""
        rf = self.receptive_field(input_shape, rf)
        visit(path, self, input_shape, rf, True)
        return rf

    def label(self) -> str:
        """How ``summary`` names this layer's own row."""
        return repr(self)


def _head(layer: Layer) -> str:
    text = repr(layer)
    return text if "\n" not in text else type(layer).__name__


def _check_train(layer: Layer, train: Any) -> None:
    if not isinstance(train, bool):
        raise TypeError(f"{_head(layer)}: train must be a Python bool, got {train!r}")


def _key_problem(key: Any) -> str | None:
    """Why ``key`` is not one PRNG key (``None`` if it is one)."""
    if not isinstance(key, jax.Array):  # jax.Array includes tracers; NumPy arrays are not
        return f"got {_checks.describe(key)}"
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        if key.shape != ():
            return (f"got an array of {math.prod(key.shape)} keys (shape {key.shape}); "
                    f"pass one key, e.g. keys[0]")
        return None
    if key.dtype == jnp.uint32 and key.shape == (2,):
        return None  # a raw jax.random.PRNGKey
    return f"got an array of dtype {key.dtype} and shape {key.shape}"


def _check_key(layer: Layer, key: Any, train: bool) -> None:
    if key is None:
        if train and layer.stochastic:
            raise ValueError(
                f"{_head(layer)}: training mode (train=True) needs a PRNG key: this layer "
                f"draws random numbers (stochastic); pass key=jax.random.key(seed) (fit and "
                f"make_step give every step its own)"
            )
        return
    problem = _key_problem(key)
    if problem is not None:
        raise TypeError(
            f"{_head(layer)}: key must be a JAX PRNG key (jax.random.key(seed)) or None, "
            f"{problem}"
        )


def _frozen(shape: Any) -> Any:
    """``shape`` with every list made a tuple (a static ``jit`` argument)."""
    if isinstance(shape, (list, tuple)):
        return tuple(_frozen(d) for d in shape)
    return shape


@functools.partial(jax.jit, static_argnums=(0, 5, 6))
def _forward_program(static: Any, params: Any, state: Any, x: Any, key: Any,
                     train: bool, formulations: bool) -> tuple[Any, Any]:
    """``layer.forward`` as one compiled program per (layer, train, input shapes and
    dtypes, ``formulations``: see :func:`funcnet.nn.conv.formulations_key`): what
    :meth:`Layer.apply_with_state` runs outside a trace, after its checks.

    Returns ``(y, out)``. A state leaf the forward pass hands back untouched (all of them
    in evaluation) comes out as ``None`` in ``out``, the list of the state's leaves, and
    the caller puts the given array back: the state is returned unchanged, not copied.
    If the state's structure changed, ``out`` is ``(new_state,)``."""
    del formulations  # a cache key only: the trace reads the flag itself
    y, new_state = _layer(static).forward(params, state, x, key=key, train=train)
    leaves, tree = jax.tree_util.tree_flatten(state)
    new_leaves, new_tree = jax.tree_util.tree_flatten(new_state)
    if new_tree != tree:
        return y, (new_state,)
    return y, [None if n is o else n for n, o in zip(new_leaves, leaves, strict=True)]


class _Identity:
    """A layer as a static ``jit`` argument compared by identity, not equality."""

    __slots__ = ("layer",)

    def __init__(self, layer: Layer):
        self.layer = layer

    def __hash__(self) -> int:
        return id(self.layer)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Identity) and other.layer is self.layer


def _static(layer: Layer) -> Any:
    """The key of ``layer``'s compiled programs. funcnet's own layers compare every
    hyper-parameter, so equal networks share programs; a network with any other class
    in it (a user's layer may leave a field out of equality, and two equal layers then
    compute different things) is keyed by identity."""
    if all(type(part).__module__.partition(".")[0] == "funcnet" for part in iter_layers(layer)):
        return layer
    return _Identity(layer)


def _layer(static: Any) -> Layer:
    return static.layer if isinstance(static, _Identity) else static


def _traced(tree: Any) -> bool:
    """Whether any leaf of ``tree`` is a tracer (inside ``jit``, ``grad``, ``vmap``...)."""
    return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(tree))


@functools.partial(jax.jit, static_argnums=(0, 2))
def _init_program(static: Any, key: jax.Array, input_shape: Shape) -> Any:
    return _layer(static).init_params(key, input_shape)


def run_init(layer: Layer, key: jax.Array, input_shape: Shape, shapes: Any) -> Any:
    """``layer.init_params(key, input_shape)`` as one compiled program, cached per
    (layer, input shape); ``shapes`` is ``layer.param_shapes(input_shape)``.

    Op by op, a network's initialisation would compile one small XLA program per
    initializer, parameter shape and key split (tens for a ResNet, each costing
    milliseconds to compile); as one program the work is the same and it compiles once.
    Layers are frozen dataclasses, hence valid static arguments (equal networks of
    funcnet's layers share a program; one with another class in it is keyed by identity,
    see :func:`_static`). Already inside a trace
    (``jit``, ``vmap``, ``eval_shape``: ``key`` is a tracer), or for a layer that cannot
    be hashed, it runs in place; with no parameters it returns their empty structure
    without running anything.
    """
    if not jax.tree_util.tree_leaves(shapes):
        return shapes  # {} (tuples of {} for a network): what init_params returns
    static_shape = _frozen(input_shape)
    if isinstance(key, jax.core.Tracer) or not _hashable((layer, static_shape)):
        return layer.init_params(key, input_shape)
    return _init_program(_static(layer), key, static_shape)


def _hashable(obj: Any) -> bool:
    try:
        hash(obj)
    except TypeError:
        return False
    return True


def check_init_key(layer: Layer, key: Any) -> None:
    """``key`` of ``layer.init(key, input_shape)`` is one PRNG key, else a ``TypeError``."""
    problem = _key_problem(key)
    if problem is not None:
        raise TypeError(
            f"{_head(layer)}.init: key must be a JAX PRNG key (jax.random.key(seed)), "
            f"{problem}"
        )


def check_param_limit(layer: Layer, input_shape: Shape, shapes: Any) -> None:
    """Refuse, before allocating, more than :data:`PARAM_LIMIT` parameters in ``shapes``
    (``init``'s pytree as ``jax.ShapeDtypeStruct`` leaves)."""
    limit = PARAM_LIMIT
    if limit is None:
        return
    leaves = jax.tree_util.tree_leaves(shapes)
    count = sum(math.prod(leaf.shape) for leaf in leaves)
    if count <= limit:
        return
    nbytes = sum(math.prod(leaf.shape) * jnp.dtype(leaf.dtype).itemsize for leaf in leaves)
    dtypes = sorted({jnp.dtype(leaf.dtype).name for leaf in leaves})
    raise ValueError(
        f"{_head(layer)} on input {tuple(input_shape)} would create {count:,} parameters "
        f"({nbytes / 1e9:.1f} GB in {'/'.join(dtypes)}), more than "
        f"funcnet.nn.base.PARAM_LIMIT = {limit:,}; if you mean it, raise the limit with "
        f"funcnet.nn.base.set_param_limit(n) (None: no limit)"
    )


def _default_state(layer: Layer, state: Any, in_shape: Shape) -> Any:
    """``init_state`` in place of ``None`` or an empty pytree, for a layer without state."""
    if state is None or not jax.tree_util.tree_leaves(state):
        if state is None or not layer.has_state(in_shape):
            return layer.init_state(in_shape)
    return state


def _leaf_name(what: str, path: tuple) -> str:
    if len(path) == 1 and isinstance(path[0], jax.tree_util.DictKey):
        return f"{what.rstrip('s')} {path[0].key!r}"  # param 'w', state 'mean'
    return what + jax.tree_util.keystr(path)


def _is_leaf_value(value: Any) -> bool:
    """An array or a number (what a leaf of params or state may be)."""
    return hasattr(value, "shape") or isinstance(value, int | float | complex)


def _check_tree(
    layer: Layer, what: str, got: Any, expected: Any, in_shape: Shape, floating: bool = False
) -> None:
    """``got`` has ``expected``'s structure and leaf shapes (and, with ``floating``, real
    floating dtypes), else an error naming ``layer``."""
    e_leaves, e_def = jax.tree_util.tree_flatten_with_path(expected)
    try:
        g_leaves, g_def = jax.tree_util.tree_flatten_with_path(got)
    except Exception:
        g_def = type(got).__name__
    if e_def != g_def:
        if isinstance(expected, dict) and isinstance(got, dict):
            if set(expected) == set(got):  # same names: some entry is not an array
                for name, e in expected.items():
                    g = got[name]
                    if isinstance(e, jax.ShapeDtypeStruct) and not _is_leaf_value(g):
                        hint = " (convert it with jnp.asarray)" if isinstance(
                            g, list | tuple) else ""
                        raise TypeError(
                            f"{_head(layer)}: {what.rstrip('s')} {name!r} must be an array "
                            f"of shape {tuple(e.shape)}, got {_checks.describe(g)}{hint}"
                        )
            raise ValueError(
                f"{_head(layer)}: expected {what} with keys {sorted(expected)}, got "
                f"{sorted(got, key=str)}"
            )
        raise ValueError(
            f"{_head(layer)}: {what} do not have the expected structure for input shape "
            f"{tuple(in_shape)}: expected {e_def}, got {g_def}"
        )
    for (path, e), (_, g) in zip(e_leaves, g_leaves, strict=True):
        if not _is_leaf_value(g):
            raise TypeError(
                f"{_head(layer)}: {_leaf_name(what, path)} must be an array of shape "
                f"{tuple(e.shape)}, got {_checks.describe(g)}"
            )
        if floating:
            dtype = _checks.dtype_of(g)
            if not jnp.issubdtype(dtype, jnp.floating):
                raise TypeError(
                    f"{_head(layer)}: {_leaf_name(what, path)} must have a real floating "
                    f"dtype (e.g. {jnp.dtype(e.dtype).name}), got {dtype}"
                )
        if tuple(jnp.shape(g)) != tuple(e.shape):
            raise ValueError(
                f"{_head(layer)}: {_leaf_name(what, path)} has shape {tuple(jnp.shape(g))}, "
                f"expected {tuple(e.shape)} for input shape {tuple(in_shape)}"
            )


def rule_forward(
    layer: Layer, params: Any, state: Any, x: Any, *, key: jax.Array | None, train: bool
) -> tuple[jax.Array, Any, Any]:
    """Validate, then run ``layer.fwd``: the entry the back-propagation engine uses."""
    _check_train(layer, train)
    x, state = layer.check(params, state, x)
    _check_key(layer, key, train)
    return layer.fwd(params, state, x, key=key, train=train)


def split_key(key: jax.Array | None, n: int) -> list:
    """``n`` independent keys (``None``s when ``key`` is ``None``)."""
    if key is None:
        return [None] * n
    return list(jax.random.split(key, n)) if n else []


def mixes_batch(net: Any) -> bool:
    """Whether ``net`` or any layer inside it says it ``mixes_batch``."""
    return isinstance(net, Layer) and any(layer.mixes_batch for layer in iter_layers(net))


def iter_layers(layer: Layer) -> Iterator[Layer]:
    """``layer`` and every layer nested in it, depth first."""
    yield layer
    for sub in layer.sublayers():
        yield from iter_layers(sub)


def param_count(layer: Layer, input_shape: Shape) -> int:
    """Number of scalar parameters ``init`` would create, from shapes only."""
    leaves = jax.tree_util.tree_leaves(layer.param_shapes(input_shape))
    return sum(math.prod(leaf.shape) for leaf in leaves)


# ---------------------------------------------------------------------------------------
# Helpers for the families
# ---------------------------------------------------------------------------------------


def cast_cotangent(ct: Any, dtype: Any) -> Any:
    """A floating cotangent in its floating primal's ``dtype``, as autodiff gives it (a
    rule computes in the promoted dtype where, say, a bfloat16 input meets float32
    weights); ``None``, non-floating values and matching dtypes unchanged."""
    if (ct is None or dtype is None or not hasattr(ct, "dtype") or ct.dtype == dtype
            or not jnp.issubdtype(ct.dtype, jnp.floating)
            or not jnp.issubdtype(dtype, jnp.floating)):
        return ct
    return ct.astype(dtype)


def upcast(a: jax.Array | None) -> jax.Array | None:
    """``a`` in float32 if it is a narrower float (bfloat16, float16), else ``a`` itself.

    Mixed precision (:mod:`funcnet.precision`): reductions whose accuracy matters (the
    statistics of BatchNorm and LayerNorm, the softmax's normaliser) run in float32 on a
    low-precision input and their result is cast back, as Flax and PyTorch's autocast do.
    For float32 and float64 it adds no operation at all (``None`` stays ``None``).
    """
    if a is None or jnp.dtype(a.dtype).itemsize >= 4 or not jnp.issubdtype(a.dtype,
                                                                          jnp.floating):
        return a
    return a.astype(jnp.float32)


def downcast(y: jax.Array, x: jax.Array, *others: jax.Array | None) -> jax.Array:
    """``y`` (computed through :func:`upcast`) back in the dtype a low-precision ``x``
    promotes to with ``others`` (the layer's params, ``None`` skipped); ``y`` itself for
    an ``x`` of float32 or wider (no operation: the dtypes are exactly as without
    :func:`upcast`)."""
    if upcast(x) is x:
        return y
    dtype = jnp.result_type(x, *(o for o in others if o is not None))
    return y if y.dtype == dtype else y.astype(dtype)


def check_init_fn(value: Any, name: str, where: str) -> None:
    if not callable(value):
        raise TypeError(
            f"{where}: {name} must be an initializer (key, shape, dtype), got {value!r}"
        )


def check_param_dtype(value: Any, where: str) -> None:
    try:
        ok = jnp.issubdtype(value, jnp.floating)
    except TypeError:
        ok = False
    if not ok:
        raise TypeError(f"{where}: param_dtype must be a floating dtype, got {value!r}")


def check_bool(value: Any, name: str, where: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{where}: {name} must be True or False, got {value!r}")
    return value


@dataclasses.dataclass(frozen=True, repr=False)
class Stateless(Layer):
    """A layer whose forward is a function of ``(params, x)`` only: implement ``_apply``."""

    def forward(self, params, state, x, *, key=None, train=False):
        return self._apply(params, x), state

    def _apply(self, params: Any, x: jax.Array) -> jax.Array:
        raise NotImplementedError


@dataclasses.dataclass(frozen=True, repr=False)
class OpLayer(Stateless):
    """A parameter-free layer that is one op with a hand rule: ``y = op(x, **hyper)``.

    Subclasses set ``op`` (a ``staticmethod``) and ``rule`` (its :class:`Rule`, whose
    first ``diff`` argument is ``x``) and implement ``hyper()`` (the op's static keyword
    arguments).
    """

    op: ClassVar[Callable]
    rule: ClassVar[Rule]

    def hyper(self) -> dict[str, Any]:
        return {}

    def _apply(self, params, x):
        return type(self).op(x, **self.hyper())

    def fwd(self, params, state, x, *, key=None, train=False):
        y, res = type(self).rule.fwd(x, **self.hyper())
        return y, state, res

    def bwd(self, res, g, need_dx):
        return (type(self).rule.bwd(res, g)[0] if need_dx else None), {}
