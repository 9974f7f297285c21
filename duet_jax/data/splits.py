"""Deterministic, content-hashed train / validation / evaluation splits.

Every example gets a number u in [0, 1) from a hash of its content key (its normalised prompt) and a
salt. Examples with the same key get the same u, so exact duplicates never straddle two splits, and
the assignment does not depend on row order. Sizes are given per split as a fraction (0 < x < 1) or
a count (an integer >= 1):

* fractions: u < f_val -> validation, u < f_val + f_eval -> evaluation, else train;
* counts: groups are ordered by u and cut: the first groups fill validation, the next evaluation,
  the rest train (a group of duplicates is never cut in two, so a split may exceed its count by the
  size of one group).

The validation split is used by the influence step (a domain's own held-out loss), the evaluation
split only to score a domain when it plays the unseen task; train is what DUET samples from.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence

from duet_jax.data.example import Example
from duet_jax.errors import ConfigError, EmptySplitError

__all__ = ["SPLITS", "SplitSpec", "Splits", "split_examples", "unit_hash"]

SPLITS = ("train", "validation", "evaluation")


def unit_hash(key: str, salt: str = "") -> float:
    """A number in [0, 1) from a stable hash of ``salt`` and ``key``."""
    h = hashlib.sha256(f"{salt}\x1f{key}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2.0**64


@dataclasses.dataclass(frozen=True, kw_only=True)
class SplitSpec:
    """Sizes of the held-out splits; train gets the rest.

    Attributes:
      validation: fraction in (0, 1) or count >= 1.
      evaluation: fraction in (0, 1) or count >= 1.
      salt: changes the (deterministic) assignment; the same salt gives the same splits.
    """

    validation: float | int = 0.1
    evaluation: float | int = 0.2
    salt: str = "duet-jax-v1"

    def __post_init__(self):
        for name in ("validation", "evaluation"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise ConfigError(f"split size {name} must be a number, got {v!r}")
            if isinstance(v, float) and not v.is_integer() and not 0.0 < v < 1.0:
                raise ConfigError(f"split fraction {name} must be in (0, 1), got {v}")
            if v <= 0:
                raise ConfigError(f"split size {name} must be positive, got {v}")
        fv, fe = self.validation, self.evaluation
        if _is_fraction(fv) and _is_fraction(fe) and fv + fe >= 1.0:
            raise ConfigError(
                f"validation + evaluation fractions must leave room for train: {fv} + {fe} >= 1"
            )
        if _is_fraction(fv) != _is_fraction(fe):
            raise ConfigError(
                "give both held-out sizes as fractions or both as counts, "
                f"got validation={fv!r}, evaluation={fe!r}"
            )

    @classmethod
    def from_dict(cls, d: dict) -> SplitSpec:
        unknown = set(d) - {"validation", "evaluation", "salt"}
        if unknown:
            raise ConfigError(f"unknown split options {sorted(unknown)}; expected validation, evaluation, salt")
        return cls(**d)


def _is_fraction(v) -> bool:
    return isinstance(v, float) and 0.0 < v < 1.0


@dataclasses.dataclass(frozen=True)
class Splits:
    """The three disjoint splits of one domain."""

    domain: str
    train: tuple[Example, ...]
    validation: tuple[Example, ...]
    evaluation: tuple[Example, ...]

    def __getitem__(self, name: str) -> tuple[Example, ...]:
        if name not in SPLITS:
            raise KeyError(f"unknown split {name!r}; expected one of {SPLITS}")
        return getattr(self, name)

    def counts(self) -> dict[str, int]:
        return {s: len(self[s]) for s in SPLITS}


def split_examples(
    domain: str, examples: Sequence[Example], spec: SplitSpec | None = None
) -> Splits:
    """Split ``examples`` into disjoint train / validation / evaluation parts.

    Raises:
      EmptySplitError: the domain has no example, or a split would be empty (the message says how
        many examples there are and which sizes were asked for).
    """
    spec = spec or SplitSpec()
    if not examples:
        raise EmptySplitError(f"domain {domain!r} has no example")
    u_of: dict[str, float] = {}
    for ex in examples:
        k = ex.key
        if k not in u_of:
            u_of[k] = unit_hash(k, spec.salt)
    parts: dict[str, list[Example]] = {s: [] for s in SPLITS}
    if _is_fraction(spec.validation):
        fv, fe = float(spec.validation), float(spec.evaluation)
        for ex in examples:
            u = u_of[ex.key]
            parts["validation" if u < fv else "evaluation" if u < fv + fe else "train"].append(ex)
    else:
        nv, ne = int(spec.validation), int(spec.evaluation)
        groups: dict[str, list[Example]] = {}
        for ex in examples:
            groups.setdefault(ex.key, []).append(ex)
        order = sorted(groups, key=lambda k: (u_of[k], k))
        split_of: dict[str, str] = {}
        filled = {"validation": 0, "evaluation": 0}
        for k in order:
            if filled["validation"] < nv:
                s = "validation"
            elif filled["evaluation"] < ne:
                s = "evaluation"
            else:
                s = "train"
            split_of[k] = s
            if s in filled:
                filled[s] += len(groups[k])
        for ex in examples:  # keep the source order inside each split
            parts[split_of[ex.key]].append(ex)
    empty = [s for s in SPLITS if not parts[s]]
    if empty:
        raise EmptySplitError(
            f"domain {domain!r}: split(s) {empty} would be empty with {len(examples)} examples "
            f"({len(u_of)} distinct prompts) and sizes validation={spec.validation!r}, "
            f"evaluation={spec.evaluation!r}; use larger fractions or smaller counts"
        )
    return Splits(domain, tuple(parts["train"]), tuple(parts["validation"]), tuple(parts["evaluation"]))
