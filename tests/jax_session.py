"""Two changes to how JAX builds programs in a test process, neither to what it builds.

The suite is compile-bound: about 2,700 small programs, each traced, lowered to MLIR and
compiled by XLA once, then run once on tiny inputs. tests/conftest.py installs both of
these in every process that runs tests, and tests/parallel_checks.py (a subprocess) in
its own; tests/test_session_sharing.py checks them.

- :func:`share_identical_programs`: each distinct XLA program is compiled once per
  process, also when tests build their own network, optimizer or closure (``jax.jit``
  caches per function object).
- :func:`share_one_mlir_context`: every lowering in a thread builds its module in one MLIR
  context instead of a new one per program.

Both patch private JAX functions; with another JAX (name or signature changed) they
install nothing and return False, and test_session_sharing fails naming the JAX version.
"""

from __future__ import annotations

import hashlib
import inspect
import threading

import jax

_COMPILE_PARAMETERS = ["backend", "computation", "devices", "compile_options",
                       "host_callbacks", "executable_devices"]


def share_identical_programs() -> bool:
    """Compile each distinct XLA program once per process.

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
    configured (its own reads and writes are what such a test checks).
    """
    try:
        from jax._src import compiler
    except ImportError:
        return False
    compile_program = getattr(compiler, "compile_or_get_cached", None)
    if compile_program is None or getattr(compile_program, "__name__", "") == "shared":
        return compile_program is not None
    if list(inspect.signature(compile_program).parameters)[:6] != _COMPILE_PARAMETERS:
        return False
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
    return True


def share_one_mlir_context() -> bool:
    """Lower every program of a thread into one MLIR context.

    JAX makes a new MLIR context for each program it lowers
    (``jax._src.interpreters.mlir.make_ir_context``): loading and registering its dialects
    costs about 3.7 ms (cProfile: 1.16 s of 312 lowerings in two test files), and each new
    context uniques every type and attribute again. A test process lowers about 1,400
    programs, so this hands each thread one context, made by JAX's own function, for all
    its lowerings (a context is not shared between threads: a thread of its own, such as
    a prefetching data source, gets its own). The modules' text is the same (checked by
    test_session_sharing). Types, attributes and constants stay in the context for the
    life of the process, yet the workers' peak memory went down, not up (whole suite,
    one run each: 2.0 / 1.7 GB against 2.8 / 3.4 GB), and so did their system time
    (13 against 23 s).
    """
    try:
        from jax._src.interpreters import mlir
    except ImportError:
        return False
    make = getattr(mlir, "make_ir_context", None)
    if make is None or getattr(make, "__name__", "") == "thread_context":
        return make is not None
    if list(inspect.signature(make).parameters):
        return False
    local = threading.local()

    def thread_context():
        context = getattr(local, "context", None)
        if context is None:
            context = local.context = make()
        return context

    thread_context.make_fresh = make
    mlir.make_ir_context = thread_context
    return True
