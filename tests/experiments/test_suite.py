"""The experiment harness on the smoke preset (tiny random model): runs, skips finished runs,
resumes a killed one from its run directory, and writes summary.json in the issue's format."""

import json

import numpy as np
import pytest

from experiments import settings, suite


@pytest.fixture
def tiny(monkeypatch):
    spec = settings.SettingSpec("tiny", ("arc_easy", "sciq", "openbookqa"), "ood", ("arc_challenge",), "test")
    monkeypatch.setitem(settings.SETTINGS, "tiny", spec)
    return spec


def _args(tmp_path, *more):
    return ["run", "--settings", "tiny", "--methods", "uniform,random_search", "--seeds", "0",
            "--preset", "smoke", "--warm-start", "2", "--rounds", "0", "--scratch", str(tmp_path / "s"),
            "--results", str(tmp_path / "r"), "--inprocess", *more]


def test_suite_runs_skips_resumes_and_summarises(tmp_path, tiny, monkeypatch):
    res = tmp_path / "r"
    assert suite.main(_args(tmp_path)) == 0
    for m in ("uniform", "random_search"):
        d = json.loads((res / "tiny" / m / "seed0.json").read_text())
        assert d["method"] == m and len(d["history"]) == 2
        assert d["summary"]["best_feedback"] == max(r["feedback"] for r in d["history"])
        assert set(d["accuracy"]) == {"arc_challenge"}
    summ = json.loads((res / "summary.json").read_text())
    e = summ["settings"]["tiny"]["random_search"]
    assert e["seeds"] == 1 and e["metric"] == "neg_loss"
    assert e["mean"] == json.loads((res / "tiny" / "random_search" / "seed0.json").read_text())["summary"]["best_feedback"]

    # a kill after the first evaluation of random_search: its result file is gone, its history has
    # one line; the rerun skips uniform and resumes random_search (the first record kept as it was)
    rdir = suite.run_dir(tmp_path / "s", "demo", "tiny", "random_search", 0)
    first = (rdir / "history.jsonl").read_text().splitlines()[0]
    (rdir / "history.jsonl").write_text(first + "\n")
    for f in ("summary.json", "accuracy.json"):
        (rdir / f).unlink()
    (res / "tiny" / "random_search" / "seed0.json").unlink()
    suite._save_partial(rdir, res, "demo", "tiny", "random_search", 0)  # as a deadline kill leaves it
    partial = suite._partial_dir(res, "demo", "tiny", "random_search", 0)
    assert (partial / "history.jsonl").read_text() == first + "\n"
    ran = []
    real = suite.run_one
    monkeypatch.setattr(suite, "run_one", lambda s, m, *a, **k: (ran.append(m), real(s, m, *a, **k))[1])
    assert suite.main(_args(tmp_path)) == 0
    assert ran == ["random_search"]
    d = json.loads((res / "tiny" / "random_search" / "seed0.json").read_text())
    assert len(d["history"]) == 2 and json.dumps(d["history"][0], sort_keys=True) == \
        json.dumps({**json.loads(first)}, sort_keys=True)
    assert not (res / "partial" / "demo").exists()  # the finished run's partial is gone
    # everything done: nothing runs
    ran.clear()
    assert suite.main(_args(tmp_path)) == 0
    assert ran == []

    # a partial (and a scratch run dir) made before the code's defaults changed: not resumed (the
    # loop would refuse the mixed config), set aside, and the run starts over and finishes
    (res / "tiny" / "random_search" / "seed0.json").unlink()
    cfg = json.loads((rdir / "config.json").read_text())
    cfg["bo"]["beta"] = cfg["bo"]["beta"] + 1.0  # "an older default"
    (rdir / "config.json").write_text(json.dumps(cfg))
    (rdir / "history.jsonl").write_text(first + "\n")
    suite._save_partial(rdir, res, "demo", "tiny", "random_search", 0)
    ran.clear()
    assert suite.main(_args(tmp_path)) == 0
    assert ran == ["random_search"]
    stale = [p for p in rdir.parent.iterdir() if p.name.startswith("seed0.stale-")]
    assert len(stale) == 1 and json.loads((stale[0] / "config.json").read_text())["bo"]["beta"] == cfg["bo"]["beta"]
    d2 = json.loads((res / "tiny" / "random_search" / "seed0.json").read_text())
    assert len(d2["history"]) == 2 and d2["config_hash"] == d["config_hash"]  # the current config, run whole
    assert not (res / "partial" / "demo").exists()


def test_best_so_far():
    h = [{"feedback": -2.0}, {"feedback": None}, {"feedback": -3.0}, {"feedback": -1.0}]
    assert suite.best_so_far(h) == [-2.0, -2.0, -2.0, -1.0]


def test_paired_verdict_uses_common_seeds_and_the_per_seed_spread():
    from experiments.report import _paired, _verdict

    a = {0: -3.50, 1: -3.90, 2: -4.30}  # seeds differ a lot, a is ahead by 0.05 on every seed
    b = {0: -3.55, 1: -3.95, 2: -4.36, 7: 0.0}
    v, d = _paired(a, b)
    assert v == "win" and len(d) == 3 and all(x > 0 for x in d)
    assert _verdict(list(a.values()), list(b.values())[:3]) == "tie"  # unpaired: the seed spread hides it
    assert _paired(b, a)[0] == "loss"
    assert _paired({0: 1.0, 1: 2.0}, {0: 1.5, 1: 1.5})[0] == "tie"  # +-0.5: no consistent sign
    assert _paired({0: 1.0}, {0: 0.0}) == (None, [1.0])  # one common seed: no verdict
    # 3 seeds all ahead, mean 3.6 standard errors: beyond the normal 2 but not the t quantile (4.30
    # with 2 degrees of freedom), so a tie; the same differences on 6 seeds (t 2.57) are a win
    near = {0: 0.037, 1: 0.045, 2: 0.015}
    assert _paired(near, {s: 0.0 for s in near})[0] == "tie"
    six = {s: near[s % 3] for s in range(6)}
    assert _paired(six, {s: 0.0 for s in six})[0] == "win"
    # unpaired, Welch: a gap of 2.45 standard errors on 3 seeds each (4 degrees of freedom, t 2.78)
    # is a tie, the same values on 21 seeds each a win
    assert _verdict([0.3, 0.4, 0.5], [0.1, 0.2, 0.3]) == "tie"
    assert _verdict([0.3, 0.4, 0.5] * 7, [0.1, 0.2, 0.3] * 7) == "win"


def test_separation_cross_check_uses_the_uniform_runs_noise():
    """Four re-samples can understate the noise: the check recomputes the separation against the
    largest per-seed std of the uniform runs, and says when that estimate does not separate."""
    from experiments.report import resample_cross_check

    def run(vals):
        return {"history": [{"feedback": v} for v in vals] + [{"feedback": None}]}

    ms = {"uniform": [run([-1.0, -1.1, -1.2]), run([-1.0, -1.0, -1.0, -1.4])]}
    sd = float(np.std([-1.0, -1.0, -1.0, -1.4], ddof=1))  # 0.2, the larger of the two
    line = resample_cross_check({"ratios_std": 0.3, "resample_std": 0.01}, ms)
    assert "3-4 times" in line and f"{0.3 / sd:.2f}" in line and "does not separate" in line
    assert "(separates)" in resample_cross_check({"ratios_std": 0.5, "resample_std": 0.01}, ms)
    assert "ratio 4 times" in resample_cross_check({"ratios_std": 0.5}, {"uniform": ms["uniform"][1:]})
    assert resample_cross_check({"ratios_std": 0.3, "resample_std": 0.01}, {"duet_if": ms["uniform"]}) is None
    assert resample_cross_check(None, ms) is None


def test_ablation_keys_override_the_plain_run_and_keep_its_hash(tmp_path):
    from duet_jax.config import config_hash
    from duet_jax.errors import ConfigError

    plain = suite.make_config("in_domain", "duet_if", 0, "demo", scratch=tmp_path)
    k2 = suite.make_config("in_domain", "duet_if@k2", 0, "demo", scratch=tmp_path)
    cos = suite.make_config("in_domain", "duet_if@cosine", 0, "demo", scratch=tmp_path)
    warm = suite.make_config("in_domain", "duet_if@warm8", 0, "demo", scratch=tmp_path)
    assert (plain.k, k2.k, k2.method) == (1, 2, "duet_if")
    assert config_hash(plain) == config_hash(suite.make_config("in_domain", "duet_if", 0, "demo"))
    assert config_hash(k2) != config_hash(plain)
    # the influence store is shared unless the ablation changes the influence step
    assert k2.influence_dir == plain.influence_dir and cos.influence_dir == plain.influence_dir + "@cosine"
    assert cos.influence.curvature == "cosine" and warm.evaluations == plain.evaluations == 16
    assert suite.result_path(tmp_path, "in_domain", "duet_if@k2", 0).parent.name == "duet_if@k2"
    with pytest.raises(ConfigError, match="unknown ablation"):
        suite.make_config("in_domain", "duet_if@nope", 0, "demo")


def test_paper_scale_counts_the_checkpoints_shapes():
    from duet_jax.bench.common import _layer_linear_params
    from experiments.paper_scale import ASSUME, evaluation_flops, model_config

    llama = model_config("llama3-8b-instruct")
    assert _layer_linear_params(llama) == 218_103_808  # docs/scale.md's memory plan: 218.1M per layer
    f = evaluation_flops(llama)
    tokens = ASSUME["budget_M"] * ASSUME["seq_tokens"]
    # forward + backward + remat's forward = 3 x 2 x (linear params) per token, plus attention and head
    assert 6 * 32 * 218_103_808 * tokens < f["finetune"] < 1.2 * 6 * 32 * 218_103_808 * tokens
    assert 0 < f["feedback"] < f["finetune"] and f["total"] == f["finetune"] + f["feedback"]


def test_known_optimum_rules_share_the_instruction_and_disagree_on_the_order():
    from duet_jax.loop.setting import plan_data

    files = {r: settings.rule_file(r) for r in settings.RULES}
    assert all(f.read_text() == settings.rule_file(r).read_text() for r, f in files.items())  # deterministic
    rows = {r: [json.loads(x) for x in f.read_text().splitlines()] for r, f in files.items()}
    for r, rs in rows.items():
        assert len(rs) == settings.RULE_ROWS and len({x["prompt"] for x in rs}) == len(rs)
        for x in rs[:20]:
            word = x["prompt"].split(": ", 1)[1].split("\n")[0].split()
            assert x["answer"].split() == list(settings.RULES[r](word))
            assert sorted(x["answer"].split()) == sorted(word)  # same letters: one answer format
    cfg = settings.run_config("known_optimum", "duet_if", 0)
    assert cfg.mode == "in_domain" and not any(d.startswith("/") for d in cfg.domains)  # checkout-independent
    plan = plan_data(cfg, log=lambda s: None)
    assert plan.target_name == "rule_reverse" and "rule_reverse" in plan.names and len(plan.names) == 6
    train_prompts = {e.prompt for e in plan.train["rule_reverse"]}
    assert not train_prompts & {e.prompt for e in plan.target_examples}  # scored on unseen strings


def test_known_optimum_section_reports_reach_share_and_error(tmp_path):
    from experiments.report import known_optimum_section

    opt = settings.SETTINGS["known_optimum"].optimum
    other = next(d for d in settings.SETTINGS["known_optimum"].domains if d != opt)

    def ev(i, share, fb, k=1):
        return {"eval": i, "ratio": {opt: share, other: 1.0 - share}, "feedback": fb,
                "feedbacks": [fb] * k}

    for key, k, hist in (("duet_if", 1, [ev(0, 0.5, -3.0), ev(1, 0.9, -2.5), ev(2, 0.85, -2.6)]),
                         ("duet_if@k2", 2, [ev(0, 0.1, -3.5, 2), ev(1, 0.3, -3.2, 2)])):
        d = tmp_path / "known_optimum" / key
        d.mkdir(parents=True)
        (d / "seed0.json").write_text(json.dumps({"setting": "known_optimum", "method": key, "seed": 0,
                                                  "variant": "demo", "config": {"k": k}, "history": hist}))
    sep = tmp_path / "separation" / "known_optimum"
    sep.mkdir(parents=True)
    (sep / "demo.jsonl").write_text("".join(
        json.dumps({"kind": "optimum", "metrics": {"neg_loss": v}}) + "\n" for v in (-2.4, -2.2)))
    lines, have = known_optimum_section(tmp_path)
    assert have
    rows = {ln.split(" | ")[0].lstrip("| "): ln for ln in lines if ln.startswith("| duet_if")}
    # best -2.5 at eval index 1 (reached there: share 0.9 >= 0.8), error = -2.3 - (-2.5)
    assert rows["duet_if"] == "| duet_if | 0 | 1 | -2.5000 | 0.90 | 2 (3) | +0.2000 |"
    assert rows["duet_if@k2"] == "| duet_if@k2 | 0 | 2 | -3.2000 | 0.30 | never (2) | +0.9000 |"
    assert known_optimum_section(tmp_path / "empty")[1] is False  # no runs: no section


def test_a_variant_run_lives_apart_from_the_demo_run_of_its_setting(tmp_path):
    """known_optimum at `mid` and at `demo`, same method and seed: two result files, two summary
    entries, two report sections, each with its own variant's vertex."""
    from experiments.report import known_optimum_section

    assert suite.result_path(tmp_path, "known_optimum", "duet_if", 0) == \
        tmp_path / "known_optimum" / "duet_if" / "seed0.json"
    assert suite.result_path(tmp_path, "known_optimum", "duet_if", 0, "mid") == \
        tmp_path / "known_optimum-mid" / "duet_if" / "seed0.json"
    opt = settings.SETTINGS["known_optimum"].optimum
    for var, fb, vertex in (("demo", -2.5, -2.3), ("mid", -1.6, -1.5)):
        p = suite.result_path(tmp_path, "known_optimum", "duet_if", 0, var)
        p.parent.mkdir(parents=True)
        hist = [{"eval": 0, "ratio": {opt: 1.0}, "feedback": fb}]
        p.write_text(json.dumps({"setting": "known_optimum", "method": "duet_if", "seed": 0, "variant": var,
                                 "config": {"k": 1}, "history": hist,
                                 "summary": {"best_feedback": fb, "metric": "neg_loss"}}))
        sep = tmp_path / "separation" / "known_optimum"
        sep.mkdir(parents=True, exist_ok=True)
        (sep / f"{var}.jsonl").write_text(json.dumps({"kind": "optimum", "metrics": {"neg_loss": vertex}}) + "\n")
    summ = suite.write_summary(tmp_path)["settings"]
    assert summ["known_optimum"]["duet_if"]["mean"] == -2.5
    assert summ["known_optimum-mid"]["duet_if"] == {**summ["known_optimum-mid"]["duet_if"], "mean": -1.6,
                                                    "variant": "mid", "seeds": 1}
    lines, _ = known_optimum_section(tmp_path)
    heads = [ln for ln in lines if ln.startswith("### ")]
    assert heads == [f"### known_optimum (optimum: all of {opt})",
                     f"### known_optimum-mid (optimum: all of {opt})"]
    rows = [ln for ln in lines if ln.startswith("| duet_if")]
    assert rows[0].endswith("| +0.2000 |") and rows[1].endswith("| +0.1000 |")  # each its own vertex


def test_committed_results_still_match_the_suite_configs():
    """A library default that changes (issue 13 turned BO's near-duplicate check off) must not change
    the configs of the suite's runs: finished runs would be refused on the next `suite run`."""
    from duet_jax.config import config_hash

    files = sorted(suite.RESULTS.glob("*/*/seed*.json"))
    assert files, "no committed results"
    for p in files:
        d = json.loads(p.read_text())
        c = suite.make_config(d["setting"], d["method"], d["seed"], d["variant"])
        assert config_hash(c) == d["config_hash"], p
