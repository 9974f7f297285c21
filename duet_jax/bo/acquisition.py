"""Acquisition functions: pure functions of the posterior mean and variance (maximised).

Conventions (as BoTorch's analytic acquisitions): ``var`` is the variance of the latent function,
sigma = sqrt(var); UCB = mu + sqrt(beta) * sigma; EI and LogEI measure improvement over ``best``.
Minimisation is handled by the caller, which negates the outputs before they reach the GP.

    >>> ucb(mean=jnp.zeros(3), var=jnp.ones(3), beta=4.0)   # mu + sqrt(4) * 1
    Array([2., 2., 2.], dtype=float32)
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.scipy.special import erfcx, ndtr

from duet_jax.bo.gp import cholesky_jittered

__all__ = ["ucb", "ei", "log_ei", "igp_ucb_beta", "thompson_sample"]

_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)
_LOG_SQRT_PI_2 = 0.5 * math.log(math.pi / 2.0)


def ucb(mean: jax.Array, var: jax.Array, beta) -> jax.Array:
    """Upper confidence bound ``mean + sqrt(beta) * sqrt(var)`` (elementwise)."""
    return mean + jnp.sqrt(beta) * jnp.sqrt(var)


def _phi(u):
    return jnp.exp(-0.5 * u * u - _LOG_SQRT_2PI)


def ei(mean: jax.Array, var: jax.Array, best) -> jax.Array:
    """Expected improvement E[max(f - best, 0)] = sigma * (phi(u) + u Phi(u)), u = (mu - best)/sigma."""
    sigma = jnp.sqrt(var)
    u = (mean - best) / sigma
    return sigma * (_phi(u) + u * ndtr(u))


def _log1mexp(x):
    """log(1 - exp(x)) for x < 0, accurate on both sides of -log 2."""
    return jnp.where(x > -math.log(2.0), jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


def _log_ei_helper(u):
    """log(phi(u) + u Phi(u)), accurate and with usable gradients for very negative u.

    For u > -1 the plain formula is fine. Below, it is log phi(u) + log(1 - exp(w)) with
    w = log(|u| Phi(u) / phi(u)) = log(erfcx(-u / sqrt 2) |u|) + log sqrt(pi / 2)
    (Ament et al. 2023, "Unexpected improvements to expected improvement"; BoTorch's LogEI).
    """
    bound = -1.0
    neg_inv_sqrt_eps = -1e6
    u_upper = jnp.where(u < bound, bound, u)
    log_upper = jnp.log(_phi(u_upper) + u_upper * ndtr(u_upper))
    u_lower = jnp.where(u > bound, bound, u)
    u_eps = jnp.where(u < neg_inv_sqrt_eps, neg_inv_sqrt_eps, u_lower)
    w = jnp.log(erfcx(-u_eps * _INV_SQRT2) * jnp.abs(u_eps)) + _LOG_SQRT_PI_2
    log_phi = -0.5 * u_lower * u_lower - _LOG_SQRT_2PI
    log_lower = log_phi + jnp.where(u > neg_inv_sqrt_eps, _log1mexp(w),
                                    -2.0 * jnp.log(jnp.abs(u_lower)))
    return jnp.where(u > bound, log_upper, log_lower)


def log_ei(mean: jax.Array, var: jax.Array, best) -> jax.Array:
    """log of expected improvement, accurate where EI underflows (LogEI)."""
    sigma = jnp.sqrt(var)
    return _log_ei_helper((mean - best) / sigma) + jnp.log(sigma)


def igp_ucb_beta(info_gain, noise_std, b: float, delta: float) -> jax.Array:
    """IGP-UCB (Chowdhury & Gopalan 2017): sqrt(beta_t) = B + R sqrt(2 (gamma_t + 1 + ln(1/delta))).

    ``info_gain`` is gamma_t, the information gain of the data seen so far (it grows with t);
    ``noise_std`` is R. Returns beta_t.
    """
    root = b + noise_std * jnp.sqrt(2.0 * (info_gain + 1.0 + math.log(1.0 / delta)))
    return root * root


def thompson_sample(key, mean: jax.Array, cov: jax.Array) -> jax.Array:
    """One joint draw from N(mean, cov) (``cov`` gets jitter when it is not numerically PD)."""
    L, _ = cholesky_jittered(cov)
    return mean + L @ jax.random.normal(key, mean.shape, mean.dtype)

