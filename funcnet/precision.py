"""Mixed precision: float32 parameters, the network in bfloat16 or float16.

A :class:`Policy` says which dtype each kind of array has in a train step, as DeepMind's
jmp (``params=float32,compute=bfloat16,output=float32``), Flax's ``param_dtype`` /
``dtype`` and PyTorch's autocast do:

===============  ==========================================================================
``param_dtype``  the parameters kept in the :class:`~funcnet.train.TrainState`, the
                 gradients given to the optimizer and its state (float32)
``compute``      the parameters and a floating input ``x`` are cast to it inside the step;
                 the network's forward *and* backward pass run in it (bfloat16 or float16)
``output``       the network's output is cast to it before the loss (float32), so the
                 loss, its gradient and the accuracy are computed in float32
===============  ==========================================================================

The network's state (BatchNorm's running statistics) stays in its own dtype (float32);
BatchNorm's and LayerNorm's statistics and the softmax's normaliser are computed in
float32 inside the layers (:func:`funcnet.nn.base.upcast`), their outputs in the compute
dtype.

float16 has a narrow exponent range: small gradients underflow to 0. The policy's static
``loss_scale`` (default ``2**15`` for float16, 1 for bfloat16 and float32) multiplies the
loss before the backward pass and divides the float32 gradients after it; a step whose
scaled gradient overflows (inf / NaN) is not applied (see :func:`funcnet.train.make_step`).

:func:`~funcnet.train.make_step` and :func:`~funcnet.train.fit` take ``precision=``:
``None`` (off: everything in the parameters' dtype, the default), ``"bfloat16"`` /
``"bf16"``, ``"float16"`` / ``"fp16"``, a floating dtype such as ``jnp.bfloat16``, or a
:class:`Policy`.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

#: The names ``make_step(precision=...)`` accepts -> the compute dtype (Keras' and
#: Lightning's spellings included).
NAMES: dict[str, Any] = {
    "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16, "mixed_bfloat16": jnp.bfloat16,
    "bf16-mixed": jnp.bfloat16,
    "float16": jnp.float16, "fp16": jnp.float16, "half": jnp.float16,
    "mixed_float16": jnp.float16, "16-mixed": jnp.float16,
}

#: The default static loss scale for float16 (PyTorch's ``GradScaler`` starts at
#: ``2**16``; one step lower leaves room for a scaled ``(B, K)`` loss gradient of a
#: batch of one, whose entries reach the scale itself).
FLOAT16_LOSS_SCALE = 2.0**15


def _floating_dtype(value: Any, name: str, where: str) -> np.dtype:
    """``value`` as a floating ``numpy`` dtype (``jnp.bfloat16``, ``"float16"``, ...)."""
    if isinstance(value, str) and value.strip().lower() in NAMES:
        value = NAMES[value.strip().lower()]
    try:
        dtype = None if value is None else jnp.dtype(value)
    except (TypeError, ValueError):
        dtype = None
    if (isinstance(value, bool) or value is None or dtype is None
            or not jnp.issubdtype(dtype, jnp.floating)):
        got = dtype.name if dtype is not None and not isinstance(value, bool) else repr(value)
        raise TypeError(
            f"{where}: {name} must be a floating dtype (jnp.bfloat16, jnp.float16, "
            f"jnp.float32), got {got}"
        )
    return dtype


@dataclasses.dataclass(frozen=True)
class Policy:
    """Which dtype the parameters, the computation and the output have in a train step.

    Args:
      compute_dtype: the dtype the network runs in, forward and backward
        (``jnp.bfloat16``, ``jnp.float16``; ``jnp.float32`` computes in float32).
      param_dtype: the dtype of the parameters kept in the train state, of their
        gradients and of the optimizer state (float32). A step refuses parameters of
        another dtype.
      output_dtype: the network's output is cast to it before the loss (float32).
      loss_scale: the static loss scale, a finite number ``> 0``; ``None`` (default) is
        ``2**15`` for a float16 computation and 1 otherwise. For float16 it must not
        exceed float16's largest value (65504): the loss gradient it scales would
        overflow on the first step.

    Immutable and hashable (a static argument to ``jit``), with jmp's casting methods.
    """

    compute_dtype: Any
    param_dtype: Any = jnp.float32
    output_dtype: Any = jnp.float32
    loss_scale: float | None = None

    def __post_init__(self):
        where = "Policy"
        compute = _floating_dtype(self.compute_dtype, "compute_dtype", where)
        param = _floating_dtype(self.param_dtype, "param_dtype", where)
        output = _floating_dtype(self.output_dtype, "output_dtype", where)
        scale = self.loss_scale
        if scale is None:
            scale = FLOAT16_LOSS_SCALE if compute == jnp.float16 else 1.0
        elif isinstance(scale, bool) or not isinstance(scale, numbers.Real):
            raise TypeError(
                f"{where}: loss_scale must be a finite number > 0 (or None: 2**15 for "
                f"float16, 1 otherwise), got {scale!r}"
            )
        scale = float(scale)
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(
                f"{where}: loss_scale must be a finite number > 0 (or None: 2**15 for "
                f"float16, 1 otherwise), got {self.loss_scale!r}"
            )
        largest = float(jnp.finfo(compute).max)
        if scale > largest:
            raise ValueError(
                f"{where}: loss_scale {self.loss_scale!r} exceeds the largest "
                f"{compute.name} value ({largest:g}): the scaled loss gradient would "
                f"overflow on every step; use at most 2**15 (the float16 default)"
            )
        object.__setattr__(self, "compute_dtype", compute)
        object.__setattr__(self, "param_dtype", param)
        object.__setattr__(self, "output_dtype", output)
        object.__setattr__(self, "loss_scale", scale)

    def __repr__(self) -> str:
        return (f"Policy(compute_dtype={self.compute_dtype.name}, param_dtype="
                f"{self.param_dtype.name}, output_dtype={self.output_dtype.name}, "
                f"loss_scale={self.loss_scale:g})")

    # -- casting (jmp's names) -----------------------------------------------------------
    def cast_to_compute(self, tree: Any) -> Any:
        """Every floating leaf of ``tree`` in ``compute_dtype`` (others unchanged)."""
        return cast_floating(tree, self.compute_dtype)

    def cast_to_param(self, tree: Any) -> Any:
        """Every floating leaf of ``tree`` in ``param_dtype``."""
        return cast_floating(tree, self.param_dtype)

    def cast_to_output(self, tree: Any) -> Any:
        """Every floating leaf of ``tree`` in ``output_dtype``."""
        return cast_floating(tree, self.output_dtype)

    # -- loss scaling --------------------------------------------------------------------
    @property
    def scales_loss(self) -> bool:
        """Whether the loss is scaled (``loss_scale != 1``)."""
        return self.loss_scale != 1.0

    @property
    def checks_gradients(self) -> bool:
        """Whether a step must check its gradients are finite before applying them: with
        a loss scale or a float16 computation an overflow shows in the gradients first."""
        return self.scales_loss or self.compute_dtype == jnp.float16

    def scale(self, loss: jax.Array) -> jax.Array:
        """``loss * loss_scale`` (``loss`` itself for a scale of 1)."""
        return loss * self.loss_scale if self.scales_loss else loss

    def unscale(self, grads: Any, like: Any) -> Any:
        """``grads`` in the dtypes of ``like`` (the parameters), divided by the scale."""
        def one(g, p):
            g = g.astype(p.dtype) if g.dtype != p.dtype else g
            return g / self.loss_scale if self.scales_loss else g

        return jax.tree_util.tree_map(one, grads, like)


def cast_floating(tree: Any, dtype: Any) -> Any:
    """Every floating array leaf of ``tree`` in ``dtype``; integer leaves (labels,
    Embedding ids) and leaves already in ``dtype`` unchanged."""
    def one(a):
        if (hasattr(a, "dtype") and jnp.issubdtype(a.dtype, jnp.floating)
                and a.dtype != dtype):
            return jnp.asarray(a).astype(dtype)
        return a

    return jax.tree_util.tree_map(one, tree)


def get_policy(precision: Any, where: str = "precision", name: str = "precision"
               ) -> Policy | None:
    """The :class:`Policy` for a ``precision=`` argument, or ``None`` (off).

    ``None`` -> ``None``; ``"bfloat16"`` / ``"bf16"`` -> ``Policy(jnp.bfloat16)``;
    ``"float16"`` / ``"fp16"`` -> ``Policy(jnp.float16)`` (loss scale ``2**15``); a
    floating dtype -> ``Policy(dtype)``; a :class:`Policy` as it is. Anything else is a
    ``TypeError`` / ``ValueError`` naming ``where`` and ``name``.
    """
    if precision is None or isinstance(precision, Policy):
        return precision
    expected = ("None (off), 'bfloat16' / 'bf16', 'float16' / 'fp16', a floating dtype "
                "(jnp.bfloat16) or a funcnet.precision.Policy")
    if isinstance(precision, str):
        key = precision.strip().lower()
        if key not in NAMES:
            raise ValueError(
                f"{where}: {name} must be {expected}; got the unknown name {precision!r} "
                f"(known names: {', '.join(sorted(NAMES))})"
            )
        return Policy(NAMES[key])
    try:
        dtype = None if isinstance(precision, bool) else jnp.dtype(precision)
    except (TypeError, ValueError):
        dtype = None
    if dtype is None:
        raise TypeError(f"{where}: {name} must be {expected}, got {precision!r}")
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
            f"{where}: {name} must be {expected}; got the non-floating dtype {dtype.name}"
        )
    return Policy(dtype)


def check_params(policy: Policy, params: Any, where: str) -> None:
    """Every floating leaf of ``params`` has the policy's ``param_dtype`` (at trace time)."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        dtype = getattr(leaf, "dtype", None)
        if dtype is not None and jnp.issubdtype(dtype, jnp.floating) and dtype != (
                policy.param_dtype):
            raise TypeError(
                f"{where}: precision={policy!r} keeps the parameters in "
                f"{policy.param_dtype.name} (its param_dtype; the network computes in "
                f"{policy.compute_dtype.name}), but params{jax.tree_util.keystr(path)} "
                f"has dtype {jnp.dtype(dtype).name}; initialize the parameters in "
                f"{policy.param_dtype.name} (the layers' default param_dtype)"
            )


def keep_dtypes(new: Any, old: Any) -> Any:
    """``new`` in the dtypes of ``old``: a network's updated state (BatchNorm's running
    statistics stay float32 whatever the compute dtype), or the hand rules' gradients in
    their parameters' dtypes (a rule computes in the promoted dtype of mixed inputs)."""
    if jax.tree_util.tree_structure(new) != jax.tree_util.tree_structure(old):
        return new
    return jax.tree_util.tree_map(
        lambda n, o: n.astype(o.dtype) if hasattr(n, "dtype") and hasattr(o, "dtype")
        and n.dtype != o.dtype else n, new, old)


def autodiff_value_and_grad_with_state(net: Any, loss_fn: Callable, precision: Any
                                       ) -> Callable:
    """``f(params, state, x, y, key=None, train=True) -> (loss, grads, new_state,
    outputs)`` by ``jax.value_and_grad`` under a mixed-precision ``precision``.

    The twin of ``funcnet.vjp.value_and_grad_with_state(..., precision=)``: inside the
    differentiated function the parameters and a floating ``x`` are cast to the compute
    dtype, the network runs (so autodiff's backward pass runs in that dtype too), its
    outputs are cast to the output dtype and the loss (times the loss scale) is computed
    there. ``loss`` is unscaled; ``grads`` are in the parameters' dtypes, unscaled;
    ``outputs`` in the output dtype; ``new_state`` in the dtypes of ``state``.
    """
    policy = get_policy(precision, "precision.autodiff_value_and_grad_with_state")
    if policy is None:
        raise ValueError("precision.autodiff_value_and_grad_with_state: precision must "
                         "not be None (use funcnet.train.autodiff_value_and_grad_with_state)")

    def f(params, state, x, y, key=None, train=True):
        x = policy.cast_to_compute(x)

        def objective(p):
            out, new_state = net.apply_with_state(policy.cast_to_compute(p), state, x,
                                                  key=key, train=train)
            out = policy.cast_to_output(out)
            loss = loss_fn(out, y)
            return policy.scale(loss), (loss, new_state, out)

        (_, (loss, new_state, out)), grads = jax.value_and_grad(objective, has_aux=True)(
            params)
        return loss, policy.unscale(grads, params), keep_dtypes(new_state, state), out

    return f


__all__ = [
    "FLOAT16_LOSS_SCALE",
    "NAMES",
    "Policy",
    "autodiff_value_and_grad_with_state",
    "cast_floating",
    "check_params",
    "get_policy",
    "keep_dtypes",
]
