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


def _share_identical_programs():
    """Compile each distinct XLA program once per test process.

    ``jax.jit`` caches a compiled program per function object, so tests that build their
    own network, optimizer or closure compile again what an earlier test compiled: the
    same HLO, bit for bit (about 300 of a worker's 1,400 compilations, 12% of its XLA
    compile time, measured by fingerprinting every compiled module). XLA compiles the
    same module with the same options for the same devices to the same executable, so
    this wraps JAX's compile step (``jax._src.compiler.compile_or_get_cached``, called
    once per program after tracing and lowering) with a dictionary keyed by the module's
    text without source locations, the compile options and the device ids. Everything
    before it runs as usual (tracing, lowering, the ``Compiling ...`` log lines that the
    compile-count tests read, the compile event). Not shared: programs with host
    callbacks (the executable holds them) and any compile while JAX's persistent cache is
    configured (its own reads and writes are what such a test checks). If this JAX has
    no such function, with another signature, nothing is wrapped.
    """
    import hashlib
    import inspect

    import jax

    try:
        from jax._src import compiler
    except ImportError:
        return
    compile_program = getattr(compiler, "compile_or_get_cached", None)
    if compile_program is None or list(inspect.signature(compile_program).parameters)[:6] != [
        "backend", "computation", "devices", "compile_options", "host_callbacks",
        "executable_devices",
    ]:
        return
    compiled = {}

    def shared(backend, computation, devices, compile_options, host_callbacks,
               executable_devices, pgle_profiler=None):
        args = (backend, computation, devices, compile_options, host_callbacks,
                executable_devices, pgle_profiler)
        if (host_callbacks or pgle_profiler is not None
                or getattr(jax.config, "jax_compilation_cache_dir", None)):
            return compile_program(*args)
        text = computation.operation.get_asm(enable_debug_info=False)
        key = (hashlib.sha256(text.encode()).digest(), compile_options.SerializeAsString(),
               backend.platform, tuple(d.id for d in devices.flat))
        if key not in compiled:
            compiled[key] = compile_program(*args)
        return compiled[key]

    compiler.compile_or_get_cached = shared


_share_identical_programs()


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
