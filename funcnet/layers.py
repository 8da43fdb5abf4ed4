"""The layer classes, re-exported from their families (``fn.layers.Conv is fn.Conv``).

The protocol every layer follows is documented in :mod:`funcnet.nn.base`.
Initializers (``jax.nn.initializers``, overridable per layer with ``w_init`` / ``b_init``):
weights ``lecun_normal()`` (variance ``1 / fan_in``, as Flax), biases ``zeros``. For deep
ReLU networks ``jax.nn.initializers.he_normal()`` is a common override.
"""

from funcnet.nn.activation import GELU, Activation, LogSoftmax, ReLU, Sigmoid, Softmax, Tanh
from funcnet.nn.attention import ClassToken, MultiHeadSelfAttention, PositionEmbedding, TakeToken
from funcnet.nn.base import (
    DEFAULT_B_INIT,
    DEFAULT_W_INIT,
    RF,
    Initializer,
    Layer,
    Shape,
)
from funcnet.nn.conv import LOCAL_W_INIT, Conv, LocallyConnected
from funcnet.nn.dense import Dense
from funcnet.nn.dropout import Dropout
from funcnet.nn.embedding import Embedding
from funcnet.nn.normalization import BatchNorm, LayerNorm, LocalResponseNorm
from funcnet.nn.pool import (
    AvgPool,
    FeatureL2Pool,
    FeatureMaxPool,
    GlobalAvgPool,
    L2Pool,
    LpPool,
    MaxPool,
)
from funcnet.nn.reshape import Flatten, Reshape

__all__ = [
    "DEFAULT_B_INIT",
    "DEFAULT_W_INIT",
    "GELU",
    "LOCAL_W_INIT",
    "RF",
    "Activation",
    "AvgPool",
    "BatchNorm",
    "ClassToken",
    "Conv",
    "Dense",
    "Dropout",
    "Embedding",
    "FeatureL2Pool",
    "FeatureMaxPool",
    "Flatten",
    "GlobalAvgPool",
    "Initializer",
    "L2Pool",
    "Layer",
    "LayerNorm",
    "LocalResponseNorm",
    "LocallyConnected",
    "LogSoftmax",
    "LpPool",
    "MaxPool",
    "MultiHeadSelfAttention",
    "PositionEmbedding",
    "ReLU",
    "Reshape",
    "Shape",
    "Sigmoid",
    "Softmax",
    "TakeToken",
    "Tanh",
]
