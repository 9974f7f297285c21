"""The whole BO loop inside jit, for objectives written in jnp (synthetic benchmarks, simulations).

``run`` evaluates a warm-start design, then runs ``n_evals - n_init`` rounds of ``propose_core`` in a
``lax.scan`` at one fixed capacity, and vmaps that over seeds: one compile, all seeds at once.
``random_search`` is the baseline on the same footing. (``SimplexBO`` is the host-side ask/tell
loop for objectives that are not jnp functions; both use the same ``propose_core``.)
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from duet_jax.bo import gp
from duet_jax.bo.config import BOConfig
from duet_jax.bo.optimize import _TRACES, propose_core
from duet_jax.bo.runtime import jit, x64
from duet_jax.bo.simplex import apply_min_share, initial_design, project, uniform_simplex
from duet_jax.bo.synthetic import SimplexFunction, evaluate
from duet_jax.errors import BOError

__all__ = ["capacity", "run", "random_search", "simple_regret"]


def capacity(n: int, minimum: int = 16) -> int:
    """Padded data size for ``n`` rows: the next power of two, at least ``minimum``."""
    return max(minimum, 1 << max(0, int(n) - 1).bit_length())


def _postprocess(xs, cfg: BOConfig, lower, upper):
    return jax.vmap(lambda r: apply_min_share(r, cfg.min_share, cfg.renormalize_min_share, lower,
                                              upper, cfg.has_bounds()))(xs)


def _objective(objective, params):
    return (lambda x: objective(x)) if params is None else (lambda x: objective(params, x))


def _run_one(key, params, objective, d, n_evals, n_init, maximize, cfg: BOConfig,
             noise_sd: float = 0.0):
    f_true = _objective(objective, params)
    k_noise, key = jax.random.split(key) if noise_sd > 0 else (None, key)

    def f(xs, k=None):
        v = f_true(xs)
        if noise_sd > 0:
            v = v + noise_sd * jax.random.normal(k, jnp.shape(v), v.dtype)
        return v

    dt = jnp.float64
    cap = capacity(n_evals, cfg.min_capacity)
    lo, hi = (jnp.asarray(b, dt) for b in cfg.bounds(d))
    sign = 1.0 if maximize else -1.0
    k_init, k_loop = jax.random.split(key)
    x0 = initial_design(k_init, n_init, d, lo, hi, cfg.has_bounds(), cfg.init_design)
    x0 = _postprocess(x0, cfg, lo, hi)
    x = jnp.zeros((cap, d), dt).at[:n_init].set(x0)
    noise_keys = (jax.random.split(k_noise, n_evals) if noise_sd > 0
                  else jnp.zeros((n_evals, 2), jnp.uint32))
    y = jnp.zeros((cap,), dt).at[:n_init].set(sign * f(x0, noise_keys[0]))
    mask = jnp.arange(cap) < n_init
    no_pending = jnp.zeros((cap,), bool)
    round_cfg = cfg.for_round()

    def one_round(carry, k):
        x, y, mask, params = carry
        xn, params, info = propose_core(x, y, mask, no_pending, params, k, round_cfg, 1)
        i = jnp.sum(mask)
        x = x.at[i].set(xn[0])
        y = y.at[i].set(sign * f(xn[0], noise_keys[i]))
        return (x, y, mask.at[i].set(True), params), info

    carry = (x, y, mask, gp.prior_mode(d, cfg, dt))
    (x, y, _, _), info = jax.lax.scan(one_round, carry, jax.random.split(k_loop, n_evals - n_init))
    return x[:n_evals], sign * y[:n_evals], info


@jit(static_argnames=("objective", "d", "n_evals", "n_init", "maximize", "cfg", "noise_sd"))
def _run_jit(keys, params, objective, d, n_evals, n_init, maximize, cfg, noise_sd=0.0):
    _TRACES["run"] += 1
    return jax.vmap(lambda k: _run_one(k, params, objective, d, n_evals, n_init, maximize,
                                       cfg, noise_sd))(keys)


def _split_objective(objective, params):
    if isinstance(objective, SimplexFunction):  # its parameters travel as traced arguments
        return evaluate, objective.params
    return objective, params


def run(objective: Callable, dim: int, n_evals: int, seeds, *, params=None, maximize: bool = True,
        n_init: int | None = None, config: BOConfig | None = None, noise_sd: float = 0.0,
        return_info: bool = False):
    """BO on a jnp objective for several seeds at once, the whole loop in one compiled program.

    Args:
      objective: ``f(x) -> value`` for ``x: [d]`` (also called on ``[n, d]``), jnp and hashable
        (a module-level function); or ``f(params, x)`` when ``params`` (a pytree of arrays, traced,
        so new values do not recompile) is given. A ``SimplexFunction`` passes its own parameters,
        so all synthetic functions of one dimension share one compile.
      dim: number of domains. n_evals: evaluations per seed, warm start included.
      seeds: integer seeds; seed s uses ``jax.random.PRNGKey(s)``.
      maximize: False to minimise.
      n_init: warm-start size (default ``config.resolved_n_init(dim)``).
      noise_sd: standard deviation of Gaussian noise added to every observation (the optimiser
        sees the noisy values; ``y`` returned is what it saw: evaluate ``objective`` on ``x`` for
        the noise-free values).
      return_info: also return the rounds' ``RoundInfo`` (numpy, leading axes ``[seeds, rounds]``,
        one round per evaluation after the warm start), e.g. its ``explored`` and ``snr``.

    Returns:
      ``(x [seeds, n_evals, dim], y [seeds, n_evals])`` as float64 numpy arrays, and the info
      when asked for.
    """
    cfg = config or BOConfig()
    n_init = cfg.resolved_n_init(dim) if n_init is None else n_init
    if dim < 2:
        raise BOError(f"run: needs dim >= 2 (with one domain the only ratio is [1.0]), got {dim}")
    if not 1 <= n_init <= n_evals:
        raise BOError(f"run: needs 1 <= n_init <= n_evals, got n_init={n_init}, "
                      f"n_evals={n_evals}")
    objective, params = _split_objective(objective, params)
    with x64():
        keys = jnp.stack([jax.random.PRNGKey(int(s)) for s in seeds])
        x, y, info = _run_jit(keys, params, objective, dim, n_evals, n_init, maximize, cfg,
                              float(noise_sd))
        x, y = np.asarray(x), np.asarray(y)
        if return_info:
            return x, y, jax.tree.map(np.asarray, info)
        return x, y


def random_search(objective: Callable, dim: int, n_evals: int, seeds, *, params=None,
                  config: BOConfig | None = None):
    """Dirichlet(1) ratios (made feasible as BO's are); arguments and returns as ``run``."""
    cfg = config or BOConfig()
    objective, params = _split_objective(objective, params)
    f = _objective(objective, params)
    with x64():
        lo, hi = (jnp.asarray(b) for b in cfg.bounds(dim))

        @jax.vmap
        def one(key):
            xs = uniform_simplex(key, n_evals, dim)
            xs = _postprocess(project(xs, lo, hi, cfg.has_bounds()), cfg, lo, hi)
            return xs, f(xs)

        # Keys offset from BO's so the two do not share draws.
        keys = jnp.stack([jax.random.PRNGKey(10_000 + int(s)) for s in seeds])
        x, y = jax.jit(one)(keys)
        return np.asarray(x), np.asarray(y)


def simple_regret(y: np.ndarray, f_max: float, maximize: bool = True) -> np.ndarray:
    """Simple regret after each evaluation: ``f_max - running best`` (``[..., n]``)."""
    if maximize:
        return f_max - np.maximum.accumulate(y, axis=-1)
    return np.minimum.accumulate(y, axis=-1) - f_max
