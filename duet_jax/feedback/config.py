"""Where a run's feedback comes from: the one place for its options and their defaults."""

from __future__ import annotations

import dataclasses
import math

from duet_jax.errors import ConfigError

__all__ = ["FeedbackConfig", "METRICS"]

METRICS = ("acc", "acc_norm", "exact_match", "neg_loss")


@dataclasses.dataclass(frozen=True, kw_only=True)
class FeedbackConfig:
    """The unseen task's feedback.

    Attributes:
      metric: built-in task metric: ``acc``, ``acc_norm`` (multiple choice by log-likelihood),
        ``exact_match`` (generation) or ``neg_loss`` (minus the mean answer-token loss: smooth,
        sensitive to small fine-tunes).
      examples: evaluation examples of the unseen task used for feedback (0: all).
      temperature: exact_match sampling temperature (> 0: noisy feedback, as the paper).
      max_new_tokens: exact_match generated tokens.
      command: external feedback command, e.g. ``"my_eval.sh {adapter_dir}"``; it prints the
        feedback as its last line (placeholders: adapter_dir, ratio_json, round, seed).
      callable: Python feedback function ``"package.module:function"``.
      timeout_s: external command time-out per attempt.
      retries: external command retries after a failure.
      on_failure: ``record`` (log the failure, leave it out of the GP) or ``stop``.
    """

    metric: str = "neg_loss"
    examples: int = 48
    temperature: float = 0.0
    max_new_tokens: int = 32
    command: str | None = None
    callable: str | None = None
    timeout_s: float = 3600.0
    retries: int = 1
    on_failure: str = "record"

    def __post_init__(self):
        if self.metric not in METRICS:
            raise ConfigError(f"feedback.metric must be one of {', '.join(METRICS)}, got {self.metric!r}")
        if self.on_failure not in ("record", "stop"):
            raise ConfigError(f"feedback.on_failure must be record or stop, got {self.on_failure!r}")
        if self.command and self.callable:
            raise ConfigError("give feedback.command or feedback.callable, not both")
        if self.examples < 0:
            raise ConfigError(f"feedback.examples must be >= 0 (0: all), got {self.examples}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ConfigError(f"feedback.temperature must be >= 0, got {self.temperature}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"feedback.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.timeout_s > 0 or self.retries < 0:
            raise ConfigError("feedback.timeout_s must be > 0 and feedback.retries >= 0")

    @property
    def external(self) -> bool:
        return bool(self.command or self.callable)
