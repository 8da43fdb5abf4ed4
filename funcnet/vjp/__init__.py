"""Hand-written backward rules (``funcnet.vjp``), mirrored by file name with the forward.

``ops/dense.py <-> vjp/dense.py``, ``ops/conv.py <-> vjp/conv.py``, ``ops/pool.py <->
vjp/pool.py``, ``ops/activation.py <-> vjp/activation.py``, ``losses.py <->
vjp/losses.py``, ``regularizers.py <-> vjp/regularizers.py``; ``vjp/gates.py`` holds the
lecture's scalar gates. Each op has a pair in the ``jax.custom_vjp`` convention,
``<op>_fwd(*args) -> (out, residuals)`` and ``<op>_bwd(residuals, g) -> cotangents``,
collected in the one table :data:`RULES`. From it:

- :func:`manual` — an op wrapped in ``jax.custom_vjp`` with its hand rule;
- :func:`value_and_grad` — explicit back-propagation through a ``Serial``, layer by
  layer (:data:`LAYER_RULES`), same result structure as ``jax.value_and_grad``;
- :func:`regularizer_value_and_grad`, ``regularizers.l2_grad`` / ``l1_grad`` — the
  ``grad Omega`` of the lecture's update ``Delta = -grad l - lambda grad Omega``.
"""

from funcnet.vjp import activation, conv, dense, gates, losses, pool, regularizers
from funcnet.vjp._common import Rule
from funcnet.vjp.network import (
    LAYER_RULES,
    LayerRule,
    layer_rule,
    regularizer_value_and_grad,
    value_and_grad,
)
from funcnet.vjp.table import RULES, manual, rule_for

__all__ = [
    "LAYER_RULES",
    "RULES",
    "LayerRule",
    "Rule",
    "activation",
    "conv",
    "dense",
    "gates",
    "layer_rule",
    "losses",
    "manual",
    "pool",
    "regularizer_value_and_grad",
    "regularizers",
    "rule_for",
    "value_and_grad",
]
