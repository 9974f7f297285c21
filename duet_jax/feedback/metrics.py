"""Task metrics as lm-evaluation-harness defines them, as pure functions of model outputs.

* multiple choice: ``acc`` picks the choice with the highest total log-likelihood; ``acc_norm`` the
  highest log-likelihood per byte of the choice's text (lm-eval divides by the UTF-8 length of the
  continuation);
* exact match after answer extraction: gsm8k takes the final number (``The answer is N`` /
  ``#### N``, else the last number in the text); short answers (triviaqa, nq_open) are normalised
  (lower case, punctuation and the articles a/an/the removed, whitespace collapsed) and compared
  with every alias.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

import numpy as np

__all__ = [
    "mc_accuracy",
    "normalize_answer",
    "extract_number",
    "exact_match",
    "choice_byte_lengths",
]


def choice_byte_lengths(choices: Sequence[str]) -> np.ndarray:
    """UTF-8 byte length of each choice's continuation text (lm-eval's ``acc_norm`` divisor)."""
    return np.asarray([max(len((" " + c.strip()).encode("utf-8")), 1) for c in choices], np.float64)


def mc_accuracy(loglik: np.ndarray, gold: np.ndarray, byte_lengths: np.ndarray,
                valid: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Per-example ``acc`` and ``acc_norm``.

    Args:
      loglik: float ``[n, c]`` summed log-likelihood of each choice's tokens given the prompt.
      gold: int ``[n]`` gold choice index.
      byte_lengths: ``[n, c]`` byte length of each choice.
      valid: bool ``[n, c]``: False for padding choices (examples with fewer choices).

    Returns:
      ``{"acc": float [n], "acc_norm": float [n]}`` with values 0 or 1.
    """
    ll = np.asarray(loglik, np.float64)
    mask = np.ones_like(ll, bool) if valid is None else np.asarray(valid, bool)
    neg = np.where(mask, ll, -np.inf)
    norm = np.where(mask, ll / np.maximum(np.asarray(byte_lengths, np.float64), 1.0), -np.inf)
    g = np.asarray(gold)
    return {
        "acc": (np.argmax(neg, axis=1) == g).astype(np.float64),
        "acc_norm": (np.argmax(norm, axis=1) == g).astype(np.float64),
    }


_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD / TriviaQA normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


_FINAL = [re.compile(r"the answer is\s*\$?\s*(-?[\d,]*\.?\d+)", re.I), re.compile(r"####\s*\$?\s*(-?[\d,]*\.?\d+)")]
_NUMBER = re.compile(r"-?[\d,]*\.?\d+")


def extract_number(text: str) -> str | None:
    """The final numeric answer of a worked solution, without commas and trailing ``.0``; None when
    the text holds no number."""
    for pat in _FINAL:
        m = pat.findall(text)
        if m:
            return _clean_number(m[-1])
    m = _NUMBER.findall(text)
    return _clean_number(m[-1]) if m else None


def _clean_number(s: str) -> str:
    s = s.replace(",", "").strip()
    if "." in s:
        s = s.rstrip("0").rstrip(".")
    return s or "0"


def exact_match(prediction: str, references: Sequence[str], kind: str = "qa") -> float:
    """1.0 when the prediction matches a reference: numbers for ``kind="math"``, normalised text
    otherwise (the first line of the prediction only, as generation stops at a newline)."""
    if kind == "math":
        got = extract_number(prediction)
        return float(got is not None and any(got == extract_number(r) for r in references))
    first = prediction.strip().split("\n", 1)[0]
    got = normalize_answer(first)
    return float(any(got == normalize_answer(r) for r in references if r is not None))
