"""The GP against closed forms: kernels, posterior, marginal likelihood and its gradient, fit."""

from functools import partial

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

from duet_jax.bo import BOConfig, gp

RTOL = 1e-9  # float64 throughout


def _np_kernel(a, b, ls, var, kind):
    r2 = np.sum(((a[:, None, :] - b[None, :, :]) / ls) ** 2, -1)
    if kind == "rbf":
        return var * np.exp(-0.5 * r2)
    z = np.sqrt(5.0 * r2)
    return var * (1.0 + z + z * z / 3.0) * np.exp(-z)


def _data(n=5, d=3, cap=8, seed=0):
    rng = np.random.default_rng(seed)
    x = np.zeros((cap, d))
    x[:n] = rng.dirichlet(np.ones(d), n)
    y = np.zeros(cap)
    y[:n] = rng.normal(size=n)
    return x, y, np.arange(cap) < n


def _params(d, cfg, ls=(0.3, 0.5, 0.7), os_=1.7, noise=0.05, mean=0.2):
    return gp._unconstrain(jnp.asarray(ls[:d]), jnp.asarray(os_), jnp.asarray(noise),
                           jnp.asarray(mean), cfg)


@pytest.mark.parametrize("kind", ["matern52", "rbf"])
def test_posterior_equals_closed_form_and_ignores_padding(kind):
    cfg = BOConfig(kernel=kind)
    x, y, mask = _data()
    xs = np.random.default_rng(1).dirichlet(np.ones(3), 4)
    with gp.x64():
        p = _params(3, cfg)
        c = gp.constrain(p, cfg)
        ls, os_, noise = (np.asarray(v) for v in c)
        mean, var = gp.predict(gp.posterior(jnp.asarray(x), jnp.asarray(y), jnp.asarray(mask), p,
                                            cfg), jnp.asarray(xs), cfg)
        # The same data at another capacity.
        x2, y2, m2 = np.zeros((16, 3)), np.zeros(16), np.arange(16) < 5
        x2[:5], y2[:5] = x[:5], y[:5]
        mean2, var2 = gp.predict(gp.posterior(jnp.asarray(x2), jnp.asarray(y2), jnp.asarray(m2),
                                              p, cfg), jnp.asarray(xs), cfg)
    xo, yo = x[:5], y[:5]
    K = _np_kernel(xo, xo, ls, os_, kind) + noise * np.eye(5)
    ks = _np_kernel(xs, xo, ls, os_, kind)
    m_ref = 0.2 + ks @ np.linalg.solve(K, yo - 0.2)
    v_ref = os_ - np.sum(ks * np.linalg.solve(K, ks.T).T, axis=1)
    assert mean.dtype == jnp.float64
    np.testing.assert_allclose(mean, m_ref, rtol=RTOL, atol=1e-12)
    np.testing.assert_allclose(var, v_ref, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(mean2, mean, rtol=RTOL, atol=1e-12)
    np.testing.assert_allclose(var2, var, rtol=1e-8, atol=1e-12)


def test_full_covariance_matches_the_variances():
    cfg = BOConfig()
    x, y, mask = _data()
    xs = np.random.default_rng(2).dirichlet(np.ones(3), 6)
    with gp.x64():
        post = gp.posterior(jnp.asarray(x), jnp.asarray(y), jnp.asarray(mask), _params(3, cfg),
                            cfg)
        m1, v = gp.predict(post, jnp.asarray(xs), cfg)
        m2, cov = gp.predict(post, jnp.asarray(xs), cfg, full_cov=True)
    np.testing.assert_allclose(m1, m2, rtol=RTOL)
    np.testing.assert_allclose(np.diag(cov), v, rtol=1e-8)
    assert np.all(np.linalg.eigvalsh(np.asarray(cov)) > -1e-10)


@pytest.mark.parametrize("kind", ["matern52", "rbf"])
def test_log_marginal_likelihood_equals_closed_form(kind):
    cfg = BOConfig(kernel=kind)
    x, y, mask = _data(n=6, cap=16)
    with gp.x64():
        p = _params(3, cfg)
        lml = gp.log_marginal_likelihood(p, jnp.asarray(x), jnp.asarray(y), jnp.asarray(mask), cfg)
        ls, os_, noise = (np.asarray(v) for v in gp.constrain(p, cfg))
    xo, r = x[:6], y[:6] - 0.2
    K = _np_kernel(xo, xo, ls, os_, kind) + noise * np.eye(6)
    ref = -0.5 * r @ np.linalg.solve(K, r) - 0.5 * np.linalg.slogdet(K)[1] - 3.0 * np.log(2 * np.pi)
    np.testing.assert_allclose(lml, ref, rtol=RTOL)


@pytest.mark.parametrize("prior", ["gamma", "lognormal"])
def test_marginal_likelihood_gradient_matches_finite_differences(prior):
    cfg = BOConfig(prior=prior)
    x, y, mask = _data(n=7, cap=16, seed=3)
    with gp.x64():
        p = _params(3, cfg)
        f = jax.jit(partial(gp.objective, x=jnp.asarray(x), y=jnp.asarray(y),
                            mask=jnp.asarray(mask), cfg=cfg))
        g = jax.grad(f)(p)
        flat, unravel = jax.flatten_util.ravel_pytree(p)
        gflat, _ = jax.flatten_util.ravel_pytree(g)
        h = 1e-5
        fd = np.array([(f(unravel(flat.at[i].add(h))) - f(unravel(flat.at[i].add(-h)))) / (2 * h)
                       for i in range(flat.size)])
    if prior == "lognormal":  # no output scale: its gradient is exactly zero
        assert float(g.raw_outputscale) == 0.0
    np.testing.assert_allclose(gflat, fd, rtol=1e-6, atol=1e-7)


def test_log_prior_is_the_stated_densities():
    from scipy import stats

    cfg = BOConfig(prior="gamma")
    with gp.x64():
        p = _params(3, cfg)
        lp = float(gp.log_prior(p, cfg))
        c = [np.asarray(v) for v in gp.constrain(p, cfg)]
        lp2 = float(gp.log_prior(p, BOConfig(prior="lognormal")))
    ref = (stats.gamma(3.0, scale=1 / 6.0).logpdf(c[0]).sum() + stats.gamma(2.0, scale=1 / 0.15)
           .logpdf(c[1]) + stats.gamma(1.1, scale=1 / 0.05).logpdf(c[2]))
    np.testing.assert_allclose(lp, ref, rtol=1e-10)
    ref2 = (stats.lognorm(np.sqrt(3), scale=np.exp(np.sqrt(2) + 0.5 * np.log(3))).logpdf(c[0]).sum()
            + stats.lognorm(1.0, scale=np.exp(-4.0)).logpdf(c[2]))
    np.testing.assert_allclose(lp2, ref2, rtol=1e-10)


def test_fit_lowers_the_loss_and_recovers_a_length_scale():
    # A function that varies along domain 0 only: its length scale should be the shortest.
    cfg = BOConfig(fit_restarts=4, fit_steps=150)
    rng = np.random.default_rng(4)
    cap, n = 32, 25
    x = np.zeros((cap, 3))
    x[:n] = rng.dirichlet(np.ones(3), n)
    y = np.zeros(cap)
    y[:n] = np.sin(8.0 * x[:n, 0])
    with gp.x64():
        ys, _, _ = gp.standardize(jnp.asarray(y), jnp.asarray(np.arange(cap) < n))
        args = (jnp.asarray(x), ys, jnp.asarray(np.arange(cap) < n))
        p0 = gp.prior_mode(3, cfg)
        p, loss = jax.jit(partial(gp.fit, cfg=cfg))(*args, p0, jax.random.PRNGKey(0))
        loss, loss0 = float(loss), float(gp.objective(p0, *args, cfg))
        loss_again = float(gp.objective(p, *args, cfg))
        ls = np.asarray(gp.constrain(p, cfg).lengthscale)
    assert np.isfinite(loss) and loss < loss0 - 1.0
    np.testing.assert_allclose(loss, loss_again, rtol=1e-12)
    assert ls[0] < ls[1] and ls[0] < ls[2]


def test_cholesky_adds_jitter_only_when_needed():
    with gp.x64():
        a = jnp.asarray(np.array([[2.0, 0.5], [0.5, 1.0]]))
        L, jit = gp.cholesky_jittered(a)
        assert float(jit) == 0.0
        np.testing.assert_allclose(L @ L.T, a, rtol=1e-14)
        # Duplicate points and no noise: singular.
        v = np.array([0.2, 0.3, 0.5])
        s = jnp.asarray(np.outer(v, v) * 0 + 1.0)  # rank one, all ones
        L, jit = gp.cholesky_jittered(s)
        assert np.all(np.isfinite(np.asarray(L))) and 0 < float(jit) < 1e-2
        np.testing.assert_allclose(L @ L.T, s + jit * np.eye(3), atol=1e-12)
        # Differentiable through the jitter search.
        g = jax.grad(lambda a: jnp.sum(gp.cholesky_jittered(a)[0]))(a)
        assert np.all(np.isfinite(np.asarray(g)))


def test_standardize_handles_zero_one_and_constant_outputs():
    with gp.x64():
        for vals, mean, std in [([], 0.0, 1.0), ([3.0], 3.0, 1.0), ([2.0, 2.0, 2.0], 2.0, 1.0),
                                ([1.0, 3.0], 2.0, np.sqrt(2.0))]:
            y = np.zeros(8)
            y[: len(vals)] = vals
            ys, mu, sd = gp.standardize(jnp.asarray(y), jnp.asarray(np.arange(8) < len(vals)))
            assert float(mu) == pytest.approx(mean) and float(sd) == pytest.approx(std)
            assert np.all(np.asarray(ys)[len(vals):] == 0.0)


def test_float64_stays_local():
    with gp.x64():
        c = gp.constrain(gp.prior_mode(3, BOConfig()), BOConfig())
        k = gp.kernel_matrix(jnp.ones((2, 3)), jnp.zeros((4, 3)), c, BOConfig())
        assert k.dtype == jnp.float64 and k.shape == (2, 4)
    assert jnp.ones(2).dtype == jnp.float32  # x64 is off again outside
