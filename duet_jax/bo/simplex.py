"""The feasible set of mixing ratios and points on it: projections, candidates, designs, min share.

The feasible set is {r : sum r = 1, lower <= r <= upper} (``lower = 0, upper = 1`` by default: the
probability simplex; a fixed domain has lower = upper). Functions take one ratio ``[d]`` unless they
say otherwise; batches are vmapped. ``bounded`` is a static flag: without bounds the projection is
optax's exact sort-based ``projection_simplex``; with bounds it is a bisection on the shift.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
from optax.projections import projection_simplex

__all__ = [
    "uniform_simplex",
    "project",
    "project_box_simplex",
    "structured_points",
    "face_draws",
    "raw_candidates",
    "initial_design",
    "apply_min_share",
]

_BISECTION_STEPS = 64


def uniform_simplex(key, n: int, d: int, dtype=jnp.float64) -> jax.Array:
    """``n`` draws from Dirichlet(1, ..., 1), the uniform distribution on the simplex: ``[n, d]``.

    Normalised Exponential(1) draws: the same distribution as ``jax.random.dirichlet`` with unit
    concentrations, without its Gamma rejection sampler (which takes seconds to compile).
    """
    e = jax.random.exponential(key, (n, d), dtype)
    return e / jnp.sum(e, axis=-1, keepdims=True)


def project_box_simplex(y: jax.Array, lower: jax.Array, upper: jax.Array) -> jax.Array:
    """Euclidean projection of ``y: [d]`` onto {r : sum r = 1, lower <= r <= upper}.

    The projection is clip(y - tau, lower, upper) for the tau at which it sums to one; the sum
    decreases in tau, so tau is found by bisection between max(y - lower) (sum = sum(lower) <= 1)
    and min(y - upper) (sum = sum(upper) >= 1). 64 halvings reach float64 resolution.
    """
    s = lambda t: jnp.sum(jnp.clip(y - t, lower, upper))

    def body(_, bracket):
        lo_t, hi_t = bracket
        mid = 0.5 * (lo_t + hi_t)
        above = s(mid) > 1.0
        return jnp.where(above, mid, lo_t), jnp.where(above, hi_t, mid)

    lo_t, hi_t = jax.lax.fori_loop(0, _BISECTION_STEPS, body,
                                   (jnp.min(y - upper), jnp.max(y - lower)))
    return jnp.clip(y - 0.5 * (lo_t + hi_t), lower, upper)


def project(y: jax.Array, lower: jax.Array, upper: jax.Array, bounded: bool) -> jax.Array:
    """Project ``y: [..., d]`` onto the feasible set, row by row."""
    if y.ndim > 1:
        return jax.vmap(lambda r: project(r, lower, upper, bounded))(y)
    if not bounded:
        return projection_simplex(y)
    return project_box_simplex(y, lower, upper)


def structured_points(d: int, dtype=jnp.float64) -> jax.Array:
    """The vertices, the edge midpoints and the centroid of the simplex: ``[d + d(d-1)/2 + 1, d]``."""
    eye = np.eye(d)
    mids = [0.5 * (eye[i] + eye[j]) for i, j in itertools.combinations(range(d), 2)]
    pts = np.concatenate([eye, np.asarray(mids).reshape(-1, d), np.full((1, d), 1.0 / d)])
    return jnp.asarray(pts, dtype)


def face_draws(key, n: int, d: int, dtype=jnp.float64) -> jax.Array:
    """``n`` uniform draws on random faces of the simplex: each domain is kept with probability
    1/2 (the largest of its exponential draw always), the rest zero: ``[n, d]``."""
    k1, k2 = jax.random.split(key)
    e = jax.random.exponential(k1, (n, d), dtype)
    keep = jax.random.bernoulli(k2, 0.5, (n, d)) | (e == jnp.max(e, axis=-1, keepdims=True))
    e = jnp.where(keep, e, 0.0)
    return e / jnp.sum(e, axis=-1, keepdims=True)


def raw_candidates(key, d: int, n_raw: int, lower, upper, bounded: bool, dtype=jnp.float64,
                   sparse: float = 0.0, centers: jax.Array | None = None, n_local: int = 0,
                   local_sd: float = 0.05):
    """Raw candidates of the acquisition search, projected onto the feasible set.

    ``n_raw`` draws: Dirichlet(1), a fraction ``sparse`` of them on random faces instead
    (``face_draws``); plus the structured points (vertices, edge midpoints, centroid); plus
    ``n_local`` Gaussian steps (sd ``local_sd``) around the rows of ``centers: [c, d]``.
    """
    n_face = int(round(sparse * n_raw))
    extra = n_face or (n_local and centers is not None)
    k1, k2, k3 = jax.random.split(key, 3) if extra else (key, None, None)
    parts = [uniform_simplex(k1, n_raw - n_face, d, dtype)]
    if n_face:
        parts.append(face_draws(k2, n_face, d, dtype))
    parts.append(structured_points(d, dtype))
    if n_local and centers is not None:
        c = centers[jnp.arange(n_local) % centers.shape[0]]
        parts.append(c + local_sd * jax.random.normal(k3, c.shape, dtype))
    return project(jnp.concatenate(parts), lower, upper, bounded)


def initial_design(key, n: int, d: int, lower, upper, bounded: bool, kind: str = "maximin",
                   x_seen: jax.Array | None = None, seen: jax.Array | None = None,
                   pool: int = 1024) -> jax.Array:
    """``n`` space-filling warm-start ratios ``[n, d]``.

    ``"maximin"``: greedy farthest-point selection from a pool of Dirichlet(1) draws, measuring
    distance also to the rows of ``x_seen: [cap, d]`` flagged in ``seen: [cap]`` (points already
    evaluated or pending). The first point with nothing seen is a random draw. ``"dirichlet"``:
    plain Dirichlet(1) draws.
    """
    dt = lower.dtype
    if kind == "dirichlet":
        return project(uniform_simplex(key, n, d, dt), lower, upper, bounded)
    cand = project(uniform_simplex(key, pool, d, dt), lower, upper, bounded)
    if x_seen is None:
        dmin = jnp.full((pool,), jnp.inf, dt)
    else:
        dist = jnp.sqrt(jnp.sum((cand[:, None, :] - x_seen[None, :, :]) ** 2, -1))  # [pool, cap]
        dmin = jnp.min(jnp.where(seen[None, :], dist, jnp.inf), axis=1)

    def pick(dmin, _):
        i = jnp.argmax(dmin)
        dmin = jnp.minimum(dmin, jnp.sqrt(jnp.sum((cand - cand[i]) ** 2, -1)))
        return dmin, cand[i]

    _, pts = jax.lax.scan(pick, dmin, None, length=n)
    return pts


def apply_min_share(x: jax.Array, min_share: float, renormalize: bool, lower, upper,
                    bounded: bool) -> jax.Array:
    """Zero the shares below ``min_share`` in ``x: [d]``, then (``renormalize``) rescale to sum 1.

    The largest share and domains with a positive lower bound are never zeroed. With bounds, the
    rescaled ratio is projected back inside them (zeroed domains pinned at 0); if the kept
    domains' upper bounds cannot reach a sum of one, ``x`` is returned unchanged.
    ``renormalize=False`` reproduces DUET's released code: the ratio then sums to less than one.
    """
    if isinstance(min_share, int | float) and min_share <= 0.0:
        return x  # off (a traced ``min_share`` takes the general path)
    keep = (x >= min_share) | (lower > 0) | (jnp.arange(x.shape[-1]) == jnp.argmax(x))
    x0 = jnp.where(keep, x, 0.0)
    if not renormalize:
        return x0
    x0 = x0 / jnp.sum(x0)
    if bounded:
        hi = jnp.where(keep, upper, 0.0)
        x0 = jnp.where(jnp.sum(hi) >= 1.0, project_box_simplex(x0, lower, hi), x)
    return x0
