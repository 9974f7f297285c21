"""Pure functions of (graphdef, LoRA state, frozen state, batch): the answer-slot log-probabilities
that the trainer, the evaluators and the frozen-trunk cache share.

Frozen trunk: when every adapter sits in layers ``>= start``, the hidden states entering layer
``start`` do not depend on the adapter, so they are computed once per example
(:func:`trunk_hidden`) and every fine-tune and evaluation of the run starts from them. This is
exact: the same float32 operations run in the same order, only once.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from duet_jax.errors import ConfigError
from duet_jax.models.lora import LoRAParam, lora_layers
from duet_jax.sharding import (
    as_mesh,
    batch_sharding,
    from_process_local,
    gather,
    process_block,
    put,
    replicate,
    shard_frozen,
)
from duet_jax.train.pool import Pool

__all__ = ["split_model", "trunk_start", "slot_logprobs", "run_layers_remat", "trunk_hidden"]


def split_model(model) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """``(graphdef, lora_state, frozen_state)`` of a model with adapters attached."""
    if not lora_layers(model):
        raise ConfigError("the model has no LoRA adapter; attach one with duet_jax.models.add_lora")
    return nnx.split(model, LoRAParam, ...)


def trunk_start(model) -> int:
    """The first layer that holds an adapter: layers below it form the frozen trunk."""
    layers = lora_layers(model)
    if not layers:
        raise ConfigError("the model has no LoRA adapter")
    return min(i for i, _ in layers)


def slot_logprobs(graphdef, lora, frozen, batch: Pool, *, start: int = 0,
                  dropout_key: jax.Array | None = None, remat=False) -> jax.Array:
    """float32 ``[B, A]``: log p(target token) at each answer slot (padding slots hold garbage;
    mask them with ``batch.loss_mask`` / ``batch.score_mask``).

    With ``start > 0`` the batch must carry ``hidden`` (the states entering layer ``start``).
    ``remat`` (``True`` or a ``jax.checkpoint_policies`` name) checkpoints the scanned layer: under
    ``grad`` only each layer's input is kept and the layer is recomputed in the backward pass (less
    memory, about one more forward).
    """
    model = nnx.merge(graphdef, lora, frozen)
    if start > 0:
        if batch.hidden is None:
            raise ConfigError(f"start={start} needs the cached hidden states (Pool.hidden)")
        h = batch.hidden.astype(model.dtype)
    else:
        h = model.embed(batch.input_ids)
    h, _ = model.run_layers(h, attention_mask=batch.attention_mask, start=start,
                            dropout_key=dropout_key, remat=remat)
    logits = model.head(h, positions=batch.target_pos)  # [B, A, V] float32
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, batch.targets[..., None], axis=-1)[..., 0]
    return picked - logz


def run_layers_remat(model, h: jax.Array, attention_mask: jax.Array, *, start: int = 0,
                     dropout_key: jax.Array | None = None, policy=True) -> jax.Array:
    """``model.run_layers(h, attention_mask=..., start=start, remat=policy)[0]``.

    Kept for callers of the earlier API. The layers are stacked and scanned (``lax.scan`` over each
    :class:`~duet_jax.models.llama.LayerStack`) with the scanned layer under ``jax.checkpoint``,
    so the backward pass is a loop that recomputes one layer per iteration, which XLA cannot hoist
    (with ``jax.checkpoint`` around each layer of an unrolled loop, XLA:CPU dropped the barriers
    and ran every recomputation early: no memory saved).
    """
    return model.run_layers(h, attention_mask=attention_mask, start=start, dropout_key=dropout_key,
                            remat=policy)[0]


@functools.partial(jax.jit, static_argnames=("graphdef", "start", "dtype"))
def _trunk_chunk(graphdef, lora, frozen, input_ids, attention_mask, *, start, dtype):
    model = nnx.merge(graphdef, lora, frozen)
    h, _ = model.run_layers(model.embed(input_ids), attention_mask=attention_mask, start=0, end=start)
    return h.astype(dtype)


def trunk_hidden(graphdef, lora, frozen, pool: Pool, *, start: int, batch_size: int = 16,
                 dtype=jnp.float32, bucket: int = 32, mesh=None) -> jax.Array:
    """Hidden states ``[N, T, D]`` entering layer ``start`` for every pool row.

    Rows are grouped by length, rounded up to a multiple of ``bucket``, and each group runs at its
    own length in chunks of ``batch_size`` rows: padding costs little, and there is one compiled
    program per length bucket. Positions past a row's length hold zeros (they are masked).

    ``mesh`` (a ``Mesh`` or :class:`~duet_jax.sharding.MeshConfig`): frozen weights FSDP-sharded,
    each chunk's rows split over the mesh; the result is gathered on the host as without a mesh.
    With several processes (multi-host) each process keeps only its own rows on the host: the
    result is a global array of :func:`~duet_jax.sharding.trunk_rows` rows (the pool's, padded with
    zero rows to a multiple of the mesh size) sharded by rows, built from each process's block
    (``jax.make_array_from_process_local_data``); no process ever holds the whole ``[N, T, D]``.
    """
    mesh = as_mesh(mesh)
    if mesh is not None:
        lora, frozen = replicate(lora, mesh), shard_frozen(frozen, mesh)
        rows_sharding = batch_sharding(mesh, batch_size)
    if start <= 0:
        raise ConfigError("the frozen trunk is empty (an adapter sits in layer 0)")
    ids = np.asarray(pool.input_ids)
    att = np.asarray(pool.attention_mask)
    n, t = ids.shape
    lengths = att.sum(1)
    padded = np.minimum(-(-np.maximum(lengths, 1) // bucket) * bucket, t)
    block = process_block(n, mesh)  # several processes: only this process's rows on the host
    lo, hi = (0, n) if block is None else block[1:]
    out = None
    for L in sorted(set(padded.tolist())):
        rows = np.flatnonzero(padded == L)
        for s in range(0, rows.size, batch_size):
            chunk = rows[s:s + batch_size]
            full = np.resize(chunk, batch_size)  # pad the last chunk with repeats (same shape)
            ci, ca = ids[full, :L], att[full, :L]
            if mesh is not None:
                ci, ca = put(ci, rows_sharding), put(ca, rows_sharding)
            h = _trunk_chunk(graphdef, lora, frozen, jnp.asarray(ci), jnp.asarray(ca),
                             start=int(start), dtype=jnp.dtype(dtype))
            h = gather(h)[: chunk.size]
            if out is None:
                out = np.zeros((hi - lo, t, h.shape[-1]), h.dtype)
            mine = (chunk >= lo) & (chunk < hi)
            out[chunk[mine] - lo, :L] = h[mine]
    if block is not None:
        return from_process_local(out, block[0], mesh)
    return jnp.asarray(out)
