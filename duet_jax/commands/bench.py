"""``duet-jax bench NAME``: benchmarks that time duet-jax against a peer in the same run and print
ratios. Each benchmark is a module ``duet_jax.bench.NAME`` with ``HELP``, ``add_arguments`` and
``main``. Peers (torch, peft, botorch) come from the ``bench`` extra: ``make bench-setup``."""

from __future__ import annotations

import importlib
import importlib.util

HELP = "benchmarks against peers, printed as ratios"
BENCHES = ("bo", "model", "finetune", "influence")


def add_arguments(parser):
    sub = parser.add_subparsers(dest="bench", metavar="NAME")
    for name in BENCHES:
        module = f"duet_jax.bench.{name}"
        if importlib.util.find_spec(module) is None:
            continue
        mod = importlib.import_module(module)
        p = sub.add_parser(name, help=mod.HELP, description=mod.HELP)
        mod.add_arguments(p)
        p.set_defaults(_bench_module=module)


def main(args) -> int:
    if getattr(args, "_bench_module", None) is None:
        print("usage: duet-jax bench NAME [options]; available:",
              ", ".join(n for n in BENCHES if importlib.util.find_spec(f"duet_jax.bench.{n}")))
        return 2
    return int(importlib.import_module(args._bench_module).main(args) or 0)
