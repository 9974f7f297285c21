"""``duet-jax influence``: compute DUET's per-domain influence scores alone (resumable), with the
same configuration as ``duet-jax run`` (preset, ``--config`` YAML, flags)."""

from __future__ import annotations

import argparse
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
    from duet_jax.loop.selectors import selector_weights
    from duet_jax.loop.setting import Setting, plan_data
    from duet_jax.loop.shell import Progress
    from duet_jax.report import lock_run_dir
    from duet_jax.run import _enable_compilation_cache

    _enable_compilation_cache()
    config = config_from_args(args, preset_name=args.preset_name, config_file=args.config)
    out = config.out_dir or os.path.join("runs", "influence-" + time.strftime("%Y%m%d-%H%M%S"))
    log = (lambda s: print(s, file=sys.stderr)) if args.json else print
    plan = plan_data(config, log)
    with lock_run_dir(out):
        bar = Progress(sys.stderr.isatty())
        setting = Setting.build(config, plan, out, log=log, progress=bar.update)  # no unseen task here
        _, info = selector_weights("if", setting, config.selector)
        bar.close()
    if args.json:
        json.dump(info, sys.stdout, indent=2)
        print()
    else:
        for name, d in info.items():
            print(f"{name:<16} n={d['examples']:<6} flagged={d['flagged']:<4} mean={d['score_mean']:+.4g} "
                  f"std={d['score_std']:.4g} ESS/N={d['effective_sample_size']:.3f}")
        print(f"scores: {os.path.join(out, 'influence', 'scores.npy')} (pool order); stores: "
              f"{os.path.join(out, 'influence')}")
    return 0
