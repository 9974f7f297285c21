"""The tokenized pool on device, in the shape the jitted trainer and evaluators want.

Next-token loss is taken only where it counts: for each example, the ``A`` answer slots hold the
position ``t`` whose logits predict token ``t + 1`` and that token. The LM head (576 x 49152 for
SmolLM2, a fifth of the model's FLOPs) then runs on ``[B, A]`` positions instead of ``[B, T]``.

``T`` is the longest sequence in the pool rounded up to a multiple of 16, ``A`` the most answer
tokens rounded up to a multiple of 8: a pool of short QA is not padded to the tokenizer's
``max_length``, and a new mixture drawn from the same pool never changes a shape.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from duet_jax.data.encode import TokenizedSplit
from duet_jax.errors import ConfigError

__all__ = ["Pool", "build_pool", "round_up"]


def round_up(x: int, multiple: int) -> int:
    return int(-(-int(x) // multiple) * multiple)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Pool:
    """Device arrays of N examples (a pytree; every field has the leading example axis).

    Attributes:
      input_ids: int32 ``[N, T]``.
      attention_mask: int32 ``[N, T]``.
      target_pos: int32 ``[N, A]``: position whose logits predict the slot's token.
      targets: int32 ``[N, A]``: the token to predict.
      loss_mask: float32 ``[N, A]``: 1 for answer and end-of-turn tokens (training loss).
      score_mask: float32 ``[N, A]``: 1 for answer tokens only (multiple-choice log-likelihood).
      hidden: optional ``[N, T, D]`` hidden states entering the first trained layer (frozen trunk).
    """

    input_ids: jax.Array
    attention_mask: jax.Array
    target_pos: jax.Array
    targets: jax.Array
    loss_mask: jax.Array
    score_mask: jax.Array
    hidden: jax.Array | None = None

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def answer_slots(self) -> int:
        return int(self.targets.shape[1])

    def take(self, idx: jax.Array) -> Pool:
        """Rows ``idx`` (works under jit: a gather on device)."""
        return jax.tree.map(lambda a: a[idx], self)

    def with_hidden(self, hidden: jax.Array | None) -> Pool:
        return dataclasses.replace(self, hidden=hidden)


def build_pool(
    splits: TokenizedSplit | Sequence[TokenizedSplit],
    *,
    length: int | None = None,
    answer_slots: int | None = None,
) -> tuple[Pool, np.ndarray]:
    """Concatenate tokenized splits into one :class:`Pool`.

    Args:
      splits: one split, or one per domain (their order gives the domain index).
      length: pad/trim to this T (default: the longest row, rounded up to 16).
      answer_slots: A (default: the most loss tokens of any row, rounded up to 8).

    Returns:
      ``(pool, domain_of)`` where ``domain_of`` is int32 ``[N]``.

    Raises:
      ConfigError: no example, or a ``length`` / ``answer_slots`` too small for some row.
    """
    if isinstance(splits, TokenizedSplit):
        splits = [splits]
    n_total = sum(len(s) for s in splits)
    if n_total == 0:
        raise ConfigError("cannot build a pool from zero examples")
    lengths = np.concatenate([s.lengths for s in splits])
    n_loss = np.concatenate([s.loss_mask.sum(1) for s in splits])
    T = min(round_up(max(int(lengths.max()), 1), 16), max(s.input_ids.shape[1] for s in splits))
    T = T if length is None else int(length)
    A = round_up(max(int(n_loss.max()), 1), 8) if answer_slots is None else int(answer_slots)
    if lengths.max() > T:
        raise ConfigError(f"pool length {T} is shorter than the longest example ({lengths.max()} tokens)")
    if n_loss.max() > A:
        raise ConfigError(f"answer_slots {A} < the most answer tokens of an example ({n_loss.max()})")

    ids = np.zeros((n_total, T), np.int32)
    att = np.zeros((n_total, T), np.int32)
    pos = np.zeros((n_total, A), np.int32)
    tgt = np.zeros((n_total, A), np.int32)
    lmask = np.zeros((n_total, A), np.float32)
    smask = np.zeros((n_total, A), np.float32)
    domain_of = np.zeros((n_total,), np.int32)
    row = 0
    for d, s in enumerate(splits):
        n = len(s)
        w = min(T, s.input_ids.shape[1])
        ids[row:row + n, :w] = s.input_ids[:, :w]
        att[row:row + n] = (np.arange(T)[None] < s.lengths[:, None]).astype(np.int32)
        # pad beyond a row's length with its own pad id (the pool keeps the first split's)
        ids[row:row + n][att[row:row + n] == 0] = s.pad_id
        domain_of[row:row + n] = d
        for i in range(n):
            token_pos = np.flatnonzero(s.loss_mask[i])  # tokens with loss; predicted from t - 1
            k = token_pos.size
            pos[row + i, :k] = token_pos - 1
            tgt[row + i, :k] = s.input_ids[i, token_pos]
            lmask[row + i, :k] = 1.0
            p0, na = int(s.prompt_lengths[i]), int(s.answer_lengths[i])
            smask[row + i, :k] = ((token_pos >= p0) & (token_pos < p0 + na)).astype(np.float32)
        row += n
    if (pos < 0).any():
        raise ConfigError("an example's first token carries loss; nothing precedes it to predict it")
    pool = Pool(jnp.asarray(ids), jnp.asarray(att), jnp.asarray(pos), jnp.asarray(tgt),
                jnp.asarray(lmask), jnp.asarray(smask))
    return pool, domain_of
