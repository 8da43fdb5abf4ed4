"""Combinators, re-exported from :mod:`funcnet.nn.combinators`."""

from funcnet.nn.combinators import Parallel, Residual, Serial

__all__ = ["Parallel", "Residual", "Serial"]
