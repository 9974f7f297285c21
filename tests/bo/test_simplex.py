"""Points on the feasible set: projections, candidates, designs, minimum share (property tests)."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from optax.projections import projection_simplex

from duet_jax.bo import gp
from duet_jax.bo.simplex import (
    apply_min_share,
    initial_design,
    project,
    project_box_simplex,
    raw_candidates,
    structured_points,
    uniform_simplex,
)

from .common import D, bounds, on_simplex

vectors = st.lists(st.floats(-3.0, 3.0), min_size=D, max_size=D).map(np.array)


@jax.jit
def _project_box(y, lo, hi):
    return project_box_simplex(y, lo, hi)


_min_share_bounded = jax.jit(lambda x, m, lo, hi: apply_min_share(x, m, True, lo, hi, True))


@given(vectors)
def test_simplex_projection_is_optax_and_lands_on_the_simplex(y):
    with gp.x64():
        a = np.asarray(project(jnp.asarray(y), jnp.zeros(D), jnp.ones(D), False))
        b = np.asarray(_project_box(jnp.asarray(y), jnp.zeros(D), jnp.ones(D)))
        c = np.asarray(projection_simplex(jnp.asarray(y)))
    assert on_simplex(a) and on_simplex(b)
    np.testing.assert_allclose(a, c, atol=1e-15)
    np.testing.assert_allclose(b, c, atol=1e-12)


@given(vectors, bounds())
def test_box_projection_is_feasible_optimal_and_idempotent(y, b):
    lo, hi = b
    with gp.x64():
        p = np.asarray(_project_box(jnp.asarray(y), jnp.asarray(lo), jnp.asarray(hi)))
        pp = np.asarray(_project_box(jnp.asarray(p), jnp.asarray(lo), jnp.asarray(hi)))
    assert abs(p.sum() - 1.0) <= 1e-9
    assert np.all(p >= lo - 1e-12) and np.all(p <= hi + 1e-12)
    np.testing.assert_allclose(pp, p, atol=1e-12)
    # KKT: p = clip(y - tau, lo, hi) with one tau for every coordinate strictly inside its box.
    free = (p > lo + 1e-9) & (p < hi - 1e-9)
    if free.sum() >= 2:
        taus = (y - p)[free]
        assert np.ptp(taus) < 1e-8


def test_structured_points_and_candidates():
    pts = np.asarray(structured_points(4, jnp.float32))
    assert pts.shape == (4 + 6 + 1, 4) and on_simplex(pts)
    np.testing.assert_array_equal(pts[:4], np.eye(4))
    np.testing.assert_array_equal(pts[-1], np.full(4, 0.25))
    with gp.x64():
        c = np.asarray(raw_candidates(jax.random.PRNGKey(0), 4, 64, jnp.zeros(4), jnp.ones(4),
                                      False))
        u = np.asarray(uniform_simplex(jax.random.PRNGKey(1), 40000, 3))
    assert c.shape == (64 + 11, 4) and on_simplex(c)
    # Dirichlet(1): each share is Beta(1, 2): mean 1/3, variance 1/18.
    np.testing.assert_allclose(u.mean(0), 1 / 3, atol=0.01)
    np.testing.assert_allclose(u.var(0), 1 / 18, atol=0.003)


def test_maximin_design_spreads_out_and_avoids_seen_points():
    with gp.x64():
        lo, hi = jnp.zeros(3), jnp.ones(3)
        key = jax.random.PRNGKey(0)
        mm = np.asarray(initial_design(key, 6, 3, lo, hi, False, "maximin"))
        rnd = np.asarray(initial_design(key, 6, 3, lo, hi, False, "dirichlet"))
        seen = jnp.asarray(np.vstack([np.eye(3), np.zeros((5, 3))]))
        mask = jnp.arange(8) < 3
        nxt = np.asarray(initial_design(key, 1, 3, lo, hi, False, "maximin", seen, mask))
    assert on_simplex(mm) and on_simplex(rnd)

    def min_dist(a):
        d = np.linalg.norm(a[:, None] - a[None], axis=-1)
        return d[np.triu_indices(len(a), 1)].min()

    assert min_dist(mm) > min_dist(rnd)
    assert np.linalg.norm(nxt[0] - np.eye(3), axis=1).min() > 0.3  # away from the vertices


@given(st.lists(st.floats(0.0, 1.0), min_size=D, max_size=D).filter(lambda v: sum(v) > 0.1),
       st.floats(0.01, 0.3))
def test_min_share_zeroes_and_renormalises(v, m):
    x = np.array(v) / sum(v)
    with gp.x64():
        f = partial(apply_min_share, lower=jnp.zeros(D), upper=jnp.ones(D), bounded=False)
        r = np.asarray(f(jnp.asarray(x), m, True))
        legacy = np.asarray(f(jnp.asarray(x), m, False))
    big = x >= m
    big[np.argmax(x)] = True
    np.testing.assert_array_equal(r > 0, big & (x > 0))
    assert on_simplex(r)
    np.testing.assert_allclose(r[big], x[big] / x[big].sum(), rtol=1e-12)
    # The released code's behaviour: zeroed, not renormalised (the budget shrinks).
    np.testing.assert_array_equal(legacy, np.where(big, x, 0.0))
    assert legacy.sum() <= 1.0 + 1e-12


@given(vectors, bounds(), st.floats(0.02, 0.3))
def test_min_share_keeps_bounds(y, b, m):
    lo, hi = b
    with gp.x64():
        x = _project_box(jnp.asarray(y), jnp.asarray(lo), jnp.asarray(hi))
        r = np.asarray(_min_share_bounded(x, m, jnp.asarray(lo), jnp.asarray(hi)))
    assert abs(r.sum() - 1.0) <= 1e-9
    assert np.all(r >= lo - 1e-12) and np.all(r <= hi + 1e-12)
