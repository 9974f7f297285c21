"""Mixing ratio -> per-domain example counts that add up to the budget exactly.

Largest-remainder (Hamilton) apportionment: every domain gets ``floor(r_i * M)``, then the
``M - sum(floor)`` leftover units go to the largest remainders (ties to the lower index). Counts are
non-negative, sum to ``M`` exactly, and differ from ``r_i * M`` by less than 1.

The released DUET code zeroed ratios below 0.05 without renormalising, so its budget shrank; here a
``min_share`` zeroes small shares *and* renormalises (``renormalize=False`` reproduces the old
behaviour for comparison).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from duet_jax.errors import ConfigError

__all__ = ["largest_remainder", "ratio_to_counts", "apply_min_share", "validate_ratio", "cap_ratio",
           "share_caps"]


def validate_ratio(ratio, n: int | None = None, atol: float = 1e-6) -> np.ndarray:
    """A float64 copy of ``ratio`` after checking it is on the simplex.

    Raises:
      ConfigError: wrong length, a negative or non-finite share, or a sum away from 1.
    """
    r = np.asarray(ratio, dtype=np.float64).reshape(-1)
    if n is not None and r.shape[0] != n:
        raise ConfigError(f"ratio has {r.shape[0]} shares, expected {n} (one per domain)")
    if not np.all(np.isfinite(r)):
        raise ConfigError(f"ratio has a non-finite share: {r.tolist()}")
    if np.any(r < -atol):
        raise ConfigError(f"ratio has a negative share: {r.tolist()}")
    if abs(r.sum() - 1.0) > atol:
        raise ConfigError(f"ratio must sum to 1, sums to {r.sum():.9f}: {r.tolist()}")
    return np.clip(r, 0.0, None)


def apply_min_share(ratio, min_share: float, renormalize: bool = True) -> np.ndarray:
    """Zero the shares below ``min_share``; renormalise the rest (unless ``renormalize=False``, the
    released code's behaviour, which leaves a ratio summing to less than 1)."""
    r = np.asarray(ratio, dtype=np.float64).copy()
    if min_share <= 0:
        return r
    small = r < min_share
    if small.all():
        small[np.argmax(r)] = False  # keep the largest share rather than nothing
    r[small] = 0.0
    return r / r.sum() if renormalize else r


@jax.jit
def largest_remainder(ratio: jax.Array, budget: int | jax.Array) -> jax.Array:
    """int32 counts ``[n]`` with ``sum == budget`` (jitted; ``budget`` may be traced).

    Args:
      ratio: float ``[n]``, non-negative, summing to 1 (up to rounding; it is renormalised).
      budget: the total number of examples M.
    """
    r = jnp.asarray(ratio, dtype=jnp.float32)
    r = jnp.maximum(r, 0.0)
    r = r / jnp.sum(r)
    budget = jnp.asarray(budget, jnp.int32)
    exact = r * budget
    base = jnp.minimum(jnp.floor(exact).astype(jnp.int32), budget)
    left = budget - jnp.sum(base)
    rem = exact - base
    n = r.shape[0]
    # Rank remainders descending, ties to the lower index (stable argsort of -rem).
    order = jnp.argsort(-rem, stable=True)
    rank = jnp.empty((n,), jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))
    return base + (rank < left).astype(jnp.int32)


def ratio_to_counts(ratio, budget: int, available=None, *, replace: bool = False) -> np.ndarray:
    """Host-side counts for a ratio, checked against what each domain holds.

    Args:
      ratio: shares on the simplex ``[n]``.
      budget: total examples M (> 0).
      available: examples per domain ``[n]``; when given and ``replace`` is False, a count above a
        domain's size is an error (sampling with replacement lifts it).

    Raises:
      ConfigError: a bad ratio or budget, or a count larger than its domain without ``replace``.
    """
    if int(budget) <= 0:
        raise ConfigError(f"budget must be positive, got {budget}")
    r = validate_ratio(ratio)
    counts = np.asarray(largest_remainder(jnp.asarray(r), int(budget)))
    if available is not None and not replace:
        avail = np.asarray(available)
        over = np.flatnonzero(counts > avail)
        if over.size:
            detail = ", ".join(f"domain {i}: {counts[i]} > {avail[i]}" for i in over)
            raise ConfigError(
                f"budget {budget} with ratio {np.round(r, 4).tolist()} asks for more examples than "
                f"some domains hold ({detail}); lower the budget or sample with replacement"
            )
    return counts


def share_caps(budget: int, available, replace: bool) -> np.ndarray | None:
    """Largest share each domain can take: ``available / budget`` without replacement (capped at
    1), ``None`` (no cap) with replacement.

    Raises:
      ConfigError: the domains together hold fewer than ``budget`` examples (no ratio fits).
    """
    if replace:
        return None
    avail = np.asarray(available, np.float64)
    if avail.sum() < budget:
        raise ConfigError(f"budget {budget} asks for more examples than the pool holds "
                          f"({int(avail.sum())}) without replacement; lower the budget or sample "
                          "with replacement")
    return np.minimum(avail / float(budget), 1.0)


def cap_ratio(ratio, caps, budget: int | None = None, available=None) -> np.ndarray:
    """The ratio moved onto ``{r : sum r = 1, 0 <= r <= caps}`` by clipping the over-full shares and
    spreading their excess over the others in proportion to their room (identity when it fits).

    With ``budget`` and ``available`` the result is also rounding-safe: its largest-remainder
    counts never exceed ``available``.
    """
    r = np.clip(np.asarray(ratio, np.float64), 0.0, None)
    r = r / r.sum() if r.sum() > 0 else np.full(r.shape, 1.0 / r.size)
    if caps is None:
        return r
    caps = np.asarray(caps, np.float64)
    if caps.sum() < 1.0 - 1e-12:
        raise ConfigError(f"no ratio fits the caps {caps.tolist()} (they sum to {caps.sum():.6g} < 1)")
    for _ in range(r.size + 1):
        over = r > caps + 1e-15
        if not over.any():
            break
        excess = float((r[over] - caps[over]).sum())
        r[over] = caps[over]
        room = np.where(~over, caps - r, 0.0)
        room[room < 0] = 0
        r = r + excess * room / room.sum()
    if budget is not None and available is not None:
        avail = np.asarray(available)
        counts = np.asarray(largest_remainder(jnp.asarray(r), int(budget)))
        while (counts > avail).any():  # rounding put one too many on a full domain
            i = int(np.argmax(counts - avail))
            j = int(np.argmax(np.where(counts < avail, avail - counts, -1)))
            counts[i] -= 1
            counts[j] += 1
        r = counts / float(budget)
    return r
