"""Exact GP regression on padded data: kernels, priors, marginal likelihood, fit, posterior.

Shapes: ``x: [cap, d]`` inputs, ``y: [cap]`` standardised outputs, ``mask: [cap]`` (True for a
real row). Rows past the data are padding: they are decoupled from the rest (zero covariance, unit
variance, zero residual), so the log marginal likelihood and the posterior are exactly those of the
real rows, and data of any size up to ``cap`` reuses one compiled program.

Everything here runs in float64: call it with x64 enabled (``with duet_jax.bo.x64():``), as
``SimplexBO`` and the ``propose`` / ``run`` entry points do; x64 stays off for the rest of duet-jax.

Parameters are unconstrained (``GPParams``): length scale = floor + exp(raw), output scale =
exp(raw) (fixed to 1 under the ``lognormal`` prior, as BoTorch >= 0.12 has no output scale), noise
variance = floor + exp(raw), and a constant mean (BoTorch's ConstantMean).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.scipy.linalg import cho_solve, solve_triangular
from tensorflow_probability.substrates.jax.math import psd_kernels as tfpk

from duet_jax.bo.config import BOConfig
from duet_jax.bo.runtime import x64

__all__ = [
    "x64",
    "GPParams",
    "Constrained",
    "constrain",
    "Posterior",
    "kernel_matrix",
    "cholesky_jittered",
    "standardize",
    "prior_mode",
    "sample_prior",
    "log_prior",
    "log_marginal_likelihood",
    "objective",
    "fit",
    "posterior",
    "predict",
    "information_gain",
]

_LOG_2PI = math.log(2.0 * math.pi)


class GPParams(NamedTuple):
    """Unconstrained GP hyperparameters (a pytree; a leading axis stacks several starts)."""

    raw_lengthscale: jax.Array  # [d]
    raw_outputscale: jax.Array  # []
    raw_noise: jax.Array  # []
    mean: jax.Array  # [] constant mean, standardised units


class Constrained(NamedTuple):
    lengthscale: jax.Array  # [d]
    outputscale: jax.Array  # [] signal variance
    noise: jax.Array  # [] noise variance


def constrain(p: GPParams, cfg: BOConfig) -> Constrained:
    """Length scales, signal variance and noise variance from the unconstrained parameters."""
    dt = p.raw_lengthscale.dtype
    ls = jnp.asarray(cfg.lengthscale_floor, dt) + jnp.exp(p.raw_lengthscale)
    if cfg.prior == "lognormal":
        os_ = jnp.ones((), dt) + 0.0 * p.raw_outputscale
    else:
        os_ = jnp.exp(p.raw_outputscale)
    noise = jnp.asarray(cfg.noise_floor, dt) + jnp.exp(p.raw_noise)
    return Constrained(ls, os_, noise)


def _unconstrain(ls, os_, noise, mean, cfg: BOConfig) -> GPParams:
    # Values below the floors are clamped a little above them.
    raw_ls = jnp.log(jnp.maximum(ls - cfg.lengthscale_floor, 1e-6))
    raw_noise = jnp.log(jnp.maximum(noise - cfg.noise_floor, 1e-9))
    return GPParams(raw_ls, jnp.log(os_), raw_noise, mean)


# -- kernel ------------------------------------------------------------------------------------


def make_kernel(c: Constrained, cfg: BOConfig) -> tfpk.PositiveSemidefiniteKernel:
    """TFP kernel with ARD: a unit-length-scale base kernel on inputs divided by the length scales.

    Parameters are arrays of the inputs' dtype (a Python float would make TFP build a float32
    kernel). TFP's amplitude is the square root of the signal variance.
    """
    amplitude = jnp.sqrt(c.outputscale)
    base = (tfpk.MaternFiveHalves(amplitude=amplitude) if cfg.kernel == "matern52"
            else tfpk.ExponentiatedQuadratic(amplitude=amplitude))
    return tfpk.FeatureScaled(base, scale_diag=c.lengthscale)


def kernel_matrix(x1: jax.Array, x2: jax.Array, c: Constrained, cfg: BOConfig) -> jax.Array:
    """k(x1, x2): ``[n, d] x [m, d] -> [n, m]``."""
    return make_kernel(c, cfg).matrix(x1, x2)


# -- linear algebra ----------------------------------------------------------------------------


def cholesky_jittered(a: jax.Array, max_tries: int = 8) -> tuple[jax.Array, jax.Array]:
    """Lower Cholesky factor of ``a``, adding jitter to the diagonal only when needed.

    Tries no jitter first, then ``1e-10 * 10**i`` times the mean diagonal (i = 0..max_tries-1)
    until the factor is finite. The search runs on ``stop_gradient(a)`` in a while loop; the factor
    that is returned is computed again outside it, so it is differentiable in ``a``.

    Returns:
      ``(L, jitter)`` with ``L @ L.T == a + jitter * I``.
    """
    a0 = jax.lax.stop_gradient(a)
    eye = jnp.eye(a.shape[-1], dtype=a.dtype)
    scale = jnp.mean(jnp.diag(a0))

    def ok(jit):
        return jnp.all(jnp.isfinite(jnp.linalg.cholesky(a0 + jit * eye)))

    def body(state):
        i, _ = state
        return i + 1, scale * 1e-10 * 10.0 ** i.astype(a.dtype)

    def cond(state):
        i, jit = state
        return (i < max_tries) & ~ok(jit)

    _, jitter = jax.lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), jnp.zeros((), a.dtype)))
    return jnp.linalg.cholesky(a + jitter * eye), jitter


# -- data --------------------------------------------------------------------------------------


def standardize(y: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(y - mean) / std`` over the real rows (padding set to 0).

    std uses ddof=1, like BoTorch's Standardize; with fewer than two rows, or equal values, std = 1.
    Returns ``(y_standardised, mean, std)``.
    """
    m = mask.astype(y.dtype)
    n = jnp.sum(m)
    yv = jnp.where(mask, y, 0.0)
    mu = jnp.sum(yv) / jnp.maximum(n, 1.0)
    var = jnp.sum(m * (yv - mu) ** 2) / jnp.maximum(n - 1.0, 1.0)
    std = jnp.sqrt(var)
    std = jnp.where((n < 2) | (std < 1e-12 * jnp.maximum(jnp.abs(mu), 1.0)), 1.0, std)
    return jnp.where(mask, (yv - mu) / std, 0.0), mu, std


def _masked_cov(x, mask, c: Constrained, cfg: BOConfig):
    """K + noise I on real rows; identity on padding rows."""
    m = mask.astype(x.dtype)
    k = kernel_matrix(x, x, c, cfg) * (m[:, None] * m[None, :])
    return k + jnp.diag(m * c.noise + (1.0 - m))


# -- priors ------------------------------------------------------------------------------------


def _gamma_logpdf(x, a, b):
    return a * jnp.log(b) - jax.scipy.special.gammaln(a) + (a - 1.0) * jnp.log(x) - b * x


def _lognormal_logpdf(x, loc, scale):
    z = (jnp.log(x) - loc) / scale
    return -jnp.log(x) - jnp.log(scale) - 0.5 * _LOG_2PI - 0.5 * z * z


def _lognormal_ls_loc(d: int) -> float:
    return math.sqrt(2.0) + 0.5 * math.log(d)


def log_prior(p: GPParams, cfg: BOConfig) -> jax.Array:
    """Log density of the priors on the constrained values (as GPyTorch: no Jacobian term)."""
    c = constrain(p, cfg)
    d = p.raw_lengthscale.shape[-1]
    if cfg.prior == "gamma":
        a, b = cfg.lengthscale_gamma
        return (jnp.sum(_gamma_logpdf(c.lengthscale, a, b))
                + _gamma_logpdf(c.outputscale, 2.0, 0.15)
                + _gamma_logpdf(c.noise, 1.1, 0.05))
    return (jnp.sum(_lognormal_logpdf(c.lengthscale, _lognormal_ls_loc(d), math.sqrt(3.0)))
            + _lognormal_logpdf(c.noise, -4.0, 1.0))


def prior_mode(d: int, cfg: BOConfig, dtype=jnp.float64) -> GPParams:
    """The priors' modes (BoTorch's initial values): the fit's first start with no history."""
    if cfg.prior == "gamma":
        a, b = cfg.lengthscale_gamma
        ls, os_, noise = max(a - 1.0, 0.5) / b, 1.0 / 0.15, 0.1 / 0.05
    else:
        ls, os_, noise = math.exp(_lognormal_ls_loc(d) - 3.0), 1.0, math.exp(-4.0 - 1.0)
    ls = max(ls, 2.0 * cfg.lengthscale_floor)
    noise = max(noise, 2.0 * cfg.noise_floor)
    f = lambda v: jnp.asarray(v, dtype)
    return _unconstrain(jnp.full((d,), ls, dtype), f(os_), f(noise), f(0.0), cfg)


def _lognormal_matching_gamma(a: float, b: float) -> tuple[float, float]:
    """(loc, scale) of the log-normal with the mean and variance of Gamma(a, rate b)."""
    s2 = math.log1p(1.0 / a)
    return math.log(a / b) - 0.5 * s2, math.sqrt(s2)


def sample_prior(key: jax.Array, n: int, d: int, cfg: BOConfig, dtype=jnp.float64) -> GPParams:
    """``n`` random starts of the fit near the priors (stacked on a leading axis).

    Under the ``gamma`` prior the draws come from log-normals with the Gamma priors' mean and
    variance: only starting points, and JAX's Gamma rejection sampler takes seconds to compile.
    """
    k1, k2, k3 = jax.random.split(key, 3)
    if cfg.prior == "gamma":
        (ls_m, ls_s), (os_m, os_s), (nz_m, nz_s) = (
            _lognormal_matching_gamma(*cfg.lengthscale_gamma), _lognormal_matching_gamma(2.0, 0.15),
            _lognormal_matching_gamma(1.1, 0.05))
    else:
        (ls_m, ls_s), (os_m, os_s), (nz_m, nz_s) = (
            (_lognormal_ls_loc(d), math.sqrt(3.0)), (0.0, 0.0), (-4.0, 1.0))
    ls = jnp.exp(ls_m + ls_s * jax.random.normal(k1, (n, d), dtype))
    os_ = jnp.exp(os_m + os_s * jax.random.normal(k2, (n,), dtype))
    noise = jnp.exp(nz_m + nz_s * jax.random.normal(k3, (n,), dtype))
    # Keep the starts in a sensible range: very long or very short scales start flat regions.
    ls = jnp.clip(ls, 2.0 * cfg.lengthscale_floor, 10.0)
    noise = jnp.clip(noise, 2.0 * cfg.noise_floor, 1.0)
    os_ = jnp.clip(os_, 0.05, 20.0)
    return jax.vmap(lambda a, b, c: _unconstrain(a, b, c, jnp.zeros((), dtype), cfg))(ls, os_, noise)


# -- marginal likelihood and fit ---------------------------------------------------------------


def log_marginal_likelihood(p: GPParams, x, y, mask, cfg: BOConfig) -> jax.Array:
    """log N(y | mean, K + noise I) over the real rows (``y`` standardised, padding ignored)."""
    c = constrain(p, cfg)
    m = mask.astype(x.dtype)
    r = (y - p.mean) * m
    # No jitter search here: the noise floor keeps the matrix positive definite, and this runs
    # under grad and vmap in every fit step, where a search loop would double the cost. A start
    # that still fails turns NaN and is dropped by ``fit``.
    L = jnp.linalg.cholesky(_masked_cov(x, mask, c, cfg))
    alpha = cho_solve((L, True), r)
    return (-0.5 * jnp.dot(r, alpha) - jnp.sum(jnp.log(jnp.diag(L)))
            - 0.5 * jnp.sum(m) * _LOG_2PI)


def objective(p: GPParams, x, y, mask, cfg: BOConfig) -> jax.Array:
    """The fit's loss: -(log marginal likelihood + log prior) (MAP, as fit_gpytorch_mll)."""
    return -(log_marginal_likelihood(p, x, y, mask, cfg) + log_prior(p, cfg))


def fit(x, y, mask, init: GPParams, key, cfg: BOConfig) -> tuple[GPParams, jax.Array]:
    """MAP hyperparameters by Adam from ``cfg.fit_restarts`` starts at once (vmap over starts).

    Starts: ``init`` (the previous round's fit or the prior's mode) and prior draws. Each runs
    ``cfg.fit_steps`` steps of Adam with a cosine-decayed learning rate inside ``lax.scan``; the
    start with the lowest final loss wins (a start that turned NaN never does).

    Returns ``(params, loss)``.
    """
    d = x.shape[-1]
    starts = sample_prior(key, cfg.fit_restarts, d, cfg, x.dtype)
    init = jax.tree.map(lambda a: jnp.asarray(a, x.dtype), init)
    starts = jax.tree.map(lambda s, i: s.at[0].set(i), starts, init)

    sched = optax.cosine_decay_schedule(cfg.fit_lr, cfg.fit_steps, alpha=0.1)
    tx = optax.adam(sched)
    loss_fn = lambda p: objective(p, x, y, mask, cfg)

    def run_one(p0):
        def step(carry, _):
            p, s = carry
            g = jax.grad(loss_fn)(p)
            u, s = tx.update(g, s, p)
            return (optax.apply_updates(p, u), s), None

        (p, _), _ = jax.lax.scan(step, (p0, tx.init(p0)), None, length=cfg.fit_steps)
        return p, loss_fn(p)

    ps, losses = jax.vmap(run_one)(starts)
    losses = jnp.where(jnp.isfinite(losses), losses, jnp.inf)
    best = jnp.argmin(losses)
    return jax.tree.map(lambda a: a[best], ps), losses[best]


# -- posterior ---------------------------------------------------------------------------------


class Posterior(NamedTuple):
    """A GP conditioned on padded data, ready to predict (standardised units)."""

    x: jax.Array  # [cap, d]
    mask: jax.Array  # [cap]
    params: GPParams
    chol: jax.Array  # [cap, cap] lower factor of K + noise I (identity on padding)
    alpha: jax.Array  # [cap] (K + noise I)^-1 (y - mean), zero on padding
    jitter: jax.Array  # []


def posterior(x, y, mask, p: GPParams, cfg: BOConfig) -> Posterior:
    """Condition the GP with hyperparameters ``p`` on the real rows of ``(x, y)``."""
    c = constrain(p, cfg)
    r = (y - p.mean) * mask.astype(x.dtype)
    L, jitter = cholesky_jittered(_masked_cov(x, mask, c, cfg))
    return Posterior(x, mask, p, L, cho_solve((L, True), r), jitter)


def predict(post: Posterior, xs: jax.Array, cfg: BOConfig, full_cov: bool = False):
    """Posterior of the latent function at ``xs: [m, d]``.

    Returns ``(mean [m], var [m])``, or ``(mean [m], cov [m, m])`` with ``full_cov``.
    """
    c = constrain(post.params, cfg)
    ks = kernel_matrix(xs, post.x, c, cfg) * post.mask.astype(xs.dtype)[None, :]  # [m, cap]
    mean = post.params.mean + ks @ post.alpha
    v = solve_triangular(post.chol, ks.T, lower=True)  # [cap, m]
    if full_cov:
        return mean, kernel_matrix(xs, xs, c, cfg) - v.T @ v
    var = c.outputscale - jnp.sum(v * v, axis=0)
    return mean, jnp.maximum(var, 1e-12 * c.outputscale)


def information_gain(post: Posterior, cfg: BOConfig) -> jax.Array:
    """gamma = 1/2 log det(I + K / noise) over the real rows (IGP-UCB's information gain)."""
    c = constrain(post.params, cfg)
    n = jnp.sum(post.mask.astype(post.x.dtype))
    return jnp.sum(jnp.log(jnp.diag(post.chol))) - 0.5 * n * jnp.log(c.noise)
