"""Every method through the one loop on a tiny random model, resumed from a cut history; and the
run shell's reliability: one run per directory, refused edits, repaired best adapter, failures
recorded, clear exits."""

import json
import shutil

import numpy as np
import pytest

from duet_jax import report
from duet_jax.config import preset
from duet_jax.duet import run
from duet_jax.errors import ConfigError
from duet_jax.loop.methods import METHODS
from tests.e2e.test_run import shared_compilation_cache  # noqa: F401  (module fixture, autouse)

QUIET = dict(log=lambda s: None, progress=False)


def small(method, **kw):
    return preset("smoke", method=method, **{"k": 1, "warm_start": 2, "rounds": 1, **kw})


@pytest.fixture(scope="module")
def all_methods(tmp_path_factory):
    """Every method once, sharing one influence store (the runs of one setting and seed)."""
    root = tmp_path_factory.mktemp("methods")
    shared = str(root / "influence")
    out = {}
    for m in METHODS:
        cfg = small(m, influence_dir=shared)
        out[m] = (cfg, root / m, run(cfg, root / m, **QUIET))
    return out


def hist(d):
    return [json.loads(x) for x in (d / "history.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_runs_and_resumes_identically(all_methods, method, tmp_path):
    cfg, d, s = all_methods[method]
    h = hist(d)
    m = METHODS[method]
    assert len(h) == cfg.evaluations == s["feedback_evaluations"] and s["method"] == method
    assert s["oracle"] == m.oracle and s["n_failed"] == 0
    assert s["best_feedback"] == max(r["feedback"] for r in h)
    assert report.best_adapter_evaluation(d) == s["best_evaluation"]
    if m.proposer in ("doremi", "regmix", "aioli"):
        assert s["proxy_finetunes"] > 0 and (d / "proxy.json").exists()
        ratios = {tuple(np.round(list(r["ratio"].values()), 9)) for r in h}
        assert len(ratios) == 1 and len({r["seed"] for r in h}) == len(h)  # one ratio, fresh samples
    else:
        assert s["proxy_finetunes"] == 0
    # What a kill leaves: the history cut after its first line, best_adapter/ lagging behind.
    cut = tmp_path / "cut"
    shutil.copytree(d, cut)
    (cut / "history.jsonl").write_text(json.dumps(h[0]) + "\n")
    shutil.rmtree(cut / "best_adapter")
    again = run(cfg, cut, **QUIET)
    g = hist(cut)
    assert [r["seed"] for r in g] == [r["seed"] for r in h] and [r["counts"] for r in g] == [r["counts"] for r in h]
    np.testing.assert_allclose([r["feedback"] for r in g], [r["feedback"] for r in h], rtol=1e-5)
    assert again["best_ratio"] == pytest.approx(s["best_ratio"])
    assert report.best_adapter_evaluation(cut) == again["best_evaluation"]


def test_best_adapter_is_repaired_on_resume(all_methods, tmp_path):
    """A kill between the history line and the adapter's write: best_adapter/ holds an older
    evaluation. The resume re-runs the history's best and puts its adapter there."""
    cfg, d, s = all_methods["random_search"]
    cut = tmp_path / "r"
    shutil.copytree(d, cut)
    meta = json.loads((cut / "best_adapter" / "meta.json").read_text())
    meta["evaluation"]["eval"] = -1  # as if it held another evaluation
    (cut / "best_adapter" / "meta.json").write_text(json.dumps(meta))
    (cut / ".best_adapter.tmp").mkdir()  # and a stale temporary directory
    run(cfg, cut, **QUIET)
    assert report.best_adapter_evaluation(cut) == s["best_evaluation"]
    assert not (cut / ".best_adapter.tmp").exists()


def test_a_second_run_on_the_directory_is_refused(all_methods):
    cfg, d, _ = all_methods["uniform"]
    with report.lock_run_dir(d), pytest.raises(ConfigError, match="in use by pid"):
        run(cfg, d, **QUIET)


def test_an_edited_config_or_other_domains_are_refused(all_methods, tmp_path):
    from duet_jax.config import from_dict

    cfg, d, _ = all_methods["uniform"]
    for change, match in (({"train": {"learning_rate": 0.5}}, "another configuration"),
                          ({"domains": ["arc_easy", "sciq", "piqa"]}, "mixes the domains")):
        cut = tmp_path / match.replace(" ", "_")
        shutil.copytree(d, cut)
        values = json.loads((cut / "config.json").read_text())
        for k, v in change.items():
            values[k] = {**values[k], **v} if isinstance(v, dict) else v
        (cut / "config.json").write_text(json.dumps(values))
        with pytest.raises(ConfigError, match=match):
            run(from_dict(values), cut, **QUIET)


def test_where_files_go_may_change_on_resume_what_is_computed_may_not(all_methods, tmp_path):
    import dataclasses

    cfg, d, summary = all_methods["uniform"]
    moved = tmp_path / "moved"
    shutil.copytree(d, moved)
    again = dataclasses.replace(cfg, trunk_dir=str(tmp_path / "trunk"), influence_dir=str(tmp_path / "inf"))
    s = run(again, moved, **QUIET)  # every evaluation replayed, none redone
    assert s["best_feedback"] == summary["best_feedback"] and s["n_evaluations"] == summary["n_evaluations"]
    assert len(report.read_history(moved)) == summary["n_evaluations"]
    other = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, learning_rate=0.5))
    with pytest.raises(ConfigError, match=r"another configuration \(differs in \['train'\]\)"):
        run(other, moved, **QUIET)


def test_a_run_dir_from_before_an_added_option_resumes(all_methods, tmp_path):
    """A config.json written before a BO option existed (``ADDED_FIELDS``, at its neutral value)
    is the same run: it resumes (the loop refused it as "another configuration" before), and a
    real change there is still refused."""
    from duet_jax.bo.config import ADDED_FIELDS
    from duet_jax.config import config_diff, from_dict

    cfg, d, summary = all_methods["uniform"]
    old = tmp_path / "old"
    shutil.copytree(d, old)
    values = json.loads((old / "config.json").read_text())
    values["bo"] = {k: v for k, v in values["bo"].items() if k not in ADDED_FIELDS}
    (old / "config.json").write_text(json.dumps(values))
    assert config_diff(values, cfg) == []
    s = run(cfg, old, **QUIET)  # resumed: every evaluation replayed, none redone
    assert s["best_feedback"] == summary["best_feedback"] and s["n_evaluations"] == summary["n_evaluations"]
    values["bo"]["beta"] = values["bo"].get("beta", 1.0) + 1.0
    assert config_diff(values, cfg) == ["bo"]
    (old / "config.json").write_text(json.dumps(values))
    with pytest.raises(ConfigError, match=r"another configuration \(differs in \['bo'\]\)"):
        run(from_dict({**values, "bo": {**values["bo"], "beta": values["bo"]["beta"] - 1.0}}), old, **QUIET)


def test_a_run_on_a_local_file_domain_resumes(tmp_path):
    """Ratios are keyed by the file's stem while the config lists its path: a resume must match
    them (it refused the run as "another run" before)."""
    from duet_jax.data import get_domain

    rows = get_domain("openbookqa").examples()[:40]
    p = tmp_path / "mine.jsonl"
    p.write_text("".join(json.dumps({"prompt": e.prompt, "answer": e.answer.strip()}) + "\n" for e in rows))
    cfg = small("random_search", domains=["arc_easy", "sciq", str(p)], rounds=0)
    d = tmp_path / "run"
    first = run(cfg, d, **QUIET)
    h = hist(d)
    assert set(h[0]["ratio"]) == {"arc_easy", "sciq", "mine"}
    (d / "history.jsonl").write_text(json.dumps(h[0]) + "\n")
    again = run(cfg, d, **QUIET)
    assert again["best_feedback"] == pytest.approx(first["best_feedback"], rel=1e-5)
    assert [r["seed"] for r in hist(d)] == [r["seed"] for r in h]


def test_bad_feedback_source_fails_before_anything_is_written(tmp_path):
    for fb, match in (({"callable": "no_such_module_xyz:f"}, "no_such_module_xyz"),
                      ({"callable": "json.dumps"}, "package.module:function"),
                      ({"command": "definitely-not-a-program-xyz {adapter_dir}"}, "definitely-not"),
                      ({"command": "echo {model_dir}"}, "placeholder")):
        with pytest.raises(ConfigError, match=match):
            run(small("uniform", feedback=fb), tmp_path / "x", **QUIET)
    assert not (tmp_path / "x").exists()


def test_sampling_without_replacement_respects_domain_sizes(tmp_path):
    cfg = small("random_search", budget=60, replace=False, rounds=2)
    s = run(cfg, tmp_path / "norep", **QUIET)
    assert s["n_failed"] == 0 and s["n_evaluations"] == cfg.evaluations
    for r in hist(tmp_path / "norep"):
        assert sum(r["counts"].values()) == 60


def test_all_failed_exits_3_and_interrupts_print_the_resume_command(tmp_path, monkeypatch, capsys):
    from duet_jax import duet as duet_mod
    from duet_jax.run import _cli

    (tmp_path / "fbfail.py").write_text("def f(req):\n    raise RuntimeError('the evaluator is down')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    d = tmp_path / "allfail"
    rc = _cli(["--preset", "smoke", "--method", "uniform", "--k", "1", "--warm_start", "1", "--rounds", "1",
               "--feedback.callable", "fbfail:f", "--out_dir", str(d), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 3 and "every evaluation failed" in err
    assert all("the evaluator is down" in r["errors"][0] for r in hist(d))
    for exc, code, text in ((KeyboardInterrupt(), 130, "interrupted"),
                            (OSError(28, "No space left on device", str(d / "history.jsonl")), 1,
                             "No space left on device")):
        def boom(*a, exc=exc, **k):
            raise exc
        monkeypatch.setattr(duet_mod, "run", boom)
        rc = _cli(["--preset", "smoke", "--out_dir", str(tmp_path / "y"), "--quiet"])
        err = capsys.readouterr().err
        assert rc == code and text in err and f"--resume {tmp_path / 'y'}" in err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_print_config_shows_the_resolved_tree(capsys):
    from duet_jax.run import _cli

    assert _cli(["--preset", "smoke", "--method", "regmix", "--train.learning_rate", "3e-4",
                 "--print-config"]) == 0
    tree = json.loads(capsys.readouterr().out)
    assert tree["method"] == "regmix" and tree["train"]["learning_rate"] == 3e-4
    assert {"lora", "train", "encode", "bo", "influence", "feedback", "selector", "baselines"} <= set(tree)


def test_window_filling_answers_do_not_stop_the_run(tmp_path):
    from duet_jax.loop.setting import Setting, plan_data

    lines = []
    cfg = preset("smoke", domains=["gsm8k", "sciq"], encode={"max_length": 128, "buckets": [64]})
    s = Setting.build(cfg, plan_data(cfg, log=lines.append), tmp_path, log=lines.append)
    assert set(np.unique(s.domain_of)) == {0, 1}
    assert any("gsm8k" in x and "skipped" in x for x in lines), lines
