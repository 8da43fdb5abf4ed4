"""funcnet.gradcheck: finite differences, comparison tables, directional check."""

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

from funcnet import gradcheck


def _f(p):
    return jnp.sum(jnp.sin(p["a"]) * p["b"][0]) + jnp.sum(p["b"] ** 3)


def _params():
    rng = np.random.default_rng(0)
    return {"a": jax.device_put(rng.standard_normal((3, 4))), "b": jax.device_put(rng.standard_normal(5))}


@pytest.mark.parametrize("method,tol", [("central", 1e-8), ("forward", 1e-5)])
@pytest.mark.parametrize("chunk_bytes", [8, 1 << 22], ids=["tiny-chunks", "one-chunk"])
def test_numerical_grad_matches_autodiff_over_a_pytree(method, tol, chunk_bytes):
    with jax.enable_x64(True):
        p = _params()
        num = gradcheck.numerical_grad(_f, p, method=method, chunk_bytes=chunk_bytes)
        report = gradcheck.compare({"autodiff": jax.grad(_f)(p), "fd": num}, tol=tol)
    assert report.ok and report.max_error("autodiff", "fd") > 0


def test_numerical_grad_matches_a_per_parameter_loop_exactly():
    with jax.enable_x64(True):
        p = _params()
        num = gradcheck.numerical_grad(_f, p)
        h = 1e-6
        flat, unravel = jax.flatten_util.ravel_pytree(p)
        loop = np.array([(_f(unravel(flat.at[i].add(h))) - _f(unravel(flat.at[i].add(-h))))
                         / (2 * h) for i in range(flat.size)])
        got = np.asarray(jax.flatten_util.ravel_pytree(num)[0])
    np.testing.assert_allclose(got, loop, rtol=1e-9, atol=1e-12)


def test_compare_raises_with_a_readable_table_naming_leaf_and_pair():
    with jax.enable_x64(True):
        p = _params()
        good = jax.grad(_f)(p)
        bad = {"a": good["a"], "b": good["b"].at[2].add(1e-3)}
        with pytest.raises(gradcheck.GradientMismatch) as err:
            gradcheck.compare({"autodiff": good, "manual": bad}, tol=1e-8)
    text = str(err.value)
    assert "['b']" in text and "autodiff vs manual" in text and "FAIL" in text
    assert "['a']" in text and "ok" in text


def test_check_catches_a_wrong_manual_gradient_and_passes_a_right_one():
    with jax.enable_x64(True):
        p = _params()
        right = jax.grad(_f)(p)
        assert gradcheck.check(_f, p, manual=right).ok
        wrong = jax.tree_util.tree_map(lambda g: 1.001 * g, right)
        with pytest.raises(gradcheck.GradientMismatch):
            gradcheck.check(_f, p, manual=wrong)


def test_directional_check_accepts_the_gradient_and_rejects_a_perturbed_one():
    with jax.enable_x64(True):
        p = _params()
        g = jax.grad(_f)(p)
        report = gradcheck.directional_check(_f, p, g, jax.random.key(0), 5, tol=1e-8)
        assert report.ok and report.errors.shape == (5,)
        bad = {"a": g["a"].at[1, 1].add(0.01), "b": g["b"]}
        with pytest.raises(gradcheck.GradientMismatch, match="directional"):
            gradcheck.directional_check(_f, p, bad, jax.random.key(0), 5, tol=1e-8)


def test_kinks_flags_only_entries_straddling_a_non_smooth_point():
    with jax.enable_x64(True):
        x = jnp.array([0.0, 1.0, -2.0, 3e-7])

        def f(x):
            return jnp.sum(jnp.abs(x))

        fd = gradcheck.finite_differences(f, x)
        mask = np.asarray(gradcheck.kinks(fd))
    np.testing.assert_array_equal(mask, [True, False, False, True])


def test_bad_method_is_rejected():
    with pytest.raises(ValueError, match="central"):
        gradcheck.numerical_grad(_f, _params(), method="backward")


def test_a_nan_gradient_never_passes():
    """sqrt(a^2) at a = 0: autodiff's gradient is NaN. Python's max() made the row's
    scale NaN and its tolerance inf ('ok'); relative_error also depended on the order."""
    def f(p):
        return jnp.sum(jnp.sqrt(p["a"] ** 2)) + jnp.sum(p["b"] ** 2)

    p = {"a": jnp.array([0.0, 1.0]), "b": jnp.array([1.0, 2.0])}
    assert not gradcheck.check(f, p, raise_on_failure=False).ok
    nan, zeros = np.array([0.0, np.nan, 0.0]), np.zeros(3)
    assert gradcheck.relative_error(zeros, nan) == gradcheck.relative_error(nan, zeros) == np.inf
    assert not gradcheck.compare({"auto": zeros, "manual": nan}, tol=1e-6,
                                 raise_on_failure=False).ok


def test_the_default_step_refuses_half_precision_and_float32_uses_the_step_taken():
    """bfloat16 rounds 1 + 1e-3 back to 1 (all-zero differences); in float32 at p = 1000 a
    step of 1e-3 moves p by 0.9766e-3, which the quotient must divide by."""
    with pytest.raises(TypeError, match=r"bfloat16 are too coarse for the default "
                                        r"finite-difference step .* pass h= explicitly"):
        gradcheck.numerical_grad(lambda q: jnp.sum(q ** 2), jnp.ones(2, jnp.bfloat16))
    far = jnp.array([1000.0, 1000.0], jnp.float32)
    np.testing.assert_allclose(gradcheck.numerical_grad(lambda q: jnp.sum(q) - 2000.0, far),
                               [1.0, 1.0], rtol=1e-6)
    assert gradcheck.check(lambda q: jnp.sum(q) - 2000.0, far).ok


def test_a_gradient_of_the_wrong_shape_is_named_with_its_leaf():
    """Was relative_error's 'shapes differ, (2,) vs (3,)', naming neither leaf nor source."""
    with pytest.raises(ValueError, match=r"compare: leaf \['w'\]: 'autodiff' has shape \(2,\), "
                                         r"'manual' has \(3,\)"):
        gradcheck.check(lambda q: jnp.sum(q["w"] ** 2), {"w": jnp.array([1.0, 2.0])},
                        manual={"w": jnp.ones(3)})
