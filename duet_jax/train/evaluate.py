"""Evaluation of adapters on a task: what becomes DUET's feedback.

All evaluators take ``lora`` either as one adapter state or as ``k`` stacked ones (leading axis, as
:func:`~duet_jax.train.trainer.finetune_many` returns) and return one value per adapter plus
per-example details.

* :func:`answer_loss`: mean answer-token loss and perplexity.
* :func:`multiple_choice`: ``acc`` and ``acc_norm`` by the log-likelihood of each choice
  (lm-evaluation-harness definitions), from one batched pass over all (example, choice) rows.
* :func:`generation_match`: exact match of greedy or temperature-sampled generations after answer
  extraction (gsm8k's final number, normalised short answers), seeded.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from duet_jax.data.encode import EncodeConfig, encode_examples, template_parts
from duet_jax.data.example import Example
from duet_jax.errors import ConfigError
from duet_jax.feedback.metrics import choice_byte_lengths, exact_match, mc_accuracy
from duet_jax.sharding import (
    as_mesh,
    batch_sharding,
    constrain_batch,
    gather,
    place_pool,
    replicate,
    shard_frozen,
)
from duet_jax.train.pool import Pool, build_pool

__all__ = ["row_scores", "answer_loss", "MCSet", "build_mc_set", "multiple_choice",
           "generation_match", "is_stacked"]


def is_stacked(lora, reference_leaf_ndim: int | None = None) -> bool:
    """True when ``lora`` carries a leading adapter axis (k adapters)."""
    leaf = jax.tree.leaves(lora)[0]
    if reference_leaf_ndim is not None:
        return leaf.ndim == reference_leaf_ndim + 1
    return leaf.ndim == 4  # per adapter, LoRA matrices are [layers of the stack, in, r]


@functools.partial(jax.jit, static_argnames=("graphdef", "start", "batch_size", "head_chunk",
                                             "batch_spec"))
def _scores_jit(graphdef, lora, frozen, pool: Pool, flat_row, flat_slot, flat_valid, *, start: int,
                batch_size: int, head_chunk: int = 256, batch_spec=None):
    """Two phases: the trained layers for every row (in chunks), then the LM head only on the
    answer slots that carry a weight, gathered into one flat list ``[K]`` (K fixed per pool)."""
    model = nnx.merge(graphdef, lora, frozen)
    n = len(pool)
    nb = -(-n // batch_size)
    pad = nb * batch_size - n
    padded = jax.tree.map(lambda a: jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1)), pool)
    chunks = jax.tree.map(lambda a: a.reshape((nb, batch_size) + a.shape[1:]), padded)

    def layers(batch: Pool):
        batch = constrain_batch(batch, batch_spec)
        h = batch.hidden.astype(model.dtype) if start > 0 else model.embed(batch.input_ids)
        h, _ = model.run_layers(h, attention_mask=batch.attention_mask, start=start)
        return h

    h = jax.lax.map(layers, chunks).reshape((nb * batch_size,) + (pool.length, -1))
    pos = pool.target_pos[flat_row, flat_slot]
    tgt = pool.targets[flat_row, flat_slot]
    hk = h[flat_row, pos]  # [K, D]
    K = flat_row.shape[0]
    kc = K // head_chunk

    def head(args):
        x, t = args
        logits = model.head(x[None])[0]  # [c, V] float32
        return jnp.take_along_axis(logits, t[:, None], -1)[:, 0] - jax.nn.logsumexp(logits, -1)

    lp = jax.lax.map(head, (hk.reshape(kc, head_chunk, -1), tgt.reshape(kc, head_chunk))).reshape(K)
    lw = pool.loss_mask[flat_row, flat_slot] * flat_valid
    sw = pool.score_mask[flat_row, flat_slot] * flat_valid
    nll = jax.ops.segment_sum(-lp * lw, flat_row, num_segments=n)
    cnt = jax.ops.segment_sum(lw, flat_row, num_segments=n)
    score = jax.ops.segment_sum(lp * sw, flat_row, num_segments=n)
    return nll, cnt, score


def _flat_slots(pool: Pool, head_chunk: int):
    """(row, slot, valid) of every slot with a loss or score weight, padded to a multiple of
    ``head_chunk`` with entries whose ``valid`` is 0."""
    w = np.asarray(pool.loss_mask) + np.asarray(pool.score_mask)
    rows, slots = np.nonzero(w > 0)
    K = max(-(-rows.size // head_chunk) * head_chunk, head_chunk)
    pad = K - rows.size
    valid = np.concatenate([np.ones(rows.size, np.float32), np.zeros(pad, np.float32)])
    rows = np.concatenate([rows, np.zeros(pad, rows.dtype)]).astype(np.int32)
    slots = np.concatenate([slots, np.zeros(pad, slots.dtype)]).astype(np.int32)
    return jnp.asarray(rows), jnp.asarray(slots), jnp.asarray(valid)


def row_scores(graphdef, lora, frozen, pool: Pool, *, start: int = 0, batch_size: int = 16,
               head_chunk: int = 256, mesh=None):
    """Per pool row: ``(nll_sum, n_loss_tokens, answer_logprob)``, each float32 ``[N]`` (or
    ``[k, N]`` for stacked adapters). The LM head runs only on weighted answer slots.

    ``mesh`` (a ``Mesh`` or :class:`~duet_jax.sharding.MeshConfig`): frozen weights FSDP-sharded,
    each chunk of ``batch_size`` rows split over the mesh."""
    if start > 0 and pool.hidden is None:
        raise ConfigError(f"start={start} needs the frozen-trunk cache in pool.hidden")
    fr, fs, fv = _flat_slots(pool, head_chunk)
    mesh = as_mesh(mesh)
    spec = None
    if mesh is not None:
        lora, frozen, pool = replicate(lora, mesh), shard_frozen(frozen, mesh), place_pool(pool, mesh)
        fr, fs, fv = replicate((fr, fs, fv), mesh)
        spec = batch_sharding(mesh, batch_size)
    fn = functools.partial(_scores_jit, graphdef, frozen=frozen, pool=pool, flat_row=fr, flat_slot=fs,
                           flat_valid=fv, start=start, batch_size=batch_size, head_chunk=head_chunk,
                           batch_spec=spec)
    if is_stacked(lora):
        return jax.lax.map(lambda lo: fn(lora=lo), lora)
    return fn(lora=lora)


def answer_loss(graphdef, lora, frozen, pool: Pool, *, start: int = 0, batch_size: int = 16,
                mesh=None) -> dict:
    """Mean answer-token loss (token-weighted) and perplexity, per adapter, with per-example means.

    Raises:
      ConfigError: the pool has no loss token at all (nothing to score).
    """
    nll, cnt, _ = row_scores(graphdef, lora, frozen, pool, start=start, batch_size=batch_size,
                             mesh=mesh)
    nll, cnt = gather(nll).astype(np.float64), gather(cnt).astype(np.float64)
    total = cnt.sum(-1)
    if np.any(total == 0):
        raise ConfigError("the evaluation set has no scorable (answer) token")
    loss = nll.sum(-1) / total
    return {"loss": loss, "perplexity": np.exp(loss),
            "per_example": nll / np.maximum(cnt, 1.0)}


@dataclasses.dataclass(frozen=True)
class MCSet:
    """A multiple-choice evaluation set: one pool row per (example, choice).

    Attributes:
      pool: rows of prompt + choice.
      row_example: int32 ``[R]`` example of each row; ``row_choice`` its choice index.
      gold: int32 ``[n]``; ``byte_lengths`` float ``[n, c_max]``; ``valid`` bool ``[n, c_max]``.
      ids: example ids; ``skipped``: ids of examples with a choice that did not fit.
    """

    pool: Pool
    row_example: np.ndarray
    row_choice: np.ndarray
    gold: np.ndarray
    byte_lengths: np.ndarray
    valid: np.ndarray
    ids: tuple[str, ...]
    skipped: tuple[str, ...]


def build_mc_set(examples: Sequence[Example], tokenizer, config: EncodeConfig | None = None, *,
                 length: int | None = None, answer_slots: int | None = None) -> MCSet:
    """Tokenize every (example, choice) pair. Examples without choices are refused.

    Raises:
      ConfigError: no example has choices, or every example was skipped as too long.
    """
    config = config or EncodeConfig()
    mc = [e for e in examples if e.choices]
    if not mc:
        raise ConfigError("no example has choices: multiple-choice evaluation needs an 'mc' domain")
    rows, owner, choice = [], [], []
    for i, e in enumerate(mc):
        for j, c in enumerate(e.choices):
            rows.append(Example(f"{e.id}#{j}", e.prompt, " " + c.strip(), "mc"))
            owner.append(i)
            choice.append(j)
    tok = encode_examples(rows, tokenizer, config)
    kept = set(tok.ids)
    bad = {owner[r] for r, ex in enumerate(rows) if ex.id not in kept}
    keep_rows = [r for r in range(len(rows)) if owner[r] not in bad]
    if not keep_rows:
        raise ConfigError("every multiple-choice example was too long for max_length")
    pos_of = {rid: i for i, rid in enumerate(tok.ids)}
    sel = np.asarray([pos_of[rows[r].id] for r in keep_rows])
    sub = dataclasses.replace(
        tok, input_ids=tok.input_ids[sel], loss_mask=tok.loss_mask[sel], lengths=tok.lengths[sel],
        prompt_lengths=tok.prompt_lengths[sel], answer_lengths=tok.answer_lengths[sel],
        ids=tuple(tok.ids[i] for i in sel), skipped=())
    pool, _ = build_pool(sub, length=length, answer_slots=answer_slots)
    kept_examples = [i for i in range(len(mc)) if i not in bad]
    remap = {old: new for new, old in enumerate(kept_examples)}
    row_example = np.asarray([remap[owner[r]] for r in keep_rows], np.int32)
    row_choice = np.asarray([choice[r] for r in keep_rows], np.int32)
    c_max = max(len(mc[i].choices) for i in kept_examples)
    valid = np.zeros((len(kept_examples), c_max), bool)
    lens = np.ones((len(kept_examples), c_max))
    for new, old in enumerate(kept_examples):
        n = len(mc[old].choices)
        valid[new, :n] = True
        lens[new, :n] = choice_byte_lengths(mc[old].choices)
    return MCSet(pool, row_example, row_choice,
                 np.asarray([mc[i].gold for i in kept_examples], np.int32), lens, valid,
                 tuple(mc[i].id for i in kept_examples), tuple(mc[i].id for i in sorted(bad)))


def multiple_choice(graphdef, lora, frozen, mc: MCSet, *, start: int = 0, batch_size: int = 16,
                    mesh=None) -> dict:
    """``acc`` and ``acc_norm`` per adapter (float ``[k]`` or scalar) and per example."""
    _, _, ll = row_scores(graphdef, lora, frozen, mc.pool, start=start, batch_size=batch_size,
                          mesh=mesh)
    ll = gather(ll).astype(np.float64)
    stacked = ll.ndim == 2
    ll = ll if stacked else ll[None]
    accs, norms, per = [], [], []
    for a in range(ll.shape[0]):
        table = np.full(mc.valid.shape, -np.inf)
        table[mc.row_example, mc.row_choice] = ll[a]
        m = mc_accuracy(table, mc.gold, mc.byte_lengths, mc.valid)
        accs.append(m["acc"].mean())
        norms.append(m["acc_norm"].mean())
        per.append(m)
    if not stacked:
        return {"acc": accs[0], "acc_norm": norms[0], "per_example": per[0]}
    return {"acc": np.asarray(accs), "acc_norm": np.asarray(norms), "per_example": per}


def generation_match(graphdef, lora, frozen, examples: Sequence[Example], tokenizer, *,
                     max_new_tokens: int = 32, temperature: float = 0.0, key=None,
                     config: EncodeConfig | None = None, batch_size: int = 16) -> dict:
    """Exact match of generated answers (``kind="math"``: final number; else normalised text
    against the answer and its ``meta["aliases"]``). ``temperature > 0`` samples (needs ``key``).

    Uses the full model (the KV cache needs every layer); ``lora`` is one adapter.
    """
    from duet_jax.models.generation import generate

    if not examples:
        raise ConfigError("generation_match needs at least one example")
    config = config or EncodeConfig()
    prefix, mid, _, chat = template_parts(tokenizer, config)
    model = nnx.merge(graphdef, lora, frozen)
    stops = sorted({int(tokenizer.eos_token_id)} | set(model.config.eos_token_ids or ()))
    prompts = []
    for e in examples:
        p = tokenizer(e.prompt.strip() if chat else e.prompt, add_special_tokens=False)["input_ids"]
        room = config.max_length - len(prefix) - len(mid) - max_new_tokens
        p = p[-room:] if room > 0 else p[-1:]
        prompts.append(prefix + list(p) + mid)
    scores, preds = [], []
    for b in range(0, len(prompts), batch_size):
        sub = None if key is None else jax.random.fold_in(key, b)
        out = generate(model, prompts[b:b + batch_size], max_new_tokens=max_new_tokens,
                       temperature=temperature, key=sub, stop_tokens=stops)
        for e, toks in zip(examples[b:b + batch_size], out.tokens, strict=True):
            text = tokenizer.decode(toks, skip_special_tokens=True)
            refs = [e.answer] + list(e.meta.get("aliases", []))
            if e.kind == "math" and "short_answer" in e.meta:
                refs = [str(e.meta["short_answer"])]
            preds.append(text)
            scores.append(exact_match(text, refs, kind="math" if e.kind == "math" else "qa"))
    return {"exact_match": float(np.mean(scores)), "per_example": np.asarray(scores),
            "predictions": preds}
