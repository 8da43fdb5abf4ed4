"""Transformer layers: multi-head self-attention, a class token, a learned position
embedding and taking one token out.

=========================  ==========================================  =====================
op                         forward (``x``: ``(N, T, D)``)              rule
=========================  ==========================================  =====================
multi_head_self_attention  ``softmax(Q K^T / sqrt(d)) V W_out + b``    by hand, below
class_token                ``[token; x]``: ``(N, T + 1, D)``           ``dx = g[:, 1:]``
position_embedding         ``x + table``                               ``dx = g``
take_token                 ``x[:, index]``: ``(N, D)``                 ``g`` put back
=========================  ==========================================  =====================

Self-attention follows PyTorch's ``nn.MultiheadAttention`` parameterisation (with
``batch_first=True``, ``q = k = v = x``): ``[Q K V] = x W_qkv + b_qkv`` with ``W_qkv``
``(D, 3D)`` (``in_proj_weight.T``: columns ``[0, D)`` give the queries, ``[D, 2D)`` the keys,
``[2D, 3D)`` the values; head ``h`` owns columns ``[h d, (h + 1) d)`` of each, ``d = D / H``),
then ``out = Y W_out + b_out`` with ``W_out`` ``(D, D)`` (``out_proj.weight.T``).
"""

from __future__ import annotations

import dataclasses
import math
import operator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from funcnet import _checks
from funcnet._eager import compiled_when_eager
from funcnet.nn.base import (
    DEFAULT_B_INIT,
    DEFAULT_W_INIT,
    RF,
    Initializer,
    Layer,
    Rule,
    Shape,
    check_init_fn,
    check_param_dtype,
    downcast,
    static,
    upcast,
)

# ---------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------


def _array(x: Any, what: str, where: str) -> jax.Array:
    x = _checks.as_array(x, what, where)
    _checks.check_floating(x, what, where)
    return x


def _sequence(x: Any, where: str) -> jax.Array:
    """A batched sequence ``(N, T, D)``, else an error naming ``where``."""
    x = _array(x, "input x", where)
    if x.ndim != 3:
        raise ValueError(
            f"{where}: expected an input x of shape (N, T, D) (batch, tokens, features), "
            f"got shape {x.shape}"
        )
    return x


def _check_shape(a: jax.Array | None, shape: tuple, what: str, where: str) -> None:
    if a is not None and tuple(a.shape) != tuple(shape):
        raise ValueError(f"{where}: expected {what} of shape {tuple(shape)}, got {a.shape}")


def _heads(num_heads: Any, d: int, where: str) -> int:
    num_heads = _checks.positive_int(num_heads, "num_heads", where)
    if d % num_heads:
        raise ValueError(
            f"{where}: the {d} features are not divisible by num_heads={num_heads} "
            f"(each head gets D / num_heads features)"
        )
    return num_heads


def _split_heads(z: jax.Array, h: int) -> jax.Array:
    """``(N, T, D) -> (N, H, T, D / H)``."""
    n, t, d = z.shape
    return z.reshape(n, t, h, d // h).transpose(0, 2, 1, 3)


def _merge_heads(z: jax.Array) -> jax.Array:
    """``(N, H, T, d) -> (N, T, H d)``."""
    n, h, t, d = z.shape
    return z.transpose(0, 2, 1, 3).reshape(n, t, h * d)


def _param_grads(x: jax.Array, g: jax.Array, with_bias: bool):
    """``(x^T g, sum g)`` over every leading axis of ``x (..., in)`` and ``g (..., out)``."""
    x2 = x.reshape(-1, x.shape[-1])
    g2 = g.reshape(-1, g.shape[-1])
    return x2.T @ g2, (jnp.sum(g2, axis=0) if with_bias else None)


# ---------------------------------------------------------------------------------------
# Multi-head self-attention: the op and its rule
# ---------------------------------------------------------------------------------------


def _mhsa_checked(x, w_qkv, b_qkv, w_out, b_out, num_heads):
    where = "multi_head_self_attention"
    x = _sequence(x, where)
    d = x.shape[-1]
    w_qkv = _array(w_qkv, "w_qkv", where)
    w_out = _array(w_out, "w_out", where)
    b_qkv = None if b_qkv is None else _array(b_qkv, "b_qkv", where)
    b_out = None if b_out is None else _array(b_out, "b_out", where)
    _check_shape(w_qkv, (d, 3 * d), "w_qkv (D, 3D)", where)
    _check_shape(b_qkv, (3 * d,), "b_qkv (3D,)", where)
    _check_shape(w_out, (d, d), "w_out (D, D)", where)
    _check_shape(b_out, (d,), "b_out (D,)", where)
    return x, w_qkv, b_qkv, w_out, b_out, _heads(num_heads, d, where)


def _attend(x, w_qkv, b_qkv, w_out, b_out, h):
    """The forward pass; returns the output and every intermediate the rule needs."""
    d = x.shape[-1]
    qkv = x @ w_qkv
    if b_qkv is not None:
        qkv = qkv + b_qkv
    q, k, v = (_split_heads(qkv[..., i * d:(i + 1) * d], h) for i in range(3))
    scale = 1.0 / math.sqrt(d // h)
    s = jnp.einsum("nhqe,nhke->nhqk", q, k) * scale
    a = downcast(jax.nn.softmax(upcast(s), axis=-1), s)  # float32 inside for bfloat16
    y = _merge_heads(jnp.einsum("nhqk,nhke->nhqe", a, v))
    out = y @ w_out
    if b_out is not None:
        out = out + b_out
    return out, (q, k, v, a, y)


@compiled_when_eager()
def multi_head_self_attention(
    x: jax.Array,
    w_qkv: jax.Array,
    b_qkv: jax.Array | None,
    w_out: jax.Array,
    b_out: jax.Array | None,
    num_heads: int,
) -> jax.Array:
    """Multi-head scaled dot-product self-attention (Vaswani et al., 2017).

    Args:
      x: ``(N, T, D)`` tokens.
      w_qkv: ``(D, 3D)`` in-projection; b_qkv: ``(3D,)`` or ``None``.
      w_out: ``(D, D)`` out-projection; b_out: ``(D,)`` or ``None``.
      num_heads: ``H``, a positive divisor of ``D``.

    Returns:
      ``(N, T, D)``: per head ``A = softmax(Q K^T / sqrt(D/H))`` over the keys,
      ``Y = A V`` with the heads concatenated, then ``Y W_out + b_out``.
    """
    return _attend(*_mhsa_checked(x, w_qkv, b_qkv, w_out, b_out, num_heads))[0]


@static
class Heads:
    num_heads: int


class AttentionResiduals(NamedTuple):
    x: jax.Array  # (N, T, D) the input
    w_qkv: jax.Array  # (D, 3D)
    w_out: jax.Array  # (D, D)
    q: jax.Array  # (N, H, T, d) each
    k: jax.Array
    v: jax.Array
    a: jax.Array  # (N, H, T, T) the attention weights
    y: jax.Array  # (N, T, D) the heads' outputs, merged (the out-projection's input)
    has_b_qkv: Any  # static bools: whether each bias gets a gradient
    has_b_out: Any
    heads: Heads


@static
class Flag:
    value: bool


def multi_head_self_attention_fwd(x, w_qkv, b_qkv, w_out, b_out, num_heads):
    """``(out, residuals)`` of :func:`multi_head_self_attention`."""
    x, w_qkv, b_qkv, w_out, b_out, h = _mhsa_checked(x, w_qkv, b_qkv, w_out, b_out, num_heads)
    out, (q, k, v, a, y) = _attend(x, w_qkv, b_qkv, w_out, b_out, h)
    return out, AttentionResiduals(
        x, w_qkv, w_out, q, k, v, a, y, Flag(b_qkv is not None), Flag(b_out is not None),
        Heads(h),
    )


def attention_param_and_input_grads(res: AttentionResiduals, g: jax.Array, need_dx: bool):
    """``(dx, dW_qkv, db_qkv, dW_out, db_out)`` for upstream ``g`` of shape ``(N, T, D)``.

    Out-projection: ``dY = g W_out^T``, ``dW_out = Y^T g``, ``db_out = sum g``.
    ``Y = A V``: ``dA = dY V^T``, ``dV = A^T dY``. Softmax over the keys:
    ``dS = A (dA - sum_k dA A)``; ``S = Q K^T s``: ``dQ = s dS K``, ``dK = s dS^T Q``.
    In-projection: ``dqkv = [dQ dK dV]`` (heads merged), ``dx = dqkv W_qkv^T``,
    ``dW_qkv = x^T dqkv``, ``db_qkv = sum dqkv``.
    """
    d = res.x.shape[-1]
    scale = 1.0 / math.sqrt(d // res.heads.num_heads)
    dw_out, db_out = _param_grads(res.y, g, res.has_b_out.value)
    dy = _split_heads(g @ res.w_out.T, res.heads.num_heads)  # (N, H, T, d)
    da = jnp.einsum("nhqe,nhke->nhqk", dy, res.v)
    dv = jnp.einsum("nhqk,nhqe->nhke", res.a, dy)
    a, da32 = upcast(res.a), upcast(da)  # the softmax's sum in float32 for bfloat16
    ds = downcast(a * (da32 - jnp.sum(da32 * a, axis=-1, keepdims=True)) * scale, da)
    dq = jnp.einsum("nhqk,nhke->nhqe", ds, res.k)
    dk = jnp.einsum("nhqk,nhqe->nhke", ds, res.q)
    dqkv = jnp.concatenate([_merge_heads(dq), _merge_heads(dk), _merge_heads(dv)], axis=-1)
    dw_qkv, db_qkv = _param_grads(res.x, dqkv, res.has_b_qkv.value)
    dx = dqkv @ res.w_qkv.T if need_dx else None
    return dx, dw_qkv, db_qkv, dw_out, db_out


def multi_head_self_attention_bwd(res: AttentionResiduals, g: jax.Array):
    """``(dx, dW_qkv, db_qkv, dW_out, db_out)``; absent biases get ``None``."""
    return attention_param_and_input_grads(res, g, True)


# ---------------------------------------------------------------------------------------
# Class token, position embedding, taking a token: the ops and their rules
# ---------------------------------------------------------------------------------------


@compiled_when_eager()
def class_token(x: jax.Array, token: jax.Array) -> jax.Array:
    """``(N, T, D), (1, D) -> (N, T + 1, D)``: ``token`` prepended to every sequence."""
    where = "class_token"
    x = _sequence(x, where)
    token = _array(token, "token", where)
    _check_shape(token, (1, x.shape[-1]), "token (1, D)", where)
    lead = jnp.broadcast_to(token.astype(x.dtype)[None], (x.shape[0], 1, x.shape[-1]))
    return jnp.concatenate([lead, x], axis=1)


class ClassTokenResiduals(NamedTuple):
    pass  # the rule is pure bookkeeping: it needs no arrays


def class_token_fwd(x: jax.Array, token: jax.Array):
    return class_token(x, token), ClassTokenResiduals()


def class_token_bwd(res: ClassTokenResiduals, g: jax.Array):
    """``(g[:, 1:], sum_n g[n, :1])``."""
    return g[:, 1:], jnp.sum(g[:, :1], axis=0)


@compiled_when_eager()
def position_embedding(x: jax.Array, table: jax.Array) -> jax.Array:
    """``(N, T, D) + (T, D) -> (N, T, D)``: a learned table added to every sequence."""
    where = "position_embedding"
    x = _sequence(x, where)
    table = _array(table, "table", where)
    _check_shape(table, x.shape[1:], "table (T, D)", where)
    return x + table


class PositionEmbeddingResiduals(NamedTuple):
    pass


def position_embedding_fwd(x: jax.Array, table: jax.Array):
    return position_embedding(x, table), PositionEmbeddingResiduals()


def position_embedding_bwd(res: PositionEmbeddingResiduals, g: jax.Array):
    """``(g, sum_n g)``."""
    return g, jnp.sum(g, axis=0)


def _index(index: Any, where: str) -> int:
    if isinstance(index, bool):
        raise TypeError(f"{where}: index must be an int, got {index!r}")
    try:
        return operator.index(index)
    except TypeError:
        raise TypeError(f"{where}: index must be an int, got {index!r}") from None


def _token_index(index: Any, t: int, where: str) -> int:
    index = _index(index, where)
    if not -t <= index < t:
        raise ValueError(f"{where}: token index {index} is out of range for {t} tokens")
    return index % t


@compiled_when_eager()
def take_token(x: jax.Array, index: int = 0) -> jax.Array:
    """``(N, T, D) -> (N, D)``: token ``index`` of every sequence (ViT's class token)."""
    where = "take_token"
    x = _sequence(x, where)
    return x[:, _token_index(index, x.shape[1], where)]


@static
class TokenMeta:
    index: int
    shape: tuple[int, ...]


class TakeTokenResiduals(NamedTuple):
    meta: TokenMeta
    dtype: Any


@static
class DType:
    dtype: Any


def take_token_fwd(x: jax.Array, index: int = 0):
    y = take_token(x, index)
    i = _token_index(index, x.shape[1], "take_token")
    return y, TakeTokenResiduals(TokenMeta(i, tuple(x.shape)), DType(x.dtype))


def take_token_bwd(res: TakeTokenResiduals, g: jax.Array):
    """``(zeros with g at token index,)``."""
    dx = jnp.zeros(res.meta.shape, res.dtype.dtype)
    return (dx.at[:, res.meta.index].set(g.astype(res.dtype.dtype)),)


RULES = {
    multi_head_self_attention: Rule(
        multi_head_self_attention_fwd, multi_head_self_attention_bwd,
        ("x", "w_qkv", "b_qkv", "w_out", "b_out"),
    ),
    class_token: Rule(class_token_fwd, class_token_bwd, ("x", "token")),
    position_embedding: Rule(position_embedding_fwd, position_embedding_bwd, ("x", "table")),
    take_token: Rule(take_token_fwd, take_token_bwd, ("x",)),
}


# ---------------------------------------------------------------------------------------
# The layers
# ---------------------------------------------------------------------------------------


def _token_shape(layer: Layer, input_shape: Shape) -> Shape:
    """A validated unbatched ``(T, D)``."""
    shape = _checks.input_shape_tuple(input_shape, repr(layer))
    if len(shape) != 2:
        raise ValueError(
            f"{layer!r}: expected an input shape (T, D) (tokens, features; no batch "
            f"dimension), got {shape}"
        )
    return shape


def _grid_ends(input_shape: Shape, rf: RF) -> RF:
    """Tokens keep their fields, but a grid no longer lines up with them."""
    return rf.flatten(input_shape) if rf.tracked and rf.grid else rf


@dataclasses.dataclass(frozen=True, repr=False)
class MultiHeadSelfAttention(Layer):
    """Multi-head self-attention over ``(T, D)`` tokens, as ``torch.nn.MultiheadAttention``
    (``batch_first=True``, ``q = k = v = x``).

    Params: ``w_qkv`` ``(D, 3D)``, ``b_qkv`` ``(3D,)``, ``w_out`` ``(D, D)``, ``b_out``
    ``(D,)``: ``4 D^2 + 4 D``. Input ``(N, T, D)`` -> ``(N, T, D)``; ``D`` divisible by
    ``num_heads``.

    FLOPs: the four matrix products ``2 T D 3D`` (in-projection) ``+ 2 T^2 D``
    (``Q K^T``) ``+ 2 T^2 D`` (``A V``) ``+ 2 T D^2`` (out-projection), and the softmax
    ``4`` per score (``H T^2`` of them) with one ``exp`` each (transcendental); the bias
    adds and the ``1/sqrt(d)`` scaling are not counted.

    Receptive field: every token sees every token, so the whole input.
    """

    num_heads: int
    w_init: Initializer = DEFAULT_W_INIT
    b_init: Initializer = DEFAULT_B_INIT
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        where = type(self).__name__
        object.__setattr__(
            self, "num_heads", _checks.positive_int(self.num_heads, "num_heads", where))
        check_init_fn(self.w_init, "w_init", where)
        check_init_fn(self.b_init, "b_init", where)
        check_param_dtype(self.param_dtype, where)

    def output_shape(self, input_shape: Shape) -> Shape:
        shape = _token_shape(self, input_shape)
        _heads(self.num_heads, shape[1], repr(self))
        return shape

    def param_specs(self, input_shape: Shape) -> dict[str, Shape]:
        d = self.output_shape(input_shape)[1]
        return {"w_qkv": (d, 3 * d), "b_qkv": (3 * d,), "w_out": (d, d), "b_out": (d,)}

    def initializers(self) -> dict[str, Initializer]:
        return {"w_qkv": self.w_init, "b_qkv": self.b_init, "w_out": self.w_init,
                "b_out": self.b_init}

    def _args(self, params):
        return (params["w_qkv"], params["b_qkv"], params["w_out"], params["b_out"],
                self.num_heads)

    def forward(self, params, state, x, *, key=None, train=False):
        return multi_head_self_attention(x, *self._args(params)), state

    def fwd(self, params, state, x, *, key=None, train=False):
        y, res = multi_head_self_attention_fwd(x, *self._args(params))
        return y, state, res

    def bwd(self, res, g, need_dx):
        dx, dw_qkv, db_qkv, dw_out, db_out = attention_param_and_input_grads(res, g, need_dx)
        return dx, {"w_qkv": dw_qkv, "b_qkv": db_qkv, "w_out": dw_out, "b_out": db_out}

    def flops(self, input_shape: Shape) -> tuple[int, int]:
        t, d = self.output_shape(input_shape)
        matmuls = 2 * t * d * 3 * d + 2 * t * t * d + 2 * t * t * d + 2 * t * d * d
        scores = self.num_heads * t * t
        return matmuls + 4 * scores, scores

    def receptive_field(self, input_shape: Shape, rf: RF) -> RF:
        return rf.whole() if rf.tracked else rf


@dataclasses.dataclass(frozen=True, repr=False)
class ClassToken(Layer):
    """Prepends a learned token (ViT's ``[class]``): ``(N, T, D) -> (N, T + 1, D)``.

    Params: ``token`` ``(1, D)`` (zeros by default). No FLOPs. Receptive field: every
    token keeps its own (the class token sees nothing yet); a grid no longer lines up.
    """

    token_init: Initializer = jax.nn.initializers.zeros
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        check_init_fn(self.token_init, "token_init", type(self).__name__)
        check_param_dtype(self.param_dtype, type(self).__name__)

    def output_shape(self, input_shape: Shape) -> Shape:
        t, d = _token_shape(self, input_shape)
        return (t + 1, d)

    def param_specs(self, input_shape: Shape) -> dict[str, Shape]:
        return {"token": (1, self.output_shape(input_shape)[1])}

    def initializers(self) -> dict[str, Initializer]:
        return {"token": self.token_init}

    def forward(self, params, state, x, *, key=None, train=False):
        return class_token(x, params["token"]), state

    def fwd(self, params, state, x, *, key=None, train=False):
        y, res = class_token_fwd(x, params["token"])
        return y, state, res

    def bwd(self, res, g, need_dx):
        dx, dtoken = class_token_bwd(res, g)
        return (dx if need_dx else None), {"token": dtoken}

    def flops(self, input_shape: Shape) -> tuple[int, int]:
        self.output_shape(input_shape)
        return 0, 0

    def receptive_field(self, input_shape: Shape, rf: RF) -> RF:
        return _grid_ends(input_shape, rf)


#: ViT's position-embedding initializer: normal with standard deviation 0.02.
POSITION_INIT: Initializer = jax.nn.initializers.normal(0.02)


@dataclasses.dataclass(frozen=True, repr=False)
class PositionEmbedding(Layer):
    """Adds a learned ``(T, D)`` table to every sequence: ``(N, T, D) -> (N, T, D)``.

    Params: ``table`` ``(T, D)`` (normal, standard deviation 0.02, as ViT). FLOPs: ``T D``
    adds. Receptive field unchanged.
    """

    table_init: Initializer = POSITION_INIT
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        check_init_fn(self.table_init, "table_init", type(self).__name__)
        check_param_dtype(self.param_dtype, type(self).__name__)

    def output_shape(self, input_shape: Shape) -> Shape:
        return _token_shape(self, input_shape)

    def param_specs(self, input_shape: Shape) -> dict[str, Shape]:
        return {"table": self.output_shape(input_shape)}

    def initializers(self) -> dict[str, Initializer]:
        return {"table": self.table_init}

    def forward(self, params, state, x, *, key=None, train=False):
        return position_embedding(x, params["table"]), state

    def fwd(self, params, state, x, *, key=None, train=False):
        y, res = position_embedding_fwd(x, params["table"])
        return y, state, res

    def bwd(self, res, g, need_dx):
        dx, dtable = position_embedding_bwd(res, g)
        return (dx if need_dx else None), {"table": dtable}

    def flops(self, input_shape: Shape) -> tuple[int, int]:
        return math.prod(self.output_shape(input_shape)), 0

    def receptive_field(self, input_shape: Shape, rf: RF) -> RF:
        return rf


@dataclasses.dataclass(frozen=True, repr=False)
class TakeToken(Layer):
    """Token ``index`` of each sequence (ViT's class token): ``(N, T, D) -> (N, D)``.

    No params, no FLOPs. Receptive field: that token's (a grid ends).
    """

    index: int = 0

    def __post_init__(self):
        object.__setattr__(self, "index", _index(self.index, type(self).__name__))

    def output_shape(self, input_shape: Shape) -> Shape:
        t, d = _token_shape(self, input_shape)
        _token_index(self.index, t, repr(self))
        return (d,)

    def forward(self, params, state, x, *, key=None, train=False):
        return take_token(x, self.index), state

    def fwd(self, params, state, x, *, key=None, train=False):
        y, res = take_token_fwd(x, self.index)
        return y, state, res

    def bwd(self, res, g, need_dx):
        return (take_token_bwd(res, g)[0] if need_dx else None), {}

    def flops(self, input_shape: Shape) -> tuple[int, int]:
        self.output_shape(input_shape)
        return 0, 0

    def receptive_field(self, input_shape: Shape, rf: RF) -> RF:
        return _grid_ends(input_shape, rf)
