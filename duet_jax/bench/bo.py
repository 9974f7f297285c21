"""``duet-jax bench bo``: one BO round (GP fit + proposal on the simplex) against BoTorch, and the
simple regret of both and of random search on the synthetic suite.

Measured in one run on this machine, one after the other:

1. Time per round, after compilation, on the same observations: ``n`` Dirichlet(1) ratios and their
   values under the multimodal synthetic function, for each dimension and ``n``. Ours: one
   ``SimplexBO.ask()`` (the jitted fit from ``fit_restarts`` starts + raw candidates + projected
   ascent), defaults. Peer: BoTorch's ``SingleTaskGP`` with the same model (Matern-5/2 ARD with
   BoTorch's Gamma priors, Standardize), ``fit_gpytorch_mll``, ``optimize_acqf`` on UCB (beta 1)
   with the sum-to-one equality constraint, as many restarts and raw samples as ours.
2. Median simple regret after 10, 20 and 40 evaluations on the suite (3, 5, 9 domains; smooth and
   multimodal): ours (``loop.run``, defaults, all seeds in one compiled program), BoTorch (the
   round above in a Python loop, from the same warm-start design) and random search.

JSON fields: ``ours_s_per_round``, ``peer_s_per_round``, ``ratio`` (peer / ours, so > 1 means we are
faster), ``timing`` (each case), ``regret`` (the table) and the settings. BoTorch comes from the
``bench`` extra (``make bench-setup``); without it, or with ``--no-peer``, only ours runs.
"""

from __future__ import annotations

import json
import os
import platform
import time
import warnings

import numpy as np

HELP = "BO round time vs BoTorch and the regret table (ours, BoTorch, random search)"

__all__ = ["HELP", "add_arguments", "main", "run", "time_rounds", "regret_table"]


def add_arguments(parser):
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--quick", action="store_true",
                        help="a short run (minutes): dims 3 5, 5 seeds (BoTorch 1), evals 10 20, "
                             "timed rounds at 10 and 20 observations")
    parser.add_argument("--dims", type=int, nargs="+", default=None, help="default 3 5 9")
    parser.add_argument("--seeds", type=int, default=None, help="seeds for ours and random (10)")
    parser.add_argument("--peer-seeds", type=int, default=None,
                        help="seeds for BoTorch's regret (default 3: each of its rounds takes "
                             "seconds)")
    parser.add_argument("--evals", type=int, nargs="+", default=None,
                        help="regret after these many evaluations (default 10 20 40)")
    parser.add_argument("--sizes", type=int, nargs="+", default=None,
                        help="observations in the timed rounds (default 10 20 40)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per case (ours)")
    parser.add_argument("--no-peer", action="store_true", help="skip BoTorch")
    parser.add_argument("--no-regret", action="store_true", help="only the round timing")


# ------------------------------------------------------------------------------------ peers


def _have_botorch() -> bool:
    import importlib.util

    return importlib.util.find_spec("botorch") is not None


def botorch_round(x: np.ndarray, y: np.ndarray, *, num_restarts: int, raw_samples: int,
                  beta: float = 1.0) -> np.ndarray:
    """One BoTorch round on ``(x [n, d], y [n])`` (maximised): the next ratio ``[d]``."""
    import torch
    from botorch.acquisition import UpperConfidenceBound
    from botorch.fit import fit_gpytorch_mll
    from botorch.models import SingleTaskGP
    from botorch.models.transforms.outcome import Standardize
    from botorch.models.utils.gpytorch_modules import (
        get_gaussian_likelihood_with_gamma_prior,
        get_matern_kernel_with_gamma_prior,
    )
    from botorch.optim import optimize_acqf
    from gpytorch.mlls import ExactMarginalLogLikelihood

    d = x.shape[1]
    tx = torch.tensor(x, dtype=torch.float64)
    ty = torch.tensor(y, dtype=torch.float64)[:, None]
    model = SingleTaskGP(tx, ty, covar_module=get_matern_kernel_with_gamma_prior(d),
                         likelihood=get_gaussian_likelihood_with_gamma_prior(),
                         outcome_transform=Standardize(m=1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit_gpytorch_mll(ExactMarginalLogLikelihood(model.likelihood, model))
        bounds = torch.stack([torch.zeros(d), torch.ones(d)]).to(torch.float64)
        eq = [(torch.arange(d), torch.ones(d, dtype=torch.float64), 1.0)]
        cand, _ = optimize_acqf(UpperConfidenceBound(model, beta=beta), bounds=bounds, q=1,
                                num_restarts=num_restarts, raw_samples=raw_samples,
                                equality_constraints=eq)
    r = np.clip(cand.detach().numpy()[0].astype(np.float64), 0.0, None)
    return r / r.sum()


# ------------------------------------------------------------------------------------ timing


def _observations(dim: int, n: int, seed: int = 0):
    from duet_jax.bo import synthetic, x64

    f = synthetic.multimodal(dim)
    x = np.random.default_rng(seed).dirichlet(np.ones(dim), n)
    with x64():
        return x, np.asarray(f(x), np.float64)


def time_rounds(dims, sizes, *, repeats: int = 3, peer: bool = True, config=None) -> list[dict]:
    """Seconds per round, ours and BoTorch's, on the same observations (see the module doc)."""
    from duet_jax.bo import BOConfig, SimplexBO

    cfg = config or BOConfig()
    cases = []
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
                botorch_round(x, y, num_restarts=cfg.n_starts, raw_samples=cfg.n_raw)  # warm-up
                t0 = time.perf_counter()
                botorch_round(x, y, num_restarts=cfg.n_starts, raw_samples=cfg.n_raw)
                case["peer_s"] = time.perf_counter() - t0
                case["ratio"] = case["peer_s"] / case["ours_s"]
            cases.append(case)
    return cases


# ------------------------------------------------------------------------------------ regret


def _botorch_run(f, x0: np.ndarray, n_evals: int, cfg) -> np.ndarray:
    from duet_jax.bo import x64

    def value(r):
        with x64():
            return float(f(r))

    x = [np.asarray(r) for r in x0]
    y = [value(r) for r in x]
    while len(y) < n_evals:
        r = botorch_round(np.array(x), np.array(y), num_restarts=cfg.n_starts,
                          raw_samples=cfg.n_raw)
        x.append(r)
        y.append(value(r))
    return np.array(y)


def regret_table(dims, evals, seeds: int, peer_seeds: int, *, peer: bool = True,
                 config=None, log=None) -> dict:
    """Median simple regret at each of ``evals`` for ours, BoTorch and random search."""
    from duet_jax.bo import BOConfig, loop, synthetic

    cfg = config or BOConfig()
    n_max = max(evals)
    rows = []
    for d in dims:
        for f in (synthetic.smooth(d), synthetic.multimodal(d)):
            t0 = time.perf_counter()
            x, y = loop.run(f, d, n_max, range(seeds), config=cfg)
            t_ours = time.perf_counter() - t0
            _, y_rand = loop.random_search(f, d, n_max, range(seeds))
            results = [("ours", y, t_ours), ("random", y_rand, None)]
            if peer and peer_seeds > 0:
                t0 = time.perf_counter()
                n_init = cfg.resolved_n_init(d)
                y_peer = np.stack([_botorch_run(f, x[s, :n_init], n_max, cfg)
                                   for s in range(min(peer_seeds, seeds))])
                results.append(("botorch", y_peer, time.perf_counter() - t0))
            for method, yy, secs in results:
                reg = loop.simple_regret(yy, f.f_max)
                rows.append({"function": f.name, "method": method, "seeds": len(yy),
                             "median_regret": [float(np.median(reg[:, e - 1])) for e in evals],
                             "seconds": None if secs is None else round(secs, 2)})
                if log:
                    log(_row_text(rows[-1]))
    return {"evals": list(evals), "rows": rows}


# ------------------------------------------------------------------------------------ run


def run(*, quick: bool = False, dims=None, seeds=None, peer_seeds=None, evals=None, sizes=None,
        repeats: int = 3, peer: bool = True, regret: bool = True, config=None, log=None) -> dict:
    """The whole benchmark as a JSON-ready dict (``config``: ours, default ``BOConfig()``)."""
    from duet_jax.bo import BOConfig

    peer = peer and _have_botorch()
    dims = dims or ([3, 5] if quick else [3, 5, 9])
    seeds = seeds or (5 if quick else 10)
    peer_seeds = (1 if quick else 3) if peer_seeds is None else peer_seeds
    evals = evals or ([10, 20] if quick else [10, 20, 40])
    sizes = sizes or ([10, 20] if quick else [10, 20, 40])
    cfg = config or BOConfig()
    t0 = time.perf_counter()
    cases = time_rounds(dims, sizes, repeats=repeats, peer=peer, config=cfg)
    ours = float(np.mean([c["ours_s"] for c in cases]))
    out = {
        "bench": "bo",
        "ours_s_per_round": ours,
        "peer_s_per_round": float(np.mean([c["peer_s"] for c in cases])) if peer else None,
        "ratio": None,
        "timing": cases,
        "config": cfg.to_dict(),
        "peer": "botorch" if peer else None,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
    }
    if peer:
        out["ratio"] = out["peer_s_per_round"] / ours
        import botorch
        import torch

        out["peer_versions"] = {"botorch": botorch.__version__, "torch": torch.__version__,
                                "torch_threads": torch.get_num_threads()}
    if log:
        log(_timing_text(out))
    if regret:
        out["regret"] = regret_table(dims, evals, seeds, peer_seeds, peer=peer, config=cfg, log=log)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def _timing_text(out) -> str:
    lines = ["time per BO round (fit + propose), seconds, after compilation:",
             f"{'dim':>4} {'n':>4} {'ours':>9} {'botorch':>9} {'ratio':>7}"]
    for c in out["timing"]:
        p = f"{c['peer_s']:9.3f} {c['ratio']:6.1f}x" if "peer_s" in c else f"{'-':>9} {'-':>7}"
        lines.append(f"{c['dim']:>4} {c['n']:>4} {c['ours_s']:9.4f} {p}")
    if out["ratio"] is not None:
        lines.append(f"mean: ours {out['ours_s_per_round']:.4f} s, botorch "
                     f"{out['peer_s_per_round']:.3f} s, ratio {out['ratio']:.1f}x")
    return "\n".join(lines)


def _row_text(r) -> str:
    return (f"{r['function']:16s} {r['method']:8s} seeds {r['seeds']:3d}  "
            + "  ".join(f"{v:.4f}" for v in r["median_regret"]))


def regret_markdown(table: dict) -> str:
    """The regret table as Markdown (rows: function x method; columns: evaluations)."""
    ev = table["evals"]
    head = "| function | method | seeds | " + " | ".join(f"@{e}" for e in ev) + " |"
    sep = "|---|---|---:|" + "---:|" * len(ev)
    body = [f"| {r['function']} | {r['method']} | {r['seeds']} | "
            + " | ".join(f"{v:.4f}" for v in r["median_regret"]) + " |" for r in table["rows"]]
    return "\n".join([head, sep, *body])


def main(args) -> int:
    import sys

    # with --json, stdout is the JSON alone and the progress lines go to stderr
    stream = sys.stderr if args.json else sys.stdout
    log = lambda s: print(s, file=stream, flush=True)  # noqa: E731
    if not args.no_peer and not _have_botorch():
        log("botorch is not installed (make bench-setup): timing ours only", )
    out = run(quick=args.quick, dims=args.dims, seeds=args.seeds, peer_seeds=args.peer_seeds,
              evals=args.evals, sizes=args.sizes, repeats=args.repeats, peer=not args.no_peer,
              regret=not args.no_regret, log=log)
    if args.json:
        json.dump(out, sys.stdout)
        print()
    else:
        if "regret" in out:
            print("\nmedian simple regret (1 = a random ratio's value on average, 0 = the best):")
            print(regret_markdown(out["regret"]))
        print(f"\n({out['seconds']} s in all)")
    return 0
