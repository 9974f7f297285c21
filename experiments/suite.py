"""The resumable experiment suite of issue 16: (setting, method, seed) runs of the DUET loop.

::

    python -m experiments.suite run --settings ood_medical --methods uniform,random_search,duet_if \\
        --seeds 0,1,2 --variant demo --max-minutes 100
    python -m experiments.suite status          # what is done, what is partial, what is left
    python -m experiments.suite summary         # experiments/results/summary.json only

Each run has its own run directory under the scratch dir (``--scratch``, default
``$DUET_EXPERIMENTS_SCRATCH`` or ``/tmp/duet-experiments``):
``<scratch>/runs/<variant>/<setting>/<method>/seed<N>``; the runs of one (setting, variant, seed)
share one influence store (``.../influence/seed<N>``: computed once, reused by duet_if / duet_rh),
and every run reads the frozen trunk's states of its pools from ``<scratch>/trunk`` (computed by the
first run that needs them).
A finished run's config, summary and full history are copied to
``experiments/results/<setting>/<method>/seed<N>.json`` (``<setting>-<variant>/`` for a variant other
than ``demo``, e.g. ``known_optimum-mid/``; the summary and the report name it so too); a rerun skips runs whose result file is
there (with the same config hash) and resumes a killed one from its run directory (the loop replays
finished evaluations, never redoes them). Every run is a child process; ``--max-minutes`` kills the
child at the deadline (it resumes next time) and starts nothing after it. ``summary.json`` is
rewritten after each finished run.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
#: every method of the loop, in the order they are run (DUET and its closest baselines first)
METHODS = ["duet_if", "random_search", "uniform", "duet_ur", "duet_rh", "doremi", "regmix", "aioli",
           "duet_less"]
DEFAULT_WARM, DEFAULT_ROUNDS = 4, 12


def scratch_dir(arg: str | None = None) -> Path:
    return Path(arg or os.environ.get("DUET_EXPERIMENTS_SCRATCH", "/tmp/duet-experiments"))


def run_dir(scratch: Path, variant: str, setting: str, method: str, seed: int) -> Path:
    return scratch / "runs" / variant / setting / method / f"seed{seed}"


def setting_label(setting: str, variant: str | None = "demo") -> str:
    """Where a (setting, variant)'s runs live and how the summary and the report name them: the
    setting itself at the demo sizes, ``SETTING-VARIANT`` for a stronger variant (``known_optimum-mid``),
    so runs of two sizes never share a result file."""
    return setting if variant in (None, "demo") else f"{setting}-{variant}"


def result_path(results: Path, setting: str, method: str, seed: int, variant: str = "demo") -> Path:
    return results / setting_label(setting, variant) / method / f"seed{seed}.json"


def scratch_locations(scratch: Path, variant: str, setting: str, method: str, seed: int) -> dict:
    """The shared stores of a run under the scratch dir: one influence store per (setting, variant,
    seed) (an ablation of the influence step scores into its own), one trunk cache for every run."""
    from experiments.settings import ABLATIONS, split_key

    _, abl = split_key(method)
    tag = f"@{abl}" if abl and "influence" in ABLATIONS[abl] else ""
    return {"influence_dir": str(scratch / "runs" / variant / setting / "influence" / f"seed{seed}{tag}"),
            "trunk_dir": str(scratch / "trunk")}


def make_config(setting, method, seed, variant, *, preset_name="demo", warm_start=DEFAULT_WARM,
                rounds=DEFAULT_ROUNDS, extra=None, scratch: Path | None = None):
    from experiments.settings import run_config

    extra = dict(extra or {})
    if scratch is not None:
        loc = scratch_locations(scratch, variant, setting, method, seed)
        extra["influence_dir"] = loc["influence_dir"]
        extra.setdefault("trunk_dir", loc["trunk_dir"])
    return run_config(setting, method, seed, variant, preset_name=preset_name, rounds=rounds,
                      warm_start=warm_start, extra=extra)


def is_done(results: Path, setting, method, seed, config, variant: str = "demo") -> bool:
    from duet_jax.config import config_hash

    p = result_path(results, setting, method, seed, variant)
    if not p.exists():
        return False
    try:
        saved = json.loads(p.read_text())
    except json.JSONDecodeError:
        return False
    if saved.get("config_hash") != config_hash(config):
        raise SystemExit(f"{p} holds a run with another configuration (hash {saved.get('config_hash')}, "
                         f"now {config_hash(config)}); move it away or use another --results dir")
    return len(saved.get("history", [])) == config.evaluations


def collect(rdir: Path, results: Path, setting, method, seed, variant, config, wall_s: float | None) -> Path:
    """Copy the finished run's config, summary and history into the results tree."""
    from duet_jax import report
    from duet_jax.config import config_hash, to_dict

    summary = json.loads((rdir / "summary.json").read_text())
    history = report.read_history(rdir)
    out = {"setting": setting, "method": method, "seed": seed, "variant": variant,
           "config_hash": config_hash(config), "config": to_dict(config), "summary": summary,
           "history": history, "suite_wall_s": wall_s, "loadavg_at_end": os.getloadavg()}
    acc = rdir / "accuracy.json"
    if acc.exists():
        out["accuracy"] = json.loads(acc.read_text())
    p = result_path(results, setting, method, seed, variant)
    p.parent.mkdir(parents=True, exist_ok=True)
    report.write_json(p, out)
    return p


def best_so_far(history: list[dict]) -> list[float | None]:
    best, out = None, []
    for r in history:
        v = r.get("feedback")
        if v is not None and (best is None or v > best):
            best = v
        out.append(best)
    return out


def finished_runs(results: Path = RESULTS):
    """The finished runs' result files (a dict each, with its ``history``), in path order."""
    for p in sorted(results.glob("*/*/seed*.json")):
        try:
            d = json.loads(p.read_text())
        except json.JSONDecodeError:
            continue
        if "history" in d:
            yield d


def grid(a, scratch: Path):
    """``(seed, setting, method, config)`` of every run the command line names."""
    extra = json.loads(a.extra) if a.extra else None
    for seed in a.seeds:
        for setting in a.settings:
            for method in a.methods:
                yield seed, setting, method, make_config(
                    setting, method, seed, a.variant, preset_name=a.preset, warm_start=a.warm_start,
                    rounds=a.rounds, extra=extra, scratch=scratch)


def write_summary(results: Path = RESULTS) -> dict:
    """``summary.json`` in the issue's format, from the result files present."""
    from duet_jax import report

    settings: dict = {}
    for d in finished_runs(results):
        s = settings.setdefault(setting_label(d["setting"], d.get("variant")), {}).setdefault(d["method"], {"values": [], "metric": None,
                                                                            "variant": d.get("variant"),
                                                                            "acc": {}})
        s["values"].append(d["summary"].get("best_feedback"))
        s["metric"] = d["summary"].get("metric")
        for task, v in (d.get("accuracy") or {}).items():
            s["acc"].setdefault(task, []).append(v)
    out: dict = {"settings": {}}
    for st, methods in settings.items():
        for m, s in methods.items():
            vals = [v for v in s["values"] if v is not None]
            e = {"mean": float(np.mean(vals)) if vals else None,
                 "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else None,
                 "seeds": len(vals), "metric": s["metric"], "variant": s["variant"]}
            for task, a in s["acc"].items():
                e[f"acc:{task}"] = {"mean": float(np.mean(a)), "std": float(np.std(a, ddof=1)) if len(a) > 1 else None,
                                    "seeds": len(a)}
            out["settings"].setdefault(st, {})[m] = e
    results.mkdir(parents=True, exist_ok=True)
    report.write_json(results / "summary.json", out)
    return out


# ------------------------------------------------------------------------------ one run (child)
def run_one(setting, method, seed, variant, *, scratch: Path, results: Path, preset_name="demo",
            warm_start=DEFAULT_WARM, rounds=DEFAULT_ROUNDS, extra=None, accuracy=True) -> dict:
    """Run (or resume) one (setting, method, seed) in this process and collect it."""
    from duet_jax.duet import run
    from duet_jax.run import _enable_compilation_cache

    _enable_compilation_cache()
    cfg = make_config(setting, method, seed, variant, preset_name=preset_name, warm_start=warm_start,
                      rounds=rounds, extra=extra, scratch=scratch)
    rdir = run_dir(scratch, variant, setting, method, seed)
    t = time.time()
    summary = run(cfg, rdir, log=lambda s: print(s, flush=True), progress=False)
    if accuracy:
        best_adapter_accuracy(cfg, rdir, setting)
    collect(rdir, results, setting, method, seed, variant, cfg, round(time.time() - t, 1))
    return summary


def best_adapter_accuracy(cfg, rdir: Path, setting: str) -> dict:
    """``acc`` of the run's best adapter on each multiple-choice task of the setting (its own
    evaluation split, ``feedback.examples`` examples), written to ``RUN_DIR/accuracy.json``."""
    import dataclasses

    import jax

    from duet_jax import report
    from duet_jax.loop.feedback import EvalInfo, TaskFeedback
    from duet_jax.loop.setting import plan_data
    from duet_jax.train.checkpoint import restore_checkpoint
    from experiments.settings import SETTINGS, accuracy_tasks

    path = rdir / "accuracy.json"
    if path.exists():
        return json.loads(path.read_text())
    spec = SETTINGS[setting]
    tasks = accuracy_tasks(spec)
    out: dict = {}
    if tasks and (rdir / "best_adapter" / "state").is_dir():
        plan = plan_data(cfg, lambda s: None)
        st = _bare_setting(cfg, plan, rdir)
        lora = restore_checkpoint(rdir / "best_adapter", st.lora0)[0]
        stacked = jax.tree.map(lambda a: a[None], lora)
        for task in tasks:
            tplan = plan_data(dataclasses.replace(cfg, target=task), lambda s: None)
            view = dataclasses.replace(st, plan=dataclasses.replace(plan, target_examples=tplan.target_examples))
            fb = TaskFeedback("acc")
            fb.prepare(view)
            out[task] = fb(stacked, EvalInfo(-1, 0, 0, {}))[0].value
        if len(tasks) > 1 and all(v is not None for v in out.values()):
            out["mean"] = float(np.mean([out[t] for t in tasks]))
    report.write_json(path, out)
    return out


def _bare_setting(cfg, plan, rdir: Path):
    """A Setting without the training pool (no trunk pass over it): enough to score adapters."""
    from duet_jax.loop.setting import Setting, load_run_model
    from duet_jax.train import split_model, trunk_start

    tok, model = load_run_model(cfg, lambda s: None)
    graphdef, lora0, frozen = split_model(model)
    return Setting(cfg, plan, rdir, list(plan.names), None, np.zeros(0, np.int64), [], graphdef, lora0, frozen,
                   trunk_start(model), tok, cfg.encode, int(model.config.vocab_size), lambda s: None)


# ------------------------------------------------------------------------------ the driver
def _child_cmd(a, setting, method, seed) -> list[str]:
    cmd = [sys.executable, "-m", "experiments.suite", "one", "--setting", setting, "--method", method,
           "--seed", str(seed), "--variant", a.variant, "--scratch", str(scratch_dir(a.scratch)),
           "--results", str(a.results), "--preset", a.preset, "--warm-start", str(a.warm_start),
           "--rounds", str(a.rounds)]
    if a.extra:
        cmd += ["--extra", a.extra]
    if a.no_accuracy:
        cmd.append("--no-accuracy")
    return cmd


def cmd_run(a) -> int:
    t0 = time.time()
    deadline = None if a.max_minutes is None else t0 + 60 * a.max_minutes
    scratch = scratch_dir(a.scratch)
    results = Path(a.results)
    extra = json.loads(a.extra) if a.extra else None  # for run_one (in process)
    logs = scratch / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    n_done = n_run = 0
    for seed, setting, method, cfg in grid(a, scratch):
        if is_done(results, setting, method, seed, cfg, a.variant):
            n_done += 1
            continue
        if deadline is not None and time.time() >= deadline:
            print(f"suite: --max-minutes {a.max_minutes} reached; stopping (rerun to continue)", flush=True)
            write_summary(results)
            return 0
        rdir = run_dir(scratch, a.variant, setting, method, seed)
        _set_aside_stale(rdir, cfg)
        _restore_partial(rdir, results, a.variant, setting, method, seed, cfg)
        log = logs / f"{a.variant}_{setting}_{method}_seed{seed}.log"
        print(f"suite: {setting} / {method} / seed {seed} ({a.variant}) -> {log}  "
              f"[load {os.getloadavg()[0]:.1f}]", flush=True)
        t = time.time()
        if a.inprocess:  # tests: no child, no kill at the deadline (checked between runs)
            run_one(setting, method, seed, a.variant, scratch=scratch, results=results,
                    preset_name=a.preset, warm_start=a.warm_start, rounds=a.rounds, extra=extra,
                    accuracy=not a.no_accuracy)
            rc = 0
        else:
            with open(log, "a") as f:
                proc = subprocess.Popen(_child_cmd(a, setting, method, seed), cwd=ROOT, stdout=f,
                                        stderr=subprocess.STDOUT, start_new_session=True)
                rc = _wait(proc, deadline)
        if rc is None:
            _save_partial(run_dir(scratch, a.variant, setting, method, seed), results, a.variant, setting,
                          method, seed)
            print(f"suite: deadline reached during {setting}/{method}/seed{seed}: killed, it resumes "
                  "on the next run", flush=True)
            write_summary(results)
            return 0
        if rc != 0:
            print(f"suite: {setting}/{method}/seed{seed} failed (exit {rc}); see {log}", flush=True)
            if a.stop_on_error:
                return rc
            continue
        n_run += 1
        _drop_partial(results, a.variant, setting, method, seed)
        s = json.loads(result_path(results, setting, method, seed, a.variant).read_text())["summary"]
        print(f"suite:   best {s.get('best_feedback')} (uniform {s.get('uniform_feedback')}) in "
              f"{time.time() - t:.0f} s [load {os.getloadavg()[0]:.1f}]", flush=True)
        write_summary(results)
    write_summary(results)
    print(f"suite: all done ({n_done} were already done, {n_run} run now)", flush=True)
    return 0


def _partial_dir(results: Path, variant, setting, method, seed) -> Path:
    return results / "partial" / variant / setting / method / f"seed{seed}"


def _save_partial(rdir: Path, results: Path, variant, setting, method, seed) -> None:
    """A killed run's config.json and history.jsonl, kept in the results tree (committed), so a
    later session without the scratch dir resumes it instead of starting over."""
    import shutil

    if (rdir / "history.jsonl").exists():
        dst = _partial_dir(results, variant, setting, method, seed)
        dst.mkdir(parents=True, exist_ok=True)
        for f in ("config.json", "history.jsonl"):
            shutil.copy2(rdir / f, dst / f)


def _drop_partial(results: Path, variant, setting, method, seed) -> None:
    """A finished run's saved partial is superseded by its result file: removed, so the results
    tree shows only what is left to run."""
    import shutil

    src = _partial_dir(results, variant, setting, method, seed)
    if src.exists():
        shutil.rmtree(src)
        for parent in src.parents:  # the empty folders above it, up to partial/
            if parent == results / "partial" or any(parent.iterdir()):
                break
            parent.rmdir()


def _set_aside_stale(rdir: Path, cfg) -> None:
    """A scratch run dir made with another config (the code's defaults changed since) would be
    refused by the loop: it is renamed ``<dir>.stale-<time>`` (kept, not deleted) and the run
    starts over."""
    from duet_jax.config import config_diff

    cp = rdir / "config.json"
    if cp.exists() and (diff := config_diff(json.loads(cp.read_text()), cfg)):
        dst = rdir.with_name(f"{rdir.name}.stale-{time.strftime('%Y%m%d-%H%M%S')}")
        rdir.rename(dst)
        print(f"suite: {rdir} holds a run with another configuration (differs in {diff}): moved to {dst}; "
              "this run starts over", flush=True)


def _restore_partial(rdir: Path, results: Path, variant, setting, method, seed, cfg=None) -> None:
    """Put a saved partial run back into an empty run dir (its best adapter is re-made by the loop's
    repair step: the best evaluation is re-run from its recorded seed), unless it was made with
    another config than ``cfg`` (then it is not resumed: the run starts over, and its own partial
    or result replaces the stale one)."""
    import shutil

    from duet_jax.config import config_diff

    src = _partial_dir(results, variant, setting, method, seed)
    if cfg is not None and (src / "config.json").exists() and not (rdir / "history.jsonl").exists():
        if diff := config_diff(json.loads((src / "config.json").read_text()), cfg):
            print(f"suite: the saved partial run {src} was made with another configuration (differs in {diff}): "
                  "not resumed; this run starts over", flush=True)
            return
    if (src / "history.jsonl").exists() and not (rdir / "history.jsonl").exists():
        rdir.mkdir(parents=True, exist_ok=True)
        for f in ("config.json", "history.jsonl"):
            shutil.copy2(src / f, rdir / f)
        print(f"suite: restored the partial run {src} into {rdir}", flush=True)


def _wait(proc: subprocess.Popen, deadline: float | None) -> int | None:
    """The child's exit status, or None when it was killed at the deadline."""
    while True:
        try:
            return proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            if deadline is not None and time.time() >= deadline:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                return None


def cmd_one(a) -> int:
    run_one(a.setting, a.method, a.seed, a.variant, scratch=scratch_dir(a.scratch), results=Path(a.results),
            preset_name=a.preset, warm_start=a.warm_start, rounds=a.rounds,
            extra=json.loads(a.extra) if a.extra else None, accuracy=not a.no_accuracy)
    return 0


def cmd_status(a) -> int:
    scratch = scratch_dir(a.scratch)
    results = Path(a.results)
    from duet_jax import report

    left = 0
    for seed, setting, method, cfg in grid(a, scratch):
        if is_done(results, setting, method, seed, cfg, a.variant):
            state = "done"
        else:
            left += 1
            rdir = run_dir(scratch, a.variant, setting, method, seed)
            n = len(report.read_history(rdir)) if (rdir / "history.jsonl").exists() else 0
            state = f"partial {n}/{cfg.evaluations}" if n else "not started"
        print(f"{setting:24s} {method:14s} seed{seed}  {state}")
    print(f"{left} run(s) left")
    return 0


def _csv(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    from experiments.settings import SETTINGS, VARIANTS

    p = argparse.ArgumentParser(prog="python -m experiments.suite", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp, many=True):
        if many:
            sp.add_argument("--settings", type=_csv, default=list(SETTINGS),
                            help=f"comma-separated ({', '.join(SETTINGS)}; default all)")
            sp.add_argument("--methods", type=_csv, default=METHODS,
                            help="comma-separated (default all); METHOD@ABLATION runs an ablation "
                                 "(experiments/settings.py ABLATIONS), e.g. duet_if@k2,duet_if@k4")
            sp.add_argument("--seeds", type=lambda s: [int(x) for x in _csv(s)], default=[0, 1, 2])
        sp.add_argument("--variant", default="demo", choices=sorted(VARIANTS))
        sp.add_argument("--preset", default="demo", help="the loop preset the variant starts from")
        sp.add_argument("--warm-start", type=int, default=DEFAULT_WARM)
        sp.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS)
        sp.add_argument("--extra", default=None, help="JSON config overrides for every run")
        sp.add_argument("--scratch", default=None, help="scratch dir (run dirs, logs)")
        sp.add_argument("--results", default=str(RESULTS))
        sp.add_argument("--no-accuracy", action="store_true",
                        help="skip the best adapter's acc on the multiple-choice tasks")

    r = sub.add_parser("run", help="run what is not done yet")
    common(r)
    r.add_argument("--max-minutes", type=float, default=None)
    r.add_argument("--stop-on-error", action="store_true")
    r.add_argument("--inprocess", action="store_true", help="run in this process (tests)")
    o = sub.add_parser("one", help="one run in this process (what `run` starts per run)")
    common(o, many=False)
    o.add_argument("--setting", required=True, choices=sorted(SETTINGS))
    o.add_argument("--method", required=True, help=f"one of {', '.join(METHODS)}, or METHOD@ABLATION")
    o.add_argument("--seed", type=int, required=True)
    st = sub.add_parser("status", help="done / partial / left")
    common(st)
    sm = sub.add_parser("summary", help="rewrite experiments/results/summary.json")
    sm.add_argument("--results", default=str(RESULTS))
    return p


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    if a.cmd == "summary":
        print(json.dumps(write_summary(Path(a.results)), indent=1))
        return 0
    return {"run": cmd_run, "one": cmd_one, "status": cmd_status}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
