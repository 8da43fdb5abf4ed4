"""Public array functions called outside a trace run as one compiled program.

Called eagerly, a function of several ``jax.numpy`` / ``lax`` operations dispatches (and
the first time compiles) one small XLA program per operation; ``jax.nn``'s functions are
``jax.jit``-wrapped for that reason. :func:`compiled_when_eager` does the same for
funcnet's ops, whose configuration arguments (windows, strides, paddings as ints,
tuples, strings) are static: the arrays of a call are the compiled program's arguments,
everything else is part of its cache key. Inside ``jit`` / ``grad`` / ``vmap`` (any
argument a tracer), under ``jax.disable_jit()``, or with a configuration that cannot be
hashed, the function runs as written.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def compiled_when_eager(extra_key: Callable[[], Any] | None = None) -> Callable:
    """Decorator: outside a trace, ``f(*args, **kwargs)`` runs as one jitted program,
    cached per function, non-array arguments, ``extra_key()`` (module state the function
    reads while tracing, such as :func:`funcnet.nn.conv.plain_formulations`) and the
    arrays' shapes and dtypes. The function's own checks run while it traces, so its
    errors are the ones an op-by-op call raises."""

    def decorate(f: Callable) -> Callable:
        @functools.wraps(f)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            leaves, tree = jax.tree_util.tree_flatten((args, kwargs))
            if jax.config.jax_disable_jit or any(
                    isinstance(leaf, jax.core.Tracer) for leaf in leaves):
                return f(*args, **kwargs)
            dynamic = tuple(_traceable(leaf) for leaf in leaves)
            # with the types: 1, 1.0 and True are equal keys, but a float stride is an error
            statics = tuple(None if d else (type(leaf), leaf)
                            for d, leaf in zip(dynamic, leaves, strict=True))
            spec = (tree, dynamic, statics, None if extra_key is None else extra_key())
            try:
                hash(spec)
            except TypeError:
                return f(*args, **kwargs)
            arrays = [leaf for d, leaf in zip(dynamic, leaves, strict=True) if d]
            return _program(f, spec, *arrays)

        return wrapper

    return decorate


def _traceable(leaf: Any) -> bool:
    """A jax array, or a NumPy array of a dtype jit takes (not text or objects: those stay
    static, unhashable, and the op runs as written and names them)."""
    if isinstance(leaf, jax.Array):
        return True
    if isinstance(leaf, np.ndarray):
        return leaf.dtype == np.bool_ or bool(jnp.issubdtype(leaf.dtype, jnp.number))
    return False


@functools.partial(jax.jit, static_argnums=(0, 1))
def _program(f: Callable, spec: tuple, *arrays: Any) -> Any:
    tree, dynamic, statics, _ = spec
    it = iter(arrays)
    leaves = [next(it) if d else s[1] for d, s in zip(dynamic, statics, strict=True)]
    args, kwargs = jax.tree_util.tree_unflatten(tree, leaves)
    return f(*args, **kwargs)
