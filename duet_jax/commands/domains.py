"""``duet-jax domains``: the built-in domains, their split sizes and one formatted example each."""

from __future__ import annotations

import argparse
import json
import sys

HELP = "list the built-in data domains and their splits"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    parser.add_argument("--validation", type=float, default=None,
                        help="validation size: a fraction in (0,1) or a count (default 0.1)")
    parser.add_argument("--evaluation", type=float, default=None,
                        help="evaluation size: a fraction in (0,1) or a count (default 0.2)")
    parser.add_argument("--name", action="append", default=None,
                        help="only these domains (repeatable; a built-in name or a local file)")


def _size(v):
    if v is None:
        return None
    return int(v) if float(v).is_integer() and v >= 1 else float(v)


def main(args: argparse.Namespace) -> int:
    from duet_jax.data import SplitSpec, builtin_names, get_domain

    kw = {k: _size(getattr(args, k)) for k in ("validation", "evaluation") if getattr(args, k) is not None}
    spec = SplitSpec(**kw)
    names = args.name or builtin_names()
    rows = []
    for name in names:
        d = get_domain(name)
        s = d.splits(spec)
        ex = s.train[0]
        rows.append({
            "name": d.name, "kind": d.kind, "description": d.description, "source": d.source,
            **s.counts(), "skipped_rows": d.skipped_rows,
            "example": {"prompt": ex.prompt, "answer": ex.answer,
                        **({"choices": list(ex.choices), "gold": ex.gold} if ex.choices else {})},
        })
    if args.json:
        json.dump(rows, sys.stdout, indent=2, ensure_ascii=False)
        print()
        return 0
    w = max(len(r["name"]) for r in rows)
    print(f"{'domain':<{w}}  kind  {'train':>6} {'valid':>6} {'eval':>6}  description")
    for r in rows:
        print(f"{r['name']:<{w}}  {r['kind']:<4}  {r['train']:>6} {r['validation']:>6} {r['evaluation']:>6}  {r['description']}")
    print()
    for r in rows:
        ex = r["example"]
        prompt = ex["prompt"] if len(ex["prompt"]) < 300 else "..." + ex["prompt"][-297:]
        print(f"--- {r['name']} ({r['kind']})")
        print(prompt + "\u2502" + ex["answer"][:200])
        if "choices" in ex:
            print(f"    choices: {ex['choices']}  gold: {ex['gold']}")
    print("\n(\u2502 marks where the prompt ends and the answer, which carries the loss, begins)")
    return 0
