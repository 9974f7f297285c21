"""Re-evaluating a run's recommended ratio (experiments/confirm.py) on the smoke preset: the same
config and selector as the run (the run's own evaluation index reproduces its feedback), fresh keys
for the re-samples, resumable, and refusing lines of another run."""

import json

import numpy as np
import pytest

from experiments import confirm, settings, suite


@pytest.fixture
def finished(tmp_path, monkeypatch):
    spec = settings.SettingSpec("tiny", ("arc_easy", "sciq", "openbookqa"), "ood", ("arc_challenge",), "test")
    monkeypatch.setitem(settings.SETTINGS, "tiny", spec)
    args = ["run", "--settings", "tiny", "--methods", "uniform,duet_if", "--seeds", "0", "--preset", "smoke",
            "--warm-start", "2", "--rounds", "1", "--scratch", str(tmp_path / "s"), "--results",
            str(tmp_path / "r"), "--inprocess", "--no-accuracy"]
    assert suite.main(args) == 0
    return tmp_path


def test_confirm_reproduces_the_run_then_resamples_fresh_and_resumes(finished):
    res, scratch = finished / "r", finished / "s"
    run = json.loads((res / "tiny" / "duet_if" / "seed0.json").read_text())
    best = run["summary"]["best_evaluation"]
    # the step confirm builds is the run's own: at the run's best index it gives the run's feedback
    step, ratio = confirm.build_step(run, scratch, {}, log=lambda s: None)
    again = step(ratio, best, 0, "check")
    assert again.feedback == pytest.approx(run["summary"]["best_feedback"], abs=1e-5)

    n = confirm.run_confirm(["tiny"], ["uniform", "duet_if"], [0], "demo", resamples=2, results=res,
                            scratch=scratch, log=lambda s: None)
    assert n == 2  # uniform is a fixed ratio: nothing to run
    rp = confirm.load(res / "confirm" / "tiny" / "replay.jsonl")  # the replay check ran once, and matched
    assert len(rp) == 1 and rp[0]["replay"] == pytest.approx(rp[0]["recorded"], abs=confirm.REPLAY_TOL)
    path = confirm.confirm_path(res, "tiny", "duet_if", 0)
    lines = confirm.load(path)
    assert [r["j"] for r in lines] == [0, 1]
    run_seeds = {r["seed"] for r in run["history"]}
    assert all(r["seed"] not in run_seeds for r in lines) and lines[0]["seed"] != lines[1]["seed"]
    assert all(np.isfinite(r["feedback"]) for r in lines)
    assert all(r["ratio_recommended"] == run["summary"]["best_ratio"] for r in lines)
    c = confirm.confirmed_value(run, lines)
    assert c["n"] == 2 and c["mean"] == pytest.approx(np.mean([r["feedback"] for r in lines]))

    # a cut last line is redone; finished lines are not
    path.write_text(path.read_text().splitlines()[0] + "\n" + '{"j": 1, "feedb')
    assert confirm.run_confirm(["tiny"], ["duet_if"], [0], "demo", resamples=2, results=res, scratch=scratch,
                               log=lambda s: None) == 1
    relines = confirm.load(path)
    assert [r["j"] for r in relines] == [0, 1] and relines[1]["feedback"] == pytest.approx(lines[1]["feedback"])
    assert confirm.run_confirm(["tiny"], ["duet_if"], [0], "demo", resamples=2, results=res, scratch=scratch,
                               log=lambda s: None) == 0

    # the fixed-ratio method's value is the mean of its own history
    uni = json.loads((res / "tiny" / "uniform" / "seed0.json").read_text())
    cu = confirm.confirmed_value(uni, None)
    assert cu["source"] == "history" and cu["mean"] == pytest.approx(np.mean([r["feedback"] for r in uni["history"]]))

    # a run whose recorded feedback the code no longer reproduces is refused
    (res / "confirm" / "tiny" / "replay.jsonl").unlink()
    drifted = json.loads(json.dumps(run))
    drifted["history"][best]["feedback"] += 0.5
    with pytest.raises(SystemExit, match="changed since the run"):
        confirm.replay_check(drifted, step, ratio, res, log=lambda s: None)

    # lines of another run (its config changed) are refused, not averaged in
    other = dict(run, config_hash="0" * 16)
    with pytest.raises(SystemExit, match="another run"):
        confirm.check_lines(relines, other, path)

    # the GP's recommendation: re-evaluated apart unless it is the best told ratio
    rec = confirm.target_ratio(run, "recommended")
    assert rec in [r["ratio"] for r in run["history"]]
    n = confirm.run_confirm(["tiny"], ["duet_if"], [0], "demo", resamples=2, results=res, scratch=scratch,
                            which="recommended", log=lambda s: None)
    rl = confirm.lines_for(res, run, "recommended")
    if confirm.is_best(run, rec):
        assert n == 0 and rl == confirm.lines_for(res, run, "best")
    else:
        assert n == 2 and [r["ratio_recommended"] for r in rl] == [rec, rec]

    # re-scored by another metric: kept apart from the run's own re-samples, same ratio and keys
    assert confirm.run_metric(run) == "neg_loss"
    n = confirm.run_confirm(["tiny"], ["duet_if"], [0], "demo", resamples=2, results=res, scratch=scratch,
                            metric="acc", log=lambda s: None)
    al = confirm.lines_for(res, run, "best", "acc")
    assert n == 2 and [r["metric"] for r in al] == ["acc", "acc"]
    assert all(0.0 <= r["feedback"] <= 1.0 for r in al)  # an accuracy, not a loss
    own = confirm.lines_for(res, run, "best")
    assert [r["seed"] for r in al] == [r["seed"] for r in own]  # the same fresh keys as the own re-samples
    assert confirm.lines_for(res, run, "best", "neg_loss") == own  # the run's own metric is no re-scoring
    apath = confirm.confirm_path(res, "tiny", "duet_if", 0, "demo", "best", "acc")
    with pytest.raises(SystemExit, match="metric"):
        confirm.check_lines(confirm.load(apath), run, apath, None, None)  # acc lines are not neg_loss ones

    # a run whose config this code cannot rebuild (an option since removed) is skipped with its
    # reason; the other runs of the invocation go on
    import shutil

    res2 = finished / "r2"
    shutil.copytree(res, res2)
    old = json.loads(json.dumps(run))
    old["config"]["bo"]["explore_every"] = 0
    (res2 / "tiny" / "duet_if" / "seed0.json").write_text(json.dumps(old))
    with pytest.raises(confirm.Unbuildable, match="no longer builds"):
        confirm.build_step(old, scratch, {}, log=lambda s: None)
    said = []
    assert confirm.run_confirm(["tiny"], ["duet_if", "uniform"], [0], "demo", resamples=3, results=res2,
                               scratch=scratch, log=said.append) == 0
    assert any("skipped" in x and "explore_every" in x for x in said)

    assert confirm.same_ratio({"a": 0.3, "b": 0.7}, {"a": 0.3 + 1e-16, "b": 0.7})  # rounding only
    assert not confirm.same_ratio({"a": 0.3, "b": 0.7}, {"a": 0.31, "b": 0.69})

    # the report's section 2b shows the run's best beside the re-evaluated mean
    from experiments import report

    lines, have = report.confirmed_section(res)
    assert have
    row = next(x for x in lines if x.startswith("| duet_if |"))
    assert f"{c['mean']:.4f}" in row and f"{run['summary']['best_feedback']:.4f}" in row


def _run(setting, variant, method, seed, best, feedbacks):
    return {"setting": setting, "variant": variant, "method": method, "seed": seed, "config_hash": "h",
            "summary": {"best_feedback": best}, "history": [{"feedback": f} for f in feedbacks]}


def test_pooled_standardizes_by_each_seeds_noise_and_counts_each_setting_once(monkeypatch):
    from scipy.stats import binomtest

    from experiments import report

    monkeypatch.setattr(report, "SETTINGS", {"a": None, "b": None})
    monkeypatch.setattr(report, "VARIANTS", {"demo": {}, "mid": {}})
    rng = np.random.default_rng(0)
    runs, values, want = {}, {}, []
    for label, shift in (("a", 0.1), ("b-mid", -0.05), ("b", 9.0)):  # b-mid is b's larger variant
        st, var = (label.split("-") + ["demo"])[:2]
        ms = runs.setdefault(label, {})
        for seed in range(3):
            u = rng.normal(0, 0.02 * (seed + 1), 8)
            ms.setdefault("uniform", []).append(_run(st, var, "uniform", seed, u.max(), u))
            ms.setdefault("x", []).append(_run(st, var, "x", seed, 0, [0]))
            values.setdefault(label, {}).setdefault("x", {})[seed] = shift * (seed + 1)
            values[label].setdefault("uniform", {})[seed] = 0.0
            if label != "b":
                want.append(shift * (seed + 1) / np.std(u, ddof=1))
    r = report.pooled(runs, values, "x", "uniform")
    assert r["settings"] == ["a", "b-mid"]  # b's demo runs are not counted beside its mid runs
    assert r["n"] == 6 and r["ahead"] == 3 and r["level"] == 0
    assert r["mean_z"] == pytest.approx(np.mean(want))
    assert r["sign_p"] == pytest.approx(binomtest(3, 6).pvalue)
    values["a"]["x"][0] = 0.0  # an exact tie counts for neither side
    r = report.pooled(runs, values, "x", "uniform")
    assert r["level"] == 1 and r["ahead"] == 2 and r["sign_p"] == pytest.approx(binomtest(2, 5).pvalue)


def test_an_ablation_driven_by_another_metric_is_compared_on_the_plain_runs_metric(tmp_path):
    from experiments import report

    res = tmp_path / "r"
    ratio = {"a": 0.25, "b": 0.75}

    def write(method, seed, metric, best, rescored):
        d = {"setting": "in_domain", "variant": "demo", "method": method, "seed": seed, "config_hash": f"h{seed}",
             "config": {"feedback": {"metric": metric, "temperature": 0.0}},
             "summary": {"best_feedback": best, "best_ratio": ratio},
             "history": [{"feedback": best, "ratio": ratio}]}
        (res / "in_domain" / method).mkdir(parents=True, exist_ok=True)
        (res / "in_domain" / method / f"seed{seed}.json").write_text(json.dumps(d))
        m = None if metric == "neg_loss" else "neg_loss"
        path = confirm.confirm_path(res, "in_domain", method, seed, "demo", "best", m)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps({"j": j, "feedback": v, "ratio_recommended": ratio, "metric": "neg_loss",
                                            "run_config_hash": f"h{seed}"}) + "\n" for j, v in enumerate(rescored)))

    for seed in (0, 1):
        write("duet_if", seed, "neg_loss", -3.0 - seed, [-3.2 - seed, -3.4 - seed])
        write("duet_if@em_greedy", seed, "exact_match", 0.5, [-3.1 - seed, -3.3 - seed])
    lines, have = report.ablations_section(res)
    row = next(x for x in lines if x.startswith("| duet_if@em_greedy |"))
    cells = [c.strip() for c in row.split("|")[1:-1]]
    assert have and cells[2] == "exact_match" and cells[5] == "other metric"  # a best EM is no neg_loss
    assert cells[6].startswith("-3.7000") and "(neg_loss)" in cells[6]  # mean over seeds of the re-scored means
    assert "+0.1000, +0.1000" in cells[7]  # paired on neg_loss against the plain run's re-samples
