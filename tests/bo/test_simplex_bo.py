"""The ask/tell optimiser: warm start, proposals, batches, bounds, state, compile count, bad input."""

import json

import numpy as np
import pytest

from duet_jax.bo import BOConfig, SimplexBO, loop, x64
from duet_jax.bo.optimize import trace_counts
from duet_jax.bo.synthetic import smooth
from duet_jax.errors import BOError, ConfigError

from .common import FAST, on_simplex

F3 = smooth(3)


def f3(r):
    with x64():
        return float(F3(np.asarray(r)))


def _drive(opt, n, f=f3):
    for _ in range(n):
        r = opt.ask()[0]
        opt.tell(r, f(r))
    return opt


def test_warm_start_then_gp_and_compile_count():
    """Data growing from 4 to 15 points reuses one compiled round; 16+ compiles once more."""
    opt = SimplexBO(3, seed=0, config=FAST)
    assert opt.n_init == 4
    design = [opt.ask()[0] for _ in range(4)]  # asked before any tell: pending, all different
    assert on_simplex(np.array(design))
    assert min(np.linalg.norm(a - b) for i, a in enumerate(design) for b in design[:i]) > 0.05
    for r in design:
        opt.tell(r, f3(r))
    assert len(opt.pending) == 0
    before = trace_counts().get("propose", 0)
    _drive(opt, 11)  # GP rounds with 4..14 observations: capacity 16
    assert opt.n_observations == 15
    assert trace_counts()["propose"] - before <= 1  # at most the first (if no other test did)
    after16 = trace_counts()["propose"]
    _drive(opt, 3)  # 15, 16, 17 observations (+1 for the proposal): capacity 16 then 32
    assert trace_counts()["propose"] - after16 <= 1
    x, y, failed = opt.history()
    assert on_simplex(x) and not failed.any()
    assert opt.best()[1] == y.max()
    assert opt.last_round is not None and np.isfinite(opt.last_round.loss)
    # The GP found a good ratio on this easy function.
    assert opt.best()[1] > 0.99


def test_json_round_trip_reloads_exactly(tmp_path):
    opt = _drive(SimplexBO(3, seed=1, config=FAST), 6)
    opt.ask(), opt.ask()  # two pending ratios
    text = opt.to_json()
    clone = SimplexBO.from_json(text)
    assert clone.to_json() == text
    json.loads(text)  # plain JSON
    np.testing.assert_array_equal(clone.pending, opt.pending)
    a, b = opt.ask(), clone.ask()
    np.testing.assert_array_equal(a, b)  # bitwise: same data, params and key
    opt.save(tmp_path / "bo.json")
    again = SimplexBO.load(tmp_path / "bo.json")
    assert again.to_json() == opt.to_json()


def test_failed_evaluations_are_recorded_or_rejected():
    strict = SimplexBO(3, seed=0, config=FAST)
    r = strict.ask()[0]
    with pytest.raises(BOError, match="finite"):
        strict.tell(r, float("nan"))
    with pytest.raises(BOError, match="finite"):
        strict.tell([r, r], [1.0, float("inf")])
    assert strict.n_observations == 0  # nothing recorded from a rejected tell

    opt = SimplexBO(3, seed=0, config=FAST.replace(on_nonfinite="record"))
    _drive(opt, 4)
    r = opt.ask()[0]
    opt.tell(r, float("nan"))
    opt.tell([0.1, 0.1, 0.8], float("-inf"))
    x, y, failed = opt.history()
    assert failed.tolist() == [False] * 4 + [True, True]
    assert np.isnan(y[4]) and y[5] == -np.inf
    assert np.isfinite(opt.best()[1])  # failed ones never win
    nxt = opt.ask()  # the fit leaves them out
    assert on_simplex(nxt)
    clone = SimplexBO.from_json(opt.to_json())
    assert np.isnan(clone.history()[1][4]) and clone.history()[1][5] == -np.inf


def test_duplicates_and_tiny_data():
    opt = SimplexBO(3, seed=0, config=FAST.replace(n_init=0))
    first = opt.ask()  # no data: a space-filling point
    assert on_simplex(first)
    opt.tell(first[0], 0.5)
    one = opt.ask()  # one observation: the GP with its prior's hyperparameters
    assert on_simplex(one)
    for _ in range(3):  # the same ratio again and again, with different values
        opt.tell(first[0], 0.5 + 0.01 * np.random.default_rng(_).normal())
    opt.tell(one[0], 0.1)
    out = opt.ask(2)
    assert out.shape == (2, 3) and on_simplex(out)
    with pytest.raises(BOError, match="no successful"):
        SimplexBO(3).best()


def test_dimension_one():
    opt = SimplexBO(1)
    np.testing.assert_array_equal(opt.ask(3), np.ones((3, 1)))
    opt.tell([[1.0]], [0.3])
    opt.tell([1.0], 0.4)
    assert opt.best() == (np.array([1.0]), 0.4)
    assert SimplexBO.from_json(opt.to_json()).best()[1] == 0.4


def test_minimise_batches_bounds_fixed_domains_and_min_share():
    cfg = FAST.replace(lower=(0.1, 0.0, 0.0, 0.0), upper=(0.5, 1.0, 1.0, 0.3), fixed=((2, 0.2),),
                       min_share=0.05, acquisition="logei", n_init=3)
    opt = SimplexBO(4, maximize=False, seed=3, config=cfg)
    lo, hi = cfg.bounds(4)

    def loss(r):
        return float(np.sum((r - np.array([0.4, 0.33, 0.2, 0.07])) ** 2))

    for _ in range(3):  # a warm-start batch, then two batches of three GP proposals
        batch = opt.ask(3)
        assert batch.shape == (3, 4) and on_simplex(batch)
        assert np.all(batch >= np.array(lo) - 1e-12) and np.all(batch <= np.array(hi) + 1e-12)
        np.testing.assert_allclose(batch[:, 2], 0.2, atol=1e-12)
        assert np.all((batch == 0) | (batch >= 0.05))
        d = np.linalg.norm(batch[:, None] - batch[None], axis=-1)
        assert d[np.triu_indices(3, 1)].min() > 1e-3  # kriging believer: three different ratios
        opt.tell(batch, [loss(r) for r in batch])
    r, v = opt.best()
    assert v == min(opt.history()[1]) and v < 0.05


@pytest.mark.parametrize("acquisition", ["ei", "thompson"])
def test_other_acquisitions_propose_on_the_simplex(acquisition):
    opt = _drive(SimplexBO(3, seed=0, config=FAST.replace(acquisition=acquisition)), 8)
    assert on_simplex(opt.history()[0]) and opt.best()[1] > 0.8  # a random ratio: 0 on average


def test_min_share_without_renormalising_reproduces_the_released_code():
    legacy = SimplexBO(4, seed=0, config=FAST.replace(min_share=0.3, renormalize_min_share=False))
    r = legacy.ask(4)  # warm-start design, post-processed like every proposal
    assert np.all((r == 0) | (r >= 0.3)) and np.all(r.sum(1) <= 1 + 1e-12)
    assert np.any(r.sum(1) < 1 - 1e-6)  # the budget shrank, as in the released code
    legacy.tell(r, np.arange(4.0))  # such rows are accepted back
    with pytest.raises(BOError, match="sum to 1"):
        SimplexBO(4, seed=0, config=FAST).tell(r[np.argmin(r.sum(1))], 0.0)


def test_igp_ucb_beta_grows_over_rounds():
    opt = SimplexBO(3, seed=0, config=FAST.replace(beta_schedule="igp_ucb"))
    betas = []
    for _ in range(8):
        r = opt.ask()[0]
        opt.tell(r, f3(r))
        if opt.last_round is not None:
            betas.append(float(opt.last_round.beta))
    assert len(betas) >= 3 and betas[-1] > betas[0] > 1.0


def test_bad_input_messages():
    with pytest.raises(BOError, match="dim"):
        SimplexBO(0)
    with pytest.raises(ConfigError, match="acquisition"):
        SimplexBO(3, acquisition="pi")
    with pytest.raises(BOError, match="no ratio fits"):
        SimplexBO(3, lower=(0.5, 0.5, 0.5))
    with pytest.raises(BOError, match="length"):
        SimplexBO(3, upper=(1.0, 1.0))
    opt = SimplexBO(3)
    with pytest.raises(BOError, match="shape"):
        opt.tell([0.5, 0.5], 1.0)
    with pytest.raises(BOError, match="sum to 1"):
        opt.tell([0.5, 0.5, 0.5], 1.0)
    with pytest.raises(BOError, match="non-negative"):
        opt.tell([1.2, -0.2, 0.0], 1.0)
    with pytest.raises(BOError, match="value"):
        opt.tell([[0.2, 0.3, 0.5]], [1.0, 2.0])
    with pytest.raises(BOError, match="NaN"):
        opt.tell([np.nan, 0.5, 0.5], 1.0)
    with pytest.raises(BOError, match="n must"):
        opt.ask(0)
    with pytest.raises(BOError, match="format"):
        SimplexBO.from_state({"format": "other"})
    # The config round-trips through JSON (tuples come back as lists).
    cfg = BOConfig(lower=(0.1, 0, 0), fixed=((1, 0.2),))
    assert BOConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def _explore_run(f, noise, explore_snr, seed=0, n=14):
    """SimplexBO on ``f`` in 4 domains with Gaussian feedback noise; the rounds' ``explored`` flags
    and asks after the warm start."""
    rng = np.random.default_rng(seed)
    opt = SimplexBO(4, seed=seed, config=FAST.replace(explore_snr=explore_snr))
    flags, asks = [], []
    for _ in range(n):
        r = opt.ask()[0]
        if opt.n_observations >= opt.n_init:
            flags.append(bool(opt.last_round.explored[0]))
            asks.append(r)
        with x64():
            v = float(np.asarray(f(r[None]))[0])
        opt.tell(r, v + noise * rng.normal())
    return np.asarray(flags), np.asarray(asks)


def test_uninformed_fallback_draws_interior_ratios_when_the_fit_finds_only_noise():
    f = smooth(4)
    # a threshold no fit reaches: every GP round is the fallback's Dirichlet(1) draw, which is in
    # the interior (a face of the simplex, a share of 0, has probability 0 under Dirichlet(1))
    flags, asks = _explore_run(lambda x: 0.0 * f(x), 1.0, 1e12)
    assert flags.all() and on_simplex(asks) and np.all(asks > 1e-9)
    assert len(np.unique(np.round(asks, 6), axis=0)) == len(asks)  # fresh draws, not one ratio
    # a clear signal without noise: the fit's signal-to-noise is far above 1, the acquisition asks
    flags, _ = _explore_run(f, 0.0, 1.0)
    assert not flags.any()
    # off (the default): never
    flags, _ = _explore_run(lambda x: 0.0 * f(x), 1.0, 0.0)
    assert not flags.any()


def test_explore_snr_is_checked_and_left_out_of_hashes_when_off():
    with pytest.raises(ConfigError, match="explore_snr"):
        BOConfig(explore_snr=-1.0)
    assert "explore_snr" not in BOConfig().fingerprint_dict()
    assert BOConfig(explore_snr=1.0).fingerprint_dict()["explore_snr"] == 1.0


def test_loop_run_returns_each_rounds_fitted_snr_and_fallback_flag():
    f = smooth(3)

    def flat(r):  # one function object for both runs: the second reuses the first's compile
        return 0.0 * f(r)

    cfg = FAST.replace(explore_snr=1.0)
    x, _, info = loop.run(flat, 3, 9, [0, 1], config=cfg, noise_sd=1.0, return_info=True)
    n_init = FAST.resolved_n_init(3)
    assert x.shape == (2, 9, 3) and info.snr.shape == (2, 9 - n_init)
    assert info.explored.shape == (2, 9 - n_init, 1)
    # the flag is exactly the check on the reported ratio (every round has n >= 2 observations)
    np.testing.assert_array_equal(info.explored[..., 0], info.snr < 1.0)
    assert np.all(np.isfinite(info.snr)) and np.all(info.snr > 0)
    x2, _ = loop.run(flat, 3, 9, [0, 1], config=cfg, noise_sd=1.0)
    np.testing.assert_array_equal(x, x2)


def test_recommend_prefers_a_consistent_region_over_a_lucky_outlier():
    """Noisy feedback: the largest told value (an outlier among low neighbours) is not what the
    posterior mean recommends; noiseless distinct values: the same ratio as best()."""
    rng = np.random.default_rng(0)
    good = np.array([0.6, 0.3, 0.1])
    far = np.array([0.05, 0.1, 0.85])
    cluster = np.abs(good + 0.03 * rng.normal(size=(8, 3)))
    near_far = np.abs(far + 0.03 * rng.normal(size=(4, 3)))
    x = np.concatenate([cluster, near_far, far[None]])
    x /= x.sum(1, keepdims=True)
    y = np.concatenate([1.0 + 0.05 * rng.normal(size=8), 0.05 * rng.normal(size=4), [1.25]])
    opt = SimplexBO(3, seed=0)
    opt.tell(x, y)
    rb, vb = opt.best()
    assert np.allclose(rb, x[-1]) and vb == 1.25
    rr, mean, sd = opt.recommend()
    i = int(np.flatnonzero(np.all(np.isclose(x, rr), axis=1))[0])
    assert i < 8, f"recommended row {i}, not one of the consistent cluster"
    assert 0.8 < mean < 1.2 and sd > 0

    smooth = SimplexBO(3, seed=1)
    xs = rng.dirichlet(np.ones(3), 10)
    smooth.tell(xs, -np.sum((xs - good) ** 2, 1))
    assert np.allclose(smooth.recommend()[0], smooth.best()[0])


def test_recommend_changes_no_ask_and_falls_back_to_best_on_tiny_data():
    a, b = SimplexBO(3, seed=2), SimplexBO(3, seed=2)
    for _ in range(4):
        for o in (a, b):
            r = o.ask()[0]
            o.tell(r, float(r[0] - r[1]))
    a.recommend()
    assert np.array_equal(a.ask(), b.ask())  # its own key: the ask stream is untouched
    tiny = SimplexBO(3, seed=0, on_nonfinite="record")
    tiny.tell(np.array([[0.2, 0.3, 0.5], [0.5, 0.5, 0.0], [1.0, 0.0, 0.0]]), [1.0, 2.0, float("nan")])
    r, v, sd = tiny.recommend()  # two successful evaluations: best()
    assert np.allclose(r, [0.5, 0.5, 0.0]) and v == 2.0 and sd == 0.0
