"""Regret of SimplexBO settings on the benchmark suite (the runs behind the defaults in docs/bo.md).

    python experiments/bo_tune.py "dict(acquisition='logei')" --kinds peaks smooth --dims 3 5 \\
        --noise 0 --evals 30 --seeds 10

Each setting is the default profile with the given overrides (``--profile paper`` to start from
the paper's); results go to experiments/results/bo/tune.jsonl (one line per case, setting and
seed; a rerun skips what is there), then the median [quartiles] table of the settings named on
the command line (and ``--also`` ones already in the file) is printed.
"""

import argparse
import sys

from duet_jax.bench import bo as bench
from duet_jax.bo.config import BOConfig


def main():
    p = argparse.ArgumentParser()
    p.add_argument("settings", nargs="+", help="python dict literals of BOConfig overrides")
    p.add_argument("--profile", default="default")
    p.add_argument("--kinds", nargs="+", default=["smooth", "multimodal", "peaks"])
    p.add_argument("--dims", type=int, nargs="+", default=[3, 5, 9])
    p.add_argument("--noise", type=float, nargs="+", default=[0.0])
    p.add_argument("--evals", type=int, default=30)
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--results", default="experiments/results/bo/tune.jsonl")
    p.add_argument("--also", nargs="*", default=["random"], help="other methods to tabulate")
    p.add_argument("--budget", type=float, default=None)
    a = p.parse_args()
    configs = {}
    for s in a.settings:
        overrides = eval(s)  # noqa: S307 - a local tool
        configs[f"{a.profile}:{s}"] = BOConfig.from_profile(a.profile, **overrides)
    cl = bench.cases(a.kinds, a.dims, a.noise)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    bench.run_suite(cl, list(configs) + ["random"], a.seeds, a.evals, results=a.results,
                    configs=configs, budget=a.budget, log=log)
    fps = {m: bench._fingerprint(c) for m, c in configs.items()}
    recs = [r for r in bench._load(__import__("pathlib").Path(a.results))
            if r["case"] in {c.name for c in cl} and r["n_evals"] == a.evals
            and (r["method"] in configs or r["method"] in a.also)]
    rows = bench.summarize(recs, (a.evals,), fingerprints=fps)
    print(bench.table_markdown(rows, (a.evals,)))
    means = {}
    for r in rows:
        means.setdefault(r["method"], []).append(r[f"@{a.evals}"][1])
    for m, v in means.items():
        print(f"mean median regret {sum(v) / len(v):.4f} over {len(v)} cases: {m}")


if __name__ == "__main__":
    main()
