"""The acquisition optimiser: it finds known maxima, and its proposals are feasible (properties)."""

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from duet_jax.bo import gp, x64
from duet_jax.bo.optimize import maximize_acquisition
from duet_jax.bo.simplex import apply_min_share, project_box_simplex

from .common import FAST, D, bounds, on_simplex

# Bounds are traced arguments here, so one compile serves every example; the static config only
# says that there are bounds.
BOUNDED = FAST.replace(lower=(0.0,) * D)


def _gp_data(seed=0, n=8, cap=16):
    rng = np.random.default_rng(seed)
    x = np.zeros((cap, D))
    x[:n] = rng.dirichlet(np.ones(D), n)
    y = np.zeros(cap)
    y[:n] = np.sin(5 * x[:n, 0]) + x[:n, 1]
    return jnp.asarray(x), jnp.asarray(y), jnp.arange(cap) < n


@jax.jit
def _propose_bounded(key, lo, hi, min_share):
    x, y, mask = _gp_data()
    post = gp.posterior(x, y, mask, gp.prior_mode(D, BOUNDED), BOUNDED)

    def score(xs):
        mean, var = gp.predict(post, xs, BOUNDED)
        return mean + 2.0 * jnp.sqrt(var)

    r, _ = maximize_acquisition(score, key, D, BOUNDED, lo, hi)
    return r, apply_min_share(r, min_share, True, lo, hi, True)


@given(bounds(), st.integers(0, 2**31 - 1), st.floats(0.0, 0.3))
def test_proposals_are_on_the_simplex_and_inside_the_bounds(b, seed, m):
    lo, hi = b
    with x64():
        r, r_min = _propose_bounded(jax.random.PRNGKey(seed), jnp.asarray(lo), jnp.asarray(hi), m)
    for p in (np.asarray(r), np.asarray(r_min)):
        assert on_simplex(p)
        assert np.all(p >= lo - 1e-12) and np.all(p <= hi + 1e-12)


@jax.jit
def _maximize_distance(target, key):
    score = lambda xs: -jnp.sum((xs - target) ** 2, axis=-1)
    lo, hi = jnp.zeros(D), jnp.ones(D)
    return maximize_acquisition(score, key, D, FAST.replace(ascent_steps=60), lo, hi)


def test_ascent_finds_the_nearest_ratio():
    # The maximiser of -||r - t||^2 on the simplex is the projection of t (inside: t itself).
    with x64():
        inside = jnp.asarray([0.05, 0.4, 0.3, 0.2, 0.05])
        outside = jnp.asarray([0.9, 0.5, -0.2, 0.1, 0.0])
        for t in (inside, outside):
            r, v = _maximize_distance(t, jax.random.PRNGKey(0))
            expect = project_box_simplex(t, jnp.zeros(D), jnp.ones(D))
            np.testing.assert_allclose(np.asarray(r), np.asarray(expect), atol=1e-4)
            assert on_simplex(np.asarray(r))
