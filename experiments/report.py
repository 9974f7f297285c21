"""Generate ``experiments/RESULTS.md`` (and its plots) from the raw results, only from measured data.

``python -m experiments.report`` reads ``experiments/results/separation/*/*.jsonl`` (+ ``.meta.json``)
and ``experiments/results/<setting>/<method>/seed<N>.json``, rewrites ``results/summary.json``, draws
the best-so-far curves (``results/plots/<setting>.png``) and writes the page. Whatever has no data
is written as "not yet measured".
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from experiments.separation import N_RATIOS, N_RESAMPLES, load, spreads
from experiments.settings import SETTINGS, VARIANTS
from experiments.suite import (
    METHODS,
    RESULTS,
    best_so_far,
    finished_runs,
    setting_label,
    write_summary,
)

HERE = Path(__file__).resolve().parent
PAGE = HERE / "RESULTS.md"
DUET = ("duet_if", "duet_ur", "duet_rh")
BASELINES = ("uniform", "random_search", "doremi", "regmix", "aioli")


def _f(v, nd=4):
    return "–" if v is None else f"{v:.{nd}f}"


def _pm(vals, nd=4):
    vals = [v for v in vals if v is not None]
    if not vals:
        return "–"
    if len(vals) == 1:
        return f"{vals[0]:.{nd}f} (1 seed)"
    return f"{np.mean(vals):.{nd}f} ± {np.std(vals, ddof=1):.{nd}f}"


# ------------------------------------------------------------------------------ separation
def _neg_losses(recs: list[dict], kind: str) -> list[float]:
    """The measured neg_loss of the separation records of one ``kind`` (ratio / resample / optimum)."""
    return [r["metrics"]["neg_loss"] for r in recs if r["kind"] == kind
            and r["metrics"].get("neg_loss") is not None]


SEPARATES_AT = 2.0  # the bar: std across ratios >= this times the re-sample std


def separation_section(results: Path) -> list[str]:
    out = ["## 1. Separation: can the setting tell mixtures apart?", "",
           f"Per setting and size variant: the unseen task's feedback at {N_RATIOS} random Dirichlet(1) ratios "
           f"against the uniform ratio re-evaluated {N_RESAMPLES} times with fresh samples (fresh mixtures, fresh "
           "fine-tune keys); k = 1, uniform sampling inside domains (the loop's own local step, "
           "`experiments/separation.py`). *separation* = std across ratios / std across re-samples "
           f"(both ddof 1); the issue asks for >= {SEPARATES_AT:g} before comparing methods. `base` is the model before any "
           "fine-tune. Times: the local step alone (fine-tune + in-program neg_loss scoring), median over "
           "evaluations after the first (the first compiles); load = 1-minute load average on this 2-core "
           "machine, shared with other jobs.", ""]
    any_data = False
    runs = _runs(results)
    for st in SETTINGS:
        for var in VARIANTS:
            path = results / "separation" / st / f"{var}.jsonl"
            recs = load(path)
            if not recs:
                continue
            any_data = True
            meta_p = path.with_suffix(".meta.json")
            meta = json.loads(meta_p.read_text()) if meta_p.exists() else {}
            ev = [r for r in recs if r["kind"] in ("ratio", "resample")]
            base = next((r for r in recs if r["kind"] == "base"), None)
            sp = spreads(ev)
            out += [f"### {st} / {var}", ""]
            cfg = meta.get("config", {})
            if cfg:
                out.append(f"Sizes: budget M = {cfg.get('budget')}, train_per_domain {cfg.get('train_per_domain')}, "
                           f"LoRA rank {cfg['lora'].get('rank')} on the last {cfg['lora'].get('last_layers')} layers, "
                           f"{cfg['train'].get('epochs')} epochs ({meta.get('steps_per_finetune')} steps, batch "
                           f"{cfg['train'].get('batch_size')}, lr {cfg['train'].get('learning_rate')}), "
                           f"{meta.get('target_examples')} feedback examples"
                           + (f" (combined target: {meta['combined_composition']})" if meta.get("combined_composition") else "")
                           + f"; pool {meta.get('pool_rows')} rows.")
                out.append("")
            out += ["| metric | base | ratios mean [min, max] | ratios std (n) | re-sample mean | re-sample std (n) "
                    "| separation |", "| --- | --- | --- | --- | --- | --- | --- |"]
            for m, s in sp.items():
                sep = s["separation"]
                verdict = "" if sep is None else (" **separates**" if sep >= SEPARATES_AT else " does not separate")
                if sep is not None and (s["ratios_n"] < N_RATIOS or s["resample_n"] < N_RESAMPLES):
                    verdict += " (partial: too few evaluations to decide)"
                if s.get("resample_constant"):
                    verdict = " (every evaluation gave the same value)"
                out.append(f"| {m} | {_f(base['metrics'].get(m)) if base else '–'} | {_f(s['ratios_mean'])} "
                           f"[{_f(s['ratios_min'])}, {_f(s['ratios_max'])}] | {_f(s['ratios_std'])} ({s['ratios_n']}) "
                           f"| {_f(s['resample_mean'])} | {_f(s['resample_std'])} ({s['resample_n']}) | "
                           f"{_f(sep, 2)}{verdict} |")
            times = [r["time_s"] for r in ev]
            loads = [r["loadavg"][0] for r in ev if r.get("loadavg")]
            sess = meta.get("sessions", [])
            out.append("")
            if times:
                rest = times[1:] if len(times) > 1 else times
                out.append(f"Cost: one evaluation {np.median(rest):.1f} s median (first, with compile: {times[0]:.1f} s; "
                           f"all: {min(times):.1f}-{max(times):.1f} s) at load {min(loads):.1f}-{max(loads):.1f}; "
                           "setup (model load, pool trunk pass) "
                           + ", ".join(f"{x['setup_s']:.0f} s at load {x['loadavg'][0]:.1f}" for x in sess)
                           + f". {len(ev)} of {N_RATIOS + N_RESAMPLES} evaluations done.")
            cross = resample_cross_check(sp.get("neg_loss"), runs.get(setting_label(st, var), {}))
            if cross:
                out += ["", cross]
            opt = _neg_losses(recs, "optimum")
            if opt:
                rat = _neg_losses(recs, "ratio")
                o = SETTINGS[st].optimum
                out.append("")
                out.append(f"Known optimum: all of {o} (its vertex re-sampled {len(opt)} times) gives neg_loss "
                           f"{np.mean(opt):.4f} ± {np.std(opt, ddof=1) if len(opt) > 1 else 0:.4f}"
                           + (f"; the best of the {len(rat)} random ratios {max(rat):.4f}, their mean "
                              f"{np.mean(rat):.4f}: the vertex is "
                              + ("above every random ratio" if min(opt) > max(rat) else
                                 "NOT above every random ratio (the optimum by construction is not "
                                 "confirmed at these sizes)") if rat else "") + ".")
            out.append("")
    if not any_data:
        out += ["Not yet measured.", ""]
    missing = [st for st in SETTINGS if not any(load(results / "separation" / st / f"{var}.jsonl")
                                                for var in VARIANTS)]
    if missing:
        out += ["Not yet measured (no variant): " + ", ".join(missing) + ".", ""]
    out += ["Variants defined in `experiments/settings.py` (VARIANTS) and not listed above were not run.", ""]
    return out


# ------------------------------------------------------------------------------ methods
def _runs(results: Path) -> dict:
    """``{label: {method: [run, ...]}}``, label = ``setting_label(setting, variant)``."""
    runs: dict = {}
    for d in finished_runs(results):
        if d.get("setting") in SETTINGS:
            label = setting_label(d["setting"], d.get("variant"))
            runs.setdefault(label, {}).setdefault(d["method"], []).append(d)
    return runs


def _labels(runs: dict, *, demo_always: bool = False):
    """``(setting, variant, label)`` in the order of SETTINGS and VARIANTS: the labels with runs
    (and every setting's demo label when ``demo_always``)."""
    for st in SETTINGS:
        for var in VARIANTS:
            label = setting_label(st, var)
            if label in runs or (demo_always and var == "demo"):
                yield st, var, label


def _plot(setting: str, methods: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for m in METHODS:
        if m not in methods:
            continue
        curves = [best_so_far(d["history"]) for d in methods[m]]
        n = min(len(c) for c in curves)
        arr = np.asarray([[np.nan if v is None else v for v in c[:n]] for c in curves], float)
        mu = np.nanmean(arr, 0)
        x = np.arange(1, n + 1)
        ax.plot(x, mu, label=f"{m} ({len(curves)})", ls="--" if m in BASELINES else "-")
        if len(curves) > 1:
            sd = np.nanstd(arr, 0, ddof=1)
            ax.fill_between(x, mu - sd, mu + sd, alpha=0.15)
    ax.set_xlabel("feedback evaluations")
    ax.set_ylabel("best feedback so far")
    ax.set_title(f"{setting}: best so far, mean ± std over seeds")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


#: two-sided level of the win/tie/loss rule
VERDICT_LEVEL = 0.95


def _t_crit(df: float) -> float:
    """Student-t quantile of the rule: with 3 seeds (df 2) 4.30 standard errors, not the normal 1.96."""
    from scipy.stats import t

    return float(t.ppf(0.5 + VERDICT_LEVEL / 2, df))


def _verdict(a: list[float], b: list[float]) -> str | None:
    """win / tie / loss of a over b: Welch's t-test at VERDICT_LEVEL (needs 2+ seeds each)."""
    if len(a) < 2 or len(b) < 2:
        return None
    d = np.mean(a) - np.mean(b)
    va, vb = np.var(a, ddof=1) / len(a), np.var(b, ddof=1) / len(b)
    se = np.sqrt(va + vb)
    if se == 0:
        return "tie" if d == 0 else ("win" if d > 0 else "loss")
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))  # Welch-Satterthwaite
    c = _t_crit(df)
    return "win" if d > c * se else "loss" if d < -c * se else "tie"


def _paired(a: dict[int, float], b: dict[int, float]) -> tuple[str | None, list[float]]:
    """win / tie / loss of a over b on the seeds both have (same seed: same pool rows, splits and
    feedback examples, so the between-seed spread of the feedback set cancels): the paired t-test
    of the per-seed differences at VERDICT_LEVEL (needs 2+ common seeds)."""
    common = sorted(set(a) & set(b))
    d = [a[s] - b[s] for s in common]
    if len(d) < 2:
        return None, d
    m, se = float(np.mean(d)), float(np.std(d, ddof=1) / np.sqrt(len(d)))
    if se == 0:
        return ("tie" if m == 0 else "win" if m > 0 else "loss"), d
    c = _t_crit(len(d) - 1)
    return ("win" if m > c * se else "loss" if m < -c * se else "tie"), d


def _by_seed(rs: list[dict]) -> dict[int, float]:
    return {d["seed"]: d["summary"]["best_feedback"] for d in rs if d["summary"].get("best_feedback") is not None}


def _uniform_run_sd(d: dict) -> tuple[float, int] | None:
    """A uniform run's std (ddof 1) of its feedback, every evaluation being a fresh re-sample of
    the uniform ratio, and the number of evaluations it is over (None below 3)."""
    fb = [r["feedback"] for r in d["history"] if r["feedback"] is not None]
    return (float(np.std(fb, ddof=1)), len(fb)) if len(fb) > 2 else None


def _uniform_run_sds(ms: dict) -> list[tuple[float, int]]:
    """Per uniform run (one per seed): ``_uniform_run_sd``."""
    return [v for d in ms.get("uniform", []) if (v := _uniform_run_sd(d)) is not None]


def _uniform_sd_by_seed(ms: dict) -> dict[int, tuple[float, int]]:
    return {d["seed"]: v for d in ms.get("uniform", []) if (v := _uniform_run_sd(d)) is not None}


def resample_cross_check(neg_loss: dict | None, ms: dict) -> str | None:
    """The separation recomputed against the noise of the suite's uniform runs (many more
    re-samples than the separation runner's few, which can understate the noise by chance)."""
    runs = _uniform_run_sds(ms)
    if not runs or not neg_loss or neg_loss.get("ratios_std") is None:
        return None
    sds, n = [sd for sd, _ in runs], [k for _, k in runs]
    worst = max(sds)
    sep = neg_loss["ratios_std"] / worst if worst > 0 else None
    verdict = "" if sep is None else (" (separates)" if sep >= SEPARATES_AT else " (**does not separate** on this estimate)")
    rs = neg_loss.get("resample_std")
    return (f"Cross-check of the re-sample noise: the suite's uniform runs re-sample the same ratio "
            f"{min(n) if min(n) == max(n) else f'{min(n)}-{max(n)}'} times per seed; their std per seed {', '.join(f'{x:.4f}' for x in sds)} "
            f"(the re-sample std above: {_f(rs)}); the ratios' std over the largest of them: "
            f"{_f(sep, 2)}{verdict}.")


def noise_line(ms: dict) -> str | None:
    """The single-evaluation noise measured inside the uniform runs (every evaluation re-samples
    the uniform ratio), for reading the differences in the table."""
    sds = [sd for sd, _ in _uniform_run_sds(ms)]
    if not sds:
        return None
    n = len(ms["uniform"][0]["history"])
    return (f"Noise: in the uniform runs every evaluation re-samples the same ratio (fresh mixture and "
            f"fine-tune keys); the std of one evaluation's feedback there is {', '.join(f'{x:.4f}' for x in sds)} "
            f"(per seed, {n} evaluations each), so the uniform row's *best* is what {n} re-samples of one "
            "ratio reach by luck alone.")


def _sentence(st, dm, bm, a, b, sa, sb) -> str:
    word = {"win": "wins over", "tie": "ties with", "loss": "loses to"}
    v = _verdict(a, b)
    pv, d = _paired(sa, sb)
    if v is None and pv is None:
        return f"{st}: {dm} vs {bm}: too few seeds to say ({len(a)} and {len(b)})."
    head = (f"{st}: {dm} {word[v]} {bm}" if v else f"{st}: {dm} vs {bm}") + \
        f" on best neg_loss ({np.mean(a):.4f} vs {np.mean(b):.4f}, {len(a)} and {len(b)} seeds)"
    if pv is not None:
        head += (f"; paired: {word[pv]} (per-seed differences {', '.join(f'{x:+.4f}' for x in d)}, "
                 f"{sum(x > 0 for x in d)} of {len(d)} seeds ahead)")
    return head + "."


def methods_section(results: Path) -> list[str]:
    out = ["## 2. Method comparison", "",
           "Each run: the same number of feedback evaluations for every method (warm start + rounds), "
           "feedback = the unseen task's neg_loss; *best* = the best feedback over the run (the loop's "
           "`best_feedback`), mean ± std over seeds. acc = the best adapter's accuracy on each multiple-choice "
           "task (its own evaluation split), measured after the run. Proxy fine-tunes (doremi / regmix / aioli) "
           "are not counted as feedback evaluations and are listed apart.", ""]
    runs = _runs(results)
    if not runs:
        return out + ["Not yet measured.", ""]
    sentences = []
    for _, _, st in _labels(runs, demo_always=True):
        if st not in runs:
            out += [f"### {st}", "", "Not yet measured.", ""]
            continue
        ms = runs[st]
        any_run = next(iter(ms.values()))[0]
        cfg = any_run["config"]
        out += [f"### {st}", "", f"Variant `{any_run.get('variant')}`: {cfg['warm_start']} warm-start + "
                f"{cfg['rounds']} rounds = {cfg['warm_start'] + cfg['rounds']} evaluations, k = {cfg['k']}, "
                f"M = {cfg['budget']}, LoRA on {cfg['lora']['last_layers']} layers, "
                f"{cfg['feedback']['examples']} feedback examples.", ""]
        acc_tasks = sorted({t for runs_ in ms.values() for d in runs_ for t in (d.get("accuracy") or {})})
        head = "| method | seeds | best neg_loss | mean feedback over the run | " + \
               " | ".join(f"acc {t}" for t in acc_tasks) + (" | " if acc_tasks else "") + \
               "proxy fine-tunes | s / evaluation (load) |"
        out += [head, "|" + " --- |" * (head.count("|") - 1)]
        for m in METHODS:
            if m not in ms:
                continue
            rs = ms[m]
            best = [d["summary"].get("best_feedback") for d in rs]
            meanfb = [d["summary"].get("feedback_mean") for d in rs]
            accs = [_pm([(d.get("accuracy") or {}).get(t) for d in rs], 3) for t in acc_tasks]
            pf = sorted({d["summary"].get("proxy_finetunes", 0) for d in rs})
            ts = [r["time_s"] for d in rs for r in d["history"][1:]]
            loads = [d.get("loadavg_at_end", [None])[0] for d in rs if d.get("loadavg_at_end")]
            label = m + (" (oracle)" if m == "duet_less" else "")
            out.append(f"| {label} | {len(rs)} | {_pm(best)} | {_pm(meanfb)} | " + " | ".join(accs)
                       + (" | " if accs else "") + f"{'/'.join(map(str, pf))} | "
                       + (f"{np.median(ts):.1f} ({min(loads):.1f}-{max(loads):.1f})" if ts and loads else "–") + " |")
        nl = noise_line(ms)
        if nl:
            out += ["", nl]
        png = results / "plots" / f"{st}.png"
        if _plot(st, ms, png):
            out += ["", f"![best so far, {st}](results/plots/{st}.png)"]
        out.append("")
        for dm in DUET:
            if dm not in ms:
                continue
            a = [d["summary"]["best_feedback"] for d in ms[dm] if d["summary"].get("best_feedback") is not None]
            for bm in BASELINES:
                if bm not in ms:
                    continue
                b = [d["summary"]["best_feedback"] for d in ms[bm] if d["summary"].get("best_feedback") is not None]
                sentences.append(_sentence(st, dm, bm, a, b, _by_seed(ms[dm]), _by_seed(ms[bm])))
        for dm, bm in (("duet_if", "duet_ur"), ("duet_rh", "duet_ur"), ("duet_if", "duet_rh")):
            if dm in ms and bm in ms:  # the local step's selector (the paper's IF vs UR vs RH ablation)
                a, b = list(_by_seed(ms[dm]).values()), list(_by_seed(ms[bm]).values())
                sentences.append(_sentence(st, dm, bm, a, b, _by_seed(ms[dm]), _by_seed(ms[bm])))
    out += ["### Where DUET wins, ties and loses", "",
            "Rule: a method wins when its mean best feedback exceeds the other's by more than the two-sided "
            f"{VERDICT_LEVEL:.0%} Student-t quantile times the standard error of the difference (Welch: "
            "sqrt(s1²/n1 + s2²/n2), Welch-Satterthwaite degrees of freedom), loses when it is below by as "
            "much, and ties otherwise. *Paired*: the paired t-test of the per-seed differences (runs of one "
            "seed share the pool rows, the splits and the feedback examples, so the spread between seeds' "
            f"feedback sets cancels; with 3 seeds the mean difference must exceed {_t_crit(2):.2f} standard "
            "errors); "
            "the per-seed differences are listed, so a consistent sign that the test calls a tie is "
            "visible. With 3 seeds both are coarse tests: a tie is not evidence of no difference.", ""]
    out += [f"- {s}" for s in sentences] or ["- Not yet measured (no DUET run next to a baseline run)."]
    out.append("")
    return out


# ------------------------------------------------------------------------------ re-evaluated
#: the comparisons pooled over settings (section 2c)
POOLED_PAIRS = (("duet_if", "random_search"), ("duet_if", "uniform"), ("random_search", "uniform"),
                ("duet_ur", "random_search"), ("duet_rh", "random_search"), ("duet_if", "duet_ur"),
                ("duet_if", "duet_rh"), ("duet_if", "doremi"), ("doremi", "uniform"))


def _confirmed(results: Path, runs: dict, which: str = "best") -> dict:
    """``{label: {method: {seed: value}}}``: each run's ``which`` ratio (best told, or the GP's
    recommendation) without selection (a fixed-ratio method's history mean; the others'
    re-samples by experiments/confirm.py)."""
    from experiments.confirm import FIXED_RATIO, confirmed_value, lines_for

    out: dict = {}
    for label, ms in runs.items():
        for m, rs in ms.items():
            for d in rs:
                lines = None
                if which != "best" and "@" in m:
                    continue  # ablations: only their best told ratio is re-evaluated
                if m.split("@")[0] not in FIXED_RATIO:
                    lines = lines_for(results, d, which)
                c = confirmed_value(d, lines)
                if c is not None:
                    out.setdefault(label, {}).setdefault(m, {})[d["seed"]] = c
    return out


def confirmed_values(results: Path, runs: dict) -> tuple[dict, dict]:
    """``(best told ratio, GP recommendation)`` re-evaluated, each as :func:`_confirmed` gives it.
    The recommendation fits one GP per run: compute this once per page."""
    return _confirmed(results, runs), _confirmed(results, runs, "recommended")


def confirmed_section(results: Path, runs: dict | None = None,
                      confirmed: tuple[dict, dict] | None = None) -> tuple[list[str], bool]:
    """Section 2b: the best feedback against the re-evaluated value of the best told ratio and of
    the GP's recommendation (``runs`` / ``confirmed``: already computed, else read here)."""
    from experiments.confirm import FIXED_RATIO
    from experiments.confirm import N_RESAMPLES as N_CONFIRM

    runs = _runs(results) if runs is None else runs
    conf, rec = confirmed_values(results, runs) if confirmed is None else confirmed
    out = ["## 2b. The recommended ratios, re-evaluated", "",
           "A run's *best* feedback is the largest of its noisy evaluations, so it is biased upward, by more "
           "for a method whose evaluations crowd near its incumbent (the maximum of many draws of nearly the "
           "same value) than for one whose evaluations are spread out. What a user deploys is the ratio the run "
           f"recommends: `python -m experiments.confirm` trains and scores each run's best ratio {N_CONFIRM} more "
           "times with fresh mixtures and fine-tune keys, under the run's own config (its selector inside "
           "domains, its k), and with `--which recommended` the told ratio with the best GP posterior mean "
           "(`SimplexBO.recommend`, fitted on the run's history; where it is the best told ratio its re-samples "
           "are the same). For a fixed-ratio method (" + ", ".join(FIXED_RATIO) + ") every evaluation of the "
           "run already is such a re-sample, so its value is the mean of its history. *Optimism* = best minus "
           "re-evaluated. Verdicts as in section 2, on the re-evaluated values.", ""]
    have = False
    word = {"win": "wins over", "tie": "ties with", "loss": "loses to"}
    for _, _, label in _labels(runs):
        c = conf.get(label, {})
        if not any(m.split("@")[0] not in FIXED_RATIO for m in c):
            continue  # nothing re-evaluated here beyond the fixed-ratio methods' own histories
        have = True
        rc = rec.get(label, {})
        out += [f"### {label}", "", "| method | seeds | best (section 2) | best told ratio, re-evaluated | "
                "optimism | per seed (n) | GP-recommended, re-evaluated | per seed (n) |",
                "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        best = {m: _by_seed(rs) for m, rs in runs[label].items()}
        for m in METHODS:
            if m not in c:
                continue
            seeds = sorted(c[m])
            vals = [c[m][s]["mean"] for s in seeds]
            opt = [best[m][s] - c[m][s]["mean"] for s in seeds if s in best[m]]
            per = ", ".join(f"s{s} {c[m][s]['mean']:.4f} ({c[m][s]['n']})" for s in seeds)
            fixed = m.split("@")[0] in FIXED_RATIO
            rs_ = sorted(rc.get(m, {}))
            rper = "same ratio" if fixed else ", ".join(f"s{s} {rc[m][s]['mean']:.4f} ({rc[m][s]['n']})" for s in rs_)
            out.append(f"| {m} | {len(seeds)} | {_pm([best[m][s] for s in seeds if s in best[m]])} | {_pm(vals)} | "
                       f"{_pm(opt)} | {per} | {'–' if fixed else _pm([rc[m][s]['mean'] for s in rs_])} | "
                       f"{rper or '–'} |")
        out.append("")
        for name, vals_ in (("re-evaluated", c), ("GP-recommended, re-evaluated", rc)):
            for dm, bm in POOLED_PAIRS:
                if name != "re-evaluated" and {dm, bm} <= set(FIXED_RATIO):
                    continue  # both fixed ratios: the recommendation changes neither
                if dm in vals_ and bm in vals_:
                    pv, d = _paired({s: v["mean"] for s, v in vals_[dm].items()},
                                    {s: v["mean"] for s, v in vals_[bm].items()})
                    if pv is not None:
                        out.append(f"- {label}: {name}, paired: {dm} {word[pv]} {bm} (per-seed differences "
                                   f"{', '.join(f'{x:+.4f}' for x in d)}, {sum(x > 0 for x in d)} of {len(d)} "
                                   "seeds ahead).")
        out.append("")
    return out, have


def _primary_labels(runs: dict, a: str, b: str) -> list[str]:
    """Per setting, the largest variant at which both methods have runs (one label per setting, so
    no setting counts twice)."""
    out = []
    for st in SETTINGS:
        for var in reversed(list(VARIANTS)):
            label = setting_label(st, var)
            if label in runs and a in runs[label] and b in runs[label]:
                out.append(label)
                break
    return out


def pooled(runs: dict, values: dict, a: str, b: str) -> dict | None:
    """The paired differences a - b over every (setting, seed) where both have a value, each over
    that seed's one-evaluation noise std (the uniform run's re-samples): count ahead, mean, the
    exact two-sided sign test and the one-sample t-test of the standardized differences."""
    from scipy.stats import binomtest, ttest_1samp

    z, labels = [], []
    for label in _primary_labels(runs, a, b):
        sd = {seed: v for seed, (v, _) in _uniform_sd_by_seed(runs[label]).items()}
        va, vb = values.get(label, {}).get(a, {}), values.get(label, {}).get(b, {})
        for seed in sorted(set(va) & set(vb) & set(sd)):
            if sd[seed] > 0:
                z.append((va[seed] - vb[seed]) / sd[seed])
                labels.append(label)
    if len(z) < 2:
        return None
    z = np.asarray(z)
    ahead, behind = int((z > 0).sum()), int((z < 0).sum())  # exact ties (a shared first evaluation
    # of the same ratio and key) count for neither side of the sign test
    return {"n": len(z), "ahead": ahead, "level": len(z) - ahead - behind, "mean_z": float(z.mean()),
            "median_z": float(np.median(z)),
            "sign_p": float(binomtest(ahead, ahead + behind).pvalue) if ahead + behind else None,
            "t_p": float(ttest_1samp(z, 0.0).pvalue) if z.std() > 0 else None,
            "settings": sorted(set(labels), key=labels.index)}


def pooled_section(results: Path, runs: dict | None = None,
                   confirmed: tuple[dict, dict] | None = None) -> list[str]:
    """Section 2c: each comparison over all settings together (3 seeds per setting cannot resolve
    a difference of one noise std; 15 (setting, seed) pairs can)."""
    runs = _runs(results) if runs is None else runs
    confirmed = confirmed_values(results, runs) if confirmed is None else confirmed
    best = {label: {m: _by_seed(rs) for m, rs in ms.items()} for label, ms in runs.items()}
    flat = lambda c: {label: {m: {s: v["mean"] for s, v in d.items()} for m, d in ms.items()}  # noqa: E731
                      for label, ms in c.items()}
    conf, rec = flat(confirmed[0]), flat(confirmed[1])
    out = ["## 2c. Pooled over settings", "",
           "With 3 seeds a setting's paired test needs a mean difference above 4.3 standard errors, so a "
           "difference of about one evaluation's noise is a tie there even when its sign never changes. "
           "Here each comparison is pooled over the settings: per (setting, seed), the difference of the two "
           "methods over that seed's one-evaluation noise std (its uniform run's re-samples), one variant per "
           "setting (the largest at which both methods ran, so no setting counts twice). *z* is that "
           "standardized difference; *sign p*: the exact two-sided sign test of how many pairs are ahead; "
           "*t p*: the one-sample t-test of the z values. The (setting, seed) pairs are independent draws "
           "of pool rows, splits and feedback sets, but the p-values are not corrected for the "
           f"{len(POOLED_PAIRS)} comparisons (Bonferroni at 5%: p < {0.05 / len(POOLED_PAIRS):.4f}).", ""]
    # the same run's two picks: GP recommendation against best told ratio, both re-evaluated
    both = {label: {**{f"{m}:best": v for m, v in conf.get(label, {}).items()},
                    **{f"{m}:recommended": v for m, v in rec.get(label, {}).items()}} for label in runs}
    runs_both = {label: {**ms, **{f"{m}:{w}": rs for m, rs in ms.items() for w in ("best", "recommended")}}
                 for label, ms in runs.items()}
    pick_pairs = [(f"{m}:recommended", f"{m}:best") for m in ("duet_if", "duet_ur", "duet_rh", "random_search")]
    for name, vals, pairs, rs in (("best feedback (section 2)", best, POOLED_PAIRS, runs),
                                  ("re-evaluated best told ratio (section 2b)", conf, POOLED_PAIRS, runs),
                                  ("re-evaluated GP recommendation (section 2b)", rec, POOLED_PAIRS, runs),
                                  ("GP recommendation against the best told ratio, same run, both re-evaluated",
                                   both, pick_pairs, runs_both)):
        rows = []
        for a, b in pairs:
            r = pooled(rs, vals, a, b)
            if r is None:
                continue
            p = lambda v: "–" if v is None else (f"{v:.1e}" if v < 1e-3 else f"{v:.3f}")  # noqa: E731
            lv = f" ({r['level']} level)" if r["level"] else ""
            rows.append(f"| {a} vs {b} | {r['n']} | {r['ahead']} of {r['n']}{lv} | {r['mean_z']:+.2f} | "
                        f"{r['median_z']:+.2f} | {p(r['sign_p'])} | {p(r['t_p'])} | {', '.join(r['settings'])} |")
        out += [f"### On the {name}", ""]
        if not rows:
            out += ["Not yet measured.", ""]
            continue
        out += ["| comparison | pairs | ahead | mean z | median z | sign p | t p | settings |",
                "| --- | --- | --- | --- | --- | --- | --- | --- |", *rows, ""]
    return out


def _reevaluated_on(results: Path, d: dict, metric: str) -> float | None:
    """The mean of the re-samples of run ``d``'s best told ratio scored by ``metric`` (its own
    metric's lines, or the ``--metric`` re-scoring of experiments/confirm.py), None if none."""
    from experiments.confirm import confirmed_value, lines_for

    c = confirmed_value(d, lines_for(results, d, "best", metric))
    return None if c is None else c["mean"]


def _metric_of(d: dict) -> str:
    fb = d["config"]["feedback"]
    t = fb.get("temperature") or 0.0
    return fb["metric"] + (f" (T {t:g})" if t > 0 else "")


def _vs_plain(mine: dict[int, float], plain: dict[int, float]) -> str:
    """The paired verdict of an ablation's per-seed values against the plain run's, with the
    per-seed differences."""
    if not plain:
        return "no plain run"
    v, d = _paired(mine, plain)
    return (f"{v or 'too few seeds'}: " + ", ".join(f"{x:+.4f}" for x in d)) if d else "no common seed"


def ablations_section(results: Path, runs: dict | None = None) -> tuple[list[str], bool]:
    """Runs keyed ``METHOD@ABLATION`` against their plain METHOD, seed by seed: on the best feedback
    where both are driven by the same metric, and always on the re-evaluated best told ratio scored
    by the plain run's metric (so a run driven by exact match is compared on neg_loss)."""
    from experiments.settings import ABLATIONS

    runs = _runs(results) if runs is None else runs
    out = ["## 3. Ablations", "",
           "A run `METHOD@NAME` is METHOD with the overrides `ABLATIONS[NAME]` of `experiments/settings.py` on "
           "top of the same setting and variant (same feedback budget unless the ablation changes it). *vs "
           "plain*: the paired per-seed difference against the plain METHOD's run of the same seed (rule as in "
           "section 2), on the best feedback (only where both runs are driven by the same metric: a best exact "
           "match and a best neg_loss are not comparable) and on the *re-evaluated* best told ratio (section 2b: "
           "4 fresh re-samples, scored by the plain run's metric; `python -m experiments.confirm run --methods "
           "METHOD@NAME [--metric neg_loss]`), which also removes the selection bias of the best.", ""]
    any_data = False
    for _, _, st in _labels(runs):
        keys = sorted(k for k in runs.get(st, {}) if "@" in k)
        if not keys:
            continue
        any_data = True
        out += [f"### {st}", "", "| run | overrides | driven by | seeds | best | vs plain (paired, best) | "
                "re-evaluated | vs plain (paired, re-evaluated) |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for key in keys:
            base, abl = key.split("@", 1)
            mine, plain = runs[st][key], runs[st].get(base, [])
            metric = plain[0]["config"]["feedback"]["metric"] if plain else mine[0]["config"]["feedback"]["metric"]
            same = {d["config"]["feedback"]["metric"] for d in mine} == {metric}
            a, b = _by_seed(mine), _by_seed(plain)
            ra = {d["seed"]: v for d in mine if (v := _reevaluated_on(results, d, metric)) is not None}
            rb = {d["seed"]: v for d in plain if (v := _reevaluated_on(results, d, metric)) is not None}
            out.append(f"| {key} | `{json.dumps(ABLATIONS.get(abl, {}))}` | {_metric_of(mine[0])} | {len(a)} | "
                       f"{_pm(list(a.values()))} | {_vs_plain(a, b) if same else 'other metric'} | "
                       f"{_pm(list(ra.values())) + ' (' + metric + ')' if ra else '–'} | "
                       f"{_vs_plain(ra, rb) if ra else 'not re-evaluated'} |")
        out.append("")
    return out, any_data


# ------------------------------------------------------------------------------ known optimum
#: a ratio "reaches" the known optimum when the optimum domain's share is at least this
REACH_SHARE = 0.8


def known_optimum_section(results: Path) -> tuple[list[str], bool]:
    """Settings with an optimum by construction: does each run reach its vertex, after how many
    evaluations, and how far below the vertex's own feedback does its best stay (by k)."""
    runs = _runs(results)
    out = ["## 3b. Known optimum", "",
           f"Settings whose best ratio is known by construction (all of one domain). Per run: the best "
           f"feedback, the optimum domain's share in the best ratio, the first evaluation whose ratio gives "
           f"that domain at least {REACH_SHARE} (*reached at*), and the *error* = the vertex's mean feedback "
           "(separation runner, the vertex re-sampled) minus the run's best; with k fine-tunes per ratio "
           "(`@k2`, `@k4`) the best is the best of k mixtures (the paper's Theorem 3.2: the error shrinks "
           "with k).", ""]
    any_data = False
    for setting, var, label in _labels(runs):
        spec = SETTINGS[setting]
        if spec.optimum is None:
            continue
        any_data = True
        opt = _neg_losses(load(results / "separation" / setting / f"{var}.jsonl"), "optimum")
        v = float(np.mean(opt)) if opt else None
        out += [f"### {label} (optimum: all of {spec.optimum})", "",
                "| run | seed | k | best neg_loss | optimum share in best | reached at (of evals) | error |",
                "| --- | --- | --- | --- | --- | --- | --- |"]
        for key in sorted(runs[label]):
            for d in sorted(runs[label][key], key=lambda d: d["seed"]):
                h = [r for r in d["history"] if r.get("feedback") is not None]
                if not h:
                    continue
                best = max(h, key=lambda r: r["feedback"])
                share = best["ratio"].get(spec.optimum, 0.0)
                reach = next((r["eval"] + 1 for r in d["history"]
                              if r["ratio"].get(spec.optimum, 0.0) >= REACH_SHARE), None)
                err = "–" if v is None else f"{v - best['feedback']:+.4f}"
                k = d.get("config", {}).get("k", len(best.get("feedbacks") or [1]))
                out.append(f"| {key} | {d['seed']} | {k} | {best['feedback']:.4f} | {share:.2f} | "
                           f"{'never' if reach is None else reach} ({len(d['history'])}) | {err} |")
        if v is None:
            out.append("")
            out.append(f"The vertex's feedback is not yet measured (`python -m experiments.separation "
                       f"--setting {setting} --variant {var}`): no error column.")
        out.append("")
    return out, any_data


def main(argv=None) -> int:
    results = RESULTS
    write_summary(results)
    notes_p = HERE / "results" / "NOTES.md"
    lines = ["# Results (issue 16)", "",
             "Generated by `python -m experiments.report` from the raw files under `experiments/results/`; "
             "do not edit by hand (notes: `experiments/results/NOTES.md`, copied below). Model: "
             "SmolLM2-135M-Instruct on CPU (2 cores, shared: load averages are given beside every time).", "",
             "## Settings", "", "| setting | mode | unseen task(s) | pool |", "| --- | --- | --- | --- |"]
    for s in SETTINGS.values():
        short = lambda d: Path(d).stem if d.endswith(".jsonl") else d  # a file domain is named by its stem
        lines.append(f"| {s.name} | {s.mode} | {' + '.join(map(short, s.tasks))}"
                     f"{' (combined target)' if s.combined else ''} | {', '.join(map(short, s.domains))} "
                     f"({len(s.domains)}) |")
    lines += ["", "Two held-out tasks are one *combined target*: a file with 250 evaluation-split examples of "
              "each (`experiments/targets/`); the feedback is the mean answer-token neg_loss over the scored "
              "examples of both (the loop takes one target; see `experiments/settings.py`). The separation "
              "runner also scores each task alone (`neg_loss:<task>`, `acc:<task>`, and their `:mean`).", ""]
    lines += separation_section(results)
    lines += methods_section(results)
    runs = _runs(results)
    confirmed = confirmed_values(results, runs)  # one GP fit per run, shared by sections 2b and 2c
    conf_lines, have_conf = confirmed_section(results, runs, confirmed)
    if have_conf:
        lines += conf_lines
    lines += pooled_section(results, runs, confirmed)
    abl, have_abl = ablations_section(results, runs)
    if have_abl:
        lines += abl
    known, have_known = known_optimum_section(results)
    if have_known:
        lines += known
    lines += ["## 4. Not yet measured", ""]
    if not have_abl:
        lines.append(
              "- Ablations (k in {1, 2, 4}; selector IF / UR / RH / LESS beyond the method table; curvature "
              "fisher / cosine / adam; warm-start size; IF temperature; noisy feedback at temperature 0.75 vs "
              "greedy; `python -m experiments.suite run --methods duet_if@k2,duet_if@k4,...`): not yet measured.")
    if not have_known:
        lines.append("- The known-optimum setting and the best-of-k error against k (Theorem 3.2): not yet measured.")
    lines += [
              "- Paper-scale runs (Llama-3-8B / Qwen2.5-7B, M = 10,000, T = 10) on a GPU/TPU: not run (no "
              "accelerator was lent); their expected cost is estimated below.", ""]
    from experiments.paper_scale import estimate, markdown

    lines += markdown(estimate())
    if notes_p.exists():
        lines += ["## Notes", "", notes_p.read_text().strip(), ""]
    lines += ["## Commands", "", "```",
              "# separation (resumable; one process per setting)",
              "python -m experiments.separation --setting ood_medical --variant mid --max-minutes 100",
              "# method comparison (resumable; finished runs skipped, killed ones resumed)",
              "python -m experiments.suite run --settings ood_medical --variant mid --seeds 0,1,2 --max-minutes 100",
              "python -m experiments.suite status --settings ood_medical --variant mid --seeds 0,1,2",
              "# each run's recommended ratio re-evaluated with fresh samples (resumable)",
              "python -m experiments.confirm run --settings ood_medical --variant mid --seeds 0,1,2 --max-minutes 100",
              "# this page",
              "python -m experiments.report", "```", ""]
    PAGE.write_text("\n".join(lines))
    print(f"wrote {PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
