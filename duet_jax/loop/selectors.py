"""Selectors: how examples are drawn inside each domain once the ratio fixes how many.

A selector turns the prepared run into sampling weights over the pool (float32 ``[N]``, one per
row; a domain's weights are normalised inside the domain when a mixture is drawn):

=================  ==========================================================================
``if``             DUET-IF: influence-weighted, ``(s - min_d s) ** (1 / T)`` per domain
``uniform``        DUET-UR: every example of a domain equally likely
``remove_harmful`` DUET-RH: the lowest-influence fraction of each domain removed, the rest uniform
``less``           DUET-LESS (oracle): IF weights from gradient similarity to a few examples of the
                   unseen task's validation split; it sees task data, which DUET may not
=================  ==========================================================================
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from duet_jax.errors import ConfigError

__all__ = ["SELECTORS", "SelectorConfig", "selector_weights"]

SELECTORS = ("if", "uniform", "remove_harmful", "less")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SelectorConfig:
    """Sampling inside each domain.

    Attributes:
      kind: override the method's selector (if, uniform, remove_harmful, less); null: the method's.
      if_temperature: IF sampling temperature (> 0; below 1 sharpens the weights).
      if_floor: added to every valid weight after normalising each domain to mean 1, so no example
        becomes unreachable (0: the paper's rule).
      harmful_fraction: remove_harmful: the lowest-IF fraction dropped in each domain.
      less_examples: less: examples of the unseen task's validation split in the oracle query.
    """

    kind: str | None = None
    if_temperature: float = 1.0
    if_floor: float = 0.0
    harmful_fraction: float = 0.2
    less_examples: int = 8

    def __post_init__(self):
        if self.kind is not None and self.kind not in SELECTORS:
            raise ConfigError(f"selector.kind must be one of {', '.join(SELECTORS)} or null, got {self.kind!r}")
        if not self.if_temperature > 0:
            raise ConfigError(f"selector.if_temperature must be > 0, got {self.if_temperature}")
        if not self.if_floor >= 0:
            raise ConfigError(f"selector.if_floor must be >= 0, got {self.if_floor}")
        if not 0 <= self.harmful_fraction < 1:
            raise ConfigError(f"selector.harmful_fraction must be in [0, 1), got {self.harmful_fraction}")
        if self.less_examples < 0:
            raise ConfigError(f"selector.less_examples must be >= 0, got {self.less_examples}")


def selector_weights(kind: str, setting, config: SelectorConfig) -> tuple[jnp.ndarray, dict]:
    """Sampling weights ``[N]`` of the selector ``kind`` and per-domain diagnostics.

    Influence scores are computed once per run (resumable, in the run directory) and shared by
    every selector that needs them.
    """
    from duet_jax.mixture import (
        effective_sample_size,
        if_weights,
        remove_harmful_weights,
        uniform_weights,
    )

    if kind not in SELECTORS:
        raise ConfigError(f"unknown selector {kind!r}; available: {', '.join(SELECTORS)}")
    dom = setting.domain_of_device()
    n = setting.n_domains
    if kind == "uniform":
        return uniform_weights(dom), {}
    res = setting.influence(query="target" if kind == "less" else "domains")
    scores, valid = jnp.asarray(res.scores), jnp.asarray(res.valid)
    if kind == "remove_harmful":
        w = remove_harmful_weights(scores, dom, n, config.harmful_fraction, valid=valid)
    else:
        w = if_weights(scores, dom, n, temperature=config.if_temperature, floor=config.if_floor, valid=valid)
    ess = np.asarray(effective_sample_size(w, dom, n))
    info = {name: {**res.per_domain.get(name, {}), "effective_sample_size": float(e)}
            for name, e in zip(setting.names, ess, strict=True)}
    setting.log("sampling ESS/N: " + ", ".join(f"{nm} {e:.3f}" for nm, e in zip(setting.names, ess, strict=True)))
    return w, info
