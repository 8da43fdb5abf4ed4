"""Embedding: a lookup table from integer ids to learned vectors, ``y = W[ids]``.

The lookup is the product of a one-hot row with the table, ``y = onehot(id) W``, done as a
gather. Its rule is that product's ``dW = onehot^T g``: a scatter-add of each upstream
row into the row of its id, so an id used several times collects the sum of its rows'
gradients. The ids are integers and get no gradient (``None``, as integer labels in
:mod:`funcnet.nn.losses`).

Out-of-range ids: an id outside ``[0, num_embeddings)`` (negative ones included; they
do not wrap around as in numpy) gives a row of NaN rather than a silently clamped row
(a plain JAX gather clamps its indices), so a bad id shows up as a non-finite loss
(``fit`` stops on one); its gradient is dropped. The :class:`Embedding` layer raises a
``ValueError`` on such ids when they are concrete (outside ``jit``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from funcnet import _checks
from funcnet.nn.base import (
    RF,
    Initializer,
    Layer,
    Rule,
    Shape,
    check_init_fn,
    check_param_dtype,
    static,
)

DEFAULT_EMBEDDING_INIT: Initializer = jax.nn.initializers.normal(1.0)

# ---------------------------------------------------------------------------------------
# The op
# ---------------------------------------------------------------------------------------


def _check_ids(ids: Any, where: str) -> None:
    dtype = jnp.result_type(ids)
    if not jnp.issubdtype(dtype, jnp.integer):
        raise TypeError(
            f"{where}: ids must have an integer dtype (e.g. int32), got {dtype}; an embedding "
            f"takes token ids, not features"
        )


def embedding(ids: jax.Array, table: jax.Array) -> jax.Array:
    """The rows of ``table`` at ``ids``.

    Args:
      ids: ``(N, ...)`` integer ids in ``[0, num_embeddings)``.
      table: ``(num_embeddings, features)``, floating.

    Returns:
      ``(N, ..., features)``: ``y[n, ..., :] = table[ids[n, ...], :]``; a NaN row for an
      id out of range.
    """
    _check_ids(ids, "embedding")
    _checks.check_rank(jnp.shape(table), 2, "table", "embedding", "num_embeddings, features")
    _checks.check_floating(table, "table", "embedding")
    # mode="fill": an out-of-range id gives NaN, where a plain gather would clamp it;
    # wrap_negative_indices=False: -1 is out of range too, not the last row
    return table.at[ids].get(mode="fill", fill_value=jnp.nan, wrap_negative_indices=False)


# ---------------------------------------------------------------------------------------
# Its rule: dL/dtable = scatter-add of g into the rows of ids; no gradient for the ids
# ---------------------------------------------------------------------------------------


@static
class TableShape:
    shape: tuple[int, int]  # (num_embeddings, features)


class EmbeddingResiduals(NamedTuple):
    ids: jax.Array  # (N, ...) int
    table: TableShape  # static: bwd needs only the table's shape (and the dtype of g)


def embedding_fwd(ids: jax.Array, table: jax.Array):
    """``(y, residuals)``: ``y = table[ids]`` of shape ``(N, ..., features)``."""
    return embedding(ids, table), EmbeddingResiduals(ids, TableShape(tuple(table.shape)))


def embedding_table_grad(res: EmbeddingResiduals, g: jax.Array) -> jax.Array:
    """``dL/dtable`` of shape ``(num_embeddings, features)``: row ``k`` is the sum of the
    rows of ``g`` (``(N, ..., features)``) where ``ids == k``; out-of-range ids add nothing."""
    zeros = jnp.zeros(res.table.shape, g.dtype)
    return zeros.at[res.ids].add(g, mode="drop", wrap_negative_indices=False)


def embedding_bwd(res: EmbeddingResiduals, g: jax.Array):
    """``(None, dL/dtable)``: the integer ids get no gradient."""
    return None, embedding_table_grad(res, g)


RULES = {embedding: Rule(embedding_fwd, embedding_bwd, ("ids", "table"))}


# ---------------------------------------------------------------------------------------
# The layer
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, repr=False)
class Embedding(Layer):
    """A learned vector per integer id: ``y = W[ids]`` (``onehot(id) W``).

    Params: ``w`` of shape ``(num_embeddings, features)`` (named ``w`` so the default
    regularizer mask, :func:`funcnet.regularizers.weights_mask`, penalises it as a weight;
    initialised with ``w_init``, default ``normal(1.0)`` as PyTorch).
    Input ``(N, ...)`` integer ids -> output ``(N, ..., features)`` in ``param_dtype``;
    e.g. a sequence ``(N, T)`` -> ``(N, T, features)``.

    The input must be integer (a ``TypeError`` otherwise). Ids outside
    ``[0, num_embeddings)`` raise a ``ValueError`` when concrete; under ``jit`` they give
    rows of NaN (see the module docstring). There is no gradient w.r.t. the ids: the
    layer rule's ``dx`` is always ``None``.
    """

    num_embeddings: int
    features: int
    w_init: Initializer = DEFAULT_EMBEDDING_INIT
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        where = type(self).__name__
        for name in ("num_embeddings", "features"):
            object.__setattr__(self, name, _checks.positive_int(getattr(self, name), name, where))
        check_init_fn(self.w_init, "w_init", where)
        check_param_dtype(self.param_dtype, where)

    def output_shape(self, input_shape: Shape) -> Shape:
        return (*super().output_shape(input_shape), self.features)

    def param_specs(self, input_shape: Shape) -> dict[str, Shape]:
        self.output_shape(input_shape)
        return {"w": (self.num_embeddings, self.features)}

    def takes_integers(self) -> bool:
        return True

    def check_input(self, x: Any) -> jax.Array:
        """Integer ids ``(N, ...)`` (not floats: an embedding indexes, it does not scale)."""
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            x = jnp.asarray(x)
        if x.ndim < 1:
            raise ValueError(f"{self!r}: expected a batched input (N, ...), got a scalar")
        if not jnp.issubdtype(x.dtype, jnp.integer):
            raise TypeError(
                f"{self!r}: input ids must have an integer dtype (e.g. int32), got {x.dtype}; "
                f"an Embedding takes token ids, not features"
            )
        return x

    def check_values(self, x: Any) -> None:
        if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.integer):
            self._check_range(x)  # ids reach an Embedding unchanged (or only reshaped)

    def _check_range(self, ids: jax.Array) -> None:
        if isinstance(ids, jax.core.Tracer):
            return  # values unknown under tracing: out-of-range ids give NaN rows
        arr = np.asarray(ids)
        if arr.size and (arr.min() < 0 or arr.max() >= self.num_embeddings):
            raise ValueError(
                f"{self!r}: ids must lie in [0, {self.num_embeddings}), got values in "
                f"[{arr.min()}, {arr.max()}]"
            )

    def forward(self, params, state, x, *, key=None, train=False):
        self._check_range(x)
        return embedding(x, params["w"]), state

    # the layer rule: the op rule; dx is None always (no gradient w.r.t. integer ids)
    def fwd(self, params, state, x, *, key=None, train=False):
        self._check_range(x)
        y, res = embedding_fwd(x, params["w"])
        return y, state, res

    def bwd(self, res, g, need_dx):
        return None, {"w": embedding_table_grad(res, g)}

    # metadata: a gather, no arithmetic
    def flops(self, input_shape: Shape) -> tuple[int, int]:
        return 0, 0

    def receptive_field(self, input_shape: Shape, rf: RF) -> RF:
        # each output vector sees exactly its own id: the ids' positions are kept
        return rf
