"""``duet-jax bench bo``: the BO regret suite (ours vs BoTorch vs random search) and the round time.

1. The suite (``--suite``, the default): synthetic objectives on the simplex with known maxima
   (``duet_jax.bo.synthetic``: ``smooth`` mixing-law utility, ``multimodal`` bumps with a trend,
   ``peaks`` separated optima of different heights and widths with a narrow highest one,
   ``needle`` flat with one narrow optimum), noiseless and noisy (N(0, 0.1^2) added to every
   observation; regret on the noise-free values), in 3 / 5 / 9 / 12 domains. Each run has
   ``max(evals)`` evaluations and the regret is read after each of ``evals`` (30 and 60: a run's
   first 30 proposals do not depend on its budget). Methods:

   - ``ours``: ``loop.run`` with ``BOConfig()`` (the ``default`` profile), all seeds in one
     compiled program;
   - ``paper``: ``BOConfig.from_profile("paper")`` (Matern-5/2, UCB beta 1, maximin warm start);
   - ``botorch-logei`` / ``botorch-ucb``: BoTorch's ``SingleTaskGP`` as it comes (its default
     priors, ``Standardize``), ``fit_gpytorch_mll``, ``LogExpectedImprovement`` or
     ``UpperConfidenceBound`` (beta 1) maximised by ``optimize_acqf`` with the sum-to-one equality
     constraint (``n_starts`` restarts, ``n_raw`` raw samples), from the same warm-start design
     (``n_init`` maximin points) as ``paper``;
   - ``random``: Dirichlet(1) draws.

   One JSON line per (case, method, seed) is appended to ``--results`` as it finishes; a rerun
   skips the lines already there (for ``ours``/``paper``: only those made with the same config,
   by its fingerprint), so the table can be built in pieces (``--budget`` seconds per piece).
   ``--table`` prints the table of what the file holds: median [quartiles] of simple regret after
   each of ``evals``, and the near-duplicate proposals (a proposal within 0.02 in every share of
   an earlier evaluated ratio), summed over seeds.

2. The round time (``--timing``): seconds per BO round (fit + proposal), after compilation, on the
   same observations (``n`` Dirichlet(1) ratios valued by ``multimodal``), ours with its defaults and
   BoTorch with LogEI, measured in the same run one after the other.

BoTorch comes from the ``bench`` extra (``make bench-setup``).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
import warnings
from pathlib import Path

import numpy as np

from duet_jax.bench.common import load_average

HELP = "BO regret suite (ours, paper, BoTorch LogEI/UCB, random) and round time vs BoTorch"

__all__ = ["HELP", "add_arguments", "main", "Case", "cases", "run_suite", "summarize",
           "table_markdown", "verdicts", "verdict_markdown", "time_rounds", "near_duplicates",
           "botorch_round", "METHODS"]

METHODS = ("ours", "paper", "botorch-logei", "botorch-ucb", "random")
KINDS = ("smooth", "multimodal", "peaks", "needle")
NOISE = 0.1  # observation noise sd of the noisy cases (the functions span [~-1, 1])
DUP_TOL = 0.02  # near-duplicate: within this in every share of an earlier evaluated ratio
SUITE_VERSION = 1


def add_arguments(parser):
    parser.add_argument("--results", default="experiments/results/bo/suite.jsonl",
                        help="JSONL file the suite appends to and resumes from")
    parser.add_argument("--kinds", nargs="+", default=None, help=f"default {' '.join(KINDS)}")
    parser.add_argument("--dims", type=int, nargs="+", default=None, help="default 3 5 9 12")
    parser.add_argument("--noise", type=float, nargs="+", default=None,
                        help=f"observation noise sd of the cases (default 0 {NOISE})")
    parser.add_argument("--methods", nargs="+", default=None, help=f"default {' '.join(METHODS)}")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per case (default 10)")
    parser.add_argument("--evals", type=int, nargs="+", default=None,
                        help="regret after these many evaluations (default 30 60)")
    parser.add_argument("--budget", type=float, default=None,
                        help="stop starting new work after this many seconds")
    parser.add_argument("--quick", action="store_true",
                        help="dims 3 5, noiseless, 5 seeds, 30 evaluations, ours paper random")
    parser.add_argument("--table", action="store_true", help="only print the table of --results")
    parser.add_argument("--timing", action="store_true", help="only the round time vs BoTorch")
    parser.add_argument("--sizes", type=int, nargs="+", default=None,
                        help="observations in the timed rounds (default 10 30 60)")
    parser.add_argument("--timing-dims", type=int, nargs="+", default=None,
                        help="dims of the timed rounds (default 3 5 9 12)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per case (ours)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


# ------------------------------------------------------------------------------------ cases


class Case:
    """One objective of the suite: ``kind`` in ``dim`` domains with observation noise ``noise``."""

    def __init__(self, kind: str, dim: int, noise: float = 0.0):
        self.kind, self.dim, self.noise = kind, int(dim), float(noise)

    @property
    def name(self) -> str:
        return f"{self.kind}-{self.dim}d" + (f"-noise{self.noise:g}" if self.noise else "")

    def function(self):
        from duet_jax.bo import synthetic

        return synthetic.make(self.kind, self.dim)

    def __repr__(self):
        return f"Case({self.name})"


def cases(kinds=KINDS, dims=(3, 5, 9, 12), noise=(0.0, NOISE)) -> list[Case]:
    return [Case(k, d, s) for s in noise for d in dims for k in kinds]


def near_duplicates(x: np.ndarray, n_init: int, tol: float = DUP_TOL) -> int:
    """Proposals (rows after ``n_init``) within ``tol`` in every share of an earlier row."""
    count = 0
    for t in range(max(n_init, 1), len(x)):
        if np.min(np.max(np.abs(x[:t] - x[t]), axis=1)) < tol:
            count += 1
    return count


def _fingerprint(cfg) -> str:
    return hashlib.sha1(json.dumps(cfg.fingerprint_dict(), sort_keys=True).encode()).hexdigest()[:12]


def _true_values(f, x):
    from duet_jax.bo import x64

    with x64():
        return np.asarray(f(np.asarray(x)), np.float64)


def _regret(y_true: np.ndarray) -> np.ndarray:
    return 1.0 - np.maximum.accumulate(y_true, axis=-1)


# ------------------------------------------------------------------------------------ peer


def _have_botorch() -> bool:
    import importlib.util

    return importlib.util.find_spec("botorch") is not None


def botorch_round(x: np.ndarray, y: np.ndarray, *, num_restarts: int, raw_samples: int,
                  acquisition: str = "logei", beta: float = 1.0) -> np.ndarray:
    """One BoTorch round on ``(x [n, d], y [n])`` (maximised): the next ratio ``[d]``.

    ``SingleTaskGP`` with BoTorch's default priors and ``Standardize``, ``fit_gpytorch_mll``,
    LogEI (best observed value) or UCB, ``optimize_acqf`` with the sum-to-one constraint.
    """
    import torch
    from botorch.acquisition import LogExpectedImprovement, UpperConfidenceBound
    from botorch.fit import fit_gpytorch_mll
    from botorch.models import SingleTaskGP
    from botorch.models.transforms.outcome import Standardize
    from botorch.optim import optimize_acqf
    from gpytorch.mlls import ExactMarginalLogLikelihood

    d = x.shape[1]
    tx = torch.tensor(x, dtype=torch.float64)
    ty = torch.tensor(y, dtype=torch.float64)[:, None]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = SingleTaskGP(tx, ty, outcome_transform=Standardize(m=1))
        fit_gpytorch_mll(ExactMarginalLogLikelihood(model.likelihood, model))
        if acquisition == "logei":
            acqf = LogExpectedImprovement(model, best_f=ty.max())
        else:
            acqf = UpperConfidenceBound(model, beta=beta)
        bounds = torch.stack([torch.zeros(d), torch.ones(d)]).to(torch.float64)
        eq = [(torch.arange(d), torch.ones(d, dtype=torch.float64), 1.0)]
        cand, _ = optimize_acqf(acqf, bounds=bounds, q=1, num_restarts=num_restarts,
                                raw_samples=raw_samples, equality_constraints=eq)
    r = np.clip(cand.detach().numpy()[0].astype(np.float64), 0.0, None)
    return r / r.sum()


def warm_start(seed: int, dim: int, cfg) -> np.ndarray:
    """The ``paper`` profile's warm-start design for ``seed`` (as ``loop.run`` draws it)."""
    import jax

    from duet_jax.bo import x64
    from duet_jax.bo.simplex import initial_design

    with x64():
        import jax.numpy as jnp

        lo, hi = (jnp.asarray(b) for b in cfg.bounds(dim))
        k_init, _ = jax.random.split(jax.random.PRNGKey(int(seed)))
        return np.asarray(initial_design(k_init, cfg.resolved_n_init(dim), dim, lo, hi,
                                         cfg.has_bounds(), cfg.init_design), np.float64)


def _botorch_run(case: Case, seed: int, n_evals: int, acquisition: str, cfg):
    import torch

    f = case.function()
    torch.manual_seed(seed)
    rng = np.random.default_rng(50_000 + seed)
    noisy = lambda v: v + case.noise * rng.standard_normal(np.shape(v)) if case.noise else v  # noqa: E731
    x = list(warm_start(seed, case.dim, cfg))
    y = list(noisy(_true_values(f, np.array(x))))
    t_rounds = []
    while len(x) < n_evals:
        t0 = time.perf_counter()
        r = botorch_round(np.array(x), np.array(y), num_restarts=cfg.n_starts,
                          raw_samples=cfg.n_raw, acquisition=acquisition)
        t_rounds.append(time.perf_counter() - t0)
        x.append(r)
        y.append(float(noisy(_true_values(f, r))))
    return np.array(x), float(np.mean(t_rounds)) if t_rounds else 0.0


# ------------------------------------------------------------------------------------ suite


def _load(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by an interrupted run
                continue
    return out


def _config_of(method: str):
    from duet_jax.bo import BOConfig

    if method == "ours":
        return BOConfig()
    if method == "paper":
        return BOConfig.from_profile("paper")
    # the peers: dim + 1 (at most 10) maximin warm-start points, 8 restarts, 512 raw samples
    return BOConfig(n_init=None, init_design="maximin", n_starts=8, n_raw=512)


def run_suite(case_list, methods=METHODS, seeds: int = 10, n_evals: int = 60, *,
              results="experiments/results/bo/suite.jsonl", budget: float | None = None,
              configs: dict | None = None, log=None) -> list[dict]:
    """Run what is missing of the suite, appending one JSON line per (case, method, seed).

    ``configs`` maps a method name to a ``BOConfig`` to use instead of its profile (a method with
    such a config is recorded under the name given). Returns the new records.
    """
    from duet_jax.bo import loop

    path = Path(results)
    path.parent.mkdir(parents=True, exist_ok=True)
    done = {(r["case"], r["method"], r["seed"], r.get("fingerprint"), r["n_evals"])
            for r in _load(path)}
    t_start = time.perf_counter()
    new = []

    def out_of_time():
        return budget is not None and time.perf_counter() - t_start > budget

    def write(rec):
        with path.open("a") as fh:
            fh.write(json.dumps(rec) + "\n")
        new.append(rec)

    for case in case_list:
        f = case.function()
        for method in methods:
            cfg = (configs or {}).get(method) or _config_of(method)
            fp = _fingerprint(cfg) if method in ("ours", "paper") or method in (configs or {}) \
                else f"v{SUITE_VERSION}"
            todo = [s for s in range(seeds) if (case.name, method, s, fp, n_evals) not in done]
            if not todo:
                continue
            if out_of_time():
                if log:
                    log(f"budget spent: stopping before {case.name} {method}")
                return new
            base = {"case": case.name, "kind": case.kind, "dim": case.dim, "noise": case.noise,
                    "method": method, "n_evals": n_evals, "fingerprint": fp,
                    "version": SUITE_VERSION}
            n_init = cfg.resolved_n_init(case.dim)
            if method.startswith("botorch"):
                if not _have_botorch():
                    if log:
                        log("botorch is not installed (make bench-setup): skipping the peer")
                    continue
                for s in todo:
                    if out_of_time():
                        return new
                    t0 = time.perf_counter()
                    x, t_round = _botorch_run(case, s, n_evals, method.split("-")[1], cfg)
                    reg = _regret(_true_values(f, x))
                    write({**base, "seed": s, "regret": reg.tolist(),
                           "near_dups": near_duplicates(x, n_init),
                           "seconds": time.perf_counter() - t0, "s_per_round": t_round})
                    if log:
                        log(f"{case.name:22s} {method:14s} seed {s:2d} regret@{n_evals} "
                            f"{reg[-1]:.4f} ({time.perf_counter() - t0:.0f} s)")
                continue
            t0 = time.perf_counter()
            if method == "random":
                x, _ = loop.random_search(f, case.dim, n_evals, todo)
                n_init = 0
            else:
                x, _ = loop.run(f, case.dim, n_evals, todo, config=cfg, noise_sd=case.noise)
            secs = time.perf_counter() - t0
            for i, s in enumerate(todo):
                reg = _regret(_true_values(f, x[i]))
                write({**base, "seed": s, "regret": reg.tolist(),
                       "near_dups": near_duplicates(x[i], n_init) if n_init else 0,
                       "seconds": secs / len(todo)})
            if log:
                med = np.median([r["regret"][-1] for r in new[-len(todo):]])
                log(f"{case.name:22s} {method:14s} {len(todo)} seeds median regret@{n_evals} "
                    f"{med:.4f} ({secs:.0f} s)")
    return new


def summarize(records: list[dict], evals=(30, 60), fingerprints: dict | None = None) -> list[dict]:
    """Rows (case, method): seeds, median and quartiles of regret at each of ``evals``,
    near-duplicate proposals summed over seeds. ``fingerprints``: method -> the config
    fingerprint to keep (default: the current ``ours``/``paper`` configs)."""
    fps = fingerprints if fingerprints is not None else {
        m: _fingerprint(_config_of(m)) for m in ("ours", "paper")}
    groups: dict = {}
    for r in records:
        if r["method"] in fps and r.get("fingerprint") != fps[r["method"]]:
            continue
        g = groups.setdefault((r["case"], r["method"]), {})
        old = g.get(r["seed"])
        if old is None or len(r["regret"]) >= len(old["regret"]):  # the longest run per seed
            g[r["seed"]] = r
    rows = []
    for (case, method), by_seed in groups.items():
        recs = list(by_seed.values())
        row = {"case": case, "method": method, "seeds": len(recs),
               "near_dups": int(sum(r["near_dups"] for r in recs))}
        for e in evals:
            vals = [r["regret"][e - 1] for r in recs if len(r["regret"]) >= e]
            row[f"@{e}"] = (None if not vals else
                            [float(np.quantile(vals, q)) for q in (0.25, 0.5, 0.75)])
        rows.append(row)
    order = {m: i for i, m in enumerate(METHODS)}
    rows.sort(key=lambda r: (_case_key(r["case"]), order.get(r["method"], 99), r["method"]))
    return rows


def _case_key(name: str):
    parts = name.split("-")
    kind, dim = parts[0], int(parts[1].rstrip("d"))
    return ("noise" in name, KINDS.index(kind) if kind in KINDS else 99, dim, name)


def table_markdown(rows: list[dict], evals=(30, 60)) -> str:
    """Markdown: one row per (case, method); median [q25, q75] of regret per evaluation count."""
    head = ("| case | method | seeds | " + " | ".join(f"regret @{e}: median [q25, q75]" for e in evals)
            + " | near-dups |")
    sep = "|---|---|---:|" + "---|" * len(evals) + "---:|"
    body = []
    for r in rows:
        cells = []
        for e in evals:
            q = r.get(f"@{e}")
            cells.append("-" if q is None else f"{q[1]:.4f} [{q[0]:.4f}, {q[2]:.4f}]")
        body.append(f"| {r['case']} | {r['method']} | {r['seeds']} | " + " | ".join(cells)
                    + f" | {r['near_dups']} |")
    return "\n".join([head, sep, *body])


def verdicts(rows: list[dict], at: int = 30) -> list[dict]:
    """Issue 13's bar, per case: ``ours``'s median regret at ``at`` evaluations against the best
    BoTorch acquisition's (the lower median of ``botorch-*``) and random search's. ``ratio`` =
    ours / best BoTorch (None without a BoTorch row); ``meets``: ratio <= 1.1 (or BoTorch's median
    is 0 and ours too) and ours below random; False as soon as ours is not below random; None when
    that is not known (a side missing)."""
    by_case: dict = {}
    for r in rows:
        q = r.get(f"@{at}")
        if q is not None:
            by_case.setdefault(r["case"], {})[r["method"]] = (q[1], r["seeds"])
    out = []
    for case in sorted(by_case, key=_case_key):
        m = by_case[case]
        ours, rand = m.get("ours"), m.get("random")
        bt = [(v, k) for k, v in m.items() if k.startswith("botorch")]
        best = min(bt) if bt else None
        ratio = None
        if ours and best:
            b = best[0][0]
            ratio = (ours[0] / b) if b > 0 else (1.0 if ours[0] <= 0 else float("inf"))
        meets = None
        if ours and rand and ours[0] >= rand[0]:
            meets = False  # not below random search: fails whatever BoTorch does
        elif ours and rand and best:
            meets = bool(ratio <= 1.1)
        out.append({"case": case, "ours": ours, "botorch": None if not best else (best[1], *best[0]),
                    "random": rand, "ratio": ratio, "meets": meets})
    return out


def verdict_markdown(vs: list[dict], at: int = 30) -> str:
    head = ("| case | ours (seeds) | best BoTorch (seeds) | random (seeds) | ours / BoTorch | "
            "bar met (<= 1.1x, < random) |\n|---|---|---|---|---:|---|")
    cell = lambda t: "-" if t is None else f"{t[0]:.4f} ({t[1]})"  # noqa: E731
    body = []
    for v in vs:
        b = v["botorch"]
        bt = "-" if b is None else f"{b[1]:.4f} ({b[2]}, {b[0].split('-', 1)[1]})"
        ratio = "-" if v["ratio"] is None else f"{v['ratio']:.2f}x"
        meets = {None: "BoTorch not measured", True: "yes", False: "**no**"}[v["meets"]]
        body.append(f"| {v['case']} | {cell(v['ours'])} | {bt} | {cell(v['random'])} | {ratio} | {meets} |")
    return "\n".join([f"Median simple regret after {at} evaluations:", "", head, *body])


# ------------------------------------------------------------------------------------ timing


def _observations(dim: int, n: int, seed: int = 0):
    from duet_jax.bo import synthetic

    f = synthetic.multimodal(dim)
    x = np.random.default_rng(seed).dirichlet(np.ones(dim), n)
    return x, _true_values(f, x)


def time_rounds(dims, sizes, *, repeats: int = 3, peer: bool = True, config=None,
                acquisition: str = "logei") -> list[dict]:
    """Seconds per round, ours and BoTorch's (``acquisition``), on the same observations."""
    from duet_jax.bo import BOConfig, SimplexBO

    cfg = config or BOConfig()
    cases_ = []
    for d in dims:
        for n in sizes:
            x, y = _observations(d, n)
            opt = SimplexBO(d, seed=0, config=cfg)
            opt.tell(x, y)
            opt.ask()  # compiles this (capacity, dim); its fit warm-starts the next rounds
            opt.clear_pending()
            ts = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                opt.ask()
                ts.append(time.perf_counter() - t0)
                opt.clear_pending()
            case = {"dim": d, "n": n, "ours_s": float(np.median(ts))}
            if peer:
                kw = dict(num_restarts=cfg.n_starts, raw_samples=cfg.n_raw, acquisition=acquisition)
                botorch_round(x, y, **kw)  # warm-up
                t0 = time.perf_counter()
                botorch_round(x, y, **kw)
                case["peer_s"] = time.perf_counter() - t0
                case["ratio"] = case["peer_s"] / case["ours_s"]
                # the one peer is the strongest (its rate: rounds/s); no FLOPs are counted for BO
                case.update(strongest_peer=f"botorch-{acquisition}", ratio_vs_strongest=case["ratio"])
            cases_.append(case)
    return cases_


def timing(dims=(3, 5, 9, 12), sizes=(10, 30, 60), repeats: int = 3, peer: bool = True,
           config=None) -> dict:
    from duet_jax.bo import BOConfig

    peer = peer and _have_botorch()
    cfg = config or BOConfig()
    load_before = load_average()
    cs = time_rounds(dims, sizes, repeats=repeats, peer=peer, config=cfg)
    out = {"bench": "bo-timing", "timing": cs, "load_average_before": load_before,
           "load_average_after": load_average(),
           "ours_s_per_round": float(np.mean([c["ours_s"] for c in cs])),
           "peer_s_per_round": float(np.mean([c["peer_s"] for c in cs])) if peer else None,
           "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
           "config": cfg.to_dict()}
    out["ratio"] = out["peer_s_per_round"] / out["ours_s_per_round"] if peer else None
    if peer:
        import botorch
        import torch

        out["peer_versions"] = {"botorch": botorch.__version__, "torch": torch.__version__,
                                "torch_threads": torch.get_num_threads()}
    return out


def _timing_text(out) -> str:
    lines = [f"time per BO round (fit + propose), seconds, after compilation; load average "
             f"{out['load_average_before']} before, {out['load_average_after']} after:",
             f"{'dim':>4} {'n':>4} {'ours':>9} {'botorch':>9} {'ratio':>7}"]
    for c in out["timing"]:
        p = f"{c['peer_s']:9.3f} {c['ratio']:6.1f}x" if "peer_s" in c else f"{'-':>9} {'-':>7}"
        lines.append(f"{c['dim']:>4} {c['n']:>4} {c['ours_s']:9.4f} {p}")
    if out["ratio"] is not None:
        lines.append(f"mean: ours {out['ours_s_per_round']:.4f} s, botorch "
                     f"{out['peer_s_per_round']:.3f} s, ratio {out['ratio']:.1f}x")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ CLI


def main(args) -> int:
    import sys

    stream = sys.stderr if args.json else sys.stdout
    log = lambda s: print(s, file=stream, flush=True)  # noqa: E731
    evals = tuple(args.evals or ((30,) if args.quick else (30, 60)))
    if args.timing:
        out = timing(dims=args.timing_dims or (3, 5, 9, 12), sizes=args.sizes or (10, 30, 60),
                     repeats=args.repeats)
        log(_timing_text(out))
        if args.json:
            json.dump(out, sys.stdout)
            print()
        return 0
    if not args.table:
        if args.quick:
            cl = cases(args.kinds or KINDS, args.dims or (3, 5), args.noise or (0.0,))
            methods = args.methods or ("ours", "paper", "random")
            seeds = args.seeds or 5
        else:
            cl = cases(args.kinds or KINDS, args.dims or (3, 5, 9, 12),
                       args.noise if args.noise is not None else (0.0, NOISE))
            methods = args.methods or METHODS
            seeds = args.seeds or 10
        run_suite(cl, methods, seeds, max(evals), results=args.results, budget=args.budget,
                  log=log)
    rows = summarize(_load(Path(args.results)), evals)
    if args.json:
        json.dump({"bench": "bo", "evals": list(evals), "rows": rows}, sys.stdout)
        print()
    else:
        print(table_markdown(rows, evals))
        print()
        print(verdict_markdown(verdicts(rows, evals[0]), evals[0]))
    return 0
