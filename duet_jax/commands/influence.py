"""``duet-jax influence``: compute DUET's per-domain influence scores alone (resumable), with the
same configuration as ``duet-jax run`` (preset, ``--config`` YAML, flags)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

HELP = "compute per-domain influence scores (resumable; same options as run)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from duet_jax.config import add_config_flags

    parser.add_argument("--preset", dest="preset_name", default=None, help="demo (default), smoke or paper")
    parser.add_argument("--config", default=None, help="YAML file of options (flags override it)")
    parser.add_argument("--json", action="store_true", help="print the per-domain summary as JSON")
    add_config_flags(parser)


def main(args: argparse.Namespace) -> int:
    from duet_jax.config import config_from_args
    from duet_jax.duet import Duet
    from duet_jax.run import _enable_compilation_cache

    _enable_compilation_cache()
    config = config_from_args(args, preset_name=args.preset_name, config_file=args.config)
    if config.sampler == "uniform":
        config = dataclasses.replace(config, sampler="if")
    out = config.out_dir or os.path.join("runs", "influence-" + time.strftime("%Y%m%d-%H%M%S"))
    log = (lambda s: print(s, file=sys.stderr)) if args.json else print
    duet = Duet(config, out, log=log, progress=sys.stderr.isatty())
    duet.dir.mkdir(parents=True, exist_ok=True)
    prep = duet.prepare(target=False)  # the unseen task is not needed here
    if args.json:
        json.dump(prep.influence, sys.stdout, indent=2)
        print()
    else:
        for name, d in (prep.influence or {}).items():
            print(f"{name:<16} n={d['examples']:<6} flagged={d['flagged']:<4} mean={d['score_mean']:+.4g} "
                  f"std={d['score_std']:.4g} ESS/N={d['effective_sample_size']:.3f}")
        print(f"scores: {duet.dir / 'influence' / 'scores.npy'} (pool order); stores: {duet.dir / 'influence'}")
    return 0
