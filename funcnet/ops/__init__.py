"""Pure forward math on arrays (batched NHWC), re-exported from the layer families.

``fn.ops.conv2d`` is :func:`funcnet.nn.conv.conv2d`; ``fn.ops.conv`` (and ``pool``,
``activation``) is the whole family module.
"""

from funcnet.nn import activation, conv, pool  # noqa: F401 - the family modules
from funcnet.nn.activation import gelu, log_softmax, relu, sigmoid, softmax, tanh
from funcnet.nn.attention import (
    class_token,
    multi_head_self_attention,
    position_embedding,
    take_token,
)
from funcnet.nn.conv import conv2d, extract_patches, locally_connected2d
from funcnet.nn.dense import dense
from funcnet.nn.dropout import dropout
from funcnet.nn.embedding import embedding
from funcnet.nn.normalization import (
    batch_norm_eval,
    batch_norm_train,
    layer_norm,
    local_response_norm,
)
from funcnet.nn.pool import (
    avg_pool,
    feature_l2_pool,
    feature_max_pool,
    global_avg_pool,
    l2_pool,
    lp_pool,
    max_pool,
    sum_pool,
)
from funcnet.nn.reshape import flatten, reshape

__all__ = [
    "avg_pool",
    "batch_norm_eval",
    "batch_norm_train",
    "class_token",
    "conv2d",
    "dense",
    "dropout",
    "embedding",
    "extract_patches",
    "feature_l2_pool",
    "feature_max_pool",
    "flatten",
    "gelu",
    "global_avg_pool",
    "l2_pool",
    "layer_norm",
    "local_response_norm",
    "locally_connected2d",
    "log_softmax",
    "lp_pool",
    "max_pool",
    "multi_head_self_attention",
    "position_embedding",
    "relu",
    "reshape",
    "sigmoid",
    "softmax",
    "sum_pool",
    "take_token",
    "tanh",
]
