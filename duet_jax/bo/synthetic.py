"""Synthetic objectives on the simplex with known maxima, for tests and benchmarks.

Each function is normalised so that its maximum is 1 and its mean under Dirichlet(1) (uniform on
the simplex) is 0; the simple regret ``1 - best value so far`` then reads as "fraction of the gap
between a random ratio and the best ratio still left".

- ``smooth``: a diminishing-returns utility g(r) = sum_i a_i log(r_i + eps), concave, so its maximum
  is the water-filling solution r_i = max(a_i / lambda - eps, 0), found by bisection on lambda.
- ``multimodal``: compactly supported Wendland bumps of heights h_0 = 1 > h_k (k >= 1) with
  disjoint supports, minus a quadratic trend lambda ||r - c_0||^2 centred on the highest bump. The
  maximum is exactly g(c_0) = 1: inside bump 0 only it contributes and phi(t) - lambda t^2 w^2 <= 1;
  elsewhere g <= max_k h_k < 1. The other bumps are local maxima.
- ``peaks``: the trap of issue 13: five bumps of different heights *and widths* with disjoint
  supports and no trend: the highest (1) is the narrowest (radius 0.12), the runner-up (0.85) the
  broadest (0.35), so a greedy optimiser settles on the broad second peak.
- ``needle``: a flat objective with one narrow optimum: a weak broad quadratic rise (0.1) towards
  one bump of radius 0.12; everywhere else almost flat.

Noisy versions: ``loop.run(..., noise_sd=s)`` adds N(0, s^2) to every observation (regret is
measured on the noise-free values).

Parameters come from a fixed numpy seed per (kind, dim), so the suite is the same everywhere.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["SimplexFunction", "evaluate", "smooth", "multimodal", "peaks", "needle", "suite",
           "KINDS", "make"]

_EPS = 0.05
_N_BUMPS = 5
_TREND = 0.5
_WIDTH = 0.2  # bump radius; supports are disjoint (centres >= 2 radii apart)


def evaluate(params: dict, x):
    """The normalised value at ``x: [..., d]`` of the function described by ``params``.

    One code path for all kinds (``params["kind"]``: 0 smooth, 1 bumps (multimodal, peaks,
    needle); the other kind's parameters are zeros; ``width`` is per bump), so every function of a
    dimension shares one compiled BO loop.
    """
    p = {k: jnp.asarray(v, x.dtype) for k, v in params.items()}
    utility = jnp.sum(p["a"] * jnp.log(x + _EPS), axis=-1)
    r = jnp.sqrt(jnp.sum((x[..., None, :] - p["centers"]) ** 2, axis=-1) + 1e-30) / p["width"]
    t = jnp.clip(1.0 - r, 0.0, None)
    bumps = (jnp.sum(p["heights"] * t**4 * (4.0 * r + 1.0), axis=-1)
             - p["trend"] * jnp.sum((x - p["centers"][0]) ** 2, axis=-1))
    raw = jnp.where(p["kind"] == 0, utility, bumps)
    return (raw - p["offset"]) / p["scale"]


@dataclass(frozen=True, eq=False)
class SimplexFunction:
    """A normalised objective ``f: [..., d] -> [...]`` (jnp, jittable) with known maximum 1.

    ``params`` (numpy arrays) go to ``evaluate``; ``loop.run`` passes them as traced arguments.
    """

    name: str
    dim: int
    kind: str
    x_max: np.ndarray  # [d] a maximiser
    params: dict

    f_max = 1.0

    def __call__(self, x):
        return evaluate(self.params, x)


def _make(name, dim, kind, x_max, raw_max, **p):
    params = {"kind": np.asarray(0 if kind == "smooth" else 1), "a": np.zeros(dim),
              "centers": np.zeros((_N_BUMPS, dim)), "heights": np.zeros(_N_BUMPS),
              "width": np.ones(_N_BUMPS), "trend": np.asarray(0.0), "offset": np.asarray(0.0), "scale": np.asarray(1.0)}
    params.update({k: np.asarray(v, np.float64) for k, v in p.items()})
    rng = np.random.default_rng(12345)
    with jax.enable_x64(True):
        u = np.asarray(evaluate(params, jnp.asarray(rng.dirichlet(np.ones(dim), 20000))))
    params["offset"] = np.asarray(u.mean())
    params["scale"] = np.asarray(raw_max - u.mean())
    return SimplexFunction(name, dim, kind, np.asarray(x_max), params)


@functools.cache
def smooth(dim: int) -> SimplexFunction:
    """Concave diminishing-returns utility in ``dim`` domains (maximum by water filling)."""
    rng = np.random.default_rng(1000 + dim)
    a = rng.dirichlet(np.full(dim, 2.0))

    def total(lam):
        return np.maximum(a / lam - _EPS, 0.0).sum()

    lo, hi = 1e-12, a.max() / _EPS  # total(lo) huge, total(hi) = 0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if total(mid) > 1.0 else (lo, mid)
    x_max = np.maximum(a / (0.5 * (lo + hi)) - _EPS, 0.0)
    x_max = x_max / x_max.sum()
    raw_max = float(np.sum(a * np.log(x_max + _EPS)))
    return _make(f"smooth-{dim}d", dim, "smooth", x_max, raw_max, a=a)


@functools.cache
def multimodal(dim: int) -> SimplexFunction:
    """Five compact bumps with disjoint supports plus a trend toward the highest (maximum at c_0)."""
    rng = np.random.default_rng(2000 + dim)
    width = _WIDTH
    centers: list[np.ndarray] = []
    for _ in range(100_000):  # rejection sampling; a few hundred draws at most for dim <= 9
        c = rng.dirichlet(np.full(dim, 1.5))
        if all(np.linalg.norm(c - o) >= 2.0 * width for o in centers):
            centers.append(c)
            if len(centers) == _N_BUMPS:
                break
    else:
        raise RuntimeError(f"multimodal({dim}): could not place {_N_BUMPS} separated bumps")
    heights = np.concatenate([[1.0], rng.uniform(0.5, 0.8, _N_BUMPS - 1)])
    return _make(f"multimodal-{dim}d", dim, "multimodal", centers[0], 1.0,
                 centers=np.stack(centers), heights=heights, width=np.full(_N_BUMPS, width),
                 trend=_TREND)



def _separated(rng, dim, widths, concentration=1.5):
    centers: list[np.ndarray] = []
    for _ in range(200_000):
        c = rng.dirichlet(np.full(dim, concentration))
        i = len(centers)
        if all(np.linalg.norm(c - o) >= widths[i] + widths[j] for j, o in enumerate(centers)):
            centers.append(c)
            if len(centers) == len(widths):
                return np.stack(centers)
    raise RuntimeError(f"could not place {len(widths)} separated bumps in {dim} dimensions")


@functools.cache
def peaks(dim: int) -> SimplexFunction:
    """Narrow highest peak, broad runner-up, three more; no trend (issue 13's trap)."""
    rng = np.random.default_rng(3000 + dim)
    widths = np.array([0.12, 0.35, 0.2, 0.15, 0.25])
    heights = np.array([1.0, 0.85, 0.7, 0.6, 0.5])
    centers = _separated(rng, dim, widths)
    return _make(f"peaks-{dim}d", dim, "peaks", centers[0], 1.0, centers=centers,
                 heights=heights, width=widths, trend=0.0)


@functools.cache
def needle(dim: int) -> SimplexFunction:
    """Flat with one narrow optimum: a weak quadratic rise (0.1) to one bump of radius 0.12."""
    rng = np.random.default_rng(4000 + dim)
    c = rng.dirichlet(np.full(dim, 1.5))
    centers = np.zeros((_N_BUMPS, dim))
    centers[0] = c
    centers[1:] = c  # zero-height copies (shapes shared with the other kinds)
    heights = np.zeros(_N_BUMPS)
    heights[0] = 1.0
    return _make(f"needle-{dim}d", dim, "needle", c, 1.0, centers=centers, heights=heights,
                 width=np.full(_N_BUMPS, 0.12), trend=0.1)


KINDS = {"smooth": smooth, "multimodal": multimodal, "peaks": peaks, "needle": needle}


def make(kind: str, dim: int) -> SimplexFunction:
    """The synthetic function of ``kind`` (one of ``KINDS``) in ``dim`` domains."""
    return KINDS[kind](dim)


def suite(dims=(3, 5, 9), kinds=("smooth", "multimodal")) -> list[SimplexFunction]:
    """The benchmark suite: each kind in each dimension (default: smooth and multimodal)."""
    return [KINDS[k](d) for d in dims for k in kinds]
