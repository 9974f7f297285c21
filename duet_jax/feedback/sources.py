"""Where the unseen task's feedback comes from: one protocol, several sources.

A source is called with a :class:`FeedbackRequest` (the exported adapter's directory, the mixing
ratio, the round, the seed) and returns one finite float. A source that cannot produce one raises
:class:`~duet_jax.errors.FeedbackError`; the loop records the failure and never makes a value up.

* :class:`CommandFeedback`: an external program, e.g. ``"my_eval.sh {adapter_dir}"`` (placeholders:
  ``{adapter_dir}``, ``{ratio_json}``, ``{round}``, ``{seed}``; a literal brace is written ``{{`` or
  ``}}``). It runs without a shell, in its own process group (a time-out kills the program and
  every child it started). Time-out and retries are configurable.
* :class:`CallableFeedback`: a Python function given by import path ``"package.module:function"``.
* The built-in task evaluator (held-out domain, metric) lives with the trainer, which owns the model.

What a feedback command must print (:func:`parse_feedback`): the **last non-empty line** of its
standard output is the answer, and it must be one of

* a bare number: ``0.4375``, ``-2``, ``1e-3``, ``+7.5E+01``;
* a JSON object with a numeric ``feedback`` field: ``{"feedback": 0.4375, "n": 48}``;
* ``feedback: <number>`` or ``feedback=<number>`` (the word in any case: ``FEEDBACK=0.4375``).

Anything else on that line (``scoring adapter /runs/eval0000_0``, ``evaluated 48/48 examples``, a
number inside other text), no output at all, or a non-finite number (``nan``, ``inf``) is a failed
evaluation whose error carries the tail of the output; a number is never guessed from other text.
Earlier lines are free for logs. Before any training, :func:`check_feedback_config` checks the
command (it parses, its placeholders are known, its program exists) or the callable (it imports).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import re
import shlex
import shutil
import signal
import string
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, runtime_checkable

from duet_jax.errors import ConfigError, FeedbackError

__all__ = ["FeedbackRequest", "FeedbackSource", "CommandFeedback", "CallableFeedback", "parse_feedback",
           "check_feedback_config", "PLACEHOLDERS", "TAIL_CHARS"]


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


#: the placeholders a feedback command may use
PLACEHOLDERS = ("adapter_dir", "ratio_json", "round", "seed")
#: how much of a command's output (its end) an error carries
TAIL_CHARS = 500

_NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_NONFINITE = r"[-+]?(?:nan|inf|infinity)"
_BARE = re.compile(rf"(?:{_NUMBER}|{_NONFINITE})", re.I)
_PATTERN = re.compile(rf"feedback\s*[:=]\s*({_NUMBER}|{_NONFINITE})", re.I)


def _tail(text: str, n: int = TAIL_CHARS) -> str:
    text = (text or "").strip()
    if not text:
        return "<empty>"
    return text if len(text) <= n else "..." + text[-n:]


def _one_line(text: str) -> str:
    return text.replace("\r", "").replace("\n", "\\n")


def _fail(reason: str, output: str) -> FeedbackError:
    tail = _tail(output)
    err = FeedbackError(f"{reason}; the output ended with: {_one_line(tail)}")
    err.reason, err.output_tail = reason, tail
    return err


def parse_feedback(stdout: str) -> float:
    """The feedback in a program's standard output (the format is in the module docstring).

    Only the last non-empty line counts, and it must be a bare number, a JSON object with a
    numeric ``feedback`` field, or ``feedback: <number>`` / ``feedback=<number>``.

    Raises:
      FeedbackError: no output, a last line of another form, or a non-finite number. The message
        ends with the last :data:`TAIL_CHARS` characters of the output on one line (newlines shown
        as ``\\n``), also kept as is as the error's ``output_tail`` attribute (and the message
        without it as ``reason``).
    """
    lines = [ln.strip() for ln in (stdout or "").splitlines() if ln.strip()]
    if not lines:
        raise _fail("the feedback command printed nothing", stdout)
    last = lines[-1]
    value: float | None = None
    if _BARE.fullmatch(last):
        value = float(last)
    elif (m := _PATTERN.fullmatch(last)) is not None:
        value = float(m.group(1))
    elif last.startswith("{"):
        try:
            obj = json.loads(last)
        except json.JSONDecodeError:
            obj = None
        if not isinstance(obj, dict):
            raise _fail("the last line of the feedback command's output starts like JSON but is not "
                        "a JSON object", stdout)
        fb = obj.get("feedback")
        if isinstance(fb, bool) or not isinstance(fb, int | float):
            raise _fail("the JSON object on the last line of the feedback command's output has no "
                        f"numeric 'feedback' field (got {fb!r})", stdout)
        try:
            value = float(fb)
        except OverflowError:  # an integer beyond float range
            value = math.inf
    if value is None:
        raise _fail("the last line of the feedback command's output is not a feedback value (expected "
                    "a bare number, a JSON object with a numeric 'feedback' field, or "
                    f"'feedback: <number>'), it is {last[:120]!r}", stdout)
    if not math.isfinite(value):
        raise _fail(f"the feedback is not a finite number: {value}", stdout)
    return value


def _placeholders(arg: str) -> list[str]:
    """The placeholder names in one argument (``ValueError`` for a stray brace)."""
    return [field for _, field, _, _ in string.Formatter().parse(arg) if field is not None]


@dataclasses.dataclass
class CommandFeedback:
    """Feedback from an external command.

    The command runs in a session (process group) of its own; on a time-out the whole group is
    killed (SIGKILL), so an evaluator's children die with it.

    Attributes:
      command: a command line with placeholders, split like a shell would (``shlex``) but run
        without one.
      timeout_s: seconds before one attempt is killed.
      retries: further attempts after a failure (a time-out, a non-zero exit, no feedback value).
      backoff_s: pause between attempts.

    Raises (on construction):
      ConfigError: the command does not parse, is empty, or uses an unknown placeholder.
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
        if self.retries < 0 or not self.timeout_s > 0:
            raise ConfigError("feedback retries must be >= 0 and timeout_s > 0")
        known = ", ".join("{" + p + "}" for p in PLACEHOLDERS)
        for arg in self._argv:
            try:
                names = _placeholders(arg)
            except ValueError as e:
                raise ConfigError(f"the feedback command argument {arg!r} has a stray brace ({e}); "
                                  f"placeholders are {known}, a literal brace is {{{{ or }}}}") from None
            for nm in names:
                if nm not in PLACEHOLDERS:
                    raise ConfigError(f"unknown placeholder {{{nm}}} in the feedback command "
                                      f"{self.command!r}; use {known}")

    def check(self) -> None:
        """Check, before any training, that the program can be started.

        Raises:
          ConfigError: the program is not on PATH, not a file, or not executable.
        """
        prog = self._argv[0]
        if _placeholders(prog):
            return  # named by a placeholder: known only per evaluation
        if os.sep in prog or (os.altsep and os.altsep in prog):
            path = Path(prog).expanduser()
            if not path.is_file():
                raise ConfigError(f"the feedback command's program {prog!r} does not exist (or is not a file)")
            if not os.access(path, os.X_OK):
                raise ConfigError(f"the feedback command's program {prog!r} is not executable "
                                  f"(chmod +x it, or run it through its interpreter)")
        elif shutil.which(prog) is None:
            raise ConfigError(f"the feedback command's program {prog!r} is not on PATH; give its path")

    def argv(self, request: FeedbackRequest) -> list[str]:
        values = {
            "adapter_dir": str(request.adapter_dir) if request.adapter_dir else "",
            "ratio_json": json.dumps(request.ratio, sort_keys=True),
            "round": str(request.round),
            "seed": str(request.seed),
        }
        return [a.format(**values) for a in self._argv]

    def _attempt(self, argv: list[str]) -> tuple[str, str, str | None, float | None]:
        """One run: ``(short reason of a failure or "", stdout, stderr, value)``."""
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, errors="replace",
                                    start_new_session=True)
        except OSError as e:
            return f"cannot start {argv[0]!r}: {e}", "", "", None
        try:
            out, err = proc.communicate(timeout=self.timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            try:  # the pipes close once the whole group is dead
                out, err = proc.communicate(timeout=10)
            except subprocess.TimeoutExpired:  # a child that left the group still holds them
                proc.kill()
                out, err = "", ""
            return f"timed out after {self.timeout_s:g} s (its process group was killed)", out, err, None
        except BaseException:  # Ctrl-C while waiting: take the evaluator down too
            _kill_group(proc)
            proc.wait()
            raise
        if proc.returncode != 0:
            return f"exit status {proc.returncode}", out, err, None
        try:
            return "", out, err, parse_feedback(out)
        except FeedbackError as e:
            return getattr(e, "reason", str(e)), out, err, None

    def __call__(self, request: FeedbackRequest) -> float:
        argv = self.argv(request)
        errors = []
        out = err = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s)
            reason, out, err, value = self._attempt(argv)
            if value is not None:
                return value
            errors.append(f"attempt {attempt + 1}: {reason}")
        shown = "\n".join(x for x in ((out or "").strip(), (err or "").strip()) if x)
        tail = _tail(shown)
        e = FeedbackError(f"feedback command {shlex.join(argv)!r} failed: " + " | ".join(errors)
                          + f"; the last attempt's output (stdout, then stderr) ended with: {_one_line(tail)}")
        e.output_tail = tail
        raise e


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process group of ``proc`` (its own session; ``proc`` is not yet reaped, so the
    group id cannot have been reused)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()


def _resolve_callable(target: str):
    module, colon, attr = target.partition(":")
    if not colon or not module.strip() or not attr.strip():
        raise ConfigError(f"a feedback callable is 'package.module:function' (module, a colon, then "
                          f"the function's name), got {target!r}")
    try:
        obj = importlib.import_module(module)
    except ModuleNotFoundError as e:
        raise ConfigError(f"cannot import the module {module!r} of the feedback callable {target!r}: "
                          f"{e} (is it on PYTHONPATH?)") from e
    except Exception as e:  # the module itself raised while importing
        raise ConfigError(f"importing the module {module!r} of the feedback callable {target!r} "
                          f"raised {type(e).__name__}: {e}") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"the module {module!r} has no attribute {attr!r} "
                              f"(feedback callable {target!r})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"the feedback callable {target!r} is a {type(obj).__name__}, not callable")
    return obj


@dataclasses.dataclass
class CallableFeedback:
    """Feedback from a Python function ``f(request: FeedbackRequest) -> float``.

    Raises (on construction):
      ConfigError: no colon, the module does not import, it has no such attribute, or the
        attribute is not callable (each with its own message).
    """

    target: str | Callable[[FeedbackRequest], float]
    name: str = "callable"

    def __post_init__(self):
        if isinstance(self.target, str):
            self._fn = _resolve_callable(self.target)
        else:
            self._fn = self.target
        if not callable(self._fn):
            raise ConfigError(f"{self.target!r} is not callable")

    def check(self) -> None:
        """Nothing more to check: construction imported and checked the function."""

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


def check_feedback_config(command: str | None = None, callable: str | None = None, *,
                          timeout_s: float = 3600.0, retries: int = 1):
    """Check a feedback configuration before any training, and return the source it names.

    Args:
      command: an external command (see :class:`CommandFeedback`).
      callable: ``"package.module:function"`` (see :class:`CallableFeedback`).
      timeout_s, retries: the command's settings (checked too).

    Returns:
      The :class:`CommandFeedback` or :class:`CallableFeedback`, or ``None`` when neither is given
      (the built-in evaluator).

    Raises:
      ConfigError: both given; the command does not parse, is empty, uses an unknown placeholder
        (named), or its program is not on PATH / not an executable file; the callable has no colon,
        its module does not import, it has no such attribute, or it is not callable.
    """
    if command and callable:
        raise ConfigError("give feedback.command or feedback.callable, not both")
    if command:
        source = CommandFeedback(command, timeout_s=timeout_s, retries=retries)
        source.check()
        return source
    if callable:
        return CallableFeedback(callable)
    return None
