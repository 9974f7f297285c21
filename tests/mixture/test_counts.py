"""Ratio -> counts: non-negative, sums to the budget, within 1 of r*M, deterministic."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from duet_jax.errors import ConfigError
from duet_jax.mixture import apply_min_share, largest_remainder, ratio_to_counts

ratios = st.lists(st.floats(0, 1), min_size=1, max_size=12).filter(lambda v: sum(v) > 1e-3).map(
    lambda v: np.asarray(v) / np.sum(v))


@given(ratios, st.integers(1, 20000))
def test_counts_properties(r, m):
    c = np.asarray(largest_remainder(r, m))
    assert c.dtype == np.int32 and (c >= 0).all() and c.sum() == m
    assert np.all(np.abs(c - r * m) < 1 + 1e-3 * m * 1e-2)  # float32 slack on r*M
    assert (c == np.asarray(largest_remainder(r, m))).all()


def test_known_apportionment():
    assert largest_remainder(np.array([0.5, 0.3, 0.2]), 10).tolist() == [5, 3, 2]
    assert largest_remainder(np.array([1 / 3] * 3), 10).tolist() == [4, 3, 3]  # tie -> lower index
    assert largest_remainder(np.array([0.0, 1.0]), 7).tolist() == [0, 7]


def test_ratio_to_counts_checks():
    assert ratio_to_counts([0.25, 0.75], 8, available=[2, 6]).tolist() == [2, 6]
    with pytest.raises(ConfigError, match="more examples than"):
        ratio_to_counts([0.5, 0.5], 8, available=[2, 6])
    assert ratio_to_counts([0.5, 0.5], 8, available=[2, 6], replace=True).tolist() == [4, 4]
    for bad in ([0.5, 0.6], [-0.1, 1.1], [np.nan, 1.0]):
        with pytest.raises(ConfigError):
            ratio_to_counts(bad, 8)
    with pytest.raises(ConfigError, match="budget"):
        ratio_to_counts([1.0], 0)


def test_min_share_renormalises_unless_asked():
    r = np.array([0.02, 0.48, 0.5])
    assert np.allclose(apply_min_share(r, 0.05), [0, 0.48 / 0.98, 0.5 / 0.98])
    assert np.allclose(apply_min_share(r, 0.05, renormalize=False), [0, 0.48, 0.5])  # released code
    assert apply_min_share(np.array([0.3, 0.3, 0.4]), 0.5).tolist() == [0, 0, 1.0]
