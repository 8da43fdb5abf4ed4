"""Static-graph tools: look at, measure and compile the XLA program behind a function.

Every helper takes either

- a funcnet layer / network and an unbatched ``input_shape`` (the program is the forward
  pass ``net.apply(params, x)`` on a batch of ``batch`` inputs), e.g.
  ``graph.cost_analysis(net, (28, 28, 1), batch=32)``; or
- any function and its arguments, e.g. a train step
  ``graph.cost_analysis(step, params, opt_state, x, y)``. The function may already be
  ``jax.jit``-wrapped (its static / donated arguments are kept); otherwise it is wrapped
  with ``jax.jit(fn, **jit_kwargs)``.

Arguments may be real arrays or ``jax.ShapeDtypeStruct`` placeholders: nothing needs to
be allocated to inspect or compile a program (:func:`abstract` turns a pytree of arrays
into placeholders). What each helper returns:

==================  =====================================================================
:func:`jaxpr`       the traced program in JAX's own IR (``jax.make_jaxpr``)
:func:`lower`       ``jax.stages.Lowered`` (before XLA optimisation)
:func:`stablehlo`   the lowered StableHLO module as text (what ``jax.export`` ships)
:func:`compile`     ``jax.stages.Compiled``: the ahead-of-time executable; call it with
                    arguments of the same shapes and dtypes, it never re-traces
:func:`hlo`         the optimised HLO text after XLA's passes (fusions, layouts)
:func:`cost_analysis`  XLA's cost estimate of the compiled program as a :class:`Cost`
==================  =====================================================================
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from funcnet import _checks
from funcnet.layers import Layer, Shape

__all__ = [
    "Cost",
    "abstract",
    "compile",
    "cost_analysis",
    "forward",
    "hlo",
    "jaxpr",
    "lower",
    "stablehlo",
]


class Cost(NamedTuple):
    """XLA's cost estimate of a compiled program (for the whole batch it was built for).

    ``flops`` counts a multiply-add as 2; ``transcendentals`` (exp, log, tanh, ...) are
    counted apart; ``bytes_accessed`` is the memory traffic of every operand and result
    of every (fused) instruction. ``raw`` is XLA's full dict (per-operand bytes, ...).
    """

    flops: float
    transcendentals: float
    bytes_accessed: float
    raw: dict[str, float]


def abstract(tree: Any) -> Any:
    """A pytree of arrays as ``jax.ShapeDtypeStruct`` placeholders (shapes and dtypes)."""
    return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), a.dtype), tree)


def forward(
    net: Layer, input_shape: Shape, batch: int = 1, dtype: Any = None
) -> tuple[Callable, tuple]:
    """The evaluation-mode forward pass of ``net`` as ``(fn, args)``.

    ``dtype`` is the input's; default ``int32`` for a network that takes integer ids
    (``net.takes_integers()``, e.g. ``Embedding`` first), else ``float32``, as
    :func:`funcnet.export.save` chooses.

    ``fn(params, x) == net.apply(params, x)`` for a network without state, and
    ``fn(params, state, x) == net.apply_with_state(params, state, x)[0]`` for one with
    state (BatchNorm). ``args`` are placeholders as ``param_shapes`` / ``state_shapes``
    predict them and ``x`` of shape ``(batch, *input_shape)``; nothing is allocated.
    """
    if not isinstance(net, Layer):
        raise TypeError(f"graph.forward: net must be a funcnet layer or Serial, got {net!r}")
    shape = _checks.input_shape_tuple(input_shape, "graph.forward")
    batch = _checks.positive_int(batch, "batch", "graph.forward")
    if dtype is None:
        dtype = jnp.int32 if net.takes_integers() else jnp.float32
    params = net.param_shapes(shape)
    x = jax.ShapeDtypeStruct((batch, *shape), dtype)
    if net.has_state(shape):

        def apply_with_state(params, state, x):
            return net.apply_with_state(params, state, x)[0]

        return apply_with_state, (params, net.state_shapes(shape), x)

    def apply(params, x):
        return net.apply(params, x)

    return apply, (params, x)


def _program(fn: Any, args: tuple, kwargs: dict) -> tuple[Any, tuple, dict]:
    """``(jitted, args, call_kwargs)`` for a network or a function with its arguments."""
    if isinstance(fn, Layer):
        if len(args) != 1:
            raise TypeError(
                f"graph: for a network pass (net, input_shape, batch=..., dtype=...), "
                f"got {len(args)} positional arguments after the network"
            )
        batch = kwargs.pop("batch", 1)
        dtype = kwargs.pop("dtype", None)
        if kwargs:
            raise TypeError(f"graph: unexpected keyword arguments for a network: {sorted(kwargs)}")
        apply, fargs = forward(fn, args[0], batch, dtype)
        return jax.jit(apply), fargs, {}
    if not callable(fn):
        raise TypeError(f"graph: expected a funcnet network or a callable, got {fn!r}")
    jit_keys = {"static_argnums", "static_argnames", "donate_argnums", "donate_argnames"}
    jit_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in jit_keys}
    if hasattr(fn, "lower") and hasattr(fn, "trace"):  # already jax.jit-wrapped
        if jit_kwargs:
            raise TypeError(
                f"graph: {sorted(jit_kwargs)} apply to a function that is not jitted yet; "
                f"this one already is (pass them to jax.jit instead)"
            )
        return fn, args, kwargs
    return jax.jit(fn, **jit_kwargs), args, kwargs


def lower(fn: Any, *args: Any, **kwargs: Any) -> jax.stages.Lowered:
    """Trace and lower to StableHLO (``jax.jit(fn).lower(*args)``), nothing compiled yet.

    ``fn`` is a network (then ``args = (input_shape,)``, keywords ``batch``, ``dtype``) or
    a function; keywords ``static_argnums`` / ``donate_argnums`` (...) go to ``jax.jit``
    and the rest to ``fn``.
    """
    jitted, args, kwargs = _program(fn, args, dict(kwargs))
    return jitted.lower(*args, **kwargs)


def jaxpr(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """The program as a closed jaxpr (JAX's IR: one equation per primitive).

    ``print(graph.jaxpr(net, (28, 28, 1)))`` shows every ``conv_general_dilated``,
    ``dot_general`` and ``reduce_window`` of the forward pass with their shapes.
    """
    jitted, args, kwargs = _program(fn, args, dict(kwargs))
    return jitted.trace(*args, **kwargs).jaxpr


def stablehlo(fn: Any, *args: Any, **kwargs: Any) -> str:
    """The lowered StableHLO module as MLIR text (before XLA's optimisations)."""
    return lower(fn, *args, **kwargs).as_text()


def compile(fn: Any, *args: Any, **kwargs: Any) -> jax.stages.Compiled:
    """Ahead-of-time compile: ``jax.jit(fn).lower(*args).compile()``.

    The result is the XLA executable. Call it with arrays of the same shapes, dtypes and
    pytree structure as ``args`` (static arguments are baked in and must be left out);
    it raises a ``TypeError`` on anything else rather than re-tracing. For a network the
    call is ``compiled(params, x)``.
    """
    return lower(fn, *args, **kwargs).compile()


def hlo(fn: Any, *args: Any, **kwargs: Any) -> str:
    """The optimised HLO of the compiled program (after fusion and layout assignment)."""
    return compile(fn, *args, **kwargs).as_text()


def _cost_of(compiled: jax.stages.Compiled) -> Cost:
    raw = compiled.cost_analysis()
    if isinstance(raw, list | tuple):  # older jax: one dict per device program
        raw = raw[0] if raw else {}
    raw = dict(raw or {})
    return Cost(
        flops=float(raw.get("flops", 0.0)),
        transcendentals=float(raw.get("transcendentals", 0.0)),
        bytes_accessed=float(raw.get("bytes accessed", 0.0)),
        raw=raw,
    )


def cost_analysis(fn: Any, *args: Any, **kwargs: Any) -> Cost:
    """XLA's cost analysis (FLOPs, transcendentals, bytes accessed) of the compiled program.

    Also accepts an already compiled ``jax.stages.Compiled`` as ``fn`` (no arguments).
    The figures are for the whole program, i.e. the whole batch; compare with
    :func:`funcnet.summary` (per example) by dividing by the batch size.
    """
    if isinstance(fn, jax.stages.Compiled):
        if args or kwargs:
            raise TypeError("graph.cost_analysis: a compiled program takes no arguments here")
        return _cost_of(fn)
    return _cost_of(compile(fn, *args, **kwargs))
