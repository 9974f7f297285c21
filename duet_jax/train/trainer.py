"""LoRA fine-tuning on a mixture, the whole step loop inside one jitted function.

A mixture is an int32 index array ``[M]`` into the :class:`~duet_jax.train.pool.Pool`. One call:

1. draws the example order from the key (a fresh permutation of the mixture per epoch);
2. runs ``steps`` optimizer steps in ``lax.scan``; each step gathers its batch on device, takes
   ``grad_accum`` micro-batches, clips, and applies AdamW with warm-up and cosine/linear decay;
3. watches the loss: the first non-finite loss or gradient freezes the adapter at its last finite
   value and is reported, so the host raises :class:`~duet_jax.errors.TrainingError` naming the step
   and the learning rate instead of returning a NaN adapter.

``finetune_many`` trains ``k`` adapters on ``k`` mixtures in one call (``vmap`` over index arrays and
keys, one copy of the frozen weights): DUET's best-of-k. Shapes depend only on ``(M, steps, k)``,
so a new mixture of the same size never recompiles.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from duet_jax.errors import ConfigError, TrainingError
from duet_jax.sharding import (
    as_mesh,
    batch_sharding,
    constrain_batch,
    place_pool,
    replicate,
    shard_frozen,
    shard_rows,
)
from duet_jax.train.forward import slot_logprobs
from duet_jax.train.pool import Pool

__all__ = ["TrainConfig", "TrainResult", "make_optimizer", "finetune", "finetune_many", "num_steps"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Fine-tuning hyperparameters.

    Attributes:
      epochs: passes over the mixture (fractions allowed); ignored when ``steps`` is set.
      steps: optimizer steps (overrides ``epochs``).
      batch_size: examples per micro-batch.
      grad_accum: micro-batches per optimizer step.
      learning_rate: peak learning rate.
      warmup_ratio: fraction of steps with linear warm-up from 0.
      schedule: "cosine", "linear" or "constant" after warm-up.
      weight_decay: AdamW decoupled weight decay.
      max_grad_norm: global-norm clipping (0 disables).
      b1, b2, eps: Adam moments.
      remat: recompute each layer in the backward pass instead of storing its activations
        (the scanned layer under ``jax.checkpoint``): lower peak memory for about one extra forward.
      remat_policy: which ``jax.checkpoint_policies`` entry remat uses: ``nothing_saveable``
        (store only each layer's input) or e.g. ``dots_with_no_batch_dims_saveable`` (also keep
        the matmul outputs: more memory, less recomputation).
    """

    epochs: float = 1.0
    steps: int | None = None
    batch_size: int = 8
    grad_accum: int = 1
    learning_rate: float = 2e-4
    warmup_ratio: float = 0.1
    schedule: str = "cosine"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    remat: bool = False
    remat_policy: str = "nothing_saveable"

    def __post_init__(self):
        if self.batch_size < 1 or self.grad_accum < 1:
            raise ConfigError("batch_size and grad_accum must be >= 1")
        if self.steps is not None and self.steps < 1:
            raise ConfigError(f"steps must be >= 1, got {self.steps}")
        if self.steps is None and not self.epochs > 0:
            raise ConfigError(f"epochs must be > 0, got {self.epochs}")
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ConfigError(f"schedule must be cosine, linear or constant, got {self.schedule!r}")
        if not self.learning_rate > 0 or not 0 <= self.warmup_ratio < 1:
            raise ConfigError("learning_rate must be > 0 and warmup_ratio in [0, 1)")
        if not hasattr(jax.checkpoint_policies, self.remat_policy) or self.remat_policy.startswith("_"):
            raise ConfigError(f"remat_policy {self.remat_policy!r} is not a jax.checkpoint_policies "
                              "name (e.g. nothing_saveable, dots_with_no_batch_dims_saveable)")

    @property
    def remat_arg(self):
        """What ``run_layers(remat=...)`` gets: ``False`` or the policy name."""
        return self.remat_policy if self.remat else False


def num_steps(config: TrainConfig, mixture_size: int) -> int:
    """Optimizer steps for a mixture of ``mixture_size`` examples."""
    if config.steps is not None:
        return int(config.steps)
    per_step = config.batch_size * config.grad_accum
    return max(1, math.ceil(config.epochs * mixture_size / per_step))


def learning_rate_schedule(config: TrainConfig, steps: int) -> optax.Schedule:
    warm = int(round(config.warmup_ratio * steps))
    decay_steps = max(steps - warm, 1)
    if config.schedule == "cosine":
        after = optax.cosine_decay_schedule(config.learning_rate, decay_steps)
    elif config.schedule == "linear":
        after = optax.linear_schedule(config.learning_rate, 0.0, decay_steps)
    else:
        after = optax.constant_schedule(config.learning_rate)
    if warm == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, config.learning_rate, warm), after], [warm])


def make_optimizer(config: TrainConfig, steps: int) -> optax.GradientTransformation:
    parts = []
    if config.max_grad_norm > 0:
        parts.append(optax.clip_by_global_norm(config.max_grad_norm))
    parts.append(optax.adamw(learning_rate_schedule(config, steps), b1=config.b1, b2=config.b2,
                             eps=config.eps, weight_decay=config.weight_decay))
    return optax.chain(*parts)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainResult:
    """What one (or k stacked) fine-tune(s) return.

    Attributes:
      lora: the trained adapter state (leading ``[k]`` axis for ``finetune_many``).
      opt_state: the optimizer state at the end (for checkpoints and resuming).
      losses: float32 ``[steps]`` mean answer-token loss of each step (before its update).
      bad_step: int32, the first step whose loss or gradient was not finite, -1 if none.
    """

    lora: object
    opt_state: object
    losses: jax.Array
    bad_step: jax.Array


def _masked_mean_nll(graphdef, lora, frozen, batch: Pool, start, dropout_key, remat=False):
    logp = slot_logprobs(graphdef, lora, frozen, batch, start=start, dropout_key=dropout_key,
                         remat=remat)
    m = batch.loss_mask
    return -jnp.sum(logp * m) / jnp.maximum(jnp.sum(m), 1.0)


def _finetune_one(graphdef, lora0, frozen, pool: Pool, indices, key, *, config: TrainConfig,
                  steps: int, start: int, batch_spec=None):
    M = indices.shape[0]
    B, G = config.batch_size, config.grad_accum
    per_step = B * G
    n_perm = -(-(steps * per_step) // M)
    k_order, k_drop = jax.random.split(key)
    perms = jax.vmap(lambda k: jax.random.permutation(k, M))(jax.random.split(k_order, n_perm))
    order = indices[perms.reshape(-1)[: steps * per_step]].reshape(steps, G, B)
    tx = make_optimizer(config, steps)
    opt0 = tx.init(lora0)
    grad_fn = jax.value_and_grad(_masked_mean_nll, argnums=1)

    def step(carry, xs):
        lora, opt, bad = carry
        s, rows = xs

        def micro(acc, g_rows):
            g_i, r = g_rows
            batch = constrain_batch(pool.take(r), batch_spec)
            dk = jax.random.fold_in(jax.random.fold_in(k_drop, s), g_i)
            loss, g = grad_fn(graphdef, lora, frozen, batch, start, dk, config.remat_arg)
            return jax.tree.map(jnp.add, acc, (loss, g)), None

        zero = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, lora))
        (loss, grads), _ = jax.lax.scan(micro, zero, (jnp.arange(G), rows))
        loss, grads = loss / G, jax.tree.map(lambda g: g / G, grads)
        finite = jnp.isfinite(loss) & jnp.all(
            jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
        ok = finite & (bad < 0)
        updates, new_opt = tx.update(grads, opt, lora)
        new_lora = optax.apply_updates(lora, updates)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
        bad = jnp.where((bad < 0) & ~finite, s, bad)
        return (keep(new_lora, lora), keep(new_opt, opt), bad), loss

    init = (lora0, opt0, jnp.asarray(-1, jnp.int32))
    (lora, opt, bad), losses = jax.lax.scan(step, init, (jnp.arange(steps, dtype=jnp.int32), order))
    return TrainResult(lora, opt, losses, bad)


@functools.partial(jax.jit, static_argnames=("graphdef", "config", "steps", "start", "batch_spec"))
def _finetune_jit(graphdef, lora0, frozen, pool, indices, key, *, config, steps, start,
                  batch_spec=None):
    return _finetune_one(graphdef, lora0, frozen, pool, indices, key, config=config, steps=steps,
                         start=start, batch_spec=batch_spec)


@functools.partial(jax.jit, static_argnames=("graphdef", "config", "steps", "start", "batch_spec",
                                             "spmd_axis"))
def _finetune_many_jit(graphdef, lora0, frozen, pool, indices, keys, *, config, steps, start,
                       batch_spec=None, spmd_axis=None):
    fn = functools.partial(_finetune_one, config=config, steps=steps, start=start,
                           batch_spec=batch_spec)
    return jax.vmap(fn, in_axes=(None, None, None, None, 0, 0), spmd_axis_name=spmd_axis)(
        graphdef, lora0, frozen, pool, indices, keys)


def _place(mesh, lora0, frozen, pool):
    return replicate(lora0, mesh), shard_frozen(frozen, mesh), place_pool(pool, mesh)


def _check(pool: Pool, indices, config: TrainConfig, start: int):
    idx = np.asarray(indices)
    M = idx.shape[-1]
    if M == 0:
        raise ConfigError("the mixture is empty: nothing to fine-tune on")
    if M < config.batch_size:
        raise ConfigError(
            f"the mixture has {M} examples, fewer than one batch ({config.batch_size}); "
            "lower batch_size or raise the budget")
    if idx.min() < 0 or idx.max() >= len(pool):
        raise ConfigError(f"mixture indices must lie in [0, {len(pool)}), got [{idx.min()}, {idx.max()}]")
    if start > 0 and pool.hidden is None:
        raise ConfigError(f"start={start} needs the frozen-trunk cache: pool.with_hidden(trunk_hidden(...))")


def _raise_if_bad(result: TrainResult, config: TrainConfig, steps: int):
    bad = np.atleast_1d(np.asarray(result.bad_step))
    if (bad >= 0).any():
        which = int(np.flatnonzero(bad >= 0)[0])
        s = int(bad[which])
        lr = float(learning_rate_schedule(config, steps)(s))
        raise TrainingError(
            f"the loss became NaN or infinite at step {s} of {steps} (adapter {which}, learning rate "
            f"{lr:.3g}); the adapter was not updated from then on and is not returned. Lower the "
            "learning rate or check the data.")


def finetune(graphdef, lora0, frozen, pool: Pool, indices, key, config: TrainConfig, *,
             start: int = 0, mesh=None) -> TrainResult:
    """Fine-tune one adapter on the mixture ``indices`` (int32 ``[M]``).

    Args:
      graphdef, lora0, frozen: from :func:`duet_jax.train.forward.split_model`.
      pool: the examples (with ``hidden`` when ``start > 0``).
      indices: int32 ``[M]`` rows of the pool (repeats allowed: sampling with replacement).
      key: PRNG key (order of examples, LoRA dropout). The same key gives the same adapter, bit for
        bit, on the same backend.
      config: hyperparameters.
      start: the first layer to run (the frozen-trunk split), 0 for the full model.
      mesh: ``None`` (no placement: wherever the inputs are), a ``jax.sharding.Mesh`` or a
        :class:`~duet_jax.sharding.MeshConfig`: frozen weights FSDP-sharded, the adapter
        replicated, each step's batch split over the mesh (see :mod:`duet_jax.sharding`).
        Inputs already placed that way are not copied again.

    Raises:
      ConfigError: empty mixture, fewer examples than one batch, indices out of range.
      TrainingError: the loss became NaN or infinite (names the step and learning rate).
    """
    indices = jnp.asarray(indices, jnp.int32)
    _check(pool, indices, config, start)
    steps = num_steps(config, indices.shape[0])
    mesh = as_mesh(mesh)
    spec = None
    if mesh is not None:
        lora0, frozen, pool = _place(mesh, lora0, frozen, pool)
        indices, key = replicate((indices, key), mesh)
        spec = batch_sharding(mesh, config.batch_size)
    res = _finetune_jit(graphdef, lora0, frozen, pool, indices, key, config=config, steps=steps,
                        start=int(start), batch_spec=spec)
    _raise_if_bad(res, config, steps)
    return res


def finetune_many(graphdef, lora0, frozen, pool: Pool, indices, keys, config: TrainConfig, *,
                  start: int = 0, mesh=None) -> TrainResult:
    """Fine-tune ``k`` adapters at once: ``indices`` int32 ``[k, M]``, ``keys`` ``[k]``. Returns a
    :class:`TrainResult` whose leaves have a leading ``[k]`` axis.

    With a ``mesh`` whose ``data`` axis divides ``k``, the ``k`` fine-tunes are spread over
    ``data`` (``k / data`` per device group, each adapter's batch over ``fsdp``); otherwise every
    adapter's batch is split over the whole mesh."""
    indices = jnp.asarray(indices, jnp.int32)
    if indices.ndim != 2:
        raise ConfigError(f"indices must be [k, M], got shape {indices.shape}")
    _check(pool, indices, config, start)
    steps = num_steps(config, indices.shape[1])
    mesh = as_mesh(mesh)
    spec, spmd = None, None
    if mesh is not None:
        lora0, frozen, pool = _place(mesh, lora0, frozen, pool)
        k, d = indices.shape[0], mesh.shape["data"]
        if d > 1 and k % d == 0:
            spmd = "data"
            indices, keys = shard_rows(indices, mesh, ("data",)), shard_rows(keys, mesh, ("data",))
            spec = batch_sharding(mesh, config.batch_size, ("fsdp",))
        else:
            indices, keys = replicate((indices, keys), mesh)
            spec = batch_sharding(mesh, config.batch_size)
    res = _finetune_many_jit(graphdef, lora0, frozen, pool, indices, keys, config=config, steps=steps,
                             start=int(start), batch_spec=spec, spmd_axis=spmd)
    _raise_if_bad(res, config, steps)
    return res
