"""The test session's sharing of compiled programs (tests/conftest.py,
``_share_identical_programs``): two functions that lower to the same module share one
executable; another module, other compile options or a host callback do not, and every
shared program computes what its own would."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax._src import compiler


def _x():
    return jax.device_put(np.linspace(-1.0, 1.0, 7, dtype=np.float32))


def test_the_session_wraps_the_compile_step():
    # a JAX whose compile step has another name or signature leaves it unwrapped (the
    # suite then compiles every duplicate again): this says so instead of running slower
    assert compiler.compile_or_get_cached.__name__ == "shared", (
        f"tests/conftest.py could not wrap jax._src.compiler.compile_or_get_cached in "
        f"jax {jax.__version__}: update _share_identical_programs"
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
