"""funcnet: neural networks as pure functions over parameter pytrees, in JAX.

``import funcnet as fn`` gives the layers, the ``Serial`` combinator, ``summary`` and the
sub-modules ``fn.ops``, ``fn.losses``, ``fn.regularizers``, ``fn.models``, ``fn.train``,
``fn.data``, ``fn.checkpoint``, ``fn.vjp`` (hand-written backward rules), ``fn.gradcheck``,
``fn.graph``, ``fn.export`` and ``fn.cache``.
"""

from funcnet import (
    cache,
    checkpoint,
    data,
    export,
    gradcheck,
    graph,
    losses,
    models,
    nn,
    ops,
    regularizers,
    train,
    vjp,
)
from funcnet.cache import enable_compilation_cache
from funcnet.layers import (
    Activation,
    AvgPool,
    Conv,
    Dense,
    FeatureL2Pool,
    FeatureMaxPool,
    Flatten,
    GlobalAvgPool,
    L2Pool,
    Layer,
    LocallyConnected,
    LogSoftmax,
    LpPool,
    MaxPool,
    ReLU,
    Reshape,
    Sigmoid,
    Softmax,
    Tanh,
)
from funcnet.nets import Parallel, Residual, Serial
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
    "GlobalAvgPool",
    "L2Pool",
    "Layer",
    "LocallyConnected",
    "LogSoftmax",
    "LpPool",
    "MaxPool",
    "Parallel",
    "ReLU",
    "Reshape",
    "Residual",
    "Serial",
    "Sigmoid",
    "Softmax",
    "Summary",
    "Tanh",
    "cache",
    "checkpoint",
    "data",
    "enable_compilation_cache",
    "export",
    "gradcheck",
    "graph",
    "losses",
    "models",
    "nn",
    "ops",
    "param_count",
    "regularizers",
    "summary",
    "train",
    "vjp",
]
