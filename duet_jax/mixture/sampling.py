"""DUET's local step: draw a mixture of a given ratio from the pool, weighting examples inside each
domain (IF-weighted, uniform, remove-harmful). Everything here is jittable with a static budget M,
so k mixtures are one ``vmap`` over k keys.

The pool is every domain's train split concatenated; ``domain_of[i]`` says which domain example ``i``
comes from. A mixture is ``M`` indices into the pool, with ``counts[d]`` of them from domain ``d``.

Weights inside a domain (all per domain, never across domains):

* ``uniform_weights``: every valid example alike (DUET-UR).
* ``if_weights``: the paper's rule, probabilities from influence scores shifted to be non-negative
  (``s - min_d s``), optionally sharpened by a temperature (``w ** (1/T)``); ``mode="softmax"`` uses
  ``exp(z / T)`` of the domain-standardised scores instead. ``floor`` keeps every example reachable.
* ``remove_harmful_weights``: drop the lowest-scoring ``fraction`` of each domain (by rank, so exactly
  ``floor(fraction * n_d)`` are removed: the released code's quantile bug removed none), then uniform.

Sampling: with replacement by inverse-CDF per slot; without replacement by Gumbel-top-k per domain.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

__all__ = [
    "uniform_weights",
    "if_weights",
    "remove_harmful_weights",
    "effective_sample_size",
    "sample_mixture",
    "sample_mixtures",
]


def _segment(x, domain_of, n_domains, op):
    return op(x, domain_of, num_segments=n_domains)


def uniform_weights(domain_of: jax.Array, valid: jax.Array | None = None) -> jax.Array:
    """float32 ``[N]``: 1 for every valid example, 0 otherwise."""
    w = jnp.ones(domain_of.shape, jnp.float32)
    return w if valid is None else jnp.where(valid, w, 0.0)


def if_weights(
    scores: jax.Array,
    domain_of: jax.Array,
    n_domains: int,
    *,
    temperature: float = 1.0,
    mode: str = "shift",
    floor: float = 0.0,
    valid: jax.Array | None = None,
) -> jax.Array:
    """Sampling weights ``[N]`` from influence scores ``[N]`` (higher = more helpful).

    Args:
      scores: float ``[N]`` influence scores.
      domain_of: int32 ``[N]`` domain of each example.
      n_domains: number of domains (static).
      temperature: > 0; below 1 sharpens, above 1 flattens.
      mode: "shift" (paper: ``(s - min_d s) ** (1/T)``) or "softmax" (``exp(z/T)``, z standardised per
        domain).
      floor: added to every valid weight after normalising each domain's weights to mean 1, so no
        example becomes unreachable (0 reproduces the paper's rule exactly).
      valid: bool ``[N]``; invalid examples (e.g. flagged: no loss tokens) get weight 0.
    """
    s = jnp.asarray(scores, jnp.float32)
    ok = jnp.isfinite(s) if valid is None else (jnp.asarray(valid) & jnp.isfinite(s))
    big = jnp.finfo(jnp.float32).max
    n_d = _segment(ok.astype(jnp.float32), domain_of, n_domains, jax.ops.segment_sum)
    if mode == "shift":
        mn = _segment(jnp.where(ok, s, big), domain_of, n_domains, jax.ops.segment_min)
        w = jnp.maximum(s - mn[domain_of], 0.0)
        w = jnp.where(ok, w, 0.0) ** (1.0 / temperature)
    elif mode == "softmax":
        mean = _segment(jnp.where(ok, s, 0.0), domain_of, n_domains, jax.ops.segment_sum) / jnp.maximum(n_d, 1)
        var = _segment(jnp.where(ok, (s - mean[domain_of]) ** 2, 0.0), domain_of, n_domains,
                       jax.ops.segment_sum) / jnp.maximum(n_d, 1)
        z = (s - mean[domain_of]) / jnp.sqrt(var[domain_of] + 1e-12)
        zmax = _segment(jnp.where(ok, z, -big), domain_of, n_domains, jax.ops.segment_max)
        w = jnp.where(ok, jnp.exp((z - zmax[domain_of]) / temperature), 0.0)
    else:
        raise ValueError(f"mode must be 'shift' or 'softmax', got {mode!r}")
    tot = _segment(w, domain_of, n_domains, jax.ops.segment_sum)
    w = jnp.where(tot[domain_of] > 0, w * n_d[domain_of] / jnp.maximum(tot[domain_of], 1e-30), 0.0)
    # A domain whose scores are all equal (e.g. all zero) falls back to uniform, not to nothing.
    w = jnp.where((tot[domain_of] > 0) | ~ok, w, 1.0)
    return jnp.where(ok, w + floor, 0.0)


def remove_harmful_weights(
    scores: jax.Array, domain_of: jax.Array, n_domains: int, fraction: float = 0.2,
    valid: jax.Array | None = None,
) -> jax.Array:
    """Weights ``[N]``: 0 for the ``floor(fraction * n_d)`` lowest-scoring examples of each domain
    (and invalid ones), 1 for the rest (DUET-RH)."""
    s = jnp.asarray(scores, jnp.float32)
    ok = jnp.ones(s.shape, bool) if valid is None else jnp.asarray(valid)
    s = jnp.where(ok & jnp.isfinite(s), s, -jnp.inf)  # invalid ones rank lowest (removed first)
    rank = _rank_within(s, domain_of, n_domains, descending=False)
    n_d = _segment(jnp.ones_like(s), domain_of, n_domains, jax.ops.segment_sum)
    drop = jnp.floor(fraction * n_d).astype(jnp.int32)
    return jnp.where((rank >= drop[domain_of]) & ok, 1.0, 0.0).astype(jnp.float32)


def effective_sample_size(weights: jax.Array, domain_of: jax.Array, n_domains: int) -> jax.Array:
    """Kish effective sample size per domain, ``(sum w)^2 / sum w^2``, as a fraction of the domain's
    size ``[n_domains]`` (1 = uniform; the released scores gave 0.97-0.999)."""
    w = jnp.asarray(weights, jnp.float32)
    s1 = _segment(w, domain_of, n_domains, jax.ops.segment_sum)
    s2 = _segment(w * w, domain_of, n_domains, jax.ops.segment_sum)
    n = _segment(jnp.ones_like(w), domain_of, n_domains, jax.ops.segment_sum)
    return jnp.where(s2 > 0, s1 * s1 / jnp.maximum(s2, 1e-30) / jnp.maximum(n, 1), 0.0)


def _rank_within(keys, domain_of, n_domains, descending: bool):
    """Rank of each element among its domain's elements, by key (0 = first)."""
    k = -keys if descending else keys
    order = jnp.lexsort((k, domain_of))  # by domain, then key
    n = keys.shape[0]
    pos = jnp.empty((n,), jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))
    sizes = _segment(jnp.ones((n,), jnp.int32), domain_of, n_domains, jax.ops.segment_sum)
    start = jnp.cumsum(sizes) - sizes
    return pos - start[domain_of]


@functools.partial(jax.jit, static_argnames=("budget", "n_domains", "replace"))
def sample_mixture(
    key: jax.Array,
    weights: jax.Array,
    domain_of: jax.Array,
    counts: jax.Array,
    *,
    budget: int,
    n_domains: int,
    replace: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """Draw one mixture: ``counts[d]`` examples from domain ``d`` with probability proportional to
    ``weights`` inside the domain.

    Args:
      key: PRNG key.
      weights: float ``[N]`` non-negative; a domain whose weights are all 0 is sampled uniformly.
      domain_of: int32 ``[N]``.
      counts: int32 ``[n_domains]``, summing to ``budget``.
      budget: M (static).
      n_domains: static.
      replace: with replacement (inverse CDF) or without (Gumbel-top-k; needs counts <= domain size,
        which :func:`duet_jax.mixture.ratio_to_counts` checks).

    Returns:
      ``(indices int32 [budget], valid bool [budget])``. ``valid`` is False only for slots that could
      not be filled (without replacement, a count above the domain's size); such slots hold index 0.
    """
    w = jnp.maximum(jnp.asarray(weights, jnp.float32), 0.0)
    n = w.shape[0]
    tot = _segment(w, domain_of, n_domains, jax.ops.segment_sum)
    w = jnp.where(tot[domain_of] > 0, w, 1.0)  # all-zero domain -> uniform
    if replace:
        order = jnp.argsort(domain_of, stable=True)
        ws = w[order]
        cum = jnp.cumsum(ws)
        tot = _segment(w, domain_of, n_domains, jax.ops.segment_sum)
        sizes = _segment(jnp.ones((n,), jnp.int32), domain_of, n_domains, jax.ops.segment_sum)
        end = jnp.cumsum(sizes)
        start = end - sizes
        cum_before = jnp.cumsum(tot) - tot
        slot_domain = jnp.searchsorted(jnp.cumsum(counts), jnp.arange(budget), side="right")
        slot_domain = jnp.clip(slot_domain, 0, n_domains - 1)
        u = jax.random.uniform(key, (budget,), jnp.float32)
        target = cum_before[slot_domain] + u * tot[slot_domain]
        pos = jnp.searchsorted(cum, target, side="right")
        pos = jnp.clip(pos, start[slot_domain], end[slot_domain] - 1)
        # Never land on a zero-weight example through float rounding at a boundary.
        idx = order[pos]
        return idx.astype(jnp.int32), jnp.ones((budget,), bool)
    g = jax.random.gumbel(key, (n,), jnp.float32)
    keys = jnp.where(w > 0, jnp.log(w) + g, -jnp.inf)
    rank = _rank_within(keys, domain_of, n_domains, descending=True)
    chosen = rank < counts[domain_of]
    idx = jnp.nonzero(chosen, size=budget, fill_value=0)[0]
    valid = jnp.arange(budget) < jnp.sum(chosen)
    return idx.astype(jnp.int32), valid


def sample_mixtures(key, weights, domain_of, counts, *, k: int, budget: int, n_domains: int,
                    replace: bool = True):
    """``k`` independent mixtures of the same counts: ``(indices [k, M], valid [k, M])``."""
    keys = jax.random.split(key, k)
    fn = functools.partial(sample_mixture, budget=budget, n_domains=n_domains, replace=replace)
    return jax.vmap(fn, in_axes=(0, None, None, None))(keys, weights, domain_of, counts)
