"""Named profiles of BOConfig and the new options' validation."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from duet_jax.bo import BOConfig, x64
from duet_jax.bo.config import BO_PROFILES
from duet_jax.bo.optimize import maximize_acquisition
from duet_jax.bo.simplex import face_draws, raw_candidates
from duet_jax.errors import ConfigError

from .common import FAST, on_simplex


def test_profiles_default_and_paper():
    assert set(BO_PROFILES) >= {"default", "paper"}
    assert BOConfig.from_profile("default") == BOConfig()
    assert BOConfig().profile == "default"
    paper = BOConfig.from_profile("paper")
    assert paper.profile == "paper"
    assert (paper.kernel, paper.acquisition, paper.beta, paper.beta_schedule) == (
        "matern52", "ucb", 1.0, "constant")
    assert paper.dedup_tol == 0.0 and paper.raw_local == 0 and paper.raw_sparse == 0.0
    # the lead's resolution of `--bo.profile paper --bo.beta 2`
    p2 = BOConfig.from_profile("paper", beta=2.0)
    assert p2.beta == 2.0 and p2.acquisition == "ucb" and p2.profile == "paper"
    with pytest.raises(ConfigError, match="unknown profile"):
        BOConfig.from_profile("nope")
    with pytest.raises(ConfigError, match="profile"):
        BOConfig(profile="nope")
    # every profile names real fields and builds
    names = {f.name for f in dataclasses.fields(BOConfig)}
    for name, fields in BO_PROFILES.items():
        assert set(fields) <= names
        assert BOConfig.from_profile(name).profile == name


def test_dict_round_trip_and_validation():
    cfg = BOConfig.from_profile("paper", lengthscale_gamma=[2, 10], dedup_tol=0.03)
    assert cfg.lengthscale_gamma == (2.0, 10.0)
    back = BOConfig.from_dict(cfg.to_dict())
    assert back == cfg and hash(back) == hash(cfg)
    for bad in (dict(lengthscale_gamma=(1.0,)), dict(lengthscale_gamma=(0.0, 1.0)),
                dict(raw_sparse=1.5), dict(dedup_tol=-0.1), dict(raw_local=-1),
                dict(local_sd=0.0), dict(acquisition="nope")):
        with pytest.raises(ConfigError):
            BOConfig(**bad)


def test_face_draws_and_spread_candidates_are_on_the_simplex():
    with x64():
        x = np.asarray(face_draws(jax.random.PRNGKey(0), 400, 6))
        assert on_simplex(x)
        zeros = (x == 0).sum(1)
        assert zeros.mean() > 2.0 and zeros.max() <= 5  # on faces, never empty
        centers = jnp.asarray([[0.7, 0.1, 0.1, 0.05, 0.05, 0.0]])
        c = np.asarray(raw_candidates(jax.random.PRNGKey(1), 6, 64, jnp.zeros(6), jnp.ones(6),
                                      False, sparse=0.5, centers=centers, n_local=32))
        assert on_simplex(c) and len(c) == 64 + 6 + 15 + 1 + 32
        local = c[-32:]
        assert np.max(np.abs(local - centers), axis=1).mean() < 0.15  # near the centre


def test_refused_points_are_never_returned():
    """The near-duplicate check: the maximiser of the score lies in the refused ball, so the
    answer is the best point outside it."""
    d = 3
    target = jnp.asarray([0.5, 0.3, 0.2])
    score = lambda xs: -jnp.sum((xs - target) ** 2, axis=-1)  # noqa: E731
    allowed = lambda xs: jnp.max(jnp.abs(xs - target), axis=-1) >= 0.1  # noqa: E731
    with x64():
        lo, hi = jnp.zeros(d), jnp.ones(d)
        x_free, _ = maximize_acquisition(score, jax.random.PRNGKey(0), d, FAST, lo, hi)
        x_ref, _ = maximize_acquisition(score, jax.random.PRNGKey(0), d, FAST, lo, hi,
                                        allowed=allowed)
        x_none, _ = maximize_acquisition(score, jax.random.PRNGKey(0), d, FAST, lo, hi,
                                         allowed=lambda xs: jnp.zeros(xs.shape[0], bool))
    assert np.max(np.abs(np.asarray(x_free) - np.asarray(target))) < 0.02
    assert np.max(np.abs(np.asarray(x_ref) - np.asarray(target))) >= 0.1
    assert np.max(np.abs(np.asarray(x_ref) - np.asarray(target))) < 0.2  # and close outside
    assert on_simplex(np.asarray(x_none)[None], 1e-9)  # nothing allowed: still a ratio


def test_portfolio_members_take_turns():
    """A portfolio of one member is that acquisition (same asks, same PRNG use); a mixed
    portfolio with Thompson sampling proposes on the simplex and replays identically."""
    from duet_jax.bo import SimplexBO

    for bad in ((), ("logei", "nope"), "ucb"):
        with pytest.raises(ConfigError, match="portfolio"):
            BOConfig(portfolio=bad)
    assert BOConfig(portfolio=["ts", "ucb"]).portfolio == ("thompson", "ucb")
    assert BOConfig.from_dict(BOConfig(portfolio=("ucb",)).to_dict()).portfolio == ("ucb",)
    target = np.array([0.6, 0.3, 0.1])

    def asks(cfg, n=6):
        opt = SimplexBO(3, seed=1, config=cfg)
        out = []
        for _ in range(n):
            r = opt.ask()[0]
            assert on_simplex(r[None])
            out.append(r)
            opt.tell(r, -float(np.sum((r - target) ** 2)))
        return np.array(out)

    one = dataclasses.replace(FAST, acquisition="portfolio", portfolio=("thompson",))
    np.testing.assert_array_equal(asks(one), asks(dataclasses.replace(FAST, acquisition="thompson")))
    trio = dataclasses.replace(FAST, portfolio=("logei", "ucb", "thompson"))
    a = asks(trio, 8)
    np.testing.assert_array_equal(a, asks(trio, 8))
    assert len({tuple(np.round(r, 6)) for r in a}) == len(a)
