"""Pure forward math on arrays (batched NHWC): dense, conv, pooling, activations."""

from funcnet.ops.activation import log_softmax, relu, sigmoid, softmax, tanh
from funcnet.ops.conv import conv2d, extract_patches, locally_connected2d
from funcnet.ops.dense import dense
from funcnet.ops.pool import (
    avg_pool,
    feature_l2_pool,
    feature_max_pool,
    l2_pool,
    lp_pool,
    max_pool,
    sum_pool,
)

__all__ = [
    "avg_pool",
    "conv2d",
    "dense",
    "extract_patches",
    "feature_l2_pool",
    "feature_max_pool",
    "l2_pool",
    "locally_connected2d",
    "log_softmax",
    "lp_pool",
    "max_pool",
    "relu",
    "sigmoid",
    "softmax",
    "sum_pool",
    "tanh",
]
