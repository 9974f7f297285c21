"""Regret of SimplexBO settings on the synthetic suite (the runs behind the defaults in docs/bo.md).

    python experiments/bo_tune.py "dict(fit_restarts=4)" [n_evals] [seeds]

Prints, per function, the median simple regret over seeds after n_evals evaluations (BO and random
search) and the seconds the BO runs took (compile included).
"""

import sys
import time

import numpy as np

from duet_jax.bo import loop, synthetic
from duet_jax.bo.config import BOConfig


def main():
    overrides = eval(sys.argv[1]) if len(sys.argv) > 1 else {}  # noqa: S307 - a local tool
    n_evals = int(sys.argv[2]) if len(sys.argv) > 2 else 30
    seeds = range(int(sys.argv[3]) if len(sys.argv) > 3 else 10)
    cfg = BOConfig(**overrides)
    rows = []
    for f in synthetic.suite():
        t = time.perf_counter()
        _, y = loop.run(f, f.dim, n_evals, seeds, config=cfg)
        dt = time.perf_counter() - t
        _, yr = loop.random_search(f, f.dim, n_evals, seeds)
        rb = np.median(loop.simple_regret(y, f.f_max)[:, -1])
        rr = np.median(loop.simple_regret(yr, f.f_max)[:, -1])
        rows.append((f.name, rb, rr, dt))
        print(f"{f.name:16s} bo {rb:.4f}  random {rr:.4f}  ({dt:.1f}s)", flush=True)
    print(f"{overrides} mean bo {np.mean([r[1] for r in rows]):.4f} "
          f"mean random {np.mean([r[2] for r in rows]):.4f}")


if __name__ == "__main__":
    main()
