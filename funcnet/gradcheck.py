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
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

METHODS = ("central", "forward")


def default_step(dtype) -> float:
    """``1e-6`` for float64 (the lecture's value); ``1e-3`` for float32, whose 7 digits
    would leave nothing of a ``1e-6`` difference."""
    return 1e-6 if jnp.finfo(dtype).bits >= 64 else 1e-3


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
    fd = _differences(f, params, h, method, chunk_bytes)
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
    return _differences(f, params, h, "central", chunk_bytes)


def kinks(fd: FiniteDifferences, rtol: float = 1e-4) -> Any:
    """Boolean pytree: entries whose one-sided differences disagree by more than ``rtol``
    times the leaf's largest central difference (``f`` is not smooth within ``h``)."""

    def leaf(c, fw, bw):
        scale = jnp.maximum(jnp.max(jnp.abs(c)), jnp.finfo(c.dtype).tiny)
        return jnp.abs(fw - bw) > rtol * scale

    return jax.tree_util.tree_map(leaf, fd.central, fd.forward, fd.backward)


def _differences(f, params, h, method, chunk_bytes) -> FiniteDifferences:
    leaves, treedef = jax.tree_util.tree_flatten(params)
    leaves = [jnp.asarray(leaf) for leaf in leaves]
    for leaf in leaves:
        if not jnp.issubdtype(leaf.dtype, jnp.floating):
            raise TypeError(f"numerical_grad: every leaf must be floating, got {leaf.dtype}")
    steps = [default_step(leaf.dtype) if h is None else float(h) for leaf in leaves]
    chunks = [int(min(max(leaf.size, 1), max(1, chunk_bytes // max(leaf.nbytes, 1))))
              for leaf in leaves]
    values = _all_values(f, treedef, tuple(chunks), tuple(steps), method)(leaves)
    out = {"central": [], "forward": [], "backward": []}
    for leaf, step, (plus, minus, f0) in zip(leaves, steps, values, strict=True):
        plus = plus[: leaf.size].reshape(leaf.shape)
        out["forward"].append((plus - f0) / step)
        if method == "central":
            minus = minus[: leaf.size].reshape(leaf.shape)
            out["central"].append((plus - minus) / (2 * step))
            out["backward"].append((f0 - minus) / step)
    unflat = functools.partial(jax.tree_util.tree_unflatten, treedef)
    if method != "central":
        return FiniteDifferences(None, unflat(out["forward"]), None)
    return FiniteDifferences(*(unflat(out[k]) for k in ("central", "forward", "backward")))


def _all_values(f, treedef, chunks, steps, method):
    """One jitted function: ``[(f(p + h e_i), f(p - h e_i), f(p)) for each leaf]``."""

    @jax.jit
    def run(leaves):
        f0 = f(jax.tree_util.tree_unflatten(treedef, leaves))
        results = []
        for li, (leaf, chunk, h) in enumerate(zip(leaves, chunks, steps, strict=True)):
            if leaf.size == 0:
                results.append((leaf.reshape(-1), leaf.reshape(-1), f0))
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
            results.append((plus.reshape(-1), minus.reshape(-1), f0))
        return results

    return run


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
    """``max |a - b| / max(max |a|, max |b|)`` in float64; 0 if both are all zero."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"relative_error: shapes differ, {a.shape} vs {b.shape}")
    if a.size == 0:
        return 0.0
    scale = max(np.max(np.abs(a)), np.max(np.abs(b)))
    if scale == 0:
        return 0.0
    err = np.max(np.abs(a - b)) / scale
    return float(err) if np.isfinite(err) else math.inf


def _leaf_names(tree: Any) -> list[str]:
    paths = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [jax.tree_util.keystr(path) or "(root)" for path, _ in paths]


def compare(
    grads: Mapping[str, Any],
    tol: float | Mapping[tuple[str, str], float] = 1e-6,
    raise_on_failure: bool = True,
) -> Report:
    """Relative error, per leaf, between every pair of gradient pytrees in ``grads``.

    Args:
      grads: name -> gradient pytree, e.g. ``{"autodiff": ..., "manual": ..., "fd": ...}``;
        all with the same structure.
      tol: one tolerance, or ``{(name1, name2): tol}`` per pair (either order); pairs not
        listed are reported with tolerance ``inf``.
      raise_on_failure: raise :class:`GradientMismatch` with the table if any row fails.
    """
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
        if isinstance(tol, Mapping):
            t = tol.get((a, b), tol.get((b, a), math.inf))
        else:
            t = float(tol)
        for name, la, lb in zip(leaf_names, leaves[a], leaves[b], strict=True):
            rows.append(Row(name, a, b, relative_error(la, lb), t))
    report = Report(tuple(rows))
    if raise_on_failure and not report.ok:
        raise GradientMismatch("gradients disagree:\n" + report.table())
    return report


def check(
    f: Callable[[Any], jax.Array],
    params: Any,
    manual: Any = None,
    h: float | None = None,
    method: str = "central",
    tol: float | Mapping[tuple[str, str], float] = 1e-6,
    raise_on_failure: bool = True,
) -> Report:
    """Autodiff vs finite differences (vs ``manual``, if given) for a scalar ``f(params)``.

    ``manual`` is a gradient pytree or a function ``params -> grads`` (e.g. built from
    :func:`funcnet.vjp.value_and_grad`).
    """
    grads = {"autodiff": jax.grad(f)(params)}
    if manual is not None:
        grads["manual"] = manual(params) if callable(manual) else manual
    grads["finite diff"] = numerical_grad(f, params, h=h, method=method)
    return compare(grads, tol, raise_on_failure)


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
    tol: float = 1e-6,
    raise_on_failure: bool = True,
) -> DirectionalReport:
    """Random-projection check of ``grads`` for a network too big for full differences.

    For ``num_directions`` random unit vectors ``v`` (a pytree like ``params``), compares
    ``<grads, v>`` with ``(f(p + h v) - f(p - h v)) / 2h``; all directions in one vmapped,
    jitted call. A wrong gradient entry is caught unless ``v`` happens to be orthogonal to
    the error, which has probability 0.
    """
    leaves, treedef = jax.tree_util.tree_flatten(params)
    g_leaves = jax.tree_util.tree_leaves(grads)
    dtype = jnp.result_type(*leaves)
    step = default_step(dtype) if h is None else h
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
    rule = vjp.rule_for(op)
    names = rule.diff
    key = jax.random.key(0) if key is None else key

    def call(*a):
        return op(*a, **static)

    wrapped = vjp.manual(op)

    @jax.jit
    def hand(args, g):
        out, res = rule.fwd(*args, **static)
        custom = jax.vjp(lambda *a: wrapped(*a, **static), *args)[1](g)
        return out, rule.bwd(res, g), custom

    def autodiff(args, g):
        ref_out, vjp_fn = jax.vjp(call, *args)
        return ref_out, vjp_fn(g)

    out_shape = jax.eval_shape(call, *args)
    leaves = jax.tree_util.tree_leaves(out_shape)
    keys = jax.random.split(key, len(leaves))
    g_leaves = [jax.random.normal(k, o.shape, o.dtype) for k, o in zip(keys, leaves, strict=True)]
    g = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), g_leaves)
    out, mine, custom = hand(tuple(args), g)
    ref_out, ref = jax.jit(autodiff)(tuple(args), g)
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
