"""Settings for the whole test session (every xdist worker imports this before any test).

Compiling, not running, dominates this suite: hundreds of small XLA programs, each
compiled once. XLA:CPU's backend optimisation level 0 skips LLVM's optimisation of the
generated machine code, which halves that time (three compile-heavy test files: 103 s of
CPU at the default level, 57 s at 0, same results). The programs are the same HLO with the
same floating-point operations; only how fast the machine code runs changes, and no test
here times anything. ``FUNCNET_TEST_XLA_DEFAULTS=1`` runs the suite at XLA's default level.
Subprocesses that the tests start (notebooks, fresh-process export checks) inherit it.
"""

import os

if os.environ.get("FUNCNET_TEST_XLA_DEFAULTS") != "1":
    _flags = os.environ.get("XLA_FLAGS", "")
    if "--xla_backend_optimization_level" not in _flags:
        # XLA reads XLA_FLAGS when its first backend starts, after this import.
        os.environ["XLA_FLAGS"] = f"{_flags} --xla_backend_optimization_level=0".strip()
