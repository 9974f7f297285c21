"""The project's exceptions. Every user-facing failure raises one of these with a message that
says what was expected and what was found, and how to fix it where there is a fix."""

from __future__ import annotations

__all__ = [
    "DuetError",
    "ConfigError",
    "AssetNotFoundError",
    "DomainError",
    "UnknownDomainError",
    "EmptySplitError",
    "DataFormatError",
    "FieldMappingError",
    "OfflineError",
    "TokenizerError",
    "ModelError",
    "BOError",
    "InfluenceError",
    "TrainingError",
    "FeedbackError",
]


class DuetError(Exception):
    """Base class of every error duet-jax raises on purpose."""


class ConfigError(DuetError, ValueError):
    """A configuration value is invalid or inconsistent."""


class AssetNotFoundError(DuetError, FileNotFoundError):
    """An offline asset package (model or data files) is not installed."""


class DomainError(DuetError, ValueError):
    """A data domain cannot be built."""


class UnknownDomainError(DomainError, KeyError):
    """A domain name is not in the registry.

    KeyError quotes its message; __str__ is overridden so the message reads as written.
    """

    def __str__(self) -> str:  # pragma: no cover - trivial
        return str(self.args[0]) if self.args else ""


class EmptySplitError(DomainError):
    """A domain, or one of its splits, has no example."""


class DataFormatError(DomainError):
    """A local data file is malformed (the message names the file and line)."""


class FieldMappingError(DomainError):
    """A field mapping names a column that the data does not have."""


class OfflineError(DuetError, ConnectionError):
    """Something needs the network (a hub name) but the process is offline."""


class TokenizerError(DuetError, ValueError):
    """A tokenizer cannot be loaded or used."""


class ModelError(DuetError, ValueError):
    """A model config or checkpoint is unsupported or malformed."""


class BOError(DuetError, ValueError):
    """Bad input to the Bayesian optimiser."""


class InfluenceError(DuetError, ValueError):
    """Bad input to, or a bad state of, the influence engine."""


class TrainingError(DuetError, RuntimeError):
    """Fine-tuning failed (for example, the loss became NaN)."""


class FeedbackError(DuetError, RuntimeError):
    """The unseen task's feedback could not be obtained."""
