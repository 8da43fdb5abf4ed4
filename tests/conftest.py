"""Settings for the whole test session (every xdist worker imports this before any test).

Compiling, not running, dominates this suite: about 5,000 small XLA programs, each
compiled once (measured with jax.monitoring's compile events: 278 s of the 457 s the
tests took at XLA's defaults). Two XLA:CPU flags cut that time without changing which
floating-point operations a program performs:

- ``--xla_backend_optimization_level=0`` skips LLVM's optimisation of the generated
  machine code (three compile-heavy test files: 103 s of CPU at the default level, 57 s
  at 0);
- ``--xla_cpu_use_fusion_emitters=false`` emits fused elementwise loops with XLA's
  classic elemental emitter instead of the newer MLIR fusion emitters, whose compile
  pipeline costs more per program (whole default suite, 2 workers: compile 278 s -> 102 s,
  wall 258 s -> 130 s; same tests, all passing).

Only how fast the machine code runs changes, and no test here times anything.
``FUNCNET_TEST_XLA_DEFAULTS=1`` runs the suite at XLA's defaults (CI's slow tier does, so
the default code generator is exercised too). Subprocesses that the tests start
(notebooks, fresh-process export checks, the 4-device and 2-process checks) inherit it.

Each process that runs tests also compiles every distinct program once and lowers into
one MLIR context per thread (tests/jax_session.py): how programs are built, not what.
"""

import os
import sys

import pytest

_FAST_COMPILE_FLAGS = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false")

if os.environ.get("FUNCNET_TEST_XLA_DEFAULTS") != "1":
    _flags = os.environ.get("XLA_FLAGS", "")
    for _flag in _FAST_COMPILE_FLAGS:
        if _flag.split("=")[0] not in _flags:
            # XLA reads XLA_FLAGS when its first backend starts, after this import.
            _flags = f"{_flags} {_flag}".strip()
    os.environ["XLA_FLAGS"] = _flags


@pytest.hookimpl(trylast=True)
def pytest_configure(config):
    """Install tests/jax_session.py's sharing (one compile per distinct program, one MLIR
    context per thread) in every process that runs tests; pytest-xdist's controller runs
    none and does not import JAX (a second earlier start for the workers)."""
    if getattr(config.option, "dist", "no") != "no" and not hasattr(config, "workerinput"):
        return
    import jax_session

    jax_session.share_identical_programs()
    jax_session.share_one_mlir_context()


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """A pytest-xdist worker leaves without tearing down its compiled programs.

    A worker holds about 1,700 compiled XLA programs at the end of the suite; freeing them
    at interpreter exit costs about 1.3 ms each (measured: ``jax.clear_caches()`` after
    1,000 small programs, 1.25-1.34 s), and the controller waits for every worker to exit
    before it reports (8 s of the default suite's wall time, measured with a timeline
    plugin). By this hook the worker has sent every report and its ``workerfinished``
    event (pytest-xdist's ``pytest_sessionfinish``), so nothing is lost by leaving now.
    A plain (one-process) run exits normally.
    """
    if hasattr(config, "workerinput"):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
