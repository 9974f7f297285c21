"""Re-evaluate each finished run's best ratio with fresh samples (issue 16: honest comparisons).

A run's *best feedback* is the largest of its 16 noisy evaluations, so it is biased upward, and by
how much depends on the method: a method that puts many evaluations near its incumbent takes the
maximum over more draws of nearly the same value (the winner's curse) than one whose evaluations
are spread out. What a user deploys is the ratio a run recommends, so this tool measures that
ratio's value without the selection: the best ratio (``summary.best_ratio``) of each finished run,
trained and scored ``--resamples`` more times (default 4) with fresh mixtures and fine-tune keys
(evaluation indices ``CONFIRM_OFFSET + j``, never used by a run), under the run's own method
config (its selector's weights inside domains, its k).

Methods with a fixed ratio (``uniform``, ``doremi``, ``regmix``, ``aioli``) need no re-evaluation:
every one of their evaluations is already a fresh sample of the one ratio they recommend, so the
report takes the mean of their history.

::

    python -m experiments.confirm run --settings in_domain --methods random_search,duet_if \\
        --seeds 0,1,2 --max-minutes 40
    python -m experiments.confirm run --settings ood_medical --variant mid --methods duet_if
    python -m experiments.confirm status --settings in_domain
    # runs driven by another feedback metric (the exact-match ablations), scored on neg_loss
    python -m experiments.confirm run --settings in_domain --methods duet_if@em_greedy,duet_if@em_t0.75 \
        --seeds 0 --metric neg_loss

Raw results: ``experiments/results/confirm/<label>/<method>/seed<N>.jsonl``, one line per
re-sample, appended (and fsynced) as each finishes; a rerun skips the re-samples there, so a killed
or deadline-stopped invocation resumes. Lines made for another run (its config hash or best ratio
changed, or their metric is another) raise instead of being mixed in; re-samples scored by
``--metric`` other than the run's own go to ``seed<N>.<metric>.jsonl``. Before the first re-sample of each (setting, seed) the
run's own best evaluation is replayed (same index, same keys) and must give the recorded feedback
(``replay.jsonl``): a code or data change since the run stops the tool instead of comparing
re-samples of a different program with the run's numbers. One model, pool and trunk cache per (setting, seed); the
influence scores come from the suite's shared store for that seed (computed if missing).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from experiments.separation import _append, load
from experiments.suite import (
    RESULTS,
    _csv,
    result_path,
    scratch_dir,
    scratch_locations,
    setting_label,
)

#: the evaluation index of re-sample j: far above any run's own indices (a run has warm_start +
#: rounds evaluations, and its proxies use other key streams), so its keys are fresh
CONFIRM_OFFSET = 1_000_000
N_RESAMPLES = 4
#: methods whose every evaluation already re-samples the one ratio they recommend
FIXED_RATIO = ("uniform", "doremi", "regmix", "aioli")


#: which ratio of a run is re-evaluated: ``best`` (its best told evaluation, ``summary.best_ratio``)
#: or ``recommended`` (the told ratio with the best GP posterior mean, ``SimplexBO.recommend``)
WHICH = ("best", "recommended")


def confirm_path(results: Path, setting: str, method: str, seed: int, variant: str = "demo",
                 which: str = "best", metric: str | None = None) -> Path:
    """``metric``: re-scored with this feedback metric instead of the run's own (None: the run's)."""
    tail = ("" if which == "best" else f".{which}") + ("" if metric is None else f".{metric}")
    return results / "confirm" / setting_label(setting, variant) / method / f"seed{seed}{tail}.jsonl"


def recommended_ratio(run: dict) -> dict:
    """The told ratio whose GP posterior mean is best (``SimplexBO.recommend`` with the run's BO
    config and seed over its successful evaluations), as ``{domain: share}``."""
    from duet_jax.bo.config import BOConfig
    from duet_jax.bo.simplex_bo import SimplexBO

    ok = [r for r in run["history"] if r.get("feedback") is not None]
    names = list(ok[0]["ratio"])
    known = {f.name for f in dataclasses.fields(BOConfig)}
    # the GP's fit options are what matter here; a field an old run has and BOConfig no longer
    # knows (an exploration schedule since removed) has no say in the posterior mean
    bo = {k: v for k, v in run["config"]["bo"].items() if k in known}
    opt = SimplexBO(len(names), seed=run["seed"], config=BOConfig.from_dict(bo))
    opt.tell(np.asarray([[r["ratio"][n] for n in names] for r in ok]), [r["feedback"] for r in ok])
    x = opt.recommend()[0]
    i = int(np.argmin(np.max(np.abs(np.asarray([[r["ratio"][n] for n in names] for r in ok]) - x), axis=1)))
    return dict(ok[i]["ratio"])  # the told record's own ratio, bit for bit


def same_ratio(a: dict, b: dict, tol: float = 1e-12) -> bool:
    """Two ``{domain: share}`` ratios equal up to rounding (a summary's best ratio and its history
    record can differ in the last bit)."""
    return a.keys() == b.keys() and all(abs(a[k] - b[k]) <= tol for k in a)


def is_best(run: dict, ratio: dict) -> bool:
    return same_ratio(ratio, run["summary"]["best_ratio"])


def target_ratio(run: dict, which: str) -> dict:
    if which == "best":
        return run["summary"]["best_ratio"]
    if which == "recommended":
        return recommended_ratio(run)
    raise SystemExit(f"unknown --which {which!r}; one of {', '.join(WHICH)}")


def run_metric(run: dict) -> str:
    """The feedback metric a run was driven by."""
    return run["config"]["feedback"]["metric"]


def rescored(run: dict, metric: str | None) -> str | None:
    """``metric`` where it is not the run's own (then its re-samples are scored by it and kept
    apart), else None."""
    return None if metric is None or metric == run_metric(run) else metric


def check_lines(lines: list[dict], run: dict, path: Path, ratio: dict | None = None,
                metric: str | None = None) -> list[dict]:
    """The lines that belong to ``run`` (same config hash, same re-evaluated ratio: the best one
    unless ``ratio`` says otherwise; same metric); anything else is an error: re-samples of two
    different runs must never be averaged together."""
    ratio = run["summary"]["best_ratio"] if ratio is None else ratio
    metric = metric or run_metric(run)
    for r in lines:
        if (r.get("run_config_hash") != run["config_hash"] or r.get("ratio_recommended") != ratio
                or r.get("metric", run_metric(run)) != metric):
            raise SystemExit(f"{path} holds re-samples of another run (config hash "
                             f"{r.get('run_config_hash')} vs {run['config_hash']}, metric "
                             f"{r.get('metric', run_metric(run))} vs {metric}); move it away")
    return lines


def confirmed_value(run: dict, lines: list[dict] | None) -> dict | None:
    """``{"mean", "std", "n", "source"}`` of the recommended ratio's feedback without selection:
    a fixed-ratio method's history (every evaluation a fresh sample of that ratio), or the
    re-samples' lines; None when there is nothing yet."""
    if run["method"].split("@")[0] in FIXED_RATIO:
        v = [r["feedback"] for r in run["history"] if r.get("feedback") is not None]
        source = "history"
    else:
        v = [r["feedback"] for r in (lines or []) if r.get("feedback") is not None]
        source = "resamples"
    if not v:
        return None
    return {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else None,
            "n": len(v), "source": source}


def _strip_method(d: dict) -> str:
    """The part of a config dict that the Setting depends on: not the method, and of the feedback
    only its example count (the metric is the feedback object's, built apart)."""
    fb = {"examples": d.get("feedback", {}).get("examples")}
    return json.dumps({k: (fb if k == "feedback" else v) for k, v in d.items() if k != "method"}, sort_keys=True)


class Unbuildable(Exception):
    """A run whose config this code cannot rebuild exactly: skipped (with its reason), never
    re-evaluated under another config."""


def build_step(run: dict, scratch: Path, built: dict, log=print, ratio: dict | None = None,
               metric: str | None = None):
    """``(step, ratio)``: the local step of ``run``'s own config (whatever warm start, rounds or
    preset it ran with, with its stores under ``scratch``) and the ratio to re-evaluate (its best
    unless ``ratio`` says otherwise) in the Setting's domain order; ``metric``: scored by this
    feedback metric (greedy) instead of the run's own. ``built`` caches the Setting per
    config-without-its-method-and-metric and the feedback per feedback config, so the methods of
    one (setting, seed) share one model, pool and trunk pass."""
    from duet_jax.config import config_hash, from_dict, to_dict
    from duet_jax.errors import ConfigError
    from duet_jax.loop.feedback import make_feedback
    from duet_jax.loop.local_step import LocalStep
    from duet_jax.loop.methods import METHODS
    from duet_jax.loop.selectors import selector_weights
    from duet_jax.loop.setting import Setting, plan_data

    setting, method, seed, variant = run["setting"], run["method"], run["seed"], run.get("variant", "demo")
    where = f"{setting_label(setting, variant)}/{method}/seed{seed}"
    try:
        cfg = dataclasses.replace(from_dict(run["config"]), **scratch_locations(scratch, variant, setting, method, seed))
    except ConfigError as e:  # an option since removed: this code cannot run that config
        raise Unbuildable(f"{where}: its config no longer builds ({e}); re-evaluating it needs the code it ran with") from e
    if config_hash(cfg) != run["config_hash"]:
        raise Unbuildable(f"{where}: its config does not rebuild to its hash ({run['config_hash']} vs "
                          f"{config_hash(cfg)}); re-evaluating it would use another config")
    key = _strip_method(to_dict(cfg))
    if key not in built:
        built.clear()  # one model in memory at a time
        plan = plan_data(cfg, log)
        st = Setting.build(cfg, plan, scratch / "confirm" / variant / setting / f"seed{seed}", log=log)
        built[key] = (st, {})
    st, fbs = built[key]
    fcfg = cfg.feedback if metric is None else dataclasses.replace(cfg.feedback, metric=metric, temperature=0.0)
    fkey = json.dumps(dataclasses.asdict(fcfg), sort_keys=True, default=str)
    if fkey not in fbs:
        fbs[fkey] = make_feedback(dataclasses.replace(cfg, feedback=fcfg))
        fbs[fkey].prepare(st)
    fb = fbs[fkey]
    weights, _ = selector_weights(cfg.selector.kind or METHODS[cfg.method].selector, st, cfg.selector)
    step = LocalStep(st, weights, fb, divergence_check=cfg.divergence_check)
    ratio = run["summary"]["best_ratio"] if ratio is None else ratio
    return step, np.asarray([ratio[n] for n in st.names], np.float64)


#: a replayed evaluation must give the run's recorded feedback within this (the same code and
#: machine give it bit for bit; another CPU may differ in the last digits)
REPLAY_TOL = 1e-3


def replay_check(run: dict, step, ratio_v, results: Path, log=print) -> dict:
    """Re-run the run's own best evaluation (its index, so its keys) and compare with the recorded
    feedback: if the code or the data changed since the run, re-samples would measure something
    else than the run did. Kept in ``confirm/<label>/replay.jsonl``; a mismatch raises."""
    i = run["summary"]["best_evaluation"]
    label = setting_label(run["setting"], run.get("variant", "demo"))
    path = results / "confirm" / label / "replay.jsonl"
    for r in load(path):
        if (r["method"], r["seed"], r["run_config_hash"]) == (run["method"], run["seed"], run["config_hash"]):
            return r
    t = time.time()
    got = step(ratio_v, i, 0, "replay").feedback
    want = run["history"][i]["feedback"]
    rec = {"method": run["method"], "seed": run["seed"], "run_config_hash": run["config_hash"], "eval": i,
           "recorded": want, "replay": got, "time_s": round(time.time() - t, 2)}
    ok = got is not None and abs(got - want) <= REPLAY_TOL
    if ok:
        _append(path, rec)
    log(f"confirm: {label}/{run['method']}/seed{run['seed']}: replay of evaluation {i}: {got} "
        f"(recorded {want}){'' if ok else ' MISMATCH'}")
    if not ok:
        raise SystemExit(f"{label}/{run['method']}/seed{run['seed']}: replaying evaluation {i} gave {got}, "
                         f"the run recorded {want}: the code or the data changed since the run, so fresh "
                         "re-samples would not measure what it measured")
    return rec


def run_confirm(settings, methods, seeds, variant: str, *, resamples: int = N_RESAMPLES,
                results: Path = RESULTS, scratch: Path | None = None, max_minutes: float | None = None,
                which: str = "best", metric: str | None = None, log=print) -> int:
    """Re-evaluate what is missing; the number of re-samples run now. ``which="recommended"``
    re-evaluates the GP's recommendation, and nothing where it is the best ratio (those lines are
    the best ratio's). ``metric``: score the re-samples of a run driven by another metric with
    this one (greedy), e.g. the exact-match ablations on the plain runs' ``neg_loss``; a run
    driven by ``metric`` itself is re-evaluated as usual."""
    from duet_jax.run import _enable_compilation_cache

    _enable_compilation_cache()
    t0 = time.time()
    scratch = scratch or scratch_dir()
    n_run = 0
    skipped: list[str] = []
    for seed in seeds:
        for setting in settings:
            built: dict = {}  # config without its method -> (Setting, feedbacks): one per seed
            for method in methods:
                if method.split("@")[0] in FIXED_RATIO:
                    log(f"confirm: {method} has a fixed ratio: its history is the re-evaluation")
                    continue
                rp = result_path(results, setting, method, seed, variant)
                if not rp.exists():
                    log(f"confirm: {setting_label(setting, variant)}/{method}/seed{seed}: no finished run, skipped")
                    continue
                run = json.loads(rp.read_text())
                ratio = target_ratio(run, which)
                if which != "best" and is_best(run, ratio):
                    log(f"confirm: {setting_label(setting, variant)}/{method}/seed{seed}: the {which} ratio is "
                        "the best one: its re-samples are the best ratio's")
                    continue
                m = rescored(run, metric)
                path = confirm_path(results, setting, method, seed, variant, which, m)
                done = {r["j"] for r in check_lines(load(path), run, path, ratio, m)}
                todo = [j for j in range(resamples) if j not in done]
                if not todo:
                    continue
                if max_minutes is not None and time.time() - t0 > 60 * max_minutes:
                    log(f"confirm: --max-minutes {max_minutes} reached; stopping (rerun to continue)")
                    return n_run
                try:
                    step, ratio_v = build_step(run, scratch, built, log, ratio, m)
                except Unbuildable as e:
                    log(f"confirm: skipped: {e}")
                    skipped.append(str(e))
                    continue
                if not built.get("replayed"):  # once per Setting built: its code path still the run's
                    own = step if m is None else build_step(run, scratch, built, log)[0]  # the run's metric
                    best_v = np.asarray([run["summary"]["best_ratio"][n] for n in step.setting.names], np.float64)
                    replay_check(run, own, best_v, results, log)  # the replay is of the best evaluation
                    built["replayed"] = True
                for j in todo:
                    if max_minutes is not None and time.time() - t0 > 60 * max_minutes:
                        log(f"confirm: --max-minutes {max_minutes} reached; stopping (rerun to continue)")
                        return n_run
                    t = time.time()
                    ev = step(ratio_v, CONFIRM_OFFSET + j, 0, "confirm")
                    rec = {"j": j, "eval_index": CONFIRM_OFFSET + j, "seed": ev.record["seed"],
                           "feedback": ev.feedback, "feedbacks": ev.record["feedbacks"],
                           "errors": ev.record["errors"], "ratio": ev.record["ratio"],
                           "ratio_recommended": ratio, "which": which, "metric": m or run_metric(run),
                           "best_feedback": run["summary"]["best_feedback"],
                           "run_config_hash": run["config_hash"], "time_s": round(time.time() - t, 2),
                           "loadavg": os.getloadavg()}
                    _append(path, rec)
                    n_run += 1
                    log(f"confirm: {setting_label(setting, variant)}/{method}/seed{seed} ({which}) re-sample {j}: "
                        f"{ev.feedback} (the run's best {run['summary']['best_feedback']:.4f}; "
                        f"{rec['time_s']:.1f} s)")
    log(f"confirm: done ({n_run} re-samples run now, {time.time() - t0:.0f} s)"
        + (f"; {len(skipped)} run(s) skipped, their configs do not rebuild:\n  " + "\n  ".join(skipped)
           if skipped else ""))
    return n_run


def lines_for(results: Path, run: dict, which: str = "best", metric: str | None = None) -> list[dict]:
    """The re-samples of ``run``'s ``which`` ratio that are on disk (the best ratio's where the
    recommendation is the best ratio), only those made for this run, scored by ``metric`` (None:
    the run's own)."""
    ratio = target_ratio(run, which)
    if which != "best" and is_best(run, ratio):
        which, ratio = "best", run["summary"]["best_ratio"]
    m = rescored(run, metric)
    lines = load(confirm_path(results, run["setting"], run["method"], run["seed"], run.get("variant", "demo"), which, m))
    want = m or run_metric(run)
    return [r for r in lines if r.get("run_config_hash") == run["config_hash"] and r.get("ratio_recommended") == ratio
            and r.get("metric", run_metric(run)) == want]


def status(settings, methods, seeds, variant: str, *, resamples: int = N_RESAMPLES,
           results: Path = RESULTS, which: str = "best", metric: str | None = None, log=print) -> int:
    left = 0
    for seed in seeds:
        for setting in settings:
            for method in methods:
                rp = result_path(results, setting, method, seed, variant)
                label = f"{setting_label(setting, variant):24s} {method:14s} seed{seed}"
                if not rp.exists():
                    log(f"{label}  no finished run")
                    continue
                run = json.loads(rp.read_text())
                if method.split("@")[0] in FIXED_RATIO:
                    c = confirmed_value(run, None)
                    log(f"{label}  fixed ratio: mean of its {c['n']} evaluations {c['mean']:.4f}")
                    continue
                lines = lines_for(results, run, which, metric)
                c = confirmed_value(run, lines)
                n = 0 if c is None else c["n"]
                left += max(resamples - len({r['j'] for r in lines}), 0)
                v = "" if c is None else f": mean {c['mean']:.4f} (best {run['summary']['best_feedback']:.4f})"
                m = rescored(run, metric)
                log(f"{label}  {n}/{resamples} re-samples{v}{'' if m is None else f' (scored by {m})'}")
    log(f"{left} re-sample(s) left")
    return left


def main(argv=None) -> int:
    from experiments.settings import SETTINGS, VARIANTS
    from experiments.suite import METHODS

    p = argparse.ArgumentParser(prog="python -m experiments.confirm", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("run", "status"):
        sp = sub.add_parser(name)
        sp.add_argument("--settings", type=_csv, default=list(SETTINGS))
        sp.add_argument("--methods", type=_csv, default=[m for m in METHODS if m not in FIXED_RATIO])
        sp.add_argument("--seeds", type=lambda s: [int(x) for x in _csv(s)], default=[0, 1, 2])
        sp.add_argument("--variant", default="demo", choices=sorted(VARIANTS))
        sp.add_argument("--resamples", type=int, default=N_RESAMPLES)
        sp.add_argument("--results", default=str(RESULTS))
        sp.add_argument("--which", default="best", choices=WHICH,
                        help="the run's best ratio, or the GP's recommendation (SimplexBO.recommend)")
        sp.add_argument("--metric", default=None,
                        help="score the re-samples with this feedback metric (greedy) where a run was driven "
                             "by another one (the exact-match ablations on neg_loss); default: the run's own")
        if name == "run":
            sp.add_argument("--scratch", default=None)
            sp.add_argument("--max-minutes", type=float, default=None)
    a = p.parse_args(argv)
    if a.cmd == "status":
        status(a.settings, a.methods, a.seeds, a.variant, resamples=a.resamples, results=Path(a.results),
               which=a.which, metric=a.metric)
        return 0
    run_confirm(a.settings, a.methods, a.seeds, a.variant, resamples=a.resamples, results=Path(a.results),
                scratch=scratch_dir(a.scratch), max_minutes=a.max_minutes, which=a.which, metric=a.metric,
                log=lambda s: print(s, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
