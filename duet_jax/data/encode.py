"""Tokenize examples into fixed-shape int32 arrays with an answer-only loss mask.

Layout of one example (right-padded to a bucket length)::

    [template prefix][prompt tokens][template middle][answer tokens][template suffix][pad ...]
                                                     '------- loss_mask = 1 -------'

With a chat template (the model's, when it has one) the prompt is the user turn and the answer the
assistant turn; the suffix is the end-of-turn marker, so the model learns to stop. Without one, the
plain template is ``prompt + answer + eos`` (plus BOS where the tokenizer adds one).

Too long: the prompt is cut from the LEFT (its end, next to the answer, is kept) and the template
and answer are kept whole. An example is skipped when its answer fills the window: the template +
answer leave no room for even one prompt token (e.g. a long gsm8k solution at ``max_length`` 128,
and also when they fit exactly), or nothing at all would precede the answer. An answer is never
cut (a truncated answer teaches a wrong answer). So every kept example has at least one token
before its first loss token, which the next-token loss needs (the pool refuses an example whose
first token carries loss). Skipped examples are counted and listed in
:attr:`TokenizedSplit.skipped`, never dropped silently.

Lengths are padded up to a few bucket lengths, so jitted code compiles once per bucket, not once
per batch. The convention for next-token loss: logits at position t predict ``input_ids[t + 1]``,
which counts when ``loss_mask[t + 1] == 1``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from duet_jax.data.example import Example
from duet_jax.errors import ConfigError, TokenizerError

__all__ = ["EncodeConfig", "TokenizedSplit", "Bucket", "encode_examples", "template_parts"]

_P_SENTINEL = "\ue000DUET_PROMPT\ue000"
_A_SENTINEL = "\ue001DUET_ANSWER\ue001"


@dataclasses.dataclass(frozen=True, kw_only=True)
class EncodeConfig:
    """How to tokenize.

    Attributes:
      max_length: longest sequence, in tokens.
      buckets: padded lengths (each <= max_length; max_length is always one).
      chat_template: "auto" (use the tokenizer's chat template if it has one), "always", "never".
      system_prompt: a system turn for chat templates (None: the template's default, if any).
    """

    max_length: int = 256
    buckets: tuple[int, ...] = (64, 128, 256)
    chat_template: str = "auto"
    system_prompt: str | None = None

    def __post_init__(self):
        if self.max_length < 8:
            raise ConfigError(f"max_length must be >= 8, got {self.max_length}")
        if self.chat_template not in ("auto", "always", "never"):
            raise ConfigError(f"chat_template must be auto/always/never, got {self.chat_template!r}")
        if any(b < 1 for b in self.buckets):
            raise ConfigError(f"bucket lengths must be positive, got {self.buckets}")

    @property
    def bucket_lengths(self) -> tuple[int, ...]:
        return tuple(sorted({b for b in self.buckets if b < self.max_length} | {self.max_length}))


@dataclasses.dataclass(frozen=True)
class Bucket:
    """The examples of one padded length. ``rows`` index into the split's examples."""

    length: int
    rows: np.ndarray  # int32 [n]
    input_ids: np.ndarray  # int32 [n, length]
    loss_mask: np.ndarray  # int32 [n, length]
    attention_mask: np.ndarray  # int32 [n, length]


@dataclasses.dataclass(frozen=True)
class TokenizedSplit:
    """Tokenized examples: one padded matrix plus per-example lengths and bucket assignment.

    Attributes:
      input_ids: int32 [N, max_length], right-padded with ``pad_id``.
      loss_mask: int32 [N, max_length], 1 on answer (and end-of-turn) tokens.
      lengths: int32 [N], real tokens per row.
      prompt_lengths: int32 [N], tokens before the answer starts (for generation).
      answer_lengths: int32 [N], answer tokens without the template suffix (what multiple-choice
        scoring sums over: positions ``prompt_lengths <= t < prompt_lengths + answer_lengths``).
      ids: the examples' ids (row order = the order of the kept examples).
      bucket_lengths: the padded lengths in use.
      skipped: ``(example id, tokens needed)`` of examples whose answer filled the window (the
        template + answer left no room for one prompt token; see the module docstring).
      truncated: number of kept examples whose prompt was cut from the left.
      pad_id: the padding token id.
    """

    input_ids: np.ndarray
    loss_mask: np.ndarray
    lengths: np.ndarray
    prompt_lengths: np.ndarray
    answer_lengths: np.ndarray
    ids: tuple[str, ...]
    bucket_lengths: tuple[int, ...]
    skipped: tuple[tuple[str, int], ...]
    truncated: int
    pad_id: int

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def attention_mask(self) -> np.ndarray:
        return (np.arange(self.input_ids.shape[1])[None, :] < self.lengths[:, None]).astype(np.int32)

    @property
    def bucket_of(self) -> np.ndarray:
        """int32 [N]: index into ``bucket_lengths`` of each row's bucket."""
        return np.searchsorted(np.asarray(self.bucket_lengths), self.lengths, side="left").astype(np.int32)

    def buckets(self) -> list[Bucket]:
        """Rows grouped by bucket, each group padded only to its bucket length."""
        out = []
        b_of = self.bucket_of
        mask = self.attention_mask
        for b, length in enumerate(self.bucket_lengths):
            rows = np.flatnonzero(b_of == b).astype(np.int32)
            if rows.size:
                out.append(Bucket(length, rows, self.input_ids[rows, :length],
                                  self.loss_mask[rows, :length], mask[rows, :length]))
        return out

    def summary(self) -> dict:
        return {
            "examples": len(self),
            "skipped": len(self.skipped),
            "truncated": self.truncated,
            "mean_length": float(self.lengths.mean()) if len(self) else 0.0,
            "answer_tokens": int(self.loss_mask.sum()),
            "per_bucket": {int(L): int((self.bucket_of == i).sum()) for i, L in enumerate(self.bucket_lengths)},
        }


def _uses_chat(tokenizer, mode: str) -> bool:
    has = bool(getattr(tokenizer, "chat_template", None))
    if mode == "always" and not has:
        raise TokenizerError("chat_template='always' but the tokenizer has no chat template")
    return has and mode != "never"


def template_parts(tokenizer, config: EncodeConfig) -> tuple[list[int], list[int], list[int], bool]:
    """Token ids of the template's prefix, middle and suffix, and whether it is a chat template."""
    if _uses_chat(tokenizer, config.chat_template):
        msgs = [{"role": "user", "content": _P_SENTINEL}, {"role": "assistant", "content": _A_SENTINEL}]
        if config.system_prompt is not None:
            msgs.insert(0, {"role": "system", "content": config.system_prompt})
        try:
            text = tokenizer.apply_chat_template(msgs, tokenize=False)
        except Exception as e:
            raise TokenizerError(f"the tokenizer's chat template failed: {e}") from e
        if text.count(_P_SENTINEL) != 1 or text.count(_A_SENTINEL) != 1:
            raise TokenizerError("cannot locate the user and assistant turns in the chat template")
        prefix, rest = text.split(_P_SENTINEL)
        mid, suffix = rest.split(_A_SENTINEL)
        enc = lambda s: list(tokenizer(s, add_special_tokens=False)["input_ids"]) if s else []
        return enc(prefix), enc(mid), enc(suffix), True
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    bos = list(with_special[: len(with_special) - len(without)]) if len(with_special) > len(without) else []
    eos = tokenizer.eos_token_id
    if eos is None:
        raise TokenizerError("the tokenizer has no eos token, needed to end answers (plain template)")
    return bos, [], [int(eos)], False


def encode_examples(
    examples: Sequence[Example], tokenizer, config: EncodeConfig | None = None
) -> TokenizedSplit:
    """Tokenize ``examples`` (see the module docstring for the layout and truncation rules)."""
    config = config or EncodeConfig()
    prefix, mid, suffix, chat = template_parts(tokenizer, config)
    prompts = [e.prompt.strip() if chat else e.prompt for e in examples]
    answers = [e.answer.strip() if chat else e.answer for e in examples]
    p_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"] if examples else []
    a_ids = tokenizer(answers, add_special_tokens=False)["input_ids"] if examples else []
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0

    L = config.max_length
    fixed = len(prefix) + len(mid) + len(suffix)
    rows_ids, rows_mask, lengths, p_lens, a_lens, ids, skipped = [], [], [], [], [], [], []
    truncated = 0
    for ex, p, a in zip(examples, p_ids, a_ids, strict=True):
        room = L - fixed - len(a)  # tokens left for the prompt
        # keep at least one prompt token (when there is a prompt), and something before the answer
        if room < min(1, len(p)) or len(prefix) + min(len(p), room) + len(mid) == 0:
            skipped.append((ex.id, fixed + len(a) + len(p)))
            continue
        if len(p) > room:
            p = p[len(p) - room:] if room > 0 else []
            truncated += 1
        seq = prefix + list(p) + mid + list(a) + suffix
        n_before = len(prefix) + len(p) + len(mid)
        mask = [0] * n_before + [1] * (len(a) + len(suffix))
        rows_ids.append(seq)
        rows_mask.append(mask)
        lengths.append(len(seq))
        p_lens.append(n_before)
        a_lens.append(len(a))
        ids.append(ex.id)

    n = len(ids)
    input_ids = np.full((n, L), pad_id, dtype=np.int32)
    loss_mask = np.zeros((n, L), dtype=np.int32)
    for i, (s, m) in enumerate(zip(rows_ids, rows_mask, strict=True)):
        input_ids[i, : len(s)] = s
        loss_mask[i, : len(m)] = m
    return TokenizedSplit(
        input_ids=input_ids,
        loss_mask=loss_mask,
        lengths=np.asarray(lengths, dtype=np.int32),
        prompt_lengths=np.asarray(p_lens, dtype=np.int32),
        answer_lengths=np.asarray(a_lens, dtype=np.int32),
        ids=tuple(ids),
        bucket_lengths=config.bucket_lengths,
        skipped=tuple(skipped),
        truncated=truncated,
        pad_id=int(pad_id),
    )
