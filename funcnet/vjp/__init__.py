"""Hand-written backward rules (``funcnet.vjp``), re-exported from the layer families.

Each family module (:mod:`funcnet.nn.conv`, ...) holds its ops' rule pairs in the
``jax.custom_vjp`` convention, ``<op>_fwd(*args) -> (out, residuals)`` and
``<op>_bwd(residuals, g) -> cotangents``, next to the op; ``fn.vjp.conv`` (``dense``,
``pool``, ``activation``, ``reshape``, ``losses``, ``regularizers``) is that module and
``vjp/gates.py`` holds the lecture's scalar gates. They are collected in the one table
:data:`RULES`. From it:

- :func:`manual` — an op wrapped in ``jax.custom_vjp`` with its hand rule;
- :func:`value_and_grad` / :func:`value_and_grad_with_state` — explicit
  back-propagation through a network, each layer with its own rule (``layer.fwd`` /
  ``layer.bwd``), same result structure as ``jax.value_and_grad``;
- :func:`regularizer_value_and_grad`, ``regularizers.l2_grad`` / ``l1_grad`` — the
  ``grad Omega`` of the lecture's update ``Delta = -grad l - lambda grad Omega``.
"""

from funcnet.nn import (
    activation,
    attention,
    conv,
    dense,
    dropout,
    embedding,
    losses,
    normalization,
    pool,
    regularizers,
    reshape,
)
from funcnet.nn.base import Rule
from funcnet.vjp import gates
from funcnet.vjp.network import (
    LayerRule,
    layer_rule,
    regularizer_value_and_grad,
    value_and_grad,
    value_and_grad_with_state,
)
from funcnet.vjp.table import RULES, manual, rule_for

__all__ = [
    "RULES",
    "LayerRule",
    "Rule",
    "activation",
    "attention",
    "conv",
    "dense",
    "dropout",
    "embedding",
    "gates",
    "layer_rule",
    "losses",
    "manual",
    "normalization",
    "pool",
    "regularizer_value_and_grad",
    "regularizers",
    "reshape",
    "rule_for",
    "value_and_grad",
    "value_and_grad_with_state",
]
