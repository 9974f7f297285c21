"""The ``duet-jax`` command line: one subcommand per module in ``duet_jax/commands``.

Each command module defines ``HELP`` (one line), ``add_arguments(parser)`` and ``main(args) -> int``.
Modules are imported only when their command runs, so ``duet-jax --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

from duet_jax.errors import DuetError

__all__ = ["main", "build_parser"]

# name -> (module, one-line help). A command whose module does not exist yet is not offered.
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("duet_jax.run", "run the DUET loop (no arguments: the offline demo)"),
    "domains": ("duet_jax.commands.domains", "list the built-in data domains and their splits"),
    "generate": ("duet_jax.commands.generate", "generate text with a model"),
    "perplexity": ("duet_jax.commands.perplexity", "perplexity of a model on a text file"),
    "influence": ("duet_jax.commands.influence", "compute per-domain influence scores"),
    "bench": ("duet_jax.commands.bench", "benchmarks against peers, printed as ratios"),
}


def _available() -> dict[str, tuple[str, str]]:
    return {n: v for n, v in COMMANDS.items() if importlib.util.find_spec(v[0]) is not None}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="duet-jax",
        description="DUET: optimise a fine-tuning data mixture from feedback of an unseen task.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_) in _available().items():
        p = sub.add_parser(name, help=help_, description=help_)
        mod = importlib.import_module(module)
        mod.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    mod = importlib.import_module(args._module)
    try:
        return int(mod.main(args) or 0)
    except DuetError as e:
        print(f"duet-jax {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
