"""Options of the simplex Bayesian optimiser: one frozen, keyword-only dataclass.

Every field is a plain Python value (bounds are tuples), so a config is hashable and is passed to
the jitted functions as a static argument, and it serialises to JSON as a dict.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

from duet_jax.errors import BOError, ConfigError

__all__ = ["BOConfig", "BO_PROFILES", "ADDED_FIELDS", "without_neutral", "KERNELS", "PRIORS", "ACQUISITIONS", "BETA_SCHEDULES"]

KERNELS = ("matern52", "rbf")
PRIORS = ("gamma", "lognormal")
ACQUISITIONS = ("ucb", "ei", "logei", "thompson", "portfolio")
PORTFOLIO_MEMBERS = ("logei", "ei", "ucb", "thompson")
BETA_SCHEDULES = ("constant", "igp_ucb")
INIT_DESIGNS = ("maximin", "dirichlet")
ON_NONFINITE = ("raise", "record")


@dataclass(frozen=True, kw_only=True)
class BOConfig:
    """How the GP is built and fitted, and how the next ratio is chosen.

    GP (``duet_jax.bo.gp``)
      kernel: ``"matern52"`` (Matern-5/2 with one length scale per domain (ARD), the kernel of
        BoTorch's former default and so of DUET's released code) or ``"rbf"`` (squared exponential
        with ARD, the kernel the paper states).
      prior: ``"gamma"``: BoTorch's former defaults, used by DUET's released code: length scale
        Gamma(3, 6), output scale Gamma(2, 0.15), noise Gamma(1.1, 0.05). ``"lognormal"``: BoTorch
        >= 0.12 (Hvarfner et al. 2024): length scale LogNormal(sqrt 2 + log(d)/2, sqrt 3), no
        output scale (fixed to 1 on standardised outputs), noise LogNormal(-4, 1).
      noise_floor: smallest noise variance, in standardised output units (BoTorch: 1e-4).
      lengthscale_floor: smallest length scale (BoTorch's dimension-scaled kernel: 0.025).
      fit_restarts: starts of the marginal-likelihood fit, run together under vmap: the previous
        round's hyperparameters (or the prior's mode) and ``fit_restarts - 1`` prior draws.
      fit_steps, fit_lr: Adam steps and learning rate (cosine-decayed) of the fit, in log space.
      lengthscale_gamma: (concentration, rate) of the ``gamma`` prior's length scale
        (BoTorch's former default and the released code: (3, 6), mode 1/3). A smaller mode lets
        the fit find narrow optima.

    Acquisition (``duet_jax.bo.acquisition``); the optimiser always maximises internally.
      acquisition: ``"ucb"`` (mu + sqrt(beta) sigma), ``"ei"``, ``"logei"``, ``"thompson"``
        (alias ``"ts"``: Thompson sampling, a joint posterior draw on ``ts_candidates`` points) or
        ``"portfolio"``: the acquisitions of ``portfolio`` in turn, by the number of observed and
        pending rows (the default ``("logei", "ucb")``: even LogEI, odd UCB), so a replay of the
        same tells makes the same choices.
      portfolio: the members of ``acquisition="portfolio"``, any of ``"logei"``, ``"ei"``,
        ``"ucb"``, ``"thompson"``.
      beta: UCB's beta for ``beta_schedule="constant"`` (DUET's released code: 1.0).
      beta_schedule: ``"constant"`` or ``"igp_ucb"`` (Chowdhury & Gopalan 2017, the paper's
        theory): sqrt(beta_t) = B + R sqrt(2 (gamma_t + 1 + ln(1/delta))), gamma_t the information
        gain of the observations under the fitted GP, so beta grows with the data.
      igp_b, igp_r, igp_delta: B (RKHS-norm bound), R (sub-Gaussian noise scale; ``None``: the
        fitted noise standard deviation, which makes beta fall as the fit finds less noise) and
        delta of that schedule, in standardised output units. The theory's constants are loose;
        these defaults (1, 0.1, 0.1) gave beta of about 2 to 5 over runs of 30 evaluations.

    Simplex optimiser (``duet_jax.bo.optimize``)
      n_raw: Dirichlet(1) draws among the raw candidates (with the vertices, the edge midpoints
        and the centroid); n_starts: best raw candidates refined by projected gradient ascent;
        ascent_steps, ascent_lr: steps of that ascent and their initial length (cosine-decayed).
      raw_sparse: fraction of the Dirichlet(1) raw candidates drawn instead on a random face of
        the simplex (each domain kept with probability 1/2, the largest always), so mixtures with
        zero shares are among the starts.
      raw_local: raw candidates drawn around the best observed ratios (the 4 best, Gaussian steps
        of sd ``local_sd`` projected back), BoTorch's ``sample_around_best``.
      dedup_tol, dedup_sd: near-duplicate check. A proposal within ``dedup_tol`` in every share of
        an observed (or pending) ratio is refused unless the model says repeating it is worth it:
        its posterior sd there is at least ``dedup_sd`` times the signal sd (noisy feedback);
        the best refused-free point of the search is taken instead. ``dedup_tol=0`` (default):
        off; on the benchmark suite (5 seeds) refusing close repeats raised the median regret on
        6 of 8 noiseless cases and left the other 2 level (docs/bo.md).
      ts_candidates: points on which a Thompson sample is drawn jointly.
      explore_snr: the uninformed-model fallback. When the fitted GP's signal-to-noise ratio
        (signal variance over noise variance) is below it, the model has found nothing but noise
        and its acquisition is a guess; the ask is then a plain Dirichlet(1) draw (random search's
        interior draw) instead (``RoundInfo.snr`` and ``.explored`` report both). ``0`` (default):
        off. At 1.0 it brought the noisy narrow-optimum benchmark cases to random search's level
        but raised the regret on a noiseless one, whose flat start is fitted as noise too
        (docs/bo.md, sixth run): turn it on only for feedback known to be noisy.
      min_share: shares below it are set to zero (the largest share and domains with a positive
        lower bound are kept). renormalize_min_share: then rescale the rest to sum to one
        (default); ``False`` reproduces DUET's released code, which zeroed shares below 0.05 without
        renormalising, so proposals sum to less than one.
      lower, upper: per-domain bounds on the share (tuples of length dim, or ``None``).
      fixed: ``((domain, share), ...)``: domains held at a share (lower = upper = share).

    Loop (``duet_jax.bo.SimplexBO``)
      n_init: space-filling warm-start points before the GP is used (``None``: dim + 1, at most 10).
      init_design: ``"maximin"`` (greedy farthest points of a Dirichlet(1) pool, also away from
        points already observed) or ``"dirichlet"`` (plain Dirichlet(1) draws, as the released code).
      on_nonfinite: NaN or infinite feedback: ``"raise"`` a BOError, or ``"record"`` it as a failed
        evaluation that is kept in the history and the state but left out of the fit.
      min_capacity: smallest padded data size; capacities are powers of two, so a run of N
        evaluations compiles about log2(N / min_capacity) + 1 times.

    Profiles (``BO_PROFILES``, ``BOConfig.from_profile(name, **overrides)``): ``"default"``, the
    robust defaults (the class's field defaults), and ``"paper"``, the paper's protocol
    (Matern-5/2, UCB with beta 1, the released code's Gamma priors and warm start). ``profile``
    records which one a config was built from.
    """

    profile: str = "default"

    kernel: str = "matern52"
    prior: str = "gamma"
    noise_floor: float = 1e-4
    lengthscale_floor: float = 0.025
    fit_restarts: int = 4
    fit_steps: int = 100
    fit_lr: float = 0.1
    lengthscale_gamma: tuple[float, float] = (3.0, 6.0)

    acquisition: str = "portfolio"
    portfolio: tuple[str, ...] = ("logei", "ucb")
    beta: float = 1.0
    beta_schedule: str = "constant"
    igp_b: float = 1.0
    igp_r: float | None = 0.1
    igp_delta: float = 0.1

    n_raw: int = 512
    n_starts: int = 8
    ascent_steps: int = 60
    ascent_lr: float = 0.02
    raw_sparse: float = 0.25
    raw_local: int = 64
    local_sd: float = 0.05
    dedup_tol: float = 0.0
    dedup_sd: float = 0.1
    ts_candidates: int = 512
    explore_snr: float = 0.0
    min_share: float = 0.0
    renormalize_min_share: bool = True
    lower: tuple[float, ...] | None = None
    upper: tuple[float, ...] | None = None
    fixed: tuple[tuple[int, float], ...] = field(default=())

    n_init: int | None = None
    init_design: str = "maximin"
    on_nonfinite: str = "raise"
    min_capacity: int = 16

    def __post_init__(self):
        if self.acquisition == "ts":
            object.__setattr__(self, "acquisition", "thompson")
        def choice(name, options):
            v = getattr(self, name)
            if v not in options:
                raise ConfigError(f"BOConfig.{name}: expected one of {options}, got {v!r}")

        choice("kernel", KERNELS)
        choice("prior", PRIORS)
        choice("acquisition", ACQUISITIONS)
        choice("beta_schedule", BETA_SCHEDULES)
        choice("init_design", INIT_DESIGNS)
        choice("on_nonfinite", ON_NONFINITE)
        if self.profile not in BO_PROFILES:
            raise ConfigError(f"BOConfig.profile: expected one of {tuple(BO_PROFILES)}, got "
                              f"{self.profile!r}")
        lg = tuple(float(v) for v in self.lengthscale_gamma)
        if len(lg) != 2 or not all(math.isfinite(v) and v > 0 for v in lg):
            raise ConfigError(f"BOConfig.lengthscale_gamma: expected (concentration, rate) > 0, "
                              f"got {self.lengthscale_gamma!r}")
        object.__setattr__(self, "lengthscale_gamma", lg)
        for name in ("raw_sparse", "dedup_tol", "dedup_sd"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and math.isfinite(v) and 0 <= v <= 1):
                raise ConfigError(f"BOConfig.{name}: expected a number in [0, 1], got {v!r}")
        if not (isinstance(self.explore_snr, int | float) and math.isfinite(self.explore_snr)
                and self.explore_snr >= 0):
            raise ConfigError(f"BOConfig.explore_snr: expected a finite number >= 0, got "
                              f"{self.explore_snr!r}")
        if not (isinstance(self.local_sd, int | float) and self.local_sd > 0):
            raise ConfigError(f"BOConfig.local_sd: expected a number > 0, got {self.local_sd!r}")
        members = tuple("thompson" if m == "ts" else m for m in self.portfolio)
        if not members or any(m not in PORTFOLIO_MEMBERS for m in members):
            raise ConfigError(f"BOConfig.portfolio: expected a non-empty tuple of "
                              f"{PORTFOLIO_MEMBERS}, got {self.portfolio!r}")
        object.__setattr__(self, "portfolio", members)
        if not (isinstance(self.raw_local, int) and self.raw_local >= 0):
            raise ConfigError(f"BOConfig.raw_local: expected an integer >= 0, got "
                              f"{self.raw_local!r}")
        for name in ("noise_floor", "lengthscale_floor", "fit_lr", "ascent_lr", "igp_b",
                     "igp_delta"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and math.isfinite(v) and v > 0):
                raise ConfigError(f"BOConfig.{name}: expected a finite number > 0, got {v!r}")
        if not 0 < self.igp_delta < 1:
            raise ConfigError(f"BOConfig.igp_delta: expected 0 < delta < 1, got {self.igp_delta}")
        if self.igp_r is not None and not (math.isfinite(self.igp_r) and self.igp_r > 0):
            raise ConfigError(f"BOConfig.igp_r: expected None or > 0, got {self.igp_r!r}")
        if not (math.isfinite(self.beta) and self.beta >= 0):
            raise ConfigError(f"BOConfig.beta: expected a finite number >= 0, got {self.beta!r}")
        for name in ("fit_restarts", "fit_steps", "n_raw", "n_starts", "ascent_steps",
                     "ts_candidates", "min_capacity"):
            v = getattr(self, name)
            if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
                raise ConfigError(f"BOConfig.{name}: expected an integer >= 1, got {v!r}")
        if self.n_init is not None and not (isinstance(self.n_init, int) and self.n_init >= 0):
            raise ConfigError(f"BOConfig.n_init: expected None or an integer >= 0, got "
                              f"{self.n_init!r}")
        if not (0.0 <= self.min_share < 1.0):
            raise ConfigError(f"BOConfig.min_share: expected 0 <= min_share < 1, got "
                              f"{self.min_share!r}")
        # Normalise sequences to tuples of floats so the config stays hashable (and equal after a
        # JSON round trip, where tuples come back as lists).
        for name in ("lower", "upper"):
            v = getattr(self, name)
            if v is not None:
                object.__setattr__(self, name, tuple(float(b) for b in v))
        object.__setattr__(self, "fixed", tuple((int(i), float(s)) for i, s in self.fixed))

    # -- derived -------------------------------------------------------------------------------

    def bounds(self, dim: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-domain (lower, upper) share bounds with fixed domains folded in, checked against
        ``dim`` and for feasibility (sum lower <= 1 <= sum upper)."""
        lo = list(self.lower) if self.lower is not None else [0.0] * dim
        hi = list(self.upper) if self.upper is not None else [1.0] * dim
        if len(lo) != dim or len(hi) != dim:
            raise BOError(f"bounds: expected lower and upper of length dim={dim}, got "
                          f"{len(lo)} and {len(hi)}")
        for i, s in self.fixed:
            if not 0 <= i < dim:
                raise BOError(f"fixed: domain index {i} is out of range for dim={dim}")
            lo[i] = hi[i] = s
        for i, (a, b) in enumerate(zip(lo, hi, strict=True)):
            if not (math.isfinite(a) and math.isfinite(b) and 0.0 <= a <= b <= 1.0):
                raise BOError(f"bounds: domain {i} needs 0 <= lower <= upper <= 1, got "
                              f"lower={a}, upper={b}")
        if sum(lo) > 1.0 + 1e-12 or sum(hi) < 1.0 - 1e-12:
            raise BOError(f"bounds: no ratio fits them: sum(lower)={sum(lo):.6g} must be <= 1 "
                          f"and sum(upper)={sum(hi):.6g} must be >= 1")
        return tuple(lo), tuple(hi)

    def for_round(self) -> BOConfig:
        """This config with the fields that only the host-side loop reads set to their defaults:
        the static argument of the jitted round, so changing them does not recompile it."""
        return dataclasses.replace(self, n_init=None, init_design="maximin", on_nonfinite="raise",
                                   min_capacity=16, profile="default")

    @classmethod
    def from_profile(cls, name: str = "default", **overrides) -> BOConfig:
        """The config of profile ``name`` (``BO_PROFILES``) with ``overrides`` on top:
        ``BOConfig.from_profile("paper", beta=2.0)``. An unknown name raises ConfigError."""
        if name not in BO_PROFILES:
            raise ConfigError(f"BOConfig.from_profile: unknown profile {name!r}; expected one of "
                              f"{tuple(BO_PROFILES)}")
        if "profile" in overrides and overrides["profile"] != name:
            raise ConfigError(f"BOConfig.from_profile: profile={overrides['profile']!r} "
                              f"conflicts with {name!r}")
        overrides.pop("profile", None)
        return cls(**{**BO_PROFILES[name], **overrides, "profile": name})

    def has_bounds(self) -> bool:
        return self.lower is not None or self.upper is not None or bool(self.fixed)

    def resolved_n_init(self, dim: int) -> int:
        return min(dim + 1, 10) if self.n_init is None else self.n_init

    # -- JSON ----------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["fixed"] = [list(p) for p in self.fixed]
        d["lengthscale_gamma"] = list(self.lengthscale_gamma)
        d["portfolio"] = list(self.portfolio)
        return d

    def fingerprint_dict(self) -> dict[str, Any]:
        """``to_dict()`` without the fields of ``ADDED_FIELDS`` that hold their neutral value: what
        hashes of configs (a run's ``config_hash``, the BO benchmark's fingerprints) are made of."""
        return without_neutral(self.to_dict())

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BOConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ConfigError(f"BOConfig: unknown fields {sorted(unknown)}")
        return cls(**d)

    def replace(self, **changes) -> BOConfig:
        return dataclasses.replace(self, **changes)


#: fields added after results were recorded, each with the value at which the code behaves as it
#: did before the field existed. At that value a field is left out of config hashes
#: (:func:`without_neutral`), so adding an option does not invalidate finished runs, resumable run
#: directories or benchmark lines; at any other value it is hashed like every field.
ADDED_FIELDS: dict[str, Any] = {"portfolio": ["logei", "ucb"], "explore_snr": 0.0}


def without_neutral(d: dict[str, Any]) -> dict[str, Any]:
    """A BOConfig dict without the ``ADDED_FIELDS`` that hold their neutral value (compared as
    JSON, so a tuple and the list it is read back as are the same value)."""
    same = lambda a, b: json.dumps(a) == json.dumps(b)  # noqa: E731
    return {k: v for k, v in d.items() if not (k in ADDED_FIELDS and same(v, ADDED_FIELDS[k]))}


# Field values of each named profile (fields not named keep the class defaults). "default" is
# empty: the class's field defaults are the robust defaults, chosen on the benchmark suite
# (docs/bo.md). "paper": the paper's protocol, as DUET's released code runs it.
BO_PROFILES: dict[str, dict[str, Any]] = {
    "default": {},
    "paper": {
        "kernel": "matern52",
        "prior": "gamma",
        "lengthscale_gamma": (3.0, 6.0),
        "acquisition": "ucb",
        "beta": 1.0,
        "beta_schedule": "constant",
        "init_design": "dirichlet",
        "n_init": None,
        "raw_sparse": 0.0,
        "raw_local": 0,
        "local_sd": 0.05,
        "dedup_tol": 0.0,
        "dedup_sd": 0.1,
        "explore_snr": 0.0,
    },
}
