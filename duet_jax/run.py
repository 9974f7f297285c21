"""``python -m duet_jax.run``: the DUET loop.

Not built yet: the loop lands with the end-to-end issue. Until then this prints the plan and exits
with status 3.
"""

from __future__ import annotations

import argparse
import sys

HELP = "run the DUET loop (no arguments: the offline demo)"

PLAN = """duet-jax run: the DUET loop is not built yet.
Plan of a run: domains -> tokenized arrays -> per-domain proxy fine-tune -> influence scores
-> warm start -> [GP fit -> acquisition on the simplex -> ratio r -> k IF-weighted mixtures
-> k LoRA fine-tunes -> k feedbacks -> best of k] x T -> best mixture + adapter + report.
Built so far: `duet-jax domains` (the data layer)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    del parser


def main(args: argparse.Namespace | None = None) -> int:
    del args
    print(PLAN, file=sys.stderr)
    return 3


if __name__ == "__main__":
    sys.exit(main(None))
