"""Where the BO's asks go on one benchmark case, against random search's draws.

    python experiments/bo_spread.py --kind peaks --dim 9 --noise 0.1 --seeds 3
    python experiments/bo_spread.py --kind needle --dim 5 --noise 0 --seeds 10 --set "dict(explore_snr=1.0)"

For the default profile (or ``--profile paper``) and Dirichlet(1) random search, over the seeds:
the median largest share of a proposal, the mean number of shares below 1e-3 (on a face of the
simplex), the mean true value of the proposals and each seed's best true value. Used in
docs/bo.md to see why the defaults lose to random search on noisy cases in 9 domains. Then, per
seed, the fitted signal-to-noise ratio over the rounds (median and range) and how many asks were
the uninformed-model fallback's (``explore_snr``, set with ``--set``).
"""

import argparse

import numpy as np

from duet_jax.bench import bo as bench
from duet_jax.bo import loop
from duet_jax.bo.config import BOConfig


def spread(x: np.ndarray, values: np.ndarray, skip: int) -> dict:
    p, v = x[:, skip:], values[:, skip:]
    return {"median_max_share": float(np.median(p.max(-1))),
            "mean_zero_shares": float(np.mean((p < 1e-3).sum(-1))),
            "mean_true_value": float(v.mean()), "best_true_value": np.round(values.max(-1), 4).tolist()}


def main():
    a = argparse.ArgumentParser()
    a.add_argument("--kind", default="peaks")
    a.add_argument("--dim", type=int, default=9)
    a.add_argument("--noise", type=float, default=0.1)
    a.add_argument("--seeds", type=int, default=3)
    a.add_argument("--evals", type=int, default=30)
    a.add_argument("--profile", default="default")
    a.add_argument("--set", default="dict()", help="python dict literal of BOConfig overrides")
    args = a.parse_args()
    case = bench.Case(args.kind, args.dim, args.noise)
    cfg = BOConfig.from_profile(args.profile, **eval(args.set))  # noqa: S307 - a local tool, as bo_tune.py
    f, seeds = case.function(), list(range(args.seeds))
    x, _, info = loop.run(f, args.dim, args.evals, seeds, config=cfg, noise_sd=args.noise,
                          return_info=True)
    xr, _ = loop.random_search(f, args.dim, args.evals, seeds)
    n_init = cfg.resolved_n_init(args.dim)
    for name, xs, skip in (("warm start", x[:, :n_init], 0), (f"{args.profile} asks", x, n_init),
                           ("random", xr, 0)):
        xs = np.asarray(xs)
        print(f"{case.name} {name:14s}", spread(xs, bench._true_values(f, xs), skip))
    for s, (snr, explored) in enumerate(zip(info.snr, info.explored[..., 0], strict=True)):
        print(f"{case.name} seed {s}: fitted snr median {np.median(snr):.3g} "
              f"[{snr.min():.3g}, {snr.max():.3g}] over {len(snr)} rounds; "
              f"fallback asks {int(explored.sum())}")


if __name__ == "__main__":
    main()
