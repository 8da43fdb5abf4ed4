"""The test session's sharing (tests/jax_session.py, installed by tests/conftest.py): two
functions that lower to the same module share one executable; another module, other
compile options or a host callback do not, and every shared program computes what its
own would. The lowerings of a thread share one MLIR context, another thread has its own,
and a module's text is what a fresh context gives."""

from __future__ import annotations

import threading

import jax
import jax.numpy as jnp
import numpy as np
from jax._src import compiler
from jax._src.interpreters import mlir


def _x():
    return jax.device_put(np.linspace(-1.0, 1.0, 7, dtype=np.float32))


def test_the_session_wraps_the_compile_step():
    # a JAX whose compile step has another name or signature leaves it unwrapped (the
    # suite then compiles every duplicate again): this says so instead of running slower
    assert compiler.compile_or_get_cached.__name__ == "shared", (
        f"tests/jax_session.py could not wrap jax._src.compiler.compile_or_get_cached in "
        f"jax {jax.__version__}: update share_identical_programs"
    )
    assert mlir.make_ir_context.__name__ == "thread_context", (
        f"tests/jax_session.py could not wrap jax._src.interpreters.mlir.make_ir_context "
        f"in jax {jax.__version__}: update share_one_mlir_context"
    )


def test_identical_modules_share_an_executable_and_others_do_not():
    x = _x()
    first = jax.jit(lambda a: jnp.sin(a) * 3.0).lower(x).compile()
    same = jax.jit(lambda a: jnp.sin(a) * 3.0).lower(x).compile()  # another function object
    other = jax.jit(lambda a: jnp.sin(a) * 4.0).lower(x).compile()
    options = jax.jit(lambda a: jnp.sin(a) * 3.0).lower(x).compile(
        {"xla_backend_optimization_level": 1})
    wider = jax.jit(lambda a: jnp.sin(a) * 3.0).lower(jnp.zeros(8, jnp.float32)).compile()
    assert same.runtime_executable() is first.runtime_executable()
    for different in (other, options, wider):
        assert different.runtime_executable() is not first.runtime_executable()
    expected = np.sin(np.asarray(x)) * 3.0
    np.testing.assert_allclose(first(x), expected, rtol=1e-6)
    np.testing.assert_allclose(same(x), expected, rtol=1e-6)
    np.testing.assert_allclose(other(x), np.sin(np.asarray(x)) * 4.0, rtol=1e-6)


def test_programs_with_host_callbacks_keep_their_own():
    seen = []

    def program(tag):
        def f(a):
            jax.debug.callback(lambda v: seen.append((tag, float(v))), a[0])
            return a * 2.0

        return jax.jit(f)

    x = _x()
    a, b = program("a"), program("b")
    assert a.lower(x).compile().runtime_executable() is not (
        b.lower(x).compile().runtime_executable())
    a(x).block_until_ready()
    b(x).block_until_ready()
    jax.effects_barrier()
    assert seen == [("a", -1.0), ("b", -1.0)]


def _scaled_sin():
    return jax.jit(lambda a: jnp.sin(a) * 3.0)  # a new function object each call


def test_lowerings_of_a_thread_share_one_context_and_print_as_from_a_fresh_one(monkeypatch):
    x = _x()
    first = _scaled_sin().lower(x).compiler_ir()
    other = jax.jit(lambda a: jnp.cos(a) + 1.0).lower(x).compiler_ir()
    assert first.context == other.context

    in_thread = []
    worker = threading.Thread(target=lambda: in_thread.append(_scaled_sin().lower(x)))
    worker.start()
    worker.join()
    assert in_thread[0].compiler_ir().context != first.context  # a thread of its own

    # JAX's own function, a fresh context per lowering: the same module text
    monkeypatch.setattr(mlir, "make_ir_context", mlir.make_ir_context.make_fresh)
    fresh = _scaled_sin().lower(x)
    assert fresh.compiler_ir().context != first.context
    assert str(first) == str(fresh.compiler_ir())
    assert in_thread[0].as_text() == fresh.as_text()
    np.testing.assert_allclose(in_thread[0].compile()(x), np.sin(np.asarray(x)) * 3.0,
                               rtol=1e-6)
