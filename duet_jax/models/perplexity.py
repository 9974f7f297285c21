"""Token negative log-likelihoods and perplexity of a token sequence.

A long sequence is cut into windows of ``window`` tokens that overlap by one token, so every token
after the first is predicted exactly once (context resets at each window). Windows are padded to a
power-of-two length, so few shapes are compiled.

Example::

    >>> ppl = perplexity(model, tokenizer(text).input_ids)   # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from duet_jax.errors import ModelError
from duet_jax.models.generation import bucket
from duet_jax.models.llama import LlamaModel

__all__ = ["token_nll", "perplexity"]


@partial(jax.jit, static_argnames=("graphdef",))
def _nll(graphdef, state, tokens_bt, mask_bt):
    model: LlamaModel = nnx.merge(graphdef, state)
    logits = model(tokens_bt, attention_mask=mask_bt)[:, :-1]
    logp = jax.nn.log_softmax(logits, axis=-1)
    tgt = tokens_bt[:, 1:]
    nll = -jnp.take_along_axis(logp, tgt[..., None], axis=-1)[..., 0]
    return jnp.where(mask_bt[:, 1:], nll, 0.0)


def token_nll(model: LlamaModel, tokens: Sequence[int], *, window: int = 1024) -> np.ndarray:
    """``-log p(tokens[i] | tokens[<i])`` for ``i = 1 .. n-1`` (float32, length ``n - 1``)."""
    toks = [int(t) for t in tokens]
    if len(toks) < 2:
        raise ModelError(f"need at least 2 tokens to score, got {len(toks)}")
    if window < 2:
        raise ModelError(f"window must be >= 2, got {window}")
    V = model.config.vocab_size
    bad = sorted({t for t in toks if not 0 <= t < V})
    if bad:
        raise ModelError(f"token ids {bad[:10]} outside the vocabulary [0, {V})")
    graphdef, state = nnx.split(model)
    out = []
    start = 0
    while start < len(toks) - 1:
        chunk = toks[start:start + window]
        L = bucket(len(chunk))
        t = np.zeros((1, L), np.int32)
        m = np.zeros((1, L), bool)
        t[0, :len(chunk)] = chunk
        m[0, :len(chunk)] = True
        nll = np.asarray(_nll(graphdef, state, jnp.asarray(t), jnp.asarray(m)))
        out.append(nll[0, :len(chunk) - 1])
        start += window - 1
    return np.concatenate(out).astype(np.float32)


def perplexity(model: LlamaModel, tokens: Sequence[int], *, window: int = 1024) -> float:
    """``exp(mean token NLL)`` over ``tokens[1:]``."""
    return float(math.exp(float(np.mean(token_nll(model, tokens, window=window)))))
