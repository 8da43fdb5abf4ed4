"""Vision Transformer (Dosovitskiy et al., 2021) built from funcnet layers.

``vit_tiny()`` is timm's ``vit_tiny_patch16_224`` (DeiT-Ti): 5,717,416 parameters at
224 x 224 x 3. Count for width ``D``, ``L`` blocks, ``P`` patches of ``p x p x C``, MLP
width ``M`` and ``K`` classes:

- patch embedding ``p^2 C D + D``; class token ``D``; position table ``(P + 1) D``;
- per block: two LayerNorms ``4D``, attention ``4 D^2 + 4 D``, MLP ``2 D M + M + D``;
- final LayerNorm ``2D``; head ``D K + K``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from funcnet import _checks
from funcnet.nn.activation import GELU
from funcnet.nn.attention import ClassToken, MultiHeadSelfAttention, PositionEmbedding, TakeToken
from funcnet.nn.base import Layer
from funcnet.nn.combinators import Residual, Serial
from funcnet.nn.conv import Conv
from funcnet.nn.dense import Dense
from funcnet.nn.dropout import Dropout, _check_rate
from funcnet.nn.normalization import LayerNorm
from funcnet.nn.reshape import Reshape

#: ViT's LayerNorm epsilon (timm, the original JAX code).
EPSILON = 1e-6


def _dropout(rate: float) -> list[Layer]:
    return [Dropout(rate)] if rate > 0 else []


def encoder_block(width: int, heads: int, mlp_dim: int, dropout: float = 0.0) -> list[Layer]:
    """One pre-norm Transformer encoder block over ``(T, width)`` tokens, as two residuals:
    ``x + MHSA(LN(x))`` then ``x + MLP(LN(x))`` with ``MLP = Dense(mlp_dim), GELU,
    Dense(width)`` (Dropout after the attention and after each MLP Dense when ``dropout > 0``).
    """
    attention = [LayerNorm(epsilon=EPSILON), MultiHeadSelfAttention(heads), *_dropout(dropout)]
    mlp = [LayerNorm(epsilon=EPSILON), Dense(mlp_dim), GELU(), *_dropout(dropout),
           Dense(width), *_dropout(dropout)]
    return [Residual(Serial(attention)), Residual(Serial(mlp))]


def vit(
    num_classes: int = 1000,
    image_size: int = 224,
    patch: int = 16,
    width: int = 192,
    depth: int = 12,
    heads: int = 3,
    mlp_dim: int | None = None,
    channels: int = 3,
    dropout: float = 0.0,
) -> Serial:
    """A Vision Transformer classifier on ``(image_size, image_size, channels)`` images.

    ``Conv(width, patch, stride=patch)`` cuts the image into ``(image_size / patch)^2``
    patches, ``Reshape((-1, width))`` makes them tokens, then ``ClassToken``,
    ``PositionEmbedding`` (Dropout), ``depth`` pre-norm encoder blocks
    (:func:`encoder_block`), a final ``LayerNorm``, the class token (``TakeToken(0)``) and
    ``Dense(num_classes)`` (logits). ``mlp_dim`` defaults to ``4 * width``; ``image_size``
    must be a multiple of ``patch`` and ``width`` of ``heads``. The network (a
    :class:`VisionTransformer`, a ``Serial``) takes inputs of shape ``(image_size,
    image_size, channels)`` only: ``init`` and ``apply`` refuse any other.
    """
    where = "vit"
    num_classes, image_size, patch, width, depth, heads, channels = (
        _checks.positive_int(v, name, where)
        for v, name in [(num_classes, "num_classes"), (image_size, "image_size"),
                        (patch, "patch"), (width, "width"), (depth, "depth"),
                        (heads, "heads"), (channels, "channels")]
    )
    mlp_dim = 4 * width if mlp_dim is None else _checks.positive_int(mlp_dim, "mlp_dim", where)
    dropout = _check_rate(dropout, where + ": dropout")
    if image_size % patch:
        raise ValueError(
            f"{where}: image_size={image_size} is not a multiple of patch={patch}"
        )
    if width % heads:
        raise ValueError(f"{where}: width={width} is not divisible by heads={heads}")
    layers: list[Any] = [
        Conv(width, patch, stride=patch),
        Reshape((-1, width)),
        ClassToken(),
        PositionEmbedding(),
        *_dropout(dropout),
    ]
    for _ in range(depth):
        layers += encoder_block(width, heads, mlp_dim, dropout)
    layers += [LayerNorm(epsilon=EPSILON), TakeToken(0), Dense(num_classes)]
    return VisionTransformer(tuple(layers), image_size, channels)


@dataclasses.dataclass(frozen=True, repr=False)
class VisionTransformer(Serial):
    """The :class:`Serial` :func:`vit` builds, checking that its input is the image it was
    built for, ``(image_size, image_size, channels)``: the stride-``patch`` embedding would
    otherwise take any size, silently dropping the rows and columns a patch does not fill
    (a 30x30 image through 16x16 patches makes one patch of 16x16)."""

    image_size: int = 224
    channels: int = 3

    def output_shape(self, input_shape):
        shape = _checks.input_shape_tuple(input_shape, "vit")
        expected = (self.image_size, self.image_size, self.channels)
        if shape != expected:
            raise ValueError(f"vit: built for images of shape {expected} (image_size="
                             f"{self.image_size}, channels={self.channels}), got input shape "
                             f"{shape}")
        return super().output_shape(shape)


def vit_tiny(num_classes: int = 1000) -> Serial:
    """ViT-Ti/16 (timm's ``vit_tiny_patch16_224``): patch 16, width 192, depth 12,
    3 heads, MLP 768, for ``(224, 224, 3)`` images; 5,717,416 parameters with 1000
    classes."""
    return vit(num_classes, image_size=224, patch=16, width=192, depth=12, heads=3)
