"""funcnet: neural networks as pure functions over parameter pytrees, in JAX.

``import funcnet as fn`` gives the layers, the ``Serial`` combinator, ``summary`` and the
sub-modules ``fn.ops``, ``fn.losses`` and ``fn.regularizers``.
"""

from funcnet import losses, models, ops, regularizers
from funcnet.layers import (
    Activation,
    AvgPool,
    Conv,
    Dense,
    FeatureL2Pool,
    FeatureMaxPool,
    Flatten,
    L2Pool,
    Layer,
    LocallyConnected,
    LogSoftmax,
    LpPool,
    MaxPool,
    ReLU,
    Sigmoid,
    Softmax,
    Tanh,
)
from funcnet.nets import Serial
from funcnet.summary import Summary, param_count, summary

__version__ = "0.1.0"

__all__ = [
    "Activation",
    "AvgPool",
    "Conv",
    "Dense",
    "FeatureL2Pool",
    "FeatureMaxPool",
    "Flatten",
    "L2Pool",
    "Layer",
    "LocallyConnected",
    "LogSoftmax",
    "LpPool",
    "MaxPool",
    "ReLU",
    "Serial",
    "Sigmoid",
    "Softmax",
    "Summary",
    "Tanh",
    "losses",
    "models",
    "ops",
    "param_count",
    "regularizers",
    "summary",
]
