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

Steps 2 and 3 use :func:`domain_scorer`, :func:`domain_store` and :func:`featurize_rows`, public so
that ``duet-jax bench influence`` times exactly this path.

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

__all__ = ["DomainScores", "InfluenceConfig", "domain_influence", "domain_scorer", "domain_store",
           "example_loss_fn", "featurize_pool", "featurize_rows", "trim_pool"]

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


def _loss_tokens(ex: Pool):
    return jnp.sum(ex.loss_mask)


def domain_scorer(graphdef, start: int, config: InfluenceConfig | None = None) -> InfluenceScorer:
    """The scorer DUET's influence step featurizes with (:func:`domain_influence`; the bench calls
    it too): the loss :func:`example_loss_fn` of one pool row (``config.remat``), the config's
    projector, ``proj_dim``, seed, curvature and damping, ``min(chunk_size, 16)`` rows vmapped at
    a time, and rows without answer tokens flagged.

    The ``pallas`` projector runs in the Pallas interpreter when JAX's backend is CPU and compiled
    on TPU/GPU (:func:`~duet_jax.influence.projectors.pallas_interpret`), so
    ``--influence.projector pallas`` works in a CPU run; both give the features of ``chunked``
    (the same signs) up to float summation order.
    """
    c = InfluenceConfig() if config is None else config
    return InfluenceScorer(
        example_loss_fn(graphdef, start, remat=c.remat), proj_dim=c.proj_dim, projector=c.projector,
        curvature=c.curvature, damping=c.damping, seed=c.seed, batch_size=min(c.chunk_size, 16),
        loss_mask=_loss_tokens)


def domain_store(scorer: InfluenceScorer, lora, path: str | Path, *, domain: str, example_ids: Sequence[str],
                 start: int, chunk_size: int, model_hash: str | None = None) -> FeatureStore:
    """Open (create, or reopen to resume) one domain's resumable feature store at ``path``: its
    metadata (:func:`~duet_jax.influence.store.store_metadata`: domain, example ids in store
    order, ``model_hash``, the scorer's settings, ``split="train"``, ``start_layer``,
    :data:`FEATURE_LAYOUT`) and layout (``len(example_ids)`` rows in chunks of ``chunk_size``).

    Raises:
      StoreMismatchError: the directory holds a store made with other settings.
    """
    meta = store_metadata(scorer, lora, domain=domain, example_ids=list(example_ids), model_hash=model_hash,
                          split="train", start_layer=int(start), layout=FEATURE_LAYOUT)
    return FeatureStore.open(str(path), meta, n_examples=len(example_ids),
                             dim=scorer.projector_for(lora).out_dim, chunk_size=chunk_size)


def featurize_rows(scorer: InfluenceScorer, lora, examples: Pool, frozen, *, store: FeatureStore | None = None,
                   chunk_size: int | None = None, buckets: Sequence[int] | None = None, bucket: int = 16,
                   precondition=None, progress: Callable[[int, int], None] | None = None,
                   on_trim: Callable[[Pool], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """DUET's featurize of a domain's rows, in the order given (:func:`domain_influence` passes
    them shortest first; the bench calls this too).

    :func:`~duet_jax.influence.store.featurize_into_store` chunk by chunk into ``store`` (chunks
    already written are read back, not recomputed), each chunk of ``store.chunk_size`` rows (a
    short last one filled with repeats of its own rows: one compiled program per length) cut by
    :func:`trim_pool` to the smallest of ``buckets`` that holds its longest row (``None``: a
    multiple of ``bucket``); ``on_trim(chunk)`` sees each trimmed chunk. Without ``store``: an
    in-memory store of ``chunk_size`` rows, the same loop (and the same features) without a
    directory.

    Args:
      scorer: from :func:`domain_scorer` (its loss takes ``(lora, row, frozen)``).
      lora, frozen: the adapter featurized and the frozen weights (``context``).
      examples: a host pool (numpy arrays).
      precondition: passed to :meth:`InfluenceScorer.featurize` (``adam`` curvature).
      progress: ``progress(done_chunks, num_chunks)``.

    Returns:
      ``(features [n, k] float32, valid [n] bool)`` read back from the store, in ``examples``' order.
    """
    if store is None:
        if chunk_size is None:
            raise InfluenceError("featurize_rows needs a store or a chunk_size")
        store = FeatureStore.in_memory(n_examples=len(examples), dim=scorer.projector_for(lora).out_dim,
                                       chunk_size=chunk_size)

    def trim(chunk):
        t = trim_pool(chunk, buckets, bucket)
        if on_trim is not None:
            on_trim(t)
        return t

    featurize_into_store(scorer, lora, examples, store, progress=progress, context=frozen,
                         precondition=precondition, trim=trim)
    return store.load()


def featurize_pool(scorer: InfluenceScorer, lora, pool: Pool, frozen, *, bucket: int = 16,
                   return_flags: bool = False):
    """:func:`featurize_rows` over a whole pool, returned in pool row order: rows sorted by real
    length, chunks of ``scorer.options.batch_size`` rows, each trimmed to a multiple of ``bucket``
    tokens, in memory.

    A convenience for a pool outside a run (a DUET run calls :func:`featurize_rows` per domain
    from :func:`domain_influence`, with its store and its encode buckets).

    Returns:
      ``[N, k]`` float32 numpy in pool row order (and ``valid [N]`` with ``return_flags``).
    """
    order = np.argsort(np.asarray(pool.attention_mask).sum(1), kind="stable")
    f, ok = featurize_rows(scorer, lora, _host(pool, order), frozen, chunk_size=scorer.options.batch_size,
                           bucket=bucket)
    feats, valid = np.empty_like(f), np.empty_like(ok)
    feats[order], valid[order] = f, ok
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
      store_root: directory for the resumable feature stores (None: in memory only, the same
        chunks and features).
      progress: ``progress(domain, done_chunks, num_chunks)``.

    Raises:
      InfluenceError: a domain without validation rows.
    """
    config = InfluenceConfig() if config is None else config
    curvature, seed = config.curvature, config.seed
    proxy_examples, validation_examples, chunk_size = (config.proxy_examples,
                                                       config.validation_examples, config.chunk_size)
    key = jax.random.key(seed) if key is None else key
    domain_of = np.asarray(domain_of)
    val_domain_of = np.asarray(val_domain_of)
    scores = np.zeros(len(domain_of), np.float32)
    valid = np.zeros(len(domain_of), bool)
    per: dict = {}
    scorer = domain_scorer(graphdef, start, config)
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
        store = None if store_root is None else domain_store(
            scorer, proxy.lora, Path(store_root) / name, domain=name, example_ids=ids, start=start,
            chunk_size=chunk_size, model_hash=model_hash)
        cb = None if progress is None else (lambda i, n, name=name: progress(name, i, n))
        feats, ok = featurize_rows(scorer, proxy.lora, examples, frozen, store=store, chunk_size=chunk_size,
                                   buckets=buckets, precondition=pre, progress=cb)
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
