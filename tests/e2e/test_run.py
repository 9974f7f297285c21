"""The DUET loop end to end on a tiny random model (the smoke preset): run directory contents,
resume after a real kill, leak checks, bad input, --help."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from duet_jax.config import SECTIONS, RunConfig, add_config_flags, preset
from duet_jax.data import Example
from duet_jax.duet import LeakError, check_no_leak, run
from duet_jax.errors import ConfigError, UnknownDomainError
from duet_jax.loop import setting as setting_mod
from duet_jax.loop.setting import plan_data

ROOT = Path(__file__).resolve().parents[2]
SMOKE = dict(feedback={"metric": "neg_loss", "examples": 16})


_CACHE: dict = {}


def env(tmp_path):
    """Subprocesses share the persistent compilation cache that this test process fills, so the
    killed and resumed runs do not compile everything again."""
    return dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                DUET_JAX_CACHE=str(_CACHE["dir"]), PYTHONPATH=str(ROOT))


@pytest.fixture(scope="module", autouse=True)
def shared_compilation_cache(tmp_path_factory):
    import jax

    d = tmp_path_factory.mktemp("duet-cache")
    _CACHE["dir"] = d
    old = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
    jax.config.update("jax_compilation_cache_dir", str(d / "xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    _reset_jax_cache()
    yield d
    jax.config.update("jax_compilation_cache_dir", old[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", old[1])
    _reset_jax_cache()


def _reset_jax_cache():
    """jax decides once per process whether the persistent cache is on; make it look again."""
    try:
        from jax._src import compilation_cache

        compilation_cache.reset_cache()
    except (ImportError, AttributeError):  # a jax without it: the subprocesses just compile
        pass


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, shared_compilation_cache):
    d = tmp_path_factory.mktemp("run") / "smoke"
    summary = run(preset("smoke", **SMOKE), d, log=lambda s: None, progress=False)
    return d, summary


def test_run_directory(smoke_run):
    d, summary = smoke_run
    cfg = preset("smoke", **SMOKE)
    hist = [json.loads(line) for line in (d / "history.jsonl").read_text().splitlines()]
    assert len(hist) == cfg.warm_start + cfg.rounds == summary["n_evaluations"]
    assert [h["eval"] for h in hist] == list(range(len(hist)))
    assert hist[0]["phase"] == "warm" and np.allclose(list(hist[0]["ratio"].values()), 1 / 3)
    for h in hist:
        assert abs(sum(h["ratio"].values()) - 1) < 1e-9 and sum(h["counts"].values()) == cfg.budget
        assert len(h["feedbacks"]) == cfg.k and h["feedback"] == max(h["feedbacks"])
        assert np.isfinite(h["feedback"]) and h["feedback"] < 0  # negative loss
    s = json.loads((d / "summary.json").read_text())
    for key in ("best_ratio", "best_feedback", "uniform_feedback", "n_evaluations", "wall_seconds"):
        assert key in s
    assert abs(sum(s["best_ratio"].values()) - 1) < 1e-9
    assert s["best_feedback"] == max(h["feedback"] for h in hist)
    assert s["uniform_feedback"] == hist[0]["feedback"]
    assert json.loads((d / "config.json").read_text())["preset"] == "smoke"
    assert (d / "best_adapter" / "peft" / "adapter_config.json").exists()
    assert (d / "best_adapter" / "peft" / "adapter_model.safetensors").exists()
    assert (d / "best_adapter" / "state").exists()
    meta = json.loads((d / "best_adapter" / "meta.json").read_text())
    assert meta["evaluation"]["feedback"] == s["best_feedback"]
    assert (d / "best_so_far.png").stat().st_size > 1000 and (d / "ratios.png").stat().st_size > 1000
    assert (d / "influence" / "scores.npy").exists()


def test_resume_after_kill_matches_uninterrupted(smoke_run, tmp_path):
    d_ref, ref = smoke_run
    ref_hist = [json.loads(x) for x in (d_ref / "history.jsonl").read_text().splitlines()]
    run_dir = tmp_path / "killed"
    cmd = [sys.executable, "-m", "duet_jax.run", "--preset", "smoke", "--feedback.metric", "neg_loss",
           "--feedback.examples", "16", "--out_dir", str(run_dir), "--quiet"]
    proc = subprocess.Popen(cmd, env=env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    hist = run_dir / "history.jsonl"
    deadline = time.time() + 400
    while time.time() < deadline and proc.poll() is None:
        if hist.exists() and len(hist.read_text().splitlines()) >= 2:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    n_done = len(hist.read_text().splitlines())
    assert 2 <= n_done < len(ref_hist)
    r = subprocess.run([sys.executable, "-m", "duet_jax.run", "--resume", str(run_dir), "--quiet"],
                       env=env(tmp_path), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"{n_done} evaluation(s) already done" in r.stdout
    got = [json.loads(x) for x in hist.read_text().splitlines()]
    assert len(got) == len(ref_hist)
    for a, b in zip(got, ref_hist, strict=False):
        assert a["seed"] == b["seed"] and a["counts"] == b["counts"]
        assert np.allclose(list(a["ratio"].values()), list(b["ratio"].values()), atol=1e-9)
        assert np.allclose(a["feedbacks"], b["feedbacks"], rtol=1e-5)
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["best_ratio"] == pytest.approx(ref["best_ratio"]) and s["best_feedback"] == pytest.approx(ref["best_feedback"])


def test_leak_check_direct():
    a = Example("x1", "Question: one?\nAnswer:", " 1", "qa")
    b = Example("x2", "question:   ONE?\nanswer:", " 2", "qa")  # same normalised prompt, other id
    check_no_leak([a], [], [Example("y", "other", " z", "qa")])
    with pytest.raises(LeakError, match="training pool"):
        check_no_leak([a], [], [b])
    with pytest.raises(LeakError, match="influence step"):
        check_no_leak([], [a], [a])


def test_in_domain_mode_refuses_a_leaking_split(monkeypatch, tmp_path):
    real = setting_mod.select_examples

    def leaky(examples, n, salt):  # put the target's evaluation examples into its train split
        out = real(examples, n, salt)
        if "|train|arc_easy" in salt:
            from duet_jax.data import get_domain

            out = out + list(get_domain("arc_easy").splits().evaluation[:3])
        return out

    monkeypatch.setattr(setting_mod, "select_examples", leaky)
    cfg = preset("smoke", mode="in_domain", target="arc_easy", domains=["arc_easy", "sciq"])
    with pytest.raises(LeakError):
        plan_data(cfg, log=lambda s: None)
    assert not (tmp_path / "r").exists()  # refused before anything is written


def test_bad_configs(tmp_path):
    with pytest.raises(ConfigError, match="also a training domain"):
        preset("smoke", target="sciq")
    with pytest.raises(UnknownDomainError, match="Built-in domains"):
        run(preset("smoke", domains=["nope", "sciq"]), tmp_path / "a", log=lambda s: None)
    with pytest.raises(ConfigError, match="more examples than"):
        run(preset("smoke", budget=10_000, replace=False, method="duet_ur"), tmp_path / "b",
            log=lambda s: None, progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # nothing written
    bad = tmp_path / "bad.yaml"
    bad.write_text("budget: 12\ndomains: [a, b\nk: 2\n")
    r = subprocess.run([sys.executable, "-m", "duet_jax.run", "--config", str(bad)], env=env(tmp_path),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "bad.yaml:" in r.stderr and "does not parse" in r.stderr


def test_failing_feedback_command_is_recorded_not_invented(tmp_path):
    script = tmp_path / "fail.py"
    script.write_text("import sys\nprint('no number here')\n")
    cfg = preset("smoke", rounds=0, warm_start=2, k=1,
                 feedback={"command": f"{sys.executable} {script} {{adapter_dir}}", "retries": 0},
                 method="duet_ur")
    d = tmp_path / "fail"
    s = run(cfg, d, log=lambda s: None, progress=False)
    hist = [json.loads(x) for x in (d / "history.jsonl").read_text().splitlines()]
    assert len(hist) == 2 and all(h["failed"] and h["feedback"] is None for h in hist)
    assert all("no number here" in h["errors"][0] for h in hist)  # the reason, with the output tail
    assert s["best_feedback"] is None and s["n_failed"] == 2
    assert (d / "adapters" / "eval0000_0" / "adapter_config.json").exists()  # what the command got


def test_help_documents_every_option():
    import argparse
    import dataclasses

    p = argparse.ArgumentParser()
    add_config_flags(p)
    text = p.format_help()
    for f in dataclasses.fields(RunConfig):
        if f.name == "preset":
            continue
        if f.name in SECTIONS:
            sec = getattr(RunConfig(), f.name)
            for g in dataclasses.fields(sec):
                assert f"--{f.name}.{g.name}" in text
        else:
            assert f"--{f.name}" in text


def test_influence_command_alone_matches_the_run(smoke_run, tmp_path, capsys):
    """`duet-jax influence` computes the same per-domain scores as the run's influence step, without
    preparing the unseen task, and prints the per-domain summary as JSON."""
    from duet_jax.cli import main

    d_ref, _ = smoke_run
    out = tmp_path / "inf"
    rc = main(["influence", "--preset", "smoke", "--feedback.metric", "neg_loss", "--feedback.examples", "16",
               "--out_dir", str(out), "--json"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    cfg = preset("smoke", **SMOKE)
    assert set(summary) == set(cfg.domains)
    for s in summary.values():
        assert s["examples"] > 0 and np.isfinite(s["score_mean"])
    got = np.load(out / "influence" / "scores.npy")
    np.testing.assert_allclose(got, np.load(d_ref / "influence" / "scores.npy"), rtol=1e-5, atol=1e-6)
