"""The separation measurement (issue 16, "First:"): can a setting tell mixtures apart?

For a setting and a variant (its sizes): the unseen task's feedback at 8 random Dirichlet(1) ratios
against the feedback of one ratio (the uniform one) re-evaluated with 4 fresh samples (fresh
mixtures and fresh fine-tune keys). A setting separates methods when the std across ratios is at
least twice the std across re-samples.

One model, pool and trunk cache per (setting, variant); every evaluation is the loop's own local
step (k = 1, uniform sampling inside domains), scored by

* ``neg_loss``: the loop's feedback on the setting's target (a combined target for two tasks);
* ``neg_loss:<task>`` and, for multiple-choice tasks, ``acc:<task>``: each task on its own
  evaluation split (the same ``feedback.examples`` count), and their mean over tasks
  (``neg_loss:mean``, ``acc:mean``).

Raw results: ``experiments/results/separation/<setting>/<variant>.jsonl``, one line per evaluation
(appended as each finishes; a rerun skips the finished ones), plus ``<variant>.meta.json`` (config,
setup times). ``python -m experiments.separation --setting ood_medical --variant demo``.
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

from experiments.settings import SETTINGS, VARIANTS, accuracy_tasks, run_config

RESULTS = Path(__file__).resolve().parent / "results" / "separation"
N_RATIOS = 8
N_RESAMPLES = 4
RESAMPLE_OFFSET = 100  # evaluation index of re-sample j: RESAMPLE_OFFSET + j (its own seed)
OPTIMUM_OFFSET = 200  # evaluation index of the known optimum's re-sample j


def schedule(optimum: bool = False) -> list[tuple[str, int]]:
    """Interleaved so that a partial file already holds both kinds; with ``optimum`` (a setting
    whose best ratio is known by construction) the optimum's vertex, re-sampled as often as the
    uniform ratio, comes first."""
    out = [("optimum", j) for j in range(N_RESAMPLES)] if optimum else []
    r = 0
    for u in range(N_RESAMPLES):
        out.append(("resample", u))
        for _ in range(2):
            if r < N_RATIOS:
                out.append(("ratio", r))
                r += 1
    out += [("ratio", j) for j in range(r, N_RATIOS)]
    return out


def dirichlet_ratios(n_domains: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(20260 + seed).dirichlet(np.ones(n_domains), size=N_RATIOS)


def load(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a kill: that evaluation is redone
            pass
    return out


def _append(path: Path, rec: dict) -> None:
    """One JSON line, synced; after a line cut by a kill (no final newline) on a line of its own."""
    path.parent.mkdir(parents=True, exist_ok=True)
    cut = False
    if path.exists() and path.stat().st_size:
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            cut = f.read(1) != b"\n"
    with open(path, "a") as f:
        f.write(("\n" if cut else "") + json.dumps(rec) + "\n")
        f.flush()
        os.fsync(f.fileno())


def spreads(records: list[dict]) -> dict:
    """Per metric: std (ddof 1) across ratios, across re-samples, their ratio, and the counts."""
    metrics = sorted({m for r in records for m in r["metrics"]})
    out = {}
    for m in metrics:
        a = [r["metrics"][m] for r in records if r["kind"] == "ratio" and r["metrics"].get(m) is not None]
        b = [r["metrics"][m] for r in records if r["kind"] == "resample" and r["metrics"].get(m) is not None]
        sa = float(np.std(a, ddof=1)) if len(a) > 1 else None
        sb = float(np.std(b, ddof=1)) if len(b) > 1 else None
        out[m] = {"ratios_n": len(a), "ratios_std": sa, "ratios_mean": float(np.mean(a)) if a else None,
                  "ratios_min": float(np.min(a)) if a else None, "ratios_max": float(np.max(a)) if a else None,
                  "resample_n": len(b), "resample_std": sb,
                  "resample_mean": float(np.mean(b)) if b else None,
                  "separation": (sa / sb) if (sa is not None and sb is not None and sb > 1e-9) else None,
                  "resample_constant": sb is not None and sb <= 1e-9}
    return out


def run_separation(setting: str, variant: str, *, seed: int = 0, max_minutes: float | None = None,
                   results: Path = RESULTS, preset_name: str = "demo", extra: dict | None = None,
                   log=print) -> list[dict]:
    import jax

    from duet_jax.loop.feedback import EvalInfo, TaskFeedback
    from duet_jax.loop.local_step import LocalStep
    from duet_jax.loop.selectors import selector_weights
    from duet_jax.loop.setting import Setting, plan_data
    from duet_jax.run import _enable_compilation_cache

    _enable_compilation_cache()
    t_start = time.time()
    spec = SETTINGS[setting]
    cfg = run_config(setting, "uniform", seed, variant, preset_name=preset_name, rounds=0, warm_start=1,
                     extra=extra)
    path = results / setting / f"{variant}.jsonl"
    done = {(r["kind"], r["i"]) for r in load(path)}
    todo = [s for s in schedule(spec.optimum is not None) if s not in done]
    if not todo:
        log(f"{setting}/{variant}: all {len(schedule(spec.optimum is not None))} evaluations done")
        return load(path)
    plan = plan_data(cfg, log)
    scratch = Path(os.environ.get("DUET_EXPERIMENTS_SCRATCH", "/tmp/duet-experiments")) / "separation"
    setting_obj = Setting.build(cfg, plan, scratch / setting / variant, log=log)
    t_setup = time.time() - t_start
    main_fb = TaskFeedback("neg_loss")
    main_fb.prepare(setting_obj)
    extra_fbs = {}
    for task in spec.tasks:  # each task on its own evaluation split
        tcfg = dataclasses.replace(cfg, target=task)
        tplan = plan if (not spec.combined and task == cfg.target) else plan_data(tcfg, lambda s: None)
        view = dataclasses.replace(setting_obj, plan=dataclasses.replace(plan, target_examples=tplan.target_examples))
        metrics = (["neg_loss"] if spec.combined else []) + (["acc"] if task in accuracy_tasks(spec) else [])
        for m in metrics:
            fb = TaskFeedback(m)
            fb.prepare(view)
            extra_fbs[f"{m}:{task}"] = fb
    weights, _ = selector_weights("uniform", setting_obj, cfg.selector)
    step = LocalStep(setting_obj, weights, main_fb, divergence_check=cfg.divergence_check)
    n = setting_obj.n_domains
    ratios = dirichlet_ratios(n, seed)
    t_prep = time.time() - t_start
    meta_path = results / setting / f"{variant}.meta.json"
    from duet_jax.config import to_dict

    meta = {"setting": setting, "variant": variant, "seed": seed, "domains": setting_obj.names,
            "target": cfg.target, "tasks": list(spec.tasks), "config": to_dict(cfg),
            "target_examples": len(plan.target_examples), "pool_rows": int(len(setting_obj.pool)),
            "steps_per_finetune": int(step.steps)}
    if spec.combined:
        rows = {json.loads(line)["prompt"]: json.loads(line)["task"] for line in open(cfg.target)}
        comp: dict[str, int] = {}
        for e in plan.target_examples:
            comp[rows.get(e.prompt, "?")] = comp.get(rows.get(e.prompt, "?"), 0) + 1
        meta["combined_composition"] = comp
    sessions = json.loads(meta_path.read_text()).get("sessions", []) if meta_path.exists() else []
    sessions.append({"setup_s": round(t_setup, 1), "prepare_s": round(t_prep, 1),
                     "loadavg": os.getloadavg(), "started": time.strftime("%Y-%m-%d %H:%M:%S")})
    meta["sessions"] = sessions
    meta_path.parent.mkdir(parents=True, exist_ok=True)
    meta_path.write_text(json.dumps(meta, indent=1))
    if ("base", 0) not in done:  # the model before any fine-tune, for reference
        base = jax.tree.map(lambda a: a[None], setting_obj.lora0)
        info = EvalInfo(-1, 0, 0, {})
        mets = {"neg_loss": main_fb(base, info)[0].value}
        mets.update({k: fb(base, info)[0].value for k, fb in extra_fbs.items()})
        _append(path, {"kind": "base", "i": 0, "metrics": _means(mets, spec), "ratio": None,
                       "time_s": None, "loadavg": os.getloadavg()})
    for kind, i in todo:
        if max_minutes is not None and time.time() - t_start > 60 * max_minutes:
            log(f"{setting}/{variant}: stopping after {max_minutes} min (resumable)")
            break
        if kind == "optimum":
            ratio = np.eye(n)[setting_obj.names.index(spec.optimum)]
        else:
            ratio = ratios[i] if kind == "ratio" else np.full(n, 1.0 / n)
        index = {"ratio": i, "resample": RESAMPLE_OFFSET + i, "optimum": OPTIMUM_OFFSET + i}[kind]
        t = time.time()
        ev = step(ratio, index, 0, "warm")
        t_step = time.time() - t
        info = EvalInfo(index, 0, ev.record["seed"], ev.record["ratio"])
        mets = {"neg_loss": ev.feedback}
        for k, fb in extra_fbs.items():
            o = fb(ev.loras, info)[0]
            mets[k] = o.value
        rec = {"kind": kind, "i": i, "eval_index": index, "seed": ev.record["seed"],
               "ratio": ev.record["ratio"], "metrics": _means(mets, spec), "errors": ev.record["errors"],
               "final_train_loss": ev.record["final_train_loss"], "time_s": round(t_step, 2),
               "time_with_extra_metrics_s": round(time.time() - t, 2), "loadavg": os.getloadavg()}
        _append(path, rec)
        log(f"{setting}/{variant} {kind} {i}: neg_loss {mets['neg_loss']} "
            + " ".join(f"{k} {v:.4f}" for k, v in rec["metrics"].items() if v is not None and k != "neg_loss")
            + f" ({t_step:.1f} s, load {os.getloadavg()[0]:.1f})")
    recs = load(path)
    sp = spreads([r for r in recs if r["kind"] in ("ratio", "resample")])
    meta["spreads"] = sp
    meta_path.write_text(json.dumps(meta, indent=1))
    for m, s in sp.items():
        log(f"  {m}: ratios std {s['ratios_std']} (n={s['ratios_n']}), resample std {s['resample_std']} "
            f"(n={s['resample_n']}), separation {s['separation']}")
    return recs


def _means(mets: dict, spec) -> dict:
    out = dict(mets)
    if spec.combined:
        for m in ("neg_loss", "acc"):
            vals = [mets.get(f"{m}:{t}") for t in spec.tasks if f"{m}:{t}" in mets]
            if len(vals) == len(spec.tasks) and all(v is not None for v in vals):
                out[f"{m}:mean"] = float(np.mean(vals))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--setting", action="append", choices=sorted(SETTINGS), help="repeatable; default all")
    p.add_argument("--variant", default="demo", choices=sorted(VARIANTS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-minutes", type=float, default=None)
    a = p.parse_args(argv)
    t0 = time.time()
    for s in a.setting or list(SETTINGS):
        left = None if a.max_minutes is None else a.max_minutes - (time.time() - t0) / 60
        if left is not None and left <= 0:
            break
        run_separation(s, a.variant, seed=a.seed, max_minutes=left)
    return 0


if __name__ == "__main__":
    sys.exit(main())
