"""Proposers: the global step, ask / tell on the simplex.

``ask()`` gives the next ratio to evaluate; ``tell(ratio, value)`` reports its best-of-k feedback
(``None``: the evaluation failed). A resumed run replays its history through ``ask``/``tell``, so a
proposer must give the same asks for the same tells (every one here is seeded).

* :class:`BOProposer`: DUET's global step, the warm-start ratios then :class:`SimplexBO`.
* :class:`RandomSearch`: the same warm start, then fresh Dirichlet(1) draws.
* :class:`FixedRatio`: one ratio, always (the uniform baseline and the proxy-based methods, whose
  ratio is found before any feedback).

When sampling without replacement, every proposal respects each domain's size (``caps``).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from duet_jax.mixture import cap_ratio

__all__ = ["BOProposer", "FixedRatio", "Proposer", "RandomSearch", "warm_start_ratios"]


@runtime_checkable
class Proposer(Protocol):
    name: str

    def ask(self) -> np.ndarray: ...

    def tell(self, ratio: np.ndarray, value: float | None) -> None: ...


def _draws(n: int, seed: int):
    """The uniform ratio, then Dirichlet(1) draws: the warm start of every proposing method."""
    rng = np.random.default_rng(seed)
    yield np.full(n, 1.0 / n)
    while True:
        yield rng.dirichlet(np.ones(n))


def warm_start_ratios(n: int, count: int, seed: int, caps=None) -> list[np.ndarray]:
    """``count`` warm-start ratios: uniform first, then Dirichlet(1) draws, capped by ``caps``."""
    g = _draws(n, seed)
    return [cap_ratio(next(g), caps) for _ in range(count)]


class BOProposer:
    """The warm start, then one GP proposal per round (:class:`duet_jax.bo.SimplexBO`)."""

    name = "bo"

    def __init__(self, n: int, *, warm_start: int, seed: int, config, caps=None):
        from duet_jax.bo.simplex_bo import SimplexBO

        self.warm = warm_start_ratios(n, warm_start, seed, caps)
        cfg = config.replace(n_init=len(self.warm), on_nonfinite="record")
        if caps is not None:
            upper = np.minimum(np.asarray(cfg.upper if cfg.upper is not None else np.ones(n)), caps)
            cfg = cfg.replace(upper=tuple(float(u) for u in upper))
        self.bo = SimplexBO(n, maximize=True, seed=seed, config=cfg)
        self.caps = caps
        self._asked = 0

    def ask(self) -> np.ndarray:
        i = self._asked
        self._asked += 1
        if i < len(self.warm):
            return self.warm[i].copy()
        return cap_ratio(self.bo.ask(1)[0], self.caps)

    def tell(self, ratio, value) -> None:
        self.bo.tell(np.asarray(ratio, np.float64), np.nan if value is None else float(value))


class RandomSearch:
    """Random search: the warm start's ratios, then further Dirichlet(1) draws from the same
    stream (so its first evaluations are DUET's warm start, paired)."""

    name = "random"

    def __init__(self, n: int, *, seed: int, caps=None):
        self._g = _draws(n, seed)
        self.caps = caps

    def ask(self) -> np.ndarray:
        return cap_ratio(next(self._g), self.caps)

    def tell(self, ratio, value) -> None:  # nothing to learn
        pass


class FixedRatio:
    """One ratio for every evaluation; each evaluation draws fresh mixtures of it."""

    name = "fixed"

    def __init__(self, ratio, caps=None):
        self.ratio = cap_ratio(np.asarray(ratio, np.float64), caps)

    def ask(self) -> np.ndarray:
        return self.ratio.copy()

    def tell(self, ratio, value) -> None:
        pass
