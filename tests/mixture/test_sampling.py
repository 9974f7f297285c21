"""Sampling k mixtures in jit: exact counts per domain, weights respected, no recompilation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from duet_jax.mixture import (
    effective_sample_size,
    if_weights,
    largest_remainder,
    remove_harmful_weights,
    sample_mixture,
    sample_mixtures,
    uniform_weights,
)

DOMAIN_OF = jnp.asarray(np.repeat(np.arange(3), [50, 30, 20]).astype(np.int32))


@settings(max_examples=25)
@given(st.lists(st.floats(0.0, 1.0), min_size=3, max_size=3).filter(lambda v: sum(v) > 0.05),
       st.integers(0, 2**31 - 1), st.booleans())
def test_exact_counts_and_domains(r, seed, replace):
    r = np.asarray(r) / np.sum(r)
    counts = largest_remainder(r, 20)
    w = uniform_weights(DOMAIN_OF)
    idx, valid = sample_mixture(jax.random.key(seed), w, DOMAIN_OF, counts, budget=20, n_domains=3,
                                replace=replace)
    assert bool(valid.all())
    got = np.bincount(np.asarray(DOMAIN_OF)[np.asarray(idx)], minlength=3)
    assert got.tolist() == np.asarray(counts).tolist()
    if not replace:
        assert len(set(np.asarray(idx).tolist())) == 20


@pytest.mark.parametrize("replace", [True, False])
def test_zero_weight_examples_never_drawn(replace):
    w = jnp.where(jnp.arange(100) % 2 == 0, 1.0, 0.0)
    counts = jnp.array([10, 10, 5], jnp.int32)
    idx, _ = sample_mixture(jax.random.key(0), w, DOMAIN_OF, counts, budget=25, n_domains=3, replace=replace)
    assert (np.asarray(idx) % 2 == 0).all()


def test_frequencies_follow_weights():
    dom = jnp.zeros(4, jnp.int32)
    w = jnp.array([1.0, 2.0, 3.0, 4.0])
    idx, _ = sample_mixture(jax.random.key(1), w, dom, jnp.array([40000], jnp.int32), budget=40000,
                            n_domains=1, replace=True)
    freq = np.bincount(np.asarray(idx), minlength=4) / 40000
    assert np.allclose(freq, [0.1, 0.2, 0.3, 0.4], atol=0.01)


def test_if_weights_shift_rule_and_fallbacks():
    dom = jnp.array([0, 0, 0, 1, 1], jnp.int32)
    s = jnp.array([-1.0, 0.0, 1.0, 5.0, 5.0])  # domain 1 all equal -> uniform, not empty
    w = np.asarray(if_weights(s, dom, 2))
    assert np.allclose(w[:3] / w[:3].sum(), [0, 1 / 3, 2 / 3])
    assert np.allclose(w[3:], [1, 1])
    sharp = np.asarray(if_weights(s, dom, 2, temperature=0.5))
    assert np.allclose(sharp[:3] / sharp[:3].sum(), [0, 1 / 5, 4 / 5])
    flagged = np.asarray(if_weights(s, dom, 2, valid=jnp.array([1, 1, 0, 1, 1], bool)))
    assert flagged[2] == 0 and flagged[1] > 0
    soft = np.asarray(if_weights(s, dom, 2, mode="softmax"))
    assert soft[0] < soft[1] < soft[2]
    ess = np.asarray(effective_sample_size(jnp.asarray(w), dom, 2))
    assert ess[1] == pytest.approx(1.0) and ess[0] < 1


def test_remove_harmful_removes_exactly_the_lowest_fraction():
    s = jnp.asarray(np.random.default_rng(0).normal(size=100).astype(np.float32))
    w = np.asarray(remove_harmful_weights(s, DOMAIN_OF, 3, fraction=0.2))
    dom = np.asarray(DOMAIN_OF)
    for d, n in enumerate([50, 30, 20]):
        kept = w[dom == d]
        assert (kept == 0).sum() == int(0.2 * n)
        sd = np.asarray(s)[dom == d]
        assert sd[kept == 0].max() < sd[kept == 1].min()


def test_k_mixtures_one_compile():
    w = uniform_weights(DOMAIN_OF)
    traces = []

    @jax.jit
    def draw(key, counts):
        traces.append(1)
        return sample_mixtures(key, w, DOMAIN_OF, counts, k=4, budget=30, n_domains=3)

    for i, r in enumerate([[0.2, 0.3, 0.5], [0.6, 0.2, 0.2], [1.0, 0.0, 0.0]]):
        idx, valid = draw(jax.random.key(i), largest_remainder(np.array(r), 30))
        assert idx.shape == (4, 30) and bool(valid.all())
        assert not np.array_equal(np.asarray(idx[0]), np.asarray(idx[1]))
    assert len(traces) == 1
