"""DUET's influence scores: for every domain, how much each of its training examples helps that
domain's own held-out loss. Never computed against the unseen task.

For each domain ``d``:

1. fine-tune a proxy adapter on ``d``'s train split alone (a fixed number of examples, so every
   domain shares one compiled fine-tune);
2. featurize every train example of ``d`` at the proxy adapter (projected per-example LoRA
   gradients) into a resumable :class:`~duet_jax.influence.store.FeatureStore`;
3. featurize ``d``'s validation examples and take their mean (the query);
4. ``IF(z) = g_val^T H^-1 g_z`` with the chosen curvature: higher means that up-weighting ``z``
   lowers ``d``'s validation loss (the paper's ``-g_val^T H^-1 g_z`` on the loss, read as
   "helpfulness").

Kill it part-way and run it again: finished chunks are read back, not recomputed. A store made
with another model, adapter, projector or example list is refused (``StoreMismatchError``).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from duet_jax.errors import InfluenceError
from duet_jax.influence.curvature import adam_preconditioner
from duet_jax.influence.scorer import InfluenceScorer
from duet_jax.influence.store import (
    FeatureStore,
    featurize_into_store,
    params_fingerprint,
    store_metadata,
)
from duet_jax.train.forward import slot_logprobs
from duet_jax.train.pool import Pool
from duet_jax.train.trainer import TrainConfig, finetune

__all__ = ["DomainScores", "InfluenceConfig", "domain_influence", "example_loss_fn", "featurize_pool",
           "length_chunks", "trim_pool"]

CURVATURES = ("identity", "cosine", "adam", "fisher")


@dataclasses.dataclass(frozen=True, kw_only=True)
class InfluenceConfig:
    """DUET's per-domain influence step: the one place for its options and their defaults.

    Attributes:
      proj_dim: projected gradient dimension k.
      projector: identity, dense, dense_gaussian, sjlt, chunked or pallas
        (:mod:`duet_jax.influence.projectors`).
      curvature: identity, cosine, adam or fisher (TRAK).
      damping: damping lambda of the curvature.
      proxy_examples: examples (with repeats) in each domain's proxy fine-tune.
      proxy_epochs: epochs of the proxy fine-tune.
      validation_examples: validation examples per domain for the query gradient.
      chunk_size: examples per featurize chunk (the resumable unit).
      seed: projection seed.
      remat: recompute each layer in the per-example backward pass (an 8B model at 1024 tokens
        needs about 13 GB per row without it; see docs/scale.md).
    """

    proj_dim: int = 2048
    projector: str = "sjlt"
    curvature: str = "fisher"
    damping: float = 1e-3
    proxy_examples: int = 64
    proxy_epochs: float = 1.0
    validation_examples: int = 16
    chunk_size: int = 64
    seed: int = 0
    remat: bool = False

    def __post_init__(self):
        from duet_jax.errors import ConfigError
        from duet_jax.influence.projectors import PROJECTORS

        if self.curvature not in CURVATURES:
            raise ConfigError(f"influence.curvature must be one of {', '.join(CURVATURES)} "
                              f"(ihvp is for InfluenceScorer used directly), got {self.curvature!r}")
        if self.projector not in PROJECTORS:
            raise ConfigError(f"influence.projector must be one of {', '.join(PROJECTORS)}, "
                              f"got {self.projector!r}")
        for name in ("proj_dim", "proxy_examples", "validation_examples", "chunk_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"influence.{name} must be >= 1, got {getattr(self, name)}")
        if not self.damping >= 0 or not self.proxy_epochs > 0:
            raise ConfigError("influence.damping must be >= 0 and influence.proxy_epochs > 0")


@dataclasses.dataclass(frozen=True)
class DomainScores:
    """Scores of every pool row (``[N]``), their validity flags, and per-domain diagnostics."""

    scores: np.ndarray
    valid: np.ndarray
    per_domain: dict


#: the layout of a stored feature row; bumped when the LoRA parameter tree (and so the flattening
#: order of a gradient) changes, so that an old store is refused instead of mixed with new rows.
#: 2: stacked decoder layers (lax.scan).
FEATURE_LAYOUT = 2


def example_loss_fn(graphdef, start: int, remat: bool = False) -> Callable:
    """``loss(lora, example, frozen)``: mean answer-token loss of ONE pool row (``remat``: recompute
    each layer in the backward pass, for long rows of large models)."""

    def loss(lora, ex: Pool, frozen):
        batch = jax.tree.map(lambda a: a[None], ex)
        lp = slot_logprobs(graphdef, lora, frozen, batch, start=start, remat=remat)
        m = batch.loss_mask
        return -jnp.sum(lp * m) / jnp.maximum(jnp.sum(m), 1.0)

    return loss


def trim_pool(pool: Pool, buckets: Sequence[int] | None = None, bucket: int = 16) -> Pool:
    """A host pool cut to its longest row's length, rounded up to the smallest of ``buckets`` that
    holds it (or to a multiple of ``bucket``), never beyond the pool's own length.

    Exact: rows are right-padded, positions past a row's length are masked, and its answer slots
    lie inside it, so every row's loss (and gradient) is unchanged.
    """
    lengths = np.asarray(pool.attention_mask).sum(1)
    need = max(int(lengths.max()), 1)
    if buckets:
        fits = [b for b in sorted(buckets) if b >= need]
        T = fits[0] if fits else pool.length
    else:
        T = -(-need // bucket) * bucket
    T = int(min(pool.length, T))
    if T == pool.length:
        return pool
    return dataclasses.replace(pool, input_ids=pool.input_ids[:, :T], attention_mask=pool.attention_mask[:, :T],
                               hidden=None if pool.hidden is None else pool.hidden[:, :T])


def length_chunks(pool: Pool, chunk: int, bucket: int = 16) -> list[tuple[np.ndarray, Pool]]:
    """Pool rows sorted by real length, cut into chunks of ``chunk`` rows, each trimmed to its
    longest row rounded up to ``bucket`` tokens (host arrays).

    A short chunk (the last one) is filled up with repeats of its own rows, so every chunk has
    exactly ``chunk`` rows (one compiled program per length, not per remainder). Trimming is exact:
    positions past a row's length are masked, and the answer slots lie inside the row.

    Returns:
      ``[(rows, sub_pool)]``: ``rows`` int ``[<= chunk]`` the pool rows a chunk holds (its first
      ``len(rows)`` entries; the rest are repeats to drop).
    """
    att = np.asarray(pool.attention_mask)
    lengths = att.sum(1)
    order = np.argsort(lengths, kind="stable")
    out = []
    for s in range(0, order.size, chunk):
        rows = order[s:s + chunk]
        full = np.resize(rows, chunk)
        sub = trim_pool(jax.tree.map(lambda a, full=full: np.asarray(a)[full], pool), bucket=bucket)
        out.append((rows, sub))
    return out


def featurize_pool(scorer: InfluenceScorer, lora, pool: Pool, frozen, *, bucket: int = 16,
                   chunks: list | None = None, return_flags: bool = False):
    """``scorer.featurize`` over a pool, chunk by chunk at each chunk's own (bucketed) length.

    ``scorer`` must use a loss like :func:`example_loss_fn` (``loss(lora, example, frozen)``); its
    ``batch_size`` is the chunk size. A pool of short QA rows padded to a long ``max_length`` costs
    only its real lengths. Pass ``chunks`` (from :func:`length_chunks`) to reuse the host slices.

    Returns:
      ``[N, k]`` float32 numpy in pool row order (and ``valid [N]`` with ``return_flags``).
    """
    chunks = length_chunks(pool, scorer.options.batch_size, bucket) if chunks is None else chunks
    feats, valid = None, np.zeros(len(pool), bool)
    for rows, sub in chunks:
        f, ok = scorer.featurize(lora, sub, context=frozen, return_flags=True)
        f = np.asarray(f)
        if feats is None:
            feats = np.zeros((len(pool), f.shape[1]), np.float32)
        feats[rows] = f[: rows.size]
        valid[rows] = np.asarray(ok)[: rows.size]
    return (feats, valid) if return_flags else feats


def _host(pool: Pool, rows: np.ndarray) -> Pool:
    return jax.tree.map(lambda a: np.asarray(a[jnp.asarray(rows)]), pool)


def domain_influence(
    *,
    graphdef,
    lora0,
    frozen,
    start: int,
    pool: Pool,
    domain_of: np.ndarray,
    val_pool: Pool,
    val_domain_of: np.ndarray,
    names: Sequence[str],
    example_ids: Sequence[str],
    base_model_id: str,
    train_config: TrainConfig,
    config: InfluenceConfig | None = None,
    query_pool: Pool | None = None,
    buckets: Sequence[int] | None = None,
    store_root: str | Path | None = None,
    key: jax.Array | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> DomainScores:
    """IF scores of every pool row against its own domain's validation loss (see module docs).

    Args:
      graphdef, lora0, frozen, start: the split model (``start`` > 0: pools carry ``hidden``).
      pool, domain_of: the training pool and each row's domain index.
      val_pool, val_domain_of: the domains' validation rows.
      names: domain names (index -> name), example_ids: one id per pool row.
      base_model_id: identifies the base weights in the store metadata (e.g. a file hash).
      train_config: the proxy fine-tune's settings (``epochs`` is replaced by the config's
        ``proxy_epochs`` and applied to ``proxy_examples``).
      config: the influence options (:class:`InfluenceConfig`; ``None``: its defaults).
      query_pool: score every domain against these rows instead of the domain's own validation
        rows (DUET-LESS: a few examples of the target task; an oracle, since it sees task data).
      buckets: sequence lengths the featurize chunks are cut to (the run's encode buckets, so the
        per-example gradient program compiles once per bucket); ``None``: multiples of 16. Each
        domain's rows are featurized shortest first, so a chunk holds rows of similar length and
        a pool of short rows costs their real length, not the pool's longest.
      store_root: directory for the resumable feature stores (None: in memory only).
      progress: ``progress(domain, done_chunks, num_chunks)``.

    Raises:
      InfluenceError: a domain without validation rows.
    """
    config = InfluenceConfig() if config is None else config
    proj_dim, projector, curvature, damping, seed = (config.proj_dim, config.projector,
                                                     config.curvature, config.damping, config.seed)
    proxy_examples, validation_examples, chunk_size = (config.proxy_examples,
                                                       config.validation_examples, config.chunk_size)
    key = jax.random.key(seed) if key is None else key
    domain_of = np.asarray(domain_of)
    val_domain_of = np.asarray(val_domain_of)
    scores = np.zeros(len(domain_of), np.float32)
    valid = np.zeros(len(domain_of), bool)
    per: dict = {}
    loss = example_loss_fn(graphdef, start, remat=config.remat)
    scorer = InfluenceScorer(
        loss, proj_dim=proj_dim, projector=projector, curvature=curvature,
        damping=damping, seed=seed, batch_size=min(chunk_size, 16),
        loss_mask=lambda ex: jnp.sum(ex.loss_mask))
    cfg = dataclasses.replace(train_config, steps=None, epochs=config.proxy_epochs)
    row_len = np.asarray(pool.attention_mask).sum(1)
    for d, name in enumerate(names):
        rows = np.flatnonzero(domain_of == d)
        vrows = np.flatnonzero(val_domain_of == d)[:validation_examples]
        if rows.size == 0:
            continue
        if vrows.size == 0 and query_pool is None:
            raise InfluenceError(f"domain {name!r} has no validation example for its influence query")
        kd = jax.random.fold_in(key, d)
        k_pick, k_train = jax.random.split(kd)
        pick = np.asarray(jax.random.permutation(k_pick, rows.size))
        order = rows[pick[np.arange(proxy_examples) % rows.size]]
        rows = rows[np.argsort(row_len[rows], kind="stable")]  # shortest first: chunks of like length
        proxy = finetune(graphdef, lora0, frozen, pool, order, k_train, cfg, start=start)
        model_hash = hashlib.sha256(
            f"{base_model_id}|{params_fingerprint(proxy.lora)}".encode()).hexdigest()[:16]
        pre = (adam_preconditioner(proxy.opt_state, eps=cfg.eps, b2=cfg.b2)
               if curvature == "adam" else None)
        examples = _host(pool, rows)
        ids = [example_ids[i] for i in rows]
        if store_root is not None:
            meta = store_metadata(scorer, proxy.lora, domain=name, example_ids=ids, model_hash=model_hash,
                                  split="train", start_layer=int(start), layout=FEATURE_LAYOUT)
            store = FeatureStore.open(str(Path(store_root) / name), meta, n_examples=rows.size,
                                      dim=scorer.projector_for(proxy.lora).out_dim, chunk_size=chunk_size)
            cb = None if progress is None else (lambda i, n, name=name: progress(name, i, n))
            featurize_into_store(scorer, proxy.lora, examples, store, progress=cb, context=frozen,
                                 precondition=pre, trim=lambda c: trim_pool(c, buckets))
            feats, ok = store.load()
        else:
            feats, ok = scorer.featurize(proxy.lora, examples, return_flags=True, context=frozen,
                                         precondition=pre)
            feats, ok = np.asarray(feats), np.asarray(ok)
        qpool = _host(val_pool, vrows) if query_pool is None else query_pool
        q = scorer.featurize_query(proxy.lora, qpool, mean=True, context=frozen)
        s = scorer.score(scorer.finalize(feats), q)[:, 0]
        s = np.where(ok, s, 0.0).astype(np.float32)
        scores[rows] = s
        valid[rows] = ok
        per[name] = {"examples": int(rows.size), "flagged": int((~ok).sum()),
                     "proxy_final_loss": float(np.asarray(proxy.losses)[-1]),
                     "score_mean": float(s.mean()), "score_std": float(s.std()),
                     "model_hash": model_hash}
    return DomainScores(scores, valid, per)
