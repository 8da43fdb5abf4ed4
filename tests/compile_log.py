"""Counting the XLA programs JAX compiles (``jax.log_compiles`` messages), for tests.

``with CompileLog() as log: ...`` collects the ``Compiling jit(<name>) ...`` messages
of the block; ``log.count(name)`` counts one program's. tests/parallel_checks.py (a
subprocess) uses it as a plain logging handler around its own ``jax.log_compiles``.
"""

from __future__ import annotations

import logging

import jax


class CompileLog(logging.Handler):
    """A logging handler on the ``jax`` logger that keeps the compile messages."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record):
        message = record.getMessage()
        if message.startswith("Compiling"):
            self.messages.append(message)

    def count(self, name):
        return sum(m.startswith(f"Compiling jit({name})") for m in self.messages)

    def __enter__(self):
        self.messages.clear()
        self._log = jax.log_compiles(True)
        self._log.__enter__()
        logging.getLogger("jax").addHandler(self)
        return self

    def __exit__(self, *exc):
        logging.getLogger("jax").removeHandler(self)
        self._log.__exit__(*exc)
