"""Acquisitions on a stub posterior (fixed mean and variance), in float32 and float64."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from duet_jax.bo import acquisition as acq
from duet_jax.bo import gp


@pytest.mark.parametrize("x64", [False, True])
def test_ucb_on_a_stub_posterior(x64):
    with jax.enable_x64(x64):
        out = acq.ucb(mean=jnp.zeros(3), var=jnp.ones(3), beta=4.0)
        assert out.dtype == (jnp.float64 if x64 else jnp.float32)
        np.testing.assert_array_equal(np.asarray(out), [2.0, 2.0, 2.0])
        np.testing.assert_allclose(acq.ucb(jnp.array([1.0]), jnp.array([0.25]), 1.0), [1.5])


@pytest.mark.parametrize("x64", [False, True])
def test_ei_equals_the_integral(x64):
    mean = np.array([0.0, 1.0, -2.0, 0.3])
    var = np.array([1.0, 0.5, 2.0, 1e-2])
    best = 0.5
    ref = []
    for m, v in zip(mean, var, strict=True):
        s = math.sqrt(v)
        z = np.linspace(best, m + 12 * s, 200001)
        ref.append(np.trapezoid((z - best) * stats.norm(m, s).pdf(z), z))
    with jax.enable_x64(x64):
        out = np.asarray(acq.ei(jnp.asarray(mean), jnp.asarray(var), best))
        lg = np.asarray(acq.log_ei(jnp.asarray(mean), jnp.asarray(var), best))
    tol = 1e-6 if x64 else 1e-5
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=tol)
    np.testing.assert_allclose(lg, np.log(ref), rtol=1e-5 if x64 else 1e-4)


def test_log_ei_is_finite_where_ei_underflows_and_keeps_its_gradient():
    with gp.x64():
        means = jnp.array([-5.0, -20.0, -40.0, -1e3, -1e7])
        ei = acq.ei(means, jnp.ones(5), 0.0)
        lg = acq.log_ei(means, jnp.ones(5), 0.0)
        g = jax.vmap(jax.grad(lambda m: acq.log_ei(m, jnp.array(1.0), 0.0)))(means)
        # Reference: log EI(u) = log phi(u) - 2 log|u| + log(1 - 3/u^2 + ...) for very negative u.
        u = -20.0
        ref = stats.norm.logpdf(u) - 2 * math.log(-u) + math.log1p(-3 / u**2 + 15 / u**4)
    assert float(ei[2]) == 0.0 and np.all(np.isfinite(np.asarray(lg)))
    assert np.all(np.diff(np.asarray(lg)) < 0)
    np.testing.assert_allclose(float(lg[1]), ref, rtol=1e-6)
    assert np.all(np.isfinite(np.asarray(g))) and np.all(np.asarray(g) > 0)
    # Near the switch at u = -1 both branches agree.
    with gp.x64():
        a, b = (float(acq.log_ei(jnp.array(m), jnp.array(1.0), 0.0)) for m in (-1.0 + 1e-9, -1.0 - 1e-9))
    assert abs(a - b) < 1e-7


def test_igp_ucb_beta_grows_with_information_gain():
    b1 = float(acq.igp_ucb_beta(1.0, 0.1, 1.0, 0.1))
    root = 1.0 + 0.1 * math.sqrt(2 * (1.0 + 1.0 + math.log(10.0)))
    assert b1 == pytest.approx(root**2, rel=1e-6)
    assert float(acq.igp_ucb_beta(5.0, 0.1, 1.0, 0.1)) > b1


def test_thompson_draws_have_the_posterior_moments():
    mean = np.array([0.5, -1.0, 2.0])
    a = np.array([[1.0, 0.5, 0.0], [0.5, 2.0, -0.3], [0.0, -0.3, 0.5]])
    with gp.x64():
        keys = jax.random.split(jax.random.PRNGKey(0), 20000)
        draws = np.asarray(jax.vmap(lambda k: acq.thompson_sample(k, jnp.asarray(mean),
                                                                  jnp.asarray(a)))(keys))
    np.testing.assert_allclose(draws.mean(0), mean, atol=0.04)
    np.testing.assert_allclose(np.cov(draws.T), a, atol=0.06)
