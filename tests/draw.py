"""Random test inputs drawn with NumPy and put on the device with ``jax.device_put``.

``jax.random.normal`` run eagerly compiles an XLA program per shape and dtype (about
0.1 s each at the tests' compile flags) for microseconds of work; inputs whose values are
arbitrary come from here instead. Float64 arrays stay float64 inside ``jax.enable_x64``.
"""

from __future__ import annotations

import math

import jax
import numpy as np


def normal(shape, seed=0, dtype=np.float32):
    """Standard normal draws of ``shape``."""
    return jax.device_put(np.random.default_rng(seed).normal(size=shape).astype(dtype))


def uniform(shape, seed=0, low=0.0, high=1.0, dtype=np.float32):
    """Uniform draws in ``[low, high)`` of ``shape``."""
    rng = np.random.default_rng(seed)
    return jax.device_put(rng.uniform(low, high, size=shape).astype(dtype))


def integers(shape, high, seed=0, dtype=np.int32):
    """Integers in ``[0, high)`` of ``shape``."""
    return jax.device_put(np.random.default_rng(seed).integers(0, high, size=shape, dtype=dtype))


def params(net, in_shape, seed=0, dtype=np.float32):
    """Random parameters of ``net``'s shapes for inputs ``in_shape``, drawn on the host:
    nothing to compile (``net.init`` compiles one program per network and input shape, a
    random generator per parameter); for tests whose parameters are arbitrary. Weights
    ``N(0, 1 / fan_in)``, vectors (biases, BatchNorm scales) ``1 + N(0, 0.1^2)``."""
    rng = np.random.default_rng(seed)

    def draw(s):
        if len(s.shape) >= 2:
            w = rng.normal(size=s.shape) / math.sqrt(math.prod(s.shape[:-1]))
        else:
            w = 1.0 + 0.1 * rng.normal(size=s.shape)
        return jax.device_put(w.astype(dtype))

    return jax.tree_util.tree_map(draw, net.param_shapes(in_shape))


def positive_params(net, in_shape, seed=0, dtype=np.float32):
    """Random parameters of ``net``'s shapes, each uniform in ``[0.1, 1)``: positive weights
    and biases (no unit's dependence on an input cancels or vanishes), drawn on the host."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda s: jax.device_put(rng.uniform(0.1, 1.0, size=s.shape).astype(dtype)),
        net.param_shapes(in_shape))
