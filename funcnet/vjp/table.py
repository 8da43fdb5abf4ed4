"""The single table op -> hand-written rule, and :func:`manual`, which turns a rule into a
``jax.custom_vjp`` function.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import jax

from funcnet.nn import (
    activation,
    attention,
    conv,
    dense,
    dropout,
    embedding,
    losses,
    normalization,
    pool,
    regularizers,
    reshape,
)
from funcnet.nn.base import Rule, cast_cotangent
from funcnet.vjp import gates

#: The families whose ``RULES`` make up the table (a new family adds itself here).
FAMILIES = [dense, conv, pool, activation, reshape, normalization, dropout, embedding,
            attention, losses, regularizers, gates]

#: Every op of :mod:`funcnet.ops`, every loss, regularizer and lecture gate -> its rule.
RULES: dict[Callable, Rule] = {op: rule for family in FAMILIES for op, rule in family.RULES.items()}


def _known_ops() -> str:
    return ", ".join(sorted(f.__module__.split(".")[-1] + "." + f.__name__ for f in RULES))


def rule_for(op: Callable) -> Rule:
    """The hand-written :class:`Rule` of ``op``.

    A ``TypeError`` if ``op`` is not a function, a ``ValueError`` naming ``op`` and
    listing the known ops if it has no rule (e.g. ``jnp.sin``).
    """
    if not callable(op):
        raise TypeError(
            f"vjp: op must be one of funcnet's ops (a function such as fn.ops.conv2d), got "
            f"{type(op).__name__} {op!r}; rules exist for: {_known_ops()}"
        )
    try:
        return RULES[op]
    except (KeyError, TypeError):
        name = getattr(op, "__qualname__", None) or getattr(op, "__name__", None) or repr(op)
        module = getattr(op, "__module__", None)
        full = f"{module}.{name}" if module else name
        raise ValueError(
            f"vjp: no hand-written rule for {full!r}; rules exist for: {_known_ops()}"
        ) from None


def manual(op: Callable) -> Callable:
    """``op`` wrapped in ``jax.custom_vjp`` with its hand-written backward rule.

    The wrapped function has ``op``'s signature and value. Its array arguments (the
    rule's ``diff`` names) are differentiated through the rule's ``bwd``; every other
    argument (stride, padding, window, axis, mask, ...) is a static hyper-parameter
    closed over, so it may be any Python value. Works under ``jit``, ``vmap`` and
    ``grad``::

        conv = vjp.manual(fn.ops.conv2d)
        jax.grad(lambda w: conv(x, w, None, 2, "SAME").sum())(w)   # uses conv2d_bwd
    """
    rule = rule_for(op)
    signature = inspect.signature(rule.fwd)

    @functools.wraps(op)
    def wrapped(*args: Any, **kwargs: Any):
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError as e:
            raise TypeError(f"vjp.manual({op.__name__}){signature}: {e}") from None
        bound.apply_defaults()
        arrays = tuple(bound.arguments[name] for name in rule.diff)
        static = {k: v for k, v in bound.arguments.items() if k not in rule.diff}

        def call(*arrays):
            return rule.fwd(**dict(zip(rule.diff, arrays, strict=True)), **static)

        @jax.custom_vjp
        def f(*arrays):
            return call(*arrays)[0]

        dtypes = tuple(getattr(a, "dtype", None) for a in arrays)

        def f_bwd(res, g):  # each cotangent in its argument's dtype, as autodiff's
            return tuple(cast_cotangent(ct, dtype) for ct, dtype in
                         zip(rule.bwd(res, g), dtypes, strict=True))

        f.defvjp(call, f_bwd)
        return f(*arrays)

    wrapped.rule = rule
    return wrapped
