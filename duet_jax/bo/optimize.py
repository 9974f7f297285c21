"""One BO round as one jitted function: fit the GP, maximise the acquisition on the simplex, and
propose a batch by kriging believer.

Acquisition maximisation (BoTorch's recipe, on the simplex): score raw candidates (Dirichlet(1)
draws, vertices, edge midpoints, centroid), take the ``n_starts`` best, and run projected gradient
ascent (normalised steps, cosine-decayed length) from all of them at once, vmapped; keep the best
point seen on any path.

Batches (q > 1) and pending points use the kriging believer: a chosen point joins the data with the
posterior mean as its value (the hyperparameters stay), which leaves the mean unchanged and shrinks
the variance around it, so the next choice goes elsewhere.
"""

from __future__ import annotations

import collections
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from duet_jax.bo import acquisition as acq
from duet_jax.bo import gp
from duet_jax.bo.config import BOConfig
from duet_jax.bo.runtime import jit, x64
from duet_jax.bo.simplex import apply_min_share, initial_design, project, raw_candidates

__all__ = ["RoundInfo", "maximize_acquisition", "propose_core", "propose", "trace_counts"]

_TRACES: collections.Counter = collections.Counter()


def trace_counts() -> dict[str, int]:
    """How many times each jitted entry point has been traced (compiled) in this process."""
    return dict(_TRACES)


class RoundInfo(NamedTuple):
    loss: jax.Array  # [] fit loss (-(lml + log prior)); NaN when the fit was skipped (n < 2)
    beta: jax.Array  # [] UCB beta used
    acq_value: jax.Array  # [q] acquisition value of each proposal (NaN for a fallback draw)
    y_mean: jax.Array  # [] standardisation of the outputs
    y_std: jax.Array  # []
    explored: jax.Array  # [q] bool: the proposal is the uninformed-model fallback's draw
    snr: jax.Array  # [] fitted signal variance over noise variance (what explore_snr is checked on)


def _bounds(cfg: BOConfig, d: int, dtype):
    lo, hi = cfg.bounds(d)
    return jnp.asarray(lo, dtype), jnp.asarray(hi, dtype)


def maximize_acquisition(score, key, d: int, cfg: BOConfig, lower, upper, *, allowed=None,
                         centers=None):
    """Maximise ``score: [m, d] -> [m]`` over the feasible set. Returns ``(x [d], value [])``.

    ``allowed: [m, d] -> [m] bool`` (optional): points that may be returned (the near-duplicate
    check); the ascent follows ``score`` everywhere, but only allowed points are kept as the best.
    ``centers: [c, d]``: where the ``cfg.raw_local`` local raw candidates are drawn.
    """
    bounded = cfg.has_bounds()
    cands = raw_candidates(key, d, cfg.n_raw, lower, upper, bounded, lower.dtype,
                           sparse=cfg.raw_sparse, centers=centers,
                           n_local=cfg.raw_local if centers is not None else 0,
                           local_sd=cfg.local_sd)
    ok = (lambda xs: jnp.ones(xs.shape[0], bool)) if allowed is None else allowed
    vals = score(cands)
    vals = jnp.where(jnp.isnan(vals), -jnp.inf, vals)
    # refused raw candidates rank below every allowed one but keep their order among themselves
    vals_sel = jnp.where(ok(cands), vals, -1e300)
    n_starts = min(cfg.n_starts, cands.shape[0])
    top_sel, top_i = jax.lax.top_k(vals_sel, n_starts)
    x0 = cands[top_i]
    top_v = jnp.where(top_sel > -1e300, vals[top_i], -jnp.inf)

    # Projected ascent with steps of a set length along the feasible direction d = P(x + lr g) - x,
    # so progress along a face of the simplex does not stall when most of the gradient points out
    # of it. (A per-coordinate step such as Adam's would stop short of a maximum on a face: the
    # projection of a rescaled gradient step is not a KKT fixed point.)
    lr = optax.cosine_decay_schedule(cfg.ascent_lr, cfg.ascent_steps, alpha=0.02)
    unit = lambda v: v / jnp.maximum(jnp.linalg.norm(v, axis=-1, keepdims=True), 1e-30)
    value_and_grad = jax.vmap(jax.value_and_grad(lambda xi: score(xi[None])[0]))

    def step(carry, t):
        x, bx, bv = carry
        v, g = value_and_grad(x)
        better = (v > bv) & ok(x)
        bx = jnp.where(better[:, None], x, bx)
        bv = jnp.where(better, v, bv)
        g = unit(jnp.where(jnp.isfinite(g), g, 0.0))
        d = unit(project(x + lr(t) * g, lower, upper, bounded) - x)
        return (project(x + lr(t) * d, lower, upper, bounded), bx, bv), None

    (x, bx, bv), _ = jax.lax.scan(step, (x0, x0, top_v), jnp.arange(cfg.ascent_steps))
    v = score(x)
    better = (v > bv) & ok(x)
    bx = jnp.where(better[:, None], x, bx)
    bv = jnp.where(better, v, bv)
    i = jnp.argmax(bv)
    # nothing allowed anywhere (every candidate refused): the best raw candidate after all
    j = jnp.argmax(vals)
    none = bv[i] == -jnp.inf
    return jnp.where(none, cands[j], bx[i]), jnp.where(none, vals[j], bv[i])


def _thompson(post, key, d, cfg: BOConfig, lower, upper):
    k1, k2 = jax.random.split(key)
    cands = raw_candidates(k1, d, cfg.ts_candidates, lower, upper, cfg.has_bounds(), lower.dtype)
    mean, cov = gp.predict(post, cands, cfg, full_cov=True)
    f = acq.thompson_sample(k2, mean, cov)
    i = jnp.argmax(f)
    return cands[i], f[i]


def propose_core(x, y, mask, pending, params0, key, cfg: BOConfig, q: int):
    """One BO round on padded data (pure; jit it or call it inside a jitted loop).

    Args:
      x: ``[cap, d]`` ratios; the used rows (observed, then pending) form a prefix.
      y: ``[cap]`` feedback to maximise (the caller negates losses); ignored off ``mask``.
      mask: ``[cap]`` observed rows used in the fit.
      pending: ``[cap]`` rows asked but not yet told (kriging-believer fantasies).
      params0: ``GPParams`` to start the fit from (the previous round's, or ``gp.prior_mode``);
        used as they are when fewer than two rows are observed.
      key: PRNG key.
      cfg: static options. q: static batch size; ``cap >= used rows + q`` is the caller's duty.

    Returns:
      ``(x_new [q, d], params, RoundInfo)``.
    """
    d = x.shape[-1]
    dt = x.dtype
    lower, upper = _bounds(cfg, d, dt)
    bounded = cfg.has_bounds()
    k_fit, k_q = jax.random.split(key)

    ys, y_mean, y_std = gp.standardize(y, mask)
    n = jnp.sum(mask)
    params, loss = jax.lax.cond(
        n >= 2,
        lambda: gp.fit(x, ys, mask, params0, k_fit, cfg),
        lambda: (jax.tree.map(lambda a: jnp.asarray(a, dt), params0), jnp.full((), jnp.nan, dt)),
    )
    post0 = gp.posterior(x, ys, mask, params, cfg)
    c = gp.constrain(params, cfg)
    if cfg.beta_schedule == "igp_ucb":
        r = jnp.sqrt(c.noise) if cfg.igp_r is None else jnp.asarray(cfg.igp_r, dt)
        beta = acq.igp_ucb_beta(gp.information_gain(post0, cfg), r, cfg.igp_b, cfg.igp_delta)
    else:
        beta = jnp.asarray(cfg.beta, dt)
    best = jnp.max(jnp.where(mask, ys, -jnp.inf))
    best = jnp.where(n > 0, best, 0.0)
    believe = lambda xs: gp.predict(post0, xs, cfg)[0]

    # Pending rows join as fantasies valued at the posterior mean.
    ys = jnp.where(pending, believe(x), ys)
    used = mask | pending

    # local raw candidates: around the best observed ratios
    n_c = 4
    _, top_obs = jax.lax.top_k(jnp.where(mask, ys, -jnp.inf), min(n_c, x.shape[0]))
    best_row = top_obs[0]
    centers = x[jnp.where(mask[top_obs], top_obs, best_row)]
    signal_sd = jnp.sqrt(c.outputscale)
    # the uninformed-model fallback: a fit that explains the data as noise gives no direction
    snr = c.outputscale / c.noise  # the noise has a floor, so this is finite
    uninformed = (n >= 2) & (snr < cfg.explore_snr)
    # portfolio: its members in turn, by the number of observed + pending rows (a replay of the
    # same tells makes the same choices); any other acquisition is a portfolio of one
    members = cfg.portfolio if cfg.acquisition == "portfolio" else (cfg.acquisition,)
    member = jnp.sum(mask | pending) % len(members)
    scored = [m for m in members if m != "thompson"]  # members scored by the ascent
    scored_index = jnp.asarray([scored.index(m) if m in scored else 0 for m in members])[member]
    use_ts = jnp.asarray([m == "thompson" for m in members])[member]

    def member_score(name, mean, var):
        if name == "ucb":
            return acq.ucb(mean, var, beta)
        if name == "ei":
            return acq.ei(mean, var, best)
        return acq.log_ei(mean, var, best)

    def choose(carry, k):
        xb, yb, ub = carry
        post = gp.posterior(xb, yb, ub, params, cfg)

        def by_acquisition():
            def score(xs):
                mean, var = gp.predict(post, xs, cfg)
                if len(scored) == 1:
                    return member_score(scored[0], mean, var)
                return jnp.stack([member_score(m, mean, var) for m in scored])[scored_index]

            allowed = None
            if cfg.dedup_tol > 0:
                def allowed(xs):
                    dist = jnp.max(jnp.abs(xs[:, None, :] - xb[None, :, :]), axis=-1)
                    near = jnp.any((dist < cfg.dedup_tol) & ub[None, :], axis=-1)
                    _, var = gp.predict(post, xs, cfg)
                    worth = jnp.sqrt(var) >= cfg.dedup_sd * signal_sd
                    return ~near | worth

            return maximize_acquisition(score, k, d, cfg, lower, upper, allowed=allowed,
                                        centers=centers if cfg.raw_local else None)

        def by_thompson():  # in a mixed portfolio from its own stream; alone from k
            return _thompson(post, jax.random.fold_in(k, 1) if scored else k, d, cfg, lower, upper)

        if not scored:
            xj, vj = by_thompson()
        elif "thompson" not in members:
            xj, vj = by_acquisition()
        else:  # only the round's member runs (under vmap over seeds both do, as a select)
            xj, vj = jax.lax.cond(use_ts, by_thompson, by_acquisition)
        if cfg.explore_snr > 0:
            draw = initial_design(jax.random.fold_in(k, 2), 1, d, lower, upper, bounded, "dirichlet")[0]
            xj, vj = jnp.where(uninformed, draw, xj), jnp.where(uninformed, jnp.nan, vj)
        xj = apply_min_share(xj, cfg.min_share, cfg.renormalize_min_share, lower, upper, bounded)
        slot = jnp.sum(ub)
        carry = (xb.at[slot].set(xj), yb.at[slot].set(believe(xj[None])[0]), ub.at[slot].set(True))
        return carry, (xj, vj)

    _, (x_new, vals) = jax.lax.scan(choose, (x, ys, used), jax.random.split(k_q, q))
    explored = jnp.broadcast_to(uninformed & (cfg.explore_snr > 0), (q,))
    return x_new, params, RoundInfo(loss, beta, vals, y_mean, y_std, explored, snr)


@jit(static_argnames=("cfg", "q"))
def _propose_jit(x, y, mask, pending, params0, key, cfg: BOConfig, q: int):
    _TRACES["propose"] += 1
    return propose_core(x, y, mask, pending, params0, key, cfg, q)


def propose(x, y, mask, pending, params0, key, cfg: BOConfig, q: int = 1):
    """Jitted ``propose_core`` in float64: one compile per (capacity, dim, ``cfg.for_round()``, q)."""
    with x64():
        f64 = lambda a: jnp.asarray(a, jnp.float64)
        return _propose_jit(f64(x), f64(y), jnp.asarray(mask, bool), jnp.asarray(pending, bool),
                            jax.tree.map(f64, params0), key, cfg.for_round(), q)
