"""Jitted generation with a KV cache: greedy or temperature sampling, stop tokens, a batch of
prompts of different lengths.

Prompts are left-padded to a power-of-two bucket ``T``, the batch is padded to a power of two (at
least 2: XLA:CPU compiles single-row decode steps several times slower) and the cache has
``S = next_pow2(T + max_new_tokens)`` slots, so a handful of shapes covers every call: one compile
per (batch bucket, T, S).
``max_new_tokens`` and ``temperature`` are traced values, not compile-time constants (only
greedy vs sampling is). Prefill and
the whole decode loop (``lax.while_loop``, stopping early once every row has hit a stop token) are
one compiled function.

Example::

    >>> out = generate(model, [[1, 5, 9], [1, 7]], max_new_tokens=8)          # doctest: +SKIP
    >>> out = generate(model, prompts, temperature=0.7, key=jax.random.key(0))  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from duet_jax.errors import ModelError
from duet_jax.models.llama import LlamaModel

__all__ = ["GenerationOutput", "generate", "bucket"]


def bucket(n: int, minimum: int = 8) -> int:
    """The smallest power of two ``>= max(n, minimum)``."""
    n = max(int(n), minimum, 1)
    return 1 << (n - 1).bit_length()


@dataclasses.dataclass(frozen=True)
class GenerationOutput:
    """``tokens[b]``: the new tokens of prompt ``b`` (its stop token excluded);
    ``finish_reasons[b]``: ``"stop"`` (a stop token came) or ``"length"`` (max_new_tokens)."""

    tokens: list[list[int]]
    finish_reasons: list[str]


def _sample(logits_bv: jax.Array, temperature: jax.Array, key: jax.Array) -> jax.Array:
    """One draw from ``softmax(logits / temperature)`` per row."""
    return jax.random.categorical(key, logits_bv / jnp.maximum(temperature, 1e-6),
                                  axis=-1).astype(jnp.int32)


@partial(jax.jit, static_argnames=("graphdef", "cache_len", "sample"))
def _generate(graphdef, state, tokens_bt, mask_bt, done_b, max_new, temperature, key, stop_ids,
              pad_id, *, cache_len: int, sample: bool):
    model: LlamaModel = nnx.merge(graphdef, state)
    B, T = tokens_bt.shape
    cache = model.init_cache(B, cache_len)
    logits, cache = model.forward(tokens_bt, attention_mask=mask_bt, cache=cache,
                                  logits_at=jnp.full((B, 1), T - 1, jnp.int32))
    out = jnp.full((B, cache_len - T), pad_id, jnp.int32)
    ones = jnp.ones((B, 1), bool)

    def cond(c):
        step, _, _, _, _, done, _ = c
        return (step < max_new) & ~jnp.all(done)

    def body(c):
        step, cache, last, key, out, done, lengths = c
        if sample:  # static: greedy decoding compiles without the RNG
            key, sub = jax.random.split(key)
            tok = _sample(last, temperature, sub)
        else:
            tok = jnp.argmax(last, axis=-1).astype(jnp.int32)
        is_stop = jnp.any(tok[:, None] == stop_ids[None, :], axis=-1)
        tok = jnp.where(done, pad_id, tok)
        out = out.at[:, step].set(tok)
        lengths = jnp.where(done | is_stop, lengths, lengths + 1)
        done = done | is_stop
        logits, cache = model.forward(tok[:, None], attention_mask=ones, cache=cache)
        return step + 1, cache, logits[:, -1], key, out, done, lengths

    init = (jnp.zeros((), jnp.int32), cache, logits[:, 0], key, out, done_b,
            jnp.zeros((B,), jnp.int32))
    _, _, _, _, out, done, lengths = jax.lax.while_loop(cond, body, init)
    return out, done, lengths


def generate(model: LlamaModel, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 32,
             temperature: float = 0.0, key: jax.Array | None = None,
             stop_tokens: Sequence[int] | None = None, pad_id: int | None = None
             ) -> GenerationOutput:
    """Continue each prompt (a list of token ids).

    Args:
      model: the decoder.
      prompts: token-id lists, of any lengths (``[ids]`` for one prompt).
      max_new_tokens: most tokens added per prompt.
      temperature: 0 for greedy decoding; > 0 samples from ``softmax(logits / temperature)``.
      key: a ``jax.random`` key, required when ``temperature > 0``.
      stop_tokens: ids that end a row (default: the config's ``eos_token_ids``); ``()`` for none.
      pad_id: id written after a row stopped (default: the config's pad id or 0); never returned.
    """
    if not prompts or (isinstance(prompts[0], int | np.integer)):
        raise ModelError("prompts must be a non-empty list of token-id lists")
    rows = [list(map(int, p)) for p in prompts]
    if any(not r for r in rows):
        raise ModelError("every prompt needs at least one token")
    V = model.config.vocab_size
    bad = sorted({t for r in rows for t in r if not 0 <= t < V})
    if bad:
        raise ModelError(f"token ids {bad[:10]} outside the vocabulary [0, {V})")
    if max_new_tokens < 1:
        raise ModelError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ModelError(f"temperature must be >= 0, got {temperature}")
    if temperature > 0 and key is None:
        raise ModelError("sampling (temperature > 0) needs an explicit key=jax.random.key(seed)")
    if key is None:
        key = jax.random.key(0)
    stops = tuple(model.config.eos_token_ids if stop_tokens is None else stop_tokens)
    pad = pad_id if pad_id is not None else (model.config.pad_token_id or 0)
    T = bucket(max(len(r) for r in rows))
    S = bucket(T + max_new_tokens)
    # At least two rows: XLA:CPU compiles single-row (matrix-vector) decode steps 3-5x slower.
    B = bucket(len(rows), minimum=2)
    tokens = np.full((B, T), pad, np.int32)
    mask = np.zeros((B, T), bool)
    mask[len(rows):, -1] = True  # filler rows: one token, already done
    for b, r in enumerate(rows):
        tokens[b, T - len(r):] = r
        mask[b, T - len(r):] = True
    done = np.arange(B) >= len(rows)
    graphdef, state = nnx.split(model)
    out, done, lengths = _generate(
        graphdef, state, jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(done),
        jnp.int32(max_new_tokens),
        jnp.float32(temperature), key, jnp.asarray(stops or (-1,), jnp.int32), jnp.int32(pad),
        cache_len=S, sample=temperature > 0)
    out, done, lengths = np.asarray(out), np.asarray(done), np.asarray(lengths)
    return GenerationOutput(
        tokens=[out[b, : lengths[b]].tolist() for b in range(len(rows))],
        finish_reasons=["stop" if d else "length" for d in done[:len(rows)]],
    )
