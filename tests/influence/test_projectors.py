"""Projector properties: JL inner products, determinism across batch sizes / chunkings / seeds."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from duet_jax.errors import InfluenceError
from duet_jax.influence.projectors import PROJECTORS, make_projector

RANDOM = ("dense", "dense_gaussian", "sjlt", "chunked")


def _proj(name, seed, p, k):
    pr = make_projector(name, seed, p, k, block_rows=96)
    return pr, pr.init()


@settings(max_examples=25)
@given(
    name=st.sampled_from(RANDOM),
    seed=st.integers(0, 2**31 - 1),
    p=st.sampled_from([256, 999]),  # few shapes: each new shape compiles
    data_seed=st.integers(0, 2**31 - 1),
    corr=st.floats(-0.9, 0.9),
)
def test_inner_products_within_jl_tolerance(name, seed, p, data_seed, corr):
    k = 1024
    rng = np.random.default_rng(data_seed)
    x = rng.normal(size=p)
    y = corr * x + np.sqrt(1 - corr**2) * rng.normal(size=p)
    pr, st_ = _proj(name, seed, p, k)
    out = np.asarray(pr.apply(st_, jnp.asarray(np.stack([x, y]), jnp.float32)), np.float64)
    err = abs(out[0] @ out[1] - x @ y) / (np.linalg.norm(x) * np.linalg.norm(y))
    # std of the error is about sqrt(2/k) = 0.044 for every kind here; 6 sigma
    assert err < 6 * np.sqrt(2 / k)
    assert abs(out[0] @ out[0] / (x @ x) - 1) < 6 * np.sqrt(2 / k)


@pytest.mark.parametrize("name", RANDOM)
def test_norms_are_unbiased_over_seeds(name):
    p, k = 300, 64
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, p)), jnp.float32)
    ratios = []
    for seed in range(40):
        pr, s = _proj(name, seed, p, k)
        ratios.append(float(jnp.sum(pr.apply(s, x) ** 2) / jnp.sum(x**2)))
    # mean of 40 ratios, each with std ~ sqrt(2/64) = 0.18: std of the mean 0.028
    assert abs(np.mean(ratios) - 1) < 0.12


@settings(max_examples=15)
@given(
    name=st.sampled_from(PROJECTORS[:-1]),  # pallas: tests/kernels (interpret mode is slow)
    seed=st.integers(0, 2**31 - 1),
    p=st.sampled_from([2, 37, 300]),  # few shapes: each new shape compiles
    split=st.sampled_from([0.0, 0.3, 1.0]),
    b=st.sampled_from([1, 4]),
)
def test_deterministic_across_batch_sizes_and_chunkings(name, seed, p, split, b):
    k = 48
    x = jnp.asarray(np.random.default_rng(seed % 1000).normal(size=(b, p)), jnp.float32)
    pr, s = _proj(name, seed, p, k)
    whole = np.asarray(pr.apply(s, x))
    # row by row (batch size 1)
    rows = np.concatenate([np.asarray(pr.apply(s, x[i : i + 1])) for i in range(b)])
    np.testing.assert_allclose(rows, whole, rtol=1e-5, atol=1e-5)
    # two coordinate chunks add up
    a = int(split * p)
    parts = np.zeros_like(whole)
    if a > 0:
        parts += np.asarray(pr.apply(s, x[:, :a], row_offset=0))
    if a < p:
        parts += np.asarray(pr.apply(s, x[:, a:], row_offset=a))
    np.testing.assert_allclose(parts, whole, rtol=1e-5, atol=1e-5)
    # rebuilt from the same (seed, P, k): identical
    pr2, s2 = _proj(name, seed, p, k)
    np.testing.assert_array_equal(np.asarray(pr2.apply(s2, x)), whole)


def test_chunked_independent_of_block_rows():
    x = jnp.asarray(np.random.default_rng(1).normal(size=(3, 777)), jnp.float32)
    outs = [
        np.asarray(make_projector("chunked", 4, 777, 64, block_rows=r).apply((), x))
        for r in (1, 50, 777, 4096)
    ]
    for o in outs[1:]:
        np.testing.assert_allclose(o, outs[0], rtol=1e-5, atol=1e-5)


def test_chunked_equals_pallas_interpret():
    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 300)), jnp.float32)
    a = make_projector("chunked", 9, 300, 128).apply((), x)
    b = make_projector("pallas", 9, 300, 128, interpret=True).apply((), x)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", RANDOM)
def test_different_seeds_differ(name):
    x = jnp.ones((1, 200), jnp.float32)
    a = make_projector(name, 0, 200, 32, block_rows=64)
    b = make_projector(name, 1, 200, 32, block_rows=64)
    assert not np.allclose(np.asarray(a.apply(a.init(), x)), np.asarray(b.apply(b.init(), x)))


def test_sjlt_and_chunked_jit_with_traced_offset():
    pr = make_projector("sjlt", 3, 100, 16)
    x = jnp.ones((2, 40), jnp.float32)
    f = jax.jit(lambda x, o: pr.apply((), x, row_offset=o))
    np.testing.assert_allclose(np.asarray(f(x, 60)), np.asarray(pr.apply((), x, row_offset=60)))


def test_bad_arguments_raise_project_errors():
    with pytest.raises(InfluenceError, match="unknown projector"):
        make_projector("nope", 0, 10, 4)
    with pytest.raises(InfluenceError, match="proj_dim > 0"):
        make_projector("sjlt", 0, 10, None)
    with pytest.raises(InfluenceError, match="materialise"):
        make_projector("dense", 0, 2**20, 2**12)
    pr = make_projector("sjlt", 0, 10, 4)
    with pytest.raises(InfluenceError, match="P=10"):
        pr.apply((), jnp.ones((1, 11)))
    with pytest.raises(InfluenceError, match=r"\[B, P\]"):
        pr.apply((), jnp.ones(10))


def test_pallas_interpret_follows_the_backend():
    """``interpret=None`` (the default): interpreted exactly on the CPU backend; an explicit value wins."""
    from duet_jax.influence.projectors import pallas_interpret

    on_cpu = jax.default_backend() == "cpu"
    assert pallas_interpret() is on_cpu and pallas_interpret(True) is True and pallas_interpret(False) is False
    assert make_projector("pallas", 9, 300, 128).interpret is on_cpu
    assert make_projector("pallas", 9, 300, 128, interpret=True).interpret is True
    x = jnp.asarray(np.random.default_rng(3).normal(size=(3, 300)), jnp.float32)
    a = make_projector("chunked", 9, 300, 128).apply((), x)
    b = make_projector("pallas", 9, 300, 128).apply((), x)  # no option: runs on any backend
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
