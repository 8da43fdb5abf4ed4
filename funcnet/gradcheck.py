"""Gradient checking: finite differences over whole pytrees and three-way comparisons.

- :func:`numerical_grad` — forward or central differences for every scalar parameter of a
  pytree. The perturbations of one leaf are evaluated in one jitted call: ``vmap`` over a
  chunk of parameter indices, ``lax.map`` over the chunks (memory bounded by
  ``chunk_bytes``). Only the perturbed leaf is batched, so ``vmap`` batches just the part
  of ``f`` that depends on it (perturbing the last layer does not re-run the first one per
  perturbation).
- :func:`compare` — per leaf, the relative error between every pair of gradients
  (autodiff, manual rules, finite differences, ...); raises :class:`GradientMismatch`
  with a readable table when a tolerance fails.
- :func:`check` — the three-way check of one scalar function in one call.
- :func:`directional_check` — for networks too big for full differences: compare
  ``<grad, v>`` with the central difference of ``f`` along random unit directions ``v``.

Relative error of a leaf: ``max |a - b| / max(max |a|, max |b|)`` (0 when both are 0).
Normalising by the leaf's scale rather than elementwise keeps tiny entries, where a
finite difference is all rounding noise, from dominating.

Defaults by dtype (of the coarsest parameter leaf), used where ``h`` / ``tol`` are
``None``:

=========  ==========  ==========  ===================================================
dtype      step ``h``  ``tol``     why
=========  ==========  ==========  ===================================================
float64    ``1e-6``    ``1e-6``    the lecture's step; central differences are good to
                                   ~1e-9 there
float32    ``1e-3``    ``1e-2``    ``1e-6`` fails correct gradients (measured 1e-4 to
                                   2e-3 relative errors on small networks). The
                                   smooth-``f`` optimum ``h = cbrt(eps)`` = 4.9e-3
                                   crosses ReLU / max-pool kinks five times as often
                                   (5e-2 measured on a small conv net), so the step
                                   stays at 1e-3. A wrong rule (a sign, a transpose, a
                                   missing ``1/N``) is off by far more than 1e-2.
float16,   --          --          refused by :func:`check` and :func:`directional_check`
bfloat16                           (a ``TypeError``): too coarse for differences; cast
                                   to float32 or (better) float64
=========  ==========  ==========  ===================================================

On top of ``tol``, :func:`check` allows every leaf the rounding error of the difference
quotient, ``ROUNDING_FACTOR * eps |f| / h`` (absolute; Numerical Recipes' error model,
measured at most ~0.9 ``eps |f| / h`` on small networks): in float32 it dominates for a
leaf whose gradient is small next to ``f`` (a last-layer bias: 2e-2 relative measured),
and it is negligible in float64. A finite difference straddling a kink of ``f`` (ReLU
at 0, a max-pool tie) is wrong whatever the tolerance: :func:`kinks` finds them.

For a tight check use float64 (``with jax.enable_x64(True):`` and float64 params).
Bad arguments (a step that is not a positive finite number, ``f`` not returning a
scalar, non-floating parameters) raise ``ValueError`` / ``TypeError`` naming the
argument before any evaluation.
"""

from __future__ import annotations

import functools
import itertools
import math
import numbers
import operator
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

METHODS = ("central", "forward")


def default_step(dtype) -> float:
    """``1e-6`` for float64 (the lecture's value); ``1e-3`` for float32, whose 7 digits
    would leave nothing of a ``1e-6`` difference (see the module docstring); a
    ``TypeError`` for half precision (bfloat16 rounds ``1 + 1e-3`` back to 1: every
    difference would be 0), where ``h=`` must be given."""
    bits = jnp.finfo(dtype).bits
    if bits < 32:
        raise TypeError(
            f"gradcheck: parameters of dtype {jnp.dtype(dtype).name} are too coarse for the "
            f"default finite-difference step (a step of 1e-3 rounds away in bfloat16); cast "
            f"them to float64 (with jax.enable_x64(True)) or float32, or pass h= explicitly")
    return 1e-6 if bits >= 64 else 1e-3


def default_tol(dtype) -> float:
    """``check``'s tolerance for parameters of ``dtype``: ``1e-6`` for float64, ``1e-2``
    for float32; a ``TypeError`` for half precision (see the module docstring)."""
    bits = jnp.finfo(dtype).bits
    if bits >= 64:
        return 1e-6
    if bits >= 32:
        return 1e-2
    raise TypeError(
        f"gradcheck: parameters of dtype {jnp.dtype(dtype).name} are too coarse for finite "
        f"differences; cast them to float64 (with jax.enable_x64(True)) or float32, or pass "
        f"h= and tol= explicitly"
    )


def _check_h(h: Any, where: str) -> float | None:
    """``h`` as a float: ``None`` or a positive finite number, else an error naming it."""
    if h is None:
        return None
    if isinstance(h, bool | str) or not (
        isinstance(h, numbers.Real) or (hasattr(h, "shape") and jnp.shape(h) == ())
    ):
        raise TypeError(
            f"{where}: h (the finite-difference step) must be a positive finite number or "
            f"None (the dtype's default), got {h!r}"
        )
    value = float(h)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(
            f"{where}: h (the finite-difference step) must be a positive finite number or "
            f"None (the dtype's default), got {h!r}"
        )
    return value


def _check_tol(tol: Any, where: str, name: str = "tol") -> None:
    values = tol.values() if isinstance(tol, Mapping) else [tol]
    for t in values:
        if isinstance(t, bool) or not isinstance(t, numbers.Real) or math.isnan(t) or t < 0:
            raise ValueError(
                f"{where}: {name} must be a non-negative number (or a dict of them per pair), "
                f"got {tol!r}"
            )


def _float_leaves(params: Any, where: str) -> tuple[list[jax.Array], Any]:
    """The leaves of ``params`` as floating arrays (and the treedef), else a ``TypeError``
    naming the leaf."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    leaves = []
    for path, leaf in flat:
        name = jax.tree_util.keystr(path) or "(root)"
        try:
            arr = jnp.asarray(leaf)
        except (TypeError, ValueError):
            raise TypeError(
                f"{where}: every leaf of params must be a floating array, leaf {name} is "
                f"{type(leaf).__name__} {leaf!r}"
            ) from None
        if not jnp.issubdtype(arr.dtype, jnp.floating):
            raise TypeError(
                f"{where}: every leaf of params must be floating (real), leaf {name} has "
                f"dtype {arr.dtype}"
            )
        leaves.append(arr)
    return leaves, treedef


def _check_scalar_fn(f: Any, params: Any, where: str) -> jax.ShapeDtypeStruct:
    """``f(params)`` is one real scalar (checked on shapes, evaluating nothing)."""
    if not callable(f):
        raise TypeError(f"{where}: f must be a function params -> scalar, got {f!r}")
    out = jax.eval_shape(f, params)
    if not isinstance(out, jax.ShapeDtypeStruct) or out.shape != ():
        got = (f"shape {out.shape}" if isinstance(out, jax.ShapeDtypeStruct)
               else f"a {type(out).__name__}")
        raise ValueError(
            f"{where}: f must return a scalar (shape ()), got {got}; reduce it to one "
            f"number, e.g. jnp.sum(...) or a loss"
        )
    if not jnp.issubdtype(out.dtype, jnp.floating):
        raise TypeError(f"{where}: f must return a real floating scalar, got dtype {out.dtype}")
    return out


def _coarsest(leaves: list[jax.Array]) -> Any:
    """The leaves' dtype with the largest epsilon (float64 when there are no leaves)."""
    return max((leaf.dtype for leaf in leaves), key=lambda d: jnp.finfo(d).eps,
               default=jnp.dtype(jnp.float64))


def numerical_grad(
    f: Callable[[Any], jax.Array],
    params: Any,
    h: float | None = None,
    method: str = "central",
    chunk_bytes: int = 1 << 22,
) -> Any:
    """Finite-difference gradient of a scalar ``f(params)``, with ``params``'s structure.

    ``central``: ``(f(p + h e_i) - f(p - h e_i)) / 2h`` (error ``O(h^2)``);
    ``forward``: ``(f(p + h e_i) - f(p)) / h`` (``O(h)``, half the evaluations).

    Args:
      f: scalar function of the pytree ``params``; must be ``jit``/``vmap``-able.
      params: pytree of floating arrays.
      h: step; default :func:`default_step` of each leaf's dtype.
      method: ``"central"`` or ``"forward"``.
      chunk_bytes: bound on the memory of one chunk's perturbed copies of a leaf; a chunk
        holds ``max(1, chunk_bytes // leaf.nbytes)`` perturbations.
    """
    if method not in METHODS:
        raise ValueError(f"numerical_grad: method must be one of {METHODS}, got {method!r}")
    fd = _differences(f, params, h, method, chunk_bytes, "numerical_grad")
    return fd.central if method == "central" else fd.forward


class FiniteDifferences(NamedTuple):
    """Central, forward and backward differences from the same evaluations."""

    central: Any
    forward: Any
    backward: Any


def finite_differences(
    f: Callable[[Any], jax.Array], params: Any, h: float | None = None, chunk_bytes: int = 1 << 22
) -> FiniteDifferences:
    """All three difference quotients of ``f`` at ``params`` (the cost of central ones).

    Where ``forward`` and ``backward`` differ by much more than ``h |f''|``, the interval
    ``[p - h, p + h]`` straddles a kink of ``f`` (ReLU at 0, a max-pool tie), and no
    difference quotient estimates the gradient there; see :func:`kinks`.
    """
    return _differences(f, params, h, "central", chunk_bytes, "finite_differences")


def kinks(fd: FiniteDifferences, rtol: float = 1e-4) -> Any:
    """Boolean pytree: entries whose one-sided differences disagree by more than ``rtol``
    times the leaf's largest central difference (``f`` is not smooth within ``h``)."""

    def leaf(c, fw, bw):
        scale = jnp.maximum(jnp.max(jnp.abs(c)), jnp.finfo(c.dtype).tiny)
        return jnp.abs(fw - bw) > rtol * scale

    return jax.tree_util.tree_map(leaf, fd.central, fd.forward, fd.backward)


def _differences(f, params, h, method, chunk_bytes, where) -> FiniteDifferences:
    h = _check_h(h, where)
    if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, numbers.Integral) \
            or chunk_bytes <= 0:
        raise ValueError(f"{where}: chunk_bytes must be a positive int, got {chunk_bytes!r}")
    leaves, treedef = _float_leaves(params, where)
    _check_scalar_fn(f, jax.tree_util.tree_unflatten(treedef, leaves), where)
    chunk_bytes = operator.index(chunk_bytes)
    steps = [default_step(leaf.dtype) if h is None else float(h) for leaf in leaves]
    chunks = [int(min(max(leaf.size, 1), max(1, chunk_bytes // max(leaf.nbytes, 1))))
              for leaf in leaves]
    quotients = _all_values(f, treedef, tuple(chunks), tuple(steps), method)(leaves)
    unflat = functools.partial(jax.tree_util.tree_unflatten, treedef)
    if method != "central":
        return FiniteDifferences(None, unflat([q[1] for q in quotients]), None)
    return FiniteDifferences(*(unflat([q[i] for q in quotients]) for i in range(3)))


def _all_values(f, treedef, chunks, steps, method):
    """One jitted function: per leaf, the (central, forward, backward) difference
    quotients of shape ``leaf.shape`` from ``f(p + h e_i)``, ``f(p - h e_i)`` and
    ``f(p)`` (central and backward are ``None`` unless ``method == "central"``)."""

    @jax.jit
    def run(leaves):
        f0 = f(jax.tree_util.tree_unflatten(treedef, leaves))
        results = []
        for li, (leaf, chunk, h) in enumerate(zip(leaves, chunks, steps, strict=True)):
            if leaf.size == 0:
                results.append(_quotients(leaf, leaf.reshape(-1), leaf.reshape(-1), f0, h,
                                          method))
                continue
            n_chunks = -(-leaf.size // chunk)
            # Padding indices repeat index 0; their results are sliced off.
            idx = np.zeros(n_chunks * chunk, np.int32)
            idx[: leaf.size] = np.arange(leaf.size)
            flat = leaf.reshape(-1)
            positions = lax.iota(jnp.int32, flat.size)

            def value(i, delta, li=li, leaf=leaf, flat=flat, positions=positions):
                moved = jnp.where(positions == i, flat + delta, flat).reshape(leaf.shape)
                new = [*leaves[:li], moved, *leaves[li + 1 :]]
                return f(jax.tree_util.tree_unflatten(treedef, new))

            if method == "central":
                def both(i, value=value, h=h):
                    return value(i, h), value(i, -h)
            else:
                def both(i, value=value, h=h):
                    v = value(i, h)
                    return v, v

            plus, minus = lax.map(jax.vmap(both), jnp.asarray(idx).reshape(n_chunks, chunk))
            results.append(_quotients(leaf, plus.reshape(-1), minus.reshape(-1), f0, h,
                                      method))
        return results

    return run


def _quotients(leaf, plus, minus, f0, step, method):
    """(central, forward, backward) quotients of ``leaf``'s shape (see _all_values),
    divided by the steps actually taken, ``fl(p + h) - p`` and ``p - fl(p - h)`` in the
    leaf's dtype: at ``p = 1000`` in float32 a nominal ``h = 1e-3`` moves ``p`` by
    ``0.9766e-3``, and dividing by ``h`` would be off by 2.3%."""
    plus = plus[: leaf.size].reshape(leaf.shape)
    up = (leaf + step) - leaf
    forward = (plus - f0) / up
    if method != "central":
        return None, forward, None
    minus = minus[: leaf.size].reshape(leaf.shape)
    down = leaf - (leaf - step)
    return (plus - minus) / (up + down), forward, (f0 - minus) / down


# ---------------------------------------------------------------------------------------
# Comparison reports
# ---------------------------------------------------------------------------------------


class GradientMismatch(AssertionError):
    """Raised by :func:`compare` when some pair of gradients differs beyond tolerance."""


class Row(NamedTuple):
    leaf: str
    first: str
    second: str
    error: float
    tol: float

    @property
    def ok(self) -> bool:
        return bool(self.error <= self.tol)


class Report(NamedTuple):
    """Per-leaf relative errors between every pair of gradient sources."""

    rows: tuple[Row, ...]

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.rows)

    def max_error(self, first: str, second: str) -> float:
        errs = [r.error for r in self.rows if {r.first, r.second} == {first, second}]
        return max(errs) if errs else 0.0

    def table(self) -> str:
        head = ("leaf", "pair", "rel. error", "tol", "")
        body = [
            (r.leaf, f"{r.first} vs {r.second}", f"{r.error:.3e}", f"{r.tol:.1e}",
             "ok" if r.ok else "FAIL")
            for r in self.rows
        ]
        widths = [max(len(str(c)) for c in col) for col in zip(head, *body, strict=True)]
        line = "  ".join
        out = [line(c.ljust(w) for c, w in zip(head, widths, strict=True))]
        out.append(line("-" * w for w in widths))
        out += [line(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in body]
        return "\n".join(out)

    def __str__(self) -> str:
        return self.table()


def relative_error(a: Any, b: Any) -> float:
    """``max |a - b| / max(max |a|, max |b|)`` in float64; 0 if both are all zero; ``inf``
    if either holds a NaN or an infinity (a gradient that is not a number never agrees)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"relative_error: shapes differ, {a.shape} vs {b.shape}")
    if a.size == 0:
        return 0.0
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        return math.inf
    scale = max(np.max(np.abs(a)), np.max(np.abs(b)))
    if scale == 0:
        return 0.0
    err = np.max(np.abs(a - b)) / scale
    return float(err) if np.isfinite(err) else math.inf


def _leaf_names(tree: Any) -> list[str]:
    paths = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [jax.tree_util.keystr(path) or "(root)" for path, _ in paths]


def _per_pair(value: Any, a: str, b: str, missing: float) -> float:
    if isinstance(value, Mapping):
        return float(value.get((a, b), value.get((b, a), missing)))
    return float(value)


def _leaf_scale(a: Any, b: Any) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(max(np.max(np.abs(a), initial=0.0), np.max(np.abs(b), initial=0.0)))


def compare(
    grads: Mapping[str, Any],
    tol: float | Mapping[tuple[str, str], float] = 1e-6,
    raise_on_failure: bool = True,
    atol: float | Mapping[tuple[str, str], float] = 0.0,
) -> Report:
    """Relative error, per leaf, between every pair of gradient pytrees in ``grads``.

    Args:
      grads: name -> gradient pytree, e.g. ``{"autodiff": ..., "manual": ..., "fd": ...}``;
        all with the same structure.
      tol: one tolerance, or ``{(name1, name2): tol}`` per pair (either order); pairs not
        listed are reported with tolerance ``inf``.
      raise_on_failure: raise :class:`GradientMismatch` with the table if any row fails.
      atol: an absolute error every leaf is allowed on top (one value or per pair, as
        ``tol``; default 0): a row passes when ``max |a - b| <= tol * scale + atol``
        (``scale = max(max |a|, max |b|)``), i.e. its reported tolerance is
        ``tol + atol / scale``. :func:`check` sets it to the rounding error of finite
        differences.
    """
    _check_tol(tol, "compare")
    _check_tol(atol, "compare", "atol")
    if not isinstance(grads, Mapping):
        raise TypeError(
            f"compare: grads must be a dict name -> gradient pytree, got {type(grads).__name__}"
        )
    names = list(grads)
    if len(names) < 2:
        raise ValueError(f"compare: need at least two gradients, got {names}")
    structs = {n: jax.tree_util.tree_structure(grads[n]) for n in names}
    first = names[0]
    for n in names[1:]:
        if structs[n] != structs[first]:
            raise ValueError(
                f"compare: {n!r} has structure {structs[n]}, {first!r} has {structs[first]}"
            )
    leaf_names = _leaf_names(grads[first])
    leaves = {n: jax.tree_util.tree_leaves(grads[n]) for n in names}
    rows = []
    for a, b in itertools.combinations(names, 2):
        t = _per_pair(tol, a, b, math.inf)
        floor = _per_pair(atol, a, b, 0.0)
        for name, la, lb in zip(leaf_names, leaves[a], leaves[b], strict=True):
            row_tol = t
            if floor > 0:
                scale = _leaf_scale(la, lb)  # NaN with a NaN gradient: its error is inf
                row_tol = t + floor / scale if scale > 0 else math.inf
                if not math.isfinite(scale):
                    row_tol = t
            if np.shape(la) != np.shape(lb):
                raise ValueError(f"compare: leaf {name}: {a!r} has shape {np.shape(la)}, "
                                 f"{b!r} has {np.shape(lb)}")
            rows.append(Row(name, a, b, relative_error(la, lb), row_tol))
    report = Report(tuple(rows))
    if raise_on_failure and not report.ok:
        raise GradientMismatch("gradients disagree:\n" + report.table())
    return report


#: The absolute floor :func:`check` allows finite differences, in units of
#: ``eps |f| / h`` (their rounding error; measured at most ~0.9 of it on small networks).
ROUNDING_FACTOR = 4.0


def check(
    f: Callable[[Any], jax.Array],
    params: Any,
    manual: Any = None,
    h: float | None = None,
    method: str = "central",
    tol: float | Mapping[tuple[str, str], float] | None = None,
    raise_on_failure: bool = True,
) -> Report:
    """Autodiff vs finite differences (vs ``manual``, if given) for a scalar ``f(params)``.

    ``manual`` is a gradient pytree or a function ``params -> grads`` (e.g. built from
    :func:`funcnet.vjp.value_and_grad`). ``h`` and ``tol`` default by the parameters'
    dtype (see the module docstring): float64 ``h = 1e-6``, ``tol = 1e-6``; float32
    ``h = 1e-3``, ``tol = 1e-2``; float16 / bfloat16 need explicit ``h`` and ``tol``
    (a ``TypeError`` otherwise). Pairs with the finite differences also allow each leaf
    their rounding error, ``ROUNDING_FACTOR * eps |f| / h`` in absolute terms (see
    :func:`compare`'s ``atol``); the table shows the resulting tolerance per leaf.
    """
    where = "check"
    if method not in METHODS:
        raise ValueError(f"{where}: method must be one of {METHODS}, got {method!r}")
    h = _check_h(h, where)
    leaves, treedef = _float_leaves(params, where)
    params = jax.tree_util.tree_unflatten(treedef, leaves)
    out = _check_scalar_fn(f, params, where)
    if h is None or tol is None:
        default = default_tol(_coarsest(leaves))  # refuses half precision, before any work
        tol = default if tol is None else tol
    _check_tol(tol, where)
    value, auto = jax.value_and_grad(f)(params)
    grads = {"autodiff": auto}
    if manual is not None:
        grads["manual"] = manual(params) if callable(manual) else manual
    grads["finite diff"] = numerical_grad(f, params, h=h, method=method)
    eps = max(float(jnp.finfo(d).eps) for d in [out.dtype, *(leaf.dtype for leaf in leaves)])
    steps = [default_step(leaf.dtype) if h is None else h for leaf in leaves]
    noise = ROUNDING_FACTOR * eps * abs(float(value)) / min(steps, default=1.0)
    atol = {(name, "finite diff"): noise for name in grads if name != "finite diff"}
    return compare(grads, tol, raise_on_failure, atol=atol)


class DirectionalReport(NamedTuple):
    """Directional derivatives: ``<grad, v>`` vs the central difference along each ``v``."""

    analytic: np.ndarray
    numeric: np.ndarray
    errors: np.ndarray  # |analytic - numeric| / max(|analytic|, |numeric|)
    tol: float

    @property
    def ok(self) -> bool:
        return bool(np.all(self.errors <= self.tol))


def directional_check(
    f: Callable[[Any], jax.Array],
    params: Any,
    grads: Any,
    key: jax.Array,
    num_directions: int = 4,
    h: float | None = None,
    tol: float | None = None,
    raise_on_failure: bool = True,
) -> DirectionalReport:
    """Random-projection check of ``grads`` for a network too big for full differences.

    For ``num_directions`` random unit vectors ``v`` (a pytree like ``params``), compares
    ``<grads, v>`` with ``(f(p + h v) - f(p - h v)) / 2h``; all directions in one vmapped,
    jitted call. A wrong gradient entry is caught unless ``v`` happens to be orthogonal to
    the error, which has probability 0. ``h`` and ``tol`` default by dtype as in
    :func:`check`.
    """
    where = "directional_check"
    h = _check_h(h, where)
    if isinstance(num_directions, bool) or not isinstance(num_directions, numbers.Integral) \
            or num_directions <= 0:
        raise ValueError(
            f"{where}: num_directions must be a positive int, got {num_directions!r}"
        )
    leaves, treedef = _float_leaves(params, where)
    _check_scalar_fn(f, jax.tree_util.tree_unflatten(treedef, leaves), where)
    g_struct, p_struct = jax.tree_util.tree_structure(grads), treedef
    if g_struct != p_struct:
        raise ValueError(
            f"{where}: grads must have the structure of params, got {g_struct}, params are "
            f"{p_struct}"
        )
    g_leaves = jax.tree_util.tree_leaves(grads)
    for i, (g, p) in enumerate(zip(g_leaves, leaves, strict=True)):
        if jnp.shape(g) != p.shape:
            raise ValueError(
                f"{where}: grads leaf {i} has shape {jnp.shape(g)}, the params leaf has "
                f"{p.shape}"
            )
    if not (isinstance(key, jax.Array) and (
            jnp.issubdtype(key.dtype, jax.dtypes.prng_key) or key.dtype == jnp.uint32)):
        raise TypeError(
            f"{where}: key must be a JAX PRNG key (jax.random.key(seed)), got {key!r}"
        )
    dtype = jnp.result_type(*leaves)
    if h is None or tol is None:
        default = default_tol(_coarsest(leaves))  # refuses half precision, before any work
        tol = default if tol is None else tol
    _check_tol(tol, where)
    step = default_step(_coarsest(leaves)) if h is None else h
    keys = jax.random.split(key, len(leaves))
    dirs = [
        jax.random.normal(k, (num_directions, *jnp.shape(leaf)), dtype)
        for k, leaf in zip(keys, leaves, strict=True)
    ]
    norm = jnp.sqrt(sum(jnp.sum(d.reshape(num_directions, -1) ** 2, axis=1) for d in dirs))
    dirs = [d / norm.reshape(-1, *([1] * (d.ndim - 1))) for d in dirs]

    @jax.jit
    def run(leaves, dirs):
        def along(v):
            plus = [p + step * d for p, d in zip(leaves, v, strict=True)]
            minus = [p - step * d for p, d in zip(leaves, v, strict=True)]
            fp = f(jax.tree_util.tree_unflatten(treedef, plus))
            fm = f(jax.tree_util.tree_unflatten(treedef, minus))
            return (fp - fm) / (2 * step)

        return jax.vmap(along)(dirs)

    numeric = np.asarray(run(leaves, dirs), np.float64)
    analytic = np.asarray(
        sum(
            jnp.sum((d * g[None]).reshape(num_directions, -1), axis=1)
            for d, g in zip(dirs, g_leaves, strict=True)
        ),
        np.float64,
    )
    scale = np.maximum(np.maximum(np.abs(analytic), np.abs(numeric)), np.finfo(np.float64).tiny)
    errors = np.abs(analytic - numeric) / scale
    report = DirectionalReport(analytic, numeric, errors, tol)
    if raise_on_failure and not report.ok:
        lines = [f"  v{i}: <grad, v> = {a:.10g}, finite difference = {n:.10g}, rel. error {e:.2e}"
                 for i, (a, n, e) in enumerate(zip(analytic, numeric, errors, strict=True))]
        raise GradientMismatch(
            f"directional check failed (tol {tol:.1e}):\n" + "\n".join(lines)
        )
    return report


# ---------------------------------------------------------------------------------------
# One op's hand rule, three ways
# ---------------------------------------------------------------------------------------


class RuleReport(NamedTuple):
    """Errors of an op's hand rule, per differentiable argument name."""

    forward: float  # rule's fwd output vs the op's output (relative)
    vs_autodiff: dict[str, float]  # bwd vs jax.vjp of the op
    vs_custom_vjp: dict[str, float]  # jax.vjp of vjp.manual(op) vs bwd (same numbers)
    vs_finite_diff: dict[str, float]  # bwd vs central differences of <op(args), g>
    autodiff_vs_finite_diff: dict[str, float]  # jax.vjp vs the same differences


def check_rule(
    op: Callable,
    args: tuple,
    static: Mapping[str, Any] | None = None,
    key: jax.Array | None = None,
    h: float | None = None,
    finite_differences: bool = True,
) -> RuleReport:
    """Check the hand-written rule of ``op`` at ``args`` against autodiff and differences.

    With a random cotangent ``g`` (shape of the output), compares ``bwd(res, g)`` with
    ``jax.vjp(op)(g)`` and with the central-difference gradient of ``sum(op(args) * g)``,
    per floating argument. ``static`` holds the hyper-parameters (stride, padding, ...).
    """
    from funcnet import vjp  # gradcheck sits above vjp; imported lazily to stay light

    static = dict(static or {})
    h = _check_h(h, "check_rule")
    rule = vjp.rule_for(op)
    names = rule.diff
    key = jax.random.key(0) if key is None else key

    def call(*a):
        return op(*a, **static)

    wrapped = vjp.manual(op)

    def hand(args, g):
        out, res = rule.fwd(*args, **static)
        custom = jax.vjp(lambda *a: wrapped(*a, **static), *args)[1](g)
        return out, rule.bwd(res, g), custom

    def autodiff(args, g):
        ref_out, vjp_fn = jax.vjp(call, *args)
        return ref_out, vjp_fn(g)

    @jax.jit  # one compiled program for the three
    def both(args, g):
        return hand(args, g), autodiff(args, g)

    out_shape = jax.eval_shape(call, *args)
    leaves = jax.tree_util.tree_leaves(out_shape)
    keys = jax.random.split(key, len(leaves))
    g_leaves = [jax.random.normal(k, o.shape, o.dtype) for k, o in zip(keys, leaves, strict=True)]
    g = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), g_leaves)
    (out, mine, custom), (ref_out, ref) = both(tuple(args), g)
    forward = max(
        relative_error(a, b)
        for a, b in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(ref_out),
                        strict=True)
    )

    def floating(a):
        leaves = jax.tree_util.tree_leaves(a)
        return bool(leaves) and all(jnp.issubdtype(jnp.result_type(x), jnp.floating)
                                    for x in leaves)

    def tree_error(a, b):
        return max(
            (relative_error(x, y) for x, y in zip(
                jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True)),
            default=0.0,
        )

    vs_auto, vs_custom, vs_fd, auto_fd = {}, {}, {}, {}
    diff_idx = [i for i, _ in enumerate(names) if floating(args[i])]
    for i in diff_idx:
        vs_auto[names[i]] = tree_error(mine[i], ref[i])
        vs_custom[names[i]] = tree_error(mine[i], custom[i])
    if finite_differences and diff_idx:
        def inner(diff_args):
            full = list(args)
            for i, a in zip(diff_idx, diff_args, strict=True):
                full[i] = a
            outs = jax.tree_util.tree_leaves(call(*full))
            return sum(jnp.sum(o * gl) for o, gl in zip(outs, g_leaves, strict=True))

        fd = numerical_grad(inner, tuple(args[i] for i in diff_idx), h=h)
        for i, d in zip(diff_idx, fd, strict=True):
            vs_fd[names[i]] = tree_error(mine[i], d)
            auto_fd[names[i]] = tree_error(ref[i], d)
    return RuleReport(forward, vs_auto, vs_custom, vs_fd, auto_fd)
