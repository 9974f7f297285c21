"""The Pallas projection kernel (interpret mode on CPU) against its pure-jnp reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from duet_kernels.projection import (
    project_pallas,
    project_reference,
    seed_key,
    signs,
)


def _x(b, p, seed=0):
    return jax.random.normal(jax.random.PRNGKey(seed), (b, p), jnp.float32)


@pytest.mark.parametrize(
    "b,p,k,bp,bk,offset",
    [(3, 300, 200, 128, 128, 0), (8, 256, 128, 128, 128, 7), (1, 1000, 96, 256, 128, 0)],
)
def test_pallas_interpret_matches_reference(b, p, k, bp, bk, offset):
    x = _x(b, p)
    ref = project_reference(x, seed=11, k=k, row_offset=offset, block_rows=64)
    out = project_pallas(
        x, seed=11, k=k, row_offset=offset, block_p=bp, block_k=bk, interpret=True
    )
    assert out.shape == (b, k) and out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-4)


def test_reference_equals_explicit_matrix():
    x = _x(4, 333)
    s = signs(seed_key(5), jnp.arange(333)[:, None], jnp.arange(70)[None, :])
    want = np.asarray(x) @ np.asarray(s) / np.sqrt(70)
    got = project_reference(x, seed=5, k=70, block_rows=50)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-4)


def test_signs_are_balanced_and_seeded():
    r, c = jnp.arange(512)[:, None], jnp.arange(256)[None, :]
    a = np.asarray(signs(seed_key(1), r, c))
    b = np.asarray(signs(seed_key(2), r, c))
    assert set(np.unique(a)) == {-1.0, 1.0}
    assert abs(a.mean()) < 0.01  # 131072 fair signs: std of the mean is 0.0028
    assert abs((a * b).mean()) < 0.01  # different seeds are unrelated
    # columns of one row differ (the bit expansion is not constant across words)
    assert abs(np.corrcoef(a[:, 0], a[:, 32])[0, 1]) < 0.2


def test_pallas_under_jit_and_row_offset_additivity():
    x = _x(2, 512)
    whole = project_pallas(x, seed=3, k=128, block_p=128, block_k=128, interpret=True)
    parts = project_pallas(
        x[:, :256], seed=3, k=128, block_p=128, block_k=128, interpret=True
    ) + project_pallas(
        x[:, 256:], seed=3, k=128, row_offset=256, block_p=128, block_k=128, interpret=True
    )
    np.testing.assert_allclose(np.asarray(whole), np.asarray(parts), rtol=1e-5, atol=1e-4)
