"""The loop's pieces on their own: proposers (replayable, capped), capped ratios, the divergence
check, the feedback protocol, and the local step (one compiled program, compiled once)."""

import math

import jax
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from duet_jax.bo.config import BOConfig
from duet_jax.config import preset
from duet_jax.loop.feedback import EvalInfo, ExternalFeedback, Outcome, TaskFeedback
from duet_jax.loop.local_step import LocalStep, divergence, local_program
from duet_jax.loop.proposers import BOProposer, FixedRatio, RandomSearch, warm_start_ratios
from duet_jax.loop.setting import Setting, plan_data
from duet_jax.mixture import cap_ratio, largest_remainder, share_caps

FAST_BO = BOConfig(fit_steps=20, fit_restarts=2, n_raw=64, n_starts=2, ascent_steps=10)


# ------------------------------------------------------------------ proposers
def test_bo_proposer_replays_and_random_search_shares_its_warm_start():
    f = lambda r: -float(np.sum((r - np.array([0.6, 0.3, 0.1])) ** 2))
    a = BOProposer(3, warm_start=2, seed=3, config=FAST_BO)
    asks = []
    for _ in range(4):
        r = a.ask()
        asks.append(r)
        a.tell(r, f(r))
    b = BOProposer(3, warm_start=2, seed=3, config=FAST_BO)  # a resumed run: same tells, same asks
    for r in asks:
        np.testing.assert_allclose(b.ask(), r, atol=1e-12)
        b.tell(r, f(r))
    np.testing.assert_allclose(asks[0], 1 / 3)
    rs = RandomSearch(3, seed=3)
    for w in warm_start_ratios(3, 2, 3):
        np.testing.assert_allclose(rs.ask(), w)
    fixed = FixedRatio([0.2, 0.8])
    fixed.tell(fixed.ask(), 1.0)
    np.testing.assert_allclose(fixed.ask(), [0.2, 0.8])


def test_proposals_respect_domain_sizes_without_replacement():
    available, budget = np.array([4, 50, 6]), 40
    caps = share_caps(budget, available, replace=False)
    a = BOProposer(3, warm_start=3, seed=0, config=FAST_BO, caps=caps)
    rs = RandomSearch(3, seed=0, caps=caps)
    for _ in range(5):
        for p in (a, rs):
            r = p.ask()
            assert np.all(r <= caps + 1e-9) and abs(r.sum() - 1) < 1e-9
            counts = np.asarray(largest_remainder(cap_ratio(r, caps, budget, available), budget))
            assert np.all(counts <= available)
            p.tell(r, float(r[1]))


@given(st.lists(st.floats(0, 1), min_size=2, max_size=8), st.integers(1, 200), st.data())
def test_cap_ratio_is_feasible_and_identity_when_it_fits(raw, budget, data):
    n = len(raw)
    avail = np.asarray(data.draw(st.lists(st.integers(0, 120), min_size=n, max_size=n)))
    if avail.sum() < budget:
        return
    caps = share_caps(budget, avail, replace=False)
    r = cap_ratio(raw, caps, budget, avail)
    assert abs(r.sum() - 1) < 1e-9 and np.all(r >= 0)
    counts = np.asarray(largest_remainder(r, budget))
    assert counts.sum() == budget and np.all(counts <= avail)
    free = cap_ratio(raw, None)
    if np.all(free <= caps):
        np.testing.assert_allclose(cap_ratio(raw, caps), free, atol=1e-12)


# ------------------------------------------------------------------ divergence
def test_divergence_reasons():
    V = 49152
    healthy = np.linspace(3.0, 2.2, 16) + 0.05 * np.sin(np.arange(16))
    assert divergence(healthy, V) is None
    assert "NaN or infinite at step 3" in divergence(healthy, V, bad_step=3, learning_rate=1.0)
    collapse = np.concatenate([np.linspace(3.0, 8.0, 8), np.full(8, math.log(V))])
    assert "uniform-prediction" in divergence(collapse, V)
    rose = np.linspace(2.0, 3.0, 16)
    assert "above the initial loss" in divergence(rose, V)
    assert divergence(np.array([2.0, 3.3]), V) is None  # too few steps to call a rise
    noisy = 2.0 + 0.1 * np.tile([1.0, -1.0], 8)  # batch noise is not a rise
    assert divergence(noisy[::-1], V) is None
    # a random model starts at ln(V): staying there is not a collapse
    assert divergence(np.full(16, math.log(V)) - np.linspace(0, 0.1, 16), V) is None


# ------------------------------------------------------------------ feedback and the local step
@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    cfg = preset("smoke", method="duet_ur", k=2)
    plan = plan_data(cfg, log=lambda s: None)
    return Setting.build(cfg, plan, tmp_path_factory.mktemp("run"), log=lambda s: None)


def test_local_step_is_one_program_compiled_once(setting):
    from duet_jax.mixture import uniform_weights

    fb = TaskFeedback("neg_loss")
    fb.prepare(setting)
    step = LocalStep(setting, uniform_weights(setting.domain_of_device()), fb)
    before = local_program._cache_size()
    a = step(np.array([0.2, 0.3, 0.5]), 0, 0, "warm")
    first = local_program._cache_size()
    assert first <= before + 1  # one program (or none: an earlier test compiled this shape)
    b = step(np.array([0.7, 0.2, 0.1]), 1, 1, "round")
    assert local_program._cache_size() == first  # a new ratio does not recompile
    for ev in (a, b):
        r = ev.record
        assert len(r["feedbacks"]) == 2 and r["feedback"] == max(r["feedbacks"]) and not r["failed"]
        assert sum(r["counts"].values()) == setting.config.budget and r["errors"] == [None, None]
    # the compiled scores equal the host evaluator's on the same adapters
    host = fb(a.loras, EvalInfo(0, 0, a.record["seed"], a.record["ratio"]))
    np.testing.assert_allclose([o.value for o in host], a.record["feedbacks"], rtol=1e-5)
    # the same evaluation index gives the same adapters (resume and repair rely on it)
    again = step(np.array([0.2, 0.3, 0.5]), 0, 0, "warm")
    assert again.record["feedbacks"] == a.record["feedbacks"]


def test_nan_training_is_a_recorded_failure_not_a_crash(setting):
    import dataclasses

    from duet_jax.mixture import uniform_weights

    cfg = dataclasses.replace(setting.config, train=dataclasses.replace(setting.config.train,
                                                                         learning_rate=1e30))
    s = dataclasses.replace(setting, config=cfg)
    fb = TaskFeedback("neg_loss")
    fb.prepare(s)
    ev = LocalStep(s, uniform_weights(s.domain_of_device()), fb)(np.full(3, 1 / 3), 0, 0, "warm")
    r = ev.record
    assert r["failed"] and r["feedback"] is None and r["feedbacks"] == [None, None]
    assert all("NaN or infinite" in e or "diverged" in e for e in r["errors"]), r["errors"]


def test_external_feedback_callable_protocol(setting, tmp_path):
    import dataclasses
    import sys
    import types

    mod = types.ModuleType("fbmod_test")
    mod.good = lambda req: 0.5 if (req.adapter_dir / "adapter_config.json").exists() else -1.0
    mod.bad = lambda req: (_ for _ in ()).throw(RuntimeError("evaluator down"))
    sys.modules["fbmod_test"] = mod
    lora = jax.tree.map(lambda a: np.stack([a, a]), setting.lora0)
    s = dataclasses.replace(setting, run_dir=tmp_path)
    info = EvalInfo(3, 1, 7, dict(zip(s.names, [1 / 3] * 3, strict=True)))
    good = ExternalFeedback(dataclasses.replace(s.config.feedback, callable="fbmod_test:good"))
    good.prepare(s)
    assert good(lora, info) == [Outcome(0.5), Outcome(0.5)]
    assert (tmp_path / "adapters" / "eval0003_1" / "adapter_config.json").exists()
    bad = ExternalFeedback(dataclasses.replace(s.config.feedback, callable="fbmod_test:bad"))
    bad.prepare(s)
    out = bad(lora, info)
    assert all(o.value is None and "evaluator down" in o.error for o in out)


# ------------------------------------------------------------------ the shared trunk cache
def test_trunk_dir_shares_the_frozen_trunk_between_runs(tmp_path, monkeypatch):
    import dataclasses

    from duet_jax.config import config_hash
    from duet_jax.loop import setting as setting_mod

    cfg = preset("smoke", method="uniform", trunk_dir=str(tmp_path / "trunk"))
    assert config_hash(cfg) == config_hash(dataclasses.replace(cfg, trunk_dir=None))
    plan = plan_data(cfg, log=lambda s: None)
    calls = []
    real = setting_mod.trunk_hidden
    monkeypatch.setattr(setting_mod, "trunk_hidden", lambda *a, **k: calls.append(1) or real(*a, **k))
    a = Setting.build(cfg, plan, tmp_path / "a", log=lambda s: None)
    assert a.start > 0 and len(calls) == 1
    files = sorted((tmp_path / "trunk").glob("*.npy"))
    assert len(files) == 1
    b = Setting.build(cfg, plan, tmp_path / "b", log=lambda s: None)  # another run: read, not computed
    assert len(calls) == 1
    np.testing.assert_array_equal(np.asarray(b.pool.hidden), np.asarray(a.pool.hidden))
    # other rows (the validation pool) are another entry
    b.validation_pool()
    assert len(calls) == 2 and len(list((tmp_path / "trunk").glob("*.npy"))) == 2
    # a torn file is recomputed and replaced, with a message
    files[0].write_bytes(b"\x93NUMPY torn")
    lines = []
    c = Setting.build(cfg, plan, tmp_path / "c", log=lines.append)
    assert len(calls) == 3 and any("unreadable" in s for s in lines)
    np.testing.assert_array_equal(np.asarray(c.pool.hidden), np.asarray(a.pool.hidden))
    np.testing.assert_array_equal(np.load(files[0]), np.asarray(a.pool.hidden))
    # other frozen weights (a new checkpoint at the same path) give another key
    key = a._trunk_key(a.pool)
    other = dataclasses.replace(a, frozen=jax.tree.map(lambda x: x * 1.5, a.frozen), _cache={})
    assert other._trunk_key(a.pool) != key and a._trunk_key(a.pool) == key


def test_influence_scores_are_reused_only_for_the_same_inputs(tmp_path, monkeypatch):
    import dataclasses

    from duet_jax.influence import domains
    from duet_jax.loop import setting as setting_mod

    cfg = preset("smoke", method="duet_if", influence_dir=str(tmp_path / "inf"))
    plan = plan_data(cfg, log=lambda s: None)
    calls = []
    real = domains.domain_influence
    monkeypatch.setattr(domains, "domain_influence", lambda *a, **k: calls.append(1) or real(*a, **k))
    a = Setting.build(cfg, plan, tmp_path / "a", log=lambda s: None)
    ra = a.influence()
    assert len(calls) == 1 and (tmp_path / "inf" / "scores_key.json").exists()
    lines = []
    b = Setting.build(cfg, plan, tmp_path / "b", log=lines.append)  # another method's run, same seed
    rb = b.influence()
    assert len(calls) == 1 and any("reused" in s for s in lines)
    np.testing.assert_array_equal(rb.scores, ra.scores)
    np.testing.assert_array_equal(rb.valid, ra.valid)
    assert rb.per_domain == ra.per_domain
    # another influence config, or other weights at the same path: computed again, never reused
    c_cfg = dataclasses.replace(cfg, influence=dataclasses.replace(cfg.influence, proxy_examples=cfg.influence.proxy_examples + 1))
    c = Setting.build(c_cfg, plan, tmp_path / "c", log=lambda s: None)
    fp = b._influence_fingerprint("m", *b.validation_pool(), None)
    assert fp == a._influence_fingerprint("m", *a.validation_pool(), None)
    assert c._influence_fingerprint("m", *c.validation_pool(), None) != fp
    other = dataclasses.replace(b, frozen=jax.tree.map(lambda x: x * 1.5, b.frozen), _cache={})
    assert other._influence_fingerprint("m", *b.validation_pool(), None) != fp
    # a kill between the arrays and the key leaves nothing to reuse: computed again
    (tmp_path / "inf" / "scores_key.json").unlink()
    rd = Setting.build(cfg, plan, tmp_path / "d", log=lambda s: None).influence()
    assert len(calls) == 2
    np.testing.assert_array_equal(rd.scores, ra.scores)  # (from the feature stores: the same scores)
    assert setting_mod._load_scores(tmp_path / "inf", "not-this-one", len(ra.scores)) is None
