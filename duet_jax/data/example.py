"""One training / evaluation example, and the kinds of domain.

An :class:`Example` is what every source (built-in, hub, local file) produces: a prompt, the answer
the model should produce after it, a stable id, and for multiple-choice sources the choices and the
gold index (kept for evaluation by log-likelihood of each choice).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from typing import Any

from duet_jax.errors import DomainError

__all__ = ["KINDS", "Example", "content_key", "stable_id", "normalize_text"]

#: Domain kinds. "qa": short-answer QA; "mc": multiple choice (answer = gold choice text);
#: "math": worked answers; "text": running text (a language-modelling domain: the answer is the
#: continuation of the prompt).
KINDS = ("qa", "mc", "math", "text")

_WS = re.compile(r"\s+")


def normalize_text(text: str) -> str:
    """Lower-case, whitespace-collapsed text: the form used to detect exact duplicates."""
    return _WS.sub(" ", text).strip().lower()


def content_key(prompt: str) -> str:
    """Key of an example's content for splitting: examples with the same normalised prompt share a
    key, so exact duplicates (and re-asked questions) always fall in the same split."""
    return hashlib.sha256(normalize_text(prompt).encode("utf-8")).hexdigest()


def stable_id(domain: str, prompt: str, answer: str, choices: tuple[str, ...] | None) -> str:
    """A stable id from the content (not the row order): ``<domain>-<16 hex digits>``."""
    payload = json.dumps([prompt, answer, list(choices) if choices else None], ensure_ascii=False)
    return f"{domain}-{hashlib.sha256(payload.encode('utf-8')).hexdigest()[:16]}"


@dataclasses.dataclass(frozen=True)
class Example:
    """One example.

    Attributes:
      id: stable id, derived from the content unless the source gives one.
      prompt: the text the model sees (without the chat template).
      answer: the text the model should produce (loss is taken on it only). For "mc", the gold
        choice's text; for "text", the continuation.
      kind: one of :data:`KINDS`.
      choices: for "mc", every choice's text (the answer is ``choices[gold]``).
      gold: for "mc", the index of the correct choice.
      meta: free-form extra fields (e.g. the short final answer of a math problem).
    """

    id: str
    prompt: str
    answer: str
    kind: str
    choices: tuple[str, ...] | None = None
    gold: int | None = None
    meta: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise DomainError(f"example {self.id!r}: kind must be one of {KINDS}, got {self.kind!r}")
        if not isinstance(self.prompt, str) or not isinstance(self.answer, str):
            raise DomainError(f"example {self.id!r}: prompt and answer must be strings")
        if not self.answer.strip():
            raise DomainError(f"example {self.id!r}: empty answer")
        if self.choices is not None:
            if self.gold is None or not 0 <= self.gold < len(self.choices):
                raise DomainError(
                    f"example {self.id!r}: gold index must be in [0, {len(self.choices)}), got {self.gold!r}"
                )

    @property
    def key(self) -> str:
        """The content key used for splitting (see :func:`content_key`)."""
        return content_key(self.prompt)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["choices"] = list(self.choices) if self.choices is not None else None
        return d
