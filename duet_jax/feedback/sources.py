"""Where the unseen task's feedback comes from: one protocol, several sources.

A source is called with a :class:`FeedbackRequest` (the exported adapter's directory, the mixing
ratio, the round, the seed) and returns one finite float. A source that cannot produce one raises
:class:`~duet_jax.errors.FeedbackError`; the loop records the failure and never makes a value up.

* :class:`CommandFeedback`: an external program, e.g. ``"my_eval.sh {adapter_dir}"`` (placeholders:
  ``{adapter_dir}``, ``{ratio_json}``, ``{round}``, ``{seed}``). It runs without a shell; its standard
  output's last number (or a JSON object's ``"feedback"`` field) is the feedback. Time-out and
  retries are configurable.
* :class:`CallableFeedback`: a Python function given by import path ``"package.module:function"``.
* The built-in task evaluator (held-out domain, metric) lives with the trainer, which owns the model.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import re
import shlex
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, runtime_checkable

from duet_jax.errors import ConfigError, FeedbackError

__all__ = ["FeedbackRequest", "FeedbackSource", "CommandFeedback", "CallableFeedback", "parse_feedback"]


@dataclasses.dataclass(frozen=True)
class FeedbackRequest:
    """What a feedback source is told about the model to score."""

    adapter_dir: Path | None
    ratio: dict[str, float]
    round: int
    seed: int


@runtime_checkable
class FeedbackSource(Protocol):
    name: str

    def __call__(self, request: FeedbackRequest) -> float: ...


_NUM = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|[-+]?(?:nan|inf)", re.I)


def parse_feedback(stdout: str) -> float:
    """The feedback in a program's output: a JSON object's ``feedback`` on the last non-empty line,
    else the last number printed.

    Raises:
      FeedbackError: no number, or a non-finite one.
    """
    lines = [ln for ln in stdout.strip().splitlines() if ln.strip()]
    value = None
    if lines:
        try:
            obj = json.loads(lines[-1])
            if isinstance(obj, dict) and "feedback" in obj:
                value = float(obj["feedback"])
            elif isinstance(obj, int | float):
                value = float(obj)
        except (json.JSONDecodeError, TypeError, ValueError):
            pass
    if value is None:
        nums = _NUM.findall(stdout)
        if not nums:
            tail = stdout.strip()[-200:] or "<empty>"
            raise FeedbackError(f"the feedback command printed no number; its output ended with: {tail}")
        value = float(nums[-1])
    if not math.isfinite(value):
        raise FeedbackError(f"the feedback is not a finite number: {value}")
    return value


@dataclasses.dataclass
class CommandFeedback:
    """Feedback from an external command.

    Attributes:
      command: a command line with placeholders, split like a shell would (``shlex``) but run
        without one.
      timeout_s: seconds before one attempt is killed.
      retries: further attempts after a failure (a time-out, a non-zero exit, no number).
      backoff_s: pause between attempts.
    """

    command: str
    timeout_s: float = 3600.0
    retries: int = 1
    backoff_s: float = 1.0
    name: str = "command"

    def __post_init__(self):
        try:
            self._argv = shlex.split(self.command)
        except ValueError as e:
            raise ConfigError(f"cannot parse the feedback command {self.command!r}: {e}") from e
        if not self._argv:
            raise ConfigError("the feedback command is empty")
        if self.retries < 0 or self.timeout_s <= 0:
            raise ConfigError("feedback retries must be >= 0 and timeout_s > 0")

    def argv(self, request: FeedbackRequest) -> list[str]:
        values = {
            "adapter_dir": str(request.adapter_dir) if request.adapter_dir else "",
            "ratio_json": json.dumps(request.ratio, sort_keys=True),
            "round": str(request.round),
            "seed": str(request.seed),
        }
        try:
            return [a.format(**values) for a in self._argv]
        except (KeyError, IndexError) as e:
            raise ConfigError(
                f"unknown placeholder {e} in the feedback command; use {{adapter_dir}}, {{ratio_json}}, "
                "{round}, {seed}"
            ) from e

    def __call__(self, request: FeedbackRequest) -> float:
        argv = self.argv(request)
        errors = []
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s)
            try:
                proc = subprocess.run(argv, capture_output=True, text=True, timeout=self.timeout_s,
                                      stdin=subprocess.DEVNULL)
            except subprocess.TimeoutExpired:
                errors.append(f"attempt {attempt + 1}: timed out after {self.timeout_s:g} s")
                continue
            except OSError as e:
                errors.append(f"attempt {attempt + 1}: cannot start {argv[0]!r}: {e}")
                continue
            if proc.returncode != 0:
                tail = (proc.stderr or proc.stdout).strip()[-300:]
                errors.append(f"attempt {attempt + 1}: exit status {proc.returncode}: {tail}")
                continue
            try:
                return parse_feedback(proc.stdout)
            except FeedbackError as e:
                errors.append(f"attempt {attempt + 1}: {e}")
        raise FeedbackError(f"feedback command {' '.join(argv)!r} failed: " + " | ".join(errors))


@dataclasses.dataclass
class CallableFeedback:
    """Feedback from a Python function ``f(request: FeedbackRequest) -> float``."""

    target: str | Callable[[FeedbackRequest], float]
    name: str = "callable"

    def __post_init__(self):
        if isinstance(self.target, str):
            module, _, attr = self.target.partition(":")
            if not module or not attr:
                raise ConfigError(f"a feedback callable is 'package.module:function', got {self.target!r}")
            try:
                fn = getattr(importlib.import_module(module), attr)
            except (ImportError, AttributeError) as e:
                raise ConfigError(f"cannot import the feedback callable {self.target!r}: {e}") from e
            self._fn = fn
        else:
            self._fn = self.target
        if not callable(self._fn):
            raise ConfigError(f"{self.target!r} is not callable")

    def __call__(self, request: FeedbackRequest) -> float:
        try:
            value = float(self._fn(request))
        except FeedbackError:
            raise
        except Exception as e:
            raise FeedbackError(f"the feedback callable raised {type(e).__name__}: {e}") from e
        if not math.isfinite(value):
            raise FeedbackError(f"the feedback callable returned a non-finite value: {value}")
        return value
