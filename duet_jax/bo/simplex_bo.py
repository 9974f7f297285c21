"""``SimplexBO``: ask/tell Bayesian optimisation of a mixing ratio, for any training stack.

    from duet_jax.bo import SimplexBO

    opt = SimplexBO(dim=4, maximize=True, seed=0)
    for _ in range(20):
        r = opt.ask()[0]                   # [4], on the simplex
        opt.tell(r, train_and_evaluate(r)) # any scalar feedback
    ratio, value = opt.best()

The first asks return the space-filling warm start (``n_init`` points); later ones fit the GP and
maximise the acquisition. Inputs and outputs are numpy float64; JAX runs in float64 inside only.
Asked-but-not-told ratios are pending: later asks treat them as kriging-believer fantasies, so
asking again before telling returns a different ratio. ``state()`` / ``to_json()`` hold everything
(observations, pending ratios, fitted hyperparameters, the PRNG key), and ``from_json`` reloads an
optimiser that continues exactly as the original would.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from duet_jax.bo import gp
from duet_jax.bo.config import BOConfig
from duet_jax.bo.loop import capacity
from duet_jax.bo.optimize import _TRACES, RoundInfo, propose
from duet_jax.bo.runtime import jit, x64
from duet_jax.bo.simplex import apply_min_share, initial_design
from duet_jax.errors import BOError

__all__ = ["SimplexBO"]

_FORMAT = "duet_jax.bo.SimplexBO"
_VERSION = 1
_SUM_TOL = 1e-6  # told ratios must sum to one within this
_MATCH_TOL = 1e-3  # a told ratio this close (max abs share difference) to a pending one clears it


@jit(static_argnames=("n", "cfg"))
def _design_jit(key, n, x_seen, seen, lower, upper, cfg: BOConfig):
    _TRACES["design"] += 1
    pts = initial_design(key, n, x_seen.shape[-1], lower, upper, cfg.has_bounds(),
                         cfg.init_design, x_seen, seen)
    return jax.vmap(lambda r: apply_min_share(r, cfg.min_share, cfg.renormalize_min_share, lower,
                                              upper, cfg.has_bounds()))(pts)


@jit(static_argnames=("cfg",))
def _recommend_jit(x, y, mask, params0, key, cfg: BOConfig):
    """The GP's posterior mean at the observed rows (original units), fitted as a round fits."""
    _TRACES["recommend"] += 1
    ys, mu, sd = gp.standardize(y, mask)
    params, _ = gp.fit(x, ys, mask, params0, key, cfg)
    mean, var = gp.predict(gp.posterior(x, ys, mask, params, cfg), x, cfg)
    return mu + sd * mean, sd * jnp.sqrt(var)


def _float_or_str(v: float):
    return v if math.isfinite(v) else str(v)  # "nan", "inf", "-inf": JSON has no such numbers


class SimplexBO:
    """Bayesian optimisation over mixing ratios of ``dim`` domains (ask/tell).

    Args:
      dim: number of domains (>= 1; with 1 the only ratio is ``[1.0]``).
      maximize: True for feedback to maximise (accuracy, ratings), False for a loss.
      seed: PRNG seed; the same seed and the same tells give the same asks.
      config: a ``BOConfig``; keyword ``overrides`` replace its fields
        (``SimplexBO(5, acquisition="ei", min_share=0.05)``).
    """

    def __init__(self, dim: int, maximize: bool = True, seed: int = 0,
                 config: BOConfig | None = None, **overrides: Any):
        if not (isinstance(dim, int | np.integer) and dim >= 1):
            raise BOError(f"SimplexBO: dim must be an integer >= 1, got {dim!r}")
        cfg = config or BOConfig()
        if overrides:
            cfg = cfg.replace(**overrides)
        self.dim = int(dim)
        self.maximize = bool(maximize)
        self.seed = int(seed)
        self.config = cfg
        self._lower, self._upper = (np.asarray(b, np.float64) for b in cfg.bounds(self.dim))
        self._x = np.zeros((0, self.dim))
        self._y = np.zeros((0,))
        self._failed = np.zeros((0,), bool)
        self._pending = np.zeros((0, self.dim))
        self._params: gp.GPParams | None = None
        self._key = np.asarray(jax.random.PRNGKey(self.seed), np.uint32)
        self.last_round: RoundInfo | None = None

    # -- properties ----------------------------------------------------------------------------

    @property
    def n_init(self) -> int:
        return self.config.resolved_n_init(self.dim)

    @property
    def n_observations(self) -> int:
        """Told evaluations, failed ones included."""
        return len(self._y)

    @property
    def pending(self) -> np.ndarray:
        """Ratios asked and not yet told, ``[p, dim]``."""
        return self._pending.copy()

    def clear_pending(self) -> None:
        """Forget the asked-but-not-told ratios (for asks that will never be told)."""
        self._pending = np.zeros((0, self.dim))

    def history(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(ratios [n, dim], values [n], failed [n])`` in the order told."""
        return self._x.copy(), self._y.copy(), self._failed.copy()

    # -- ask -----------------------------------------------------------------------------------

    def _next_key(self) -> jax.Array:
        key, sub = jax.random.split(jnp.asarray(self._key))
        self._key = np.asarray(key, np.uint32)
        return sub

    def ask(self, n: int = 1) -> np.ndarray:
        """The next ``n`` ratios to evaluate, ``[n, dim]`` (rows sum to one, unless
        ``renormalize_min_share=False`` zeroed small shares)."""
        if not (isinstance(n, int | np.integer) and n >= 1):
            raise BOError(f"ask: n must be an integer >= 1, got {n!r}")
        n = int(n)
        if self.dim == 1:
            out = np.ones((n, 1))
        else:
            with x64():
                out = self._ask(n)
        self._pending = np.concatenate([self._pending, out])
        return out.copy()

    def _ask(self, n: int) -> np.ndarray:
        cfg = self.config
        valid = ~self._failed
        n_valid = int(valid.sum())
        n_design = n if n_valid == 0 else min(n, max(0, self.n_init - n_valid - len(self._pending)))
        key = self._next_key()
        k_design, k_gp = jax.random.split(key)
        parts = []
        if n_design:
            seen = np.concatenate([self._x, self._pending])
            cap = capacity(len(seen), cfg.min_capacity)
            xs = np.zeros((cap, self.dim))
            xs[: len(seen)] = seen
            pts = _design_jit(k_design, n_design, jnp.asarray(xs), jnp.arange(cap) < len(seen),
                              jnp.asarray(self._lower), jnp.asarray(self._upper), cfg)
            parts.append(np.asarray(pts, np.float64))
        n_gp = n - n_design
        if n_gp:
            pend = np.concatenate([self._pending] + parts)
            xv = self._x[valid]
            sign = 1.0 if self.maximize else -1.0
            n_used = len(xv) + len(pend)
            cap = capacity(n_used + n_gp, cfg.min_capacity)
            x = np.zeros((cap, self.dim))
            x[: len(xv)] = xv
            x[len(xv): n_used] = pend
            y = np.zeros(cap)
            y[: len(xv)] = sign * self._y[valid]
            idx = np.arange(cap)
            params0 = self._params or gp.prior_mode(self.dim, cfg)
            xn, params, info = propose(x, y, idx < len(xv), (idx >= len(xv)) & (idx < n_used),
                                       params0, k_gp, cfg, n_gp)
            if n_valid >= 2:  # the fit ran: keep it as the next round's first start
                self._params = gp.GPParams(*(np.asarray(a, np.float64) for a in params))
            self.last_round = jax.tree.map(np.asarray, info)
            parts.append(np.asarray(xn, np.float64))
        return np.concatenate(parts)

    # -- tell ----------------------------------------------------------------------------------

    def tell(self, ratios, values) -> None:
        """Record evaluations: ``ratios [n, dim]`` (or one ``[dim]``) and ``values [n]`` (or one).

        Non-finite values raise a BOError, or (``on_nonfinite="record"``) are kept as failed
        evaluations that the GP does not see. Nothing is recorded when any check fails.
        """
        r = np.asarray(ratios, dtype=np.float64)
        if r.ndim == 1:
            r = r[None, :]
        v = np.atleast_1d(np.asarray(values, dtype=np.float64))
        if r.ndim != 2 or r.shape[1] != self.dim:
            raise BOError(f"tell: ratios must have shape [n, {self.dim}] or [{self.dim}], "
                          f"got {np.shape(ratios)}")
        if v.ndim != 1 or len(v) != len(r):
            raise BOError(f"tell: expected {len(r)} value(s) for {len(r)} ratio(s), got shape "
                          f"{np.shape(values)}")
        if not np.all(np.isfinite(r)):
            raise BOError("tell: ratios contain NaN or infinity")
        if np.any(r < -1e-9):
            raise BOError(f"tell: ratios must be non-negative, got a share of {r.min():.3g}")
        sums = r.sum(axis=1)
        legacy = self.config.min_share > 0 and not self.config.renormalize_min_share
        bad = (sums > 1 + _SUM_TOL) | (sums <= 0) if legacy else np.abs(sums - 1) > _SUM_TOL
        if np.any(bad):
            raise BOError(f"tell: ratios must sum to 1 (within {_SUM_TOL}), got sums "
                          f"{sums[bad][:5].tolist()}")
        failed = ~np.isfinite(v)
        if np.any(failed) and self.config.on_nonfinite == "raise":
            raise BOError(f"tell: feedback must be finite, got {v[failed][:5].tolist()} "
                          f"(pass on_nonfinite='record' to keep such evaluations as failed)")
        r = np.maximum(r, 0.0)
        for row in r:
            if len(self._pending):
                dist = np.max(np.abs(self._pending - row), axis=1)
                i = int(np.argmin(dist))
                if dist[i] <= _MATCH_TOL:
                    self._pending = np.delete(self._pending, i, axis=0)
        self._x = np.concatenate([self._x, r])
        self._y = np.concatenate([self._y, v])
        self._failed = np.concatenate([self._failed, failed])

    # -- results -------------------------------------------------------------------------------

    def best(self) -> tuple[np.ndarray, float]:
        """The best told ``(ratio [dim], value)`` (failed evaluations excluded)."""
        ok = np.flatnonzero(~self._failed)
        if len(ok) == 0:
            raise BOError("best: no successful evaluation has been told yet")
        vals = self._y[ok]
        i = ok[int(np.argmax(vals) if self.maximize else np.argmin(vals))]
        return self._x[i].copy(), float(self._y[i])

    def recommend(self) -> tuple[np.ndarray, float, float]:
        """The told ratio to deploy under noisy feedback: ``(ratio [dim], mean, sd)``, the
        successful evaluation whose GP posterior mean is best (BoTorch's "best in-sample posterior
        mean"), with that mean and its posterior sd in the feedback's units.

        ``best()`` returns the largest told value, which with noisy feedback is the maximum of
        noisy draws, biased upward, most where many evaluations sit close together; the posterior
        mean pools each evaluation with its neighbours. The fit is a fresh one on every successful
        evaluation (the same prior, restarts and steps as a round) from a key of its own, so calling
        this changes no later ask. With fewer than 3 successful evaluations it is ``best()`` (its
        value, sd 0): too few to fit.
        """
        ok = np.flatnonzero(~self._failed)
        if len(ok) < 3:
            r, v = self.best()
            return r, v, 0.0
        cfg = self.config
        sign = 1.0 if self.maximize else -1.0
        cap = capacity(len(ok), cfg.min_capacity)
        x = np.zeros((cap, self.dim))
        x[: len(ok)] = self._x[ok]
        y = np.zeros(cap)
        y[: len(ok)] = sign * self._y[ok]
        mask = np.arange(cap) < len(ok)
        key = jax.random.fold_in(jax.random.PRNGKey(self.seed), 7_000_003)  # not the ask stream
        with x64():
            params0 = self._params or gp.prior_mode(self.dim, cfg)
            f64 = lambda a: jnp.asarray(a, jnp.float64)  # noqa: E731
            mean, sd = _recommend_jit(f64(x), f64(y), jnp.asarray(mask), jax.tree.map(f64, params0), key,
                                      cfg.for_round())
        mean, sd = np.asarray(mean)[: len(ok)], np.asarray(sd)[: len(ok)]
        i = int(np.argmax(mean))
        return self._x[ok[i]].copy(), float(sign * mean[i]), float(sd[i])

    # -- state ---------------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """Everything needed to continue, as JSON-ready Python values."""
        p = self._params
        return {
            "format": _FORMAT,
            "version": _VERSION,
            "dim": self.dim,
            "maximize": self.maximize,
            "seed": self.seed,
            "config": self.config.to_dict(),
            "x": self._x.tolist(),
            "y": [_float_or_str(float(v)) for v in self._y],
            "failed": self._failed.tolist(),
            "pending": self._pending.tolist(),
            "params": None if p is None else {k: np.asarray(a).tolist()
                                              for k, a in p._asdict().items()},
            "key": [int(k) for k in self._key],
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> SimplexBO:
        if state.get("format") != _FORMAT or state.get("version") != _VERSION:
            raise BOError(f"SimplexBO.from_state: expected format {_FORMAT!r} version "
                          f"{_VERSION}, got {state.get('format')!r} version "
                          f"{state.get('version')!r}")
        cfg = BOConfig.from_dict(state["config"])
        opt = cls(state["dim"], maximize=state["maximize"], seed=state["seed"], config=cfg)
        d = opt.dim
        opt._x = np.asarray(state["x"], np.float64).reshape(-1, d)
        opt._y = np.asarray([float(v) for v in state["y"]], np.float64)
        opt._failed = np.asarray(state["failed"], bool).reshape(-1)
        opt._pending = np.asarray(state["pending"], np.float64).reshape(-1, d)
        if not len(opt._x) == len(opt._y) == len(opt._failed):
            raise BOError("SimplexBO.from_state: x, y and failed have different lengths")
        if state["params"] is not None:
            opt._params = gp.GPParams(**{k: np.asarray(v, np.float64)
                                         for k, v in state["params"].items()})
        opt._key = np.asarray(state["key"], np.uint32)
        return opt

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.state(), **kwargs)

    @classmethod
    def from_json(cls, text: str) -> SimplexBO:
        return cls.from_state(json.loads(text))

    def save(self, path) -> None:
        Path(path).write_text(self.to_json(indent=1))

    @classmethod
    def load(cls, path) -> SimplexBO:
        return cls.from_json(Path(path).read_text())

    def __repr__(self) -> str:
        return (f"SimplexBO(dim={self.dim}, maximize={self.maximize}, seed={self.seed}, "
                f"observations={self.n_observations}, pending={len(self._pending)})")
