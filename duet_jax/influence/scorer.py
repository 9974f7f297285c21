"""InfluenceScorer: featurize -> finalize -> score, for any pure ``loss_fn(params, example)``.

Stages (TRAK-like):

1. ``featurize(params, batch) -> [B, k]``: per-example gradients ``jax.vmap(jax.grad(loss_fn))``
   in float32, ``batch_size`` examples at a time under ``jax.lax.map`` (memory ``batch_size * P``),
   flattened with ``ravel_pytree`` and projected by a seeded projector. Non-finite gradients and
   examples with no loss tokens are zeroed and flagged (never NaN).
2. ``finalize(train_features) -> Finalized``: the curvature step over the training pool.
3. ``score(train, query_features) -> [n_train, n_query]``: in blocks of training rows.

Sign convention (every curvature): ``score[i, j] > 0`` means up-weighting training example i
lowers query j's loss (it helps). For the Koh-Liang curvature ``ihvp``:

    score(z, q) = g_q^T (H + lambda I)^-1 g_z = - I_up,loss(z, q)

where ``I_up,loss(z, q) = d L(q, theta_eps) / d eps`` when the training objective
``(1/n) sum_i l(z_i) + eps l(z)`` is minimised (Koh and Liang 2017, eq. 2). The DUET paper writes
``IF(z) = -g_val^T H^-1 g_z`` and reads it as "higher = more helpful to the domain": that is this
score with ``g_q`` the mean validation gradient (:meth:`InfluenceScorer.featurize_query` with
``mean=True``). Removing z from n training points changes the query loss by about ``score / n``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from duet_jax.errors import InfluenceError
from duet_jax.influence.curvature import (
    CURVATURES,
    cg_solve,
    fisher_inverse,
    hvp_fn,
    lissa_solve,
)
from duet_jax.influence.projectors import PROJECTORS, Projector, make_projector

__all__ = ["InfluenceScorer", "Finalized", "per_example_grads", "safe_masked_mean"]


def safe_masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    """``sum(values * mask) / max(sum(mask), 1)``: 0 (and zero gradient) for an all-zero mask.

    Use it in token losses so that an example with no loss tokens has a finite loss.

    Args:
      values: [...] per-token losses.
      mask: same shape, 0/1 (or weights).

    Returns:
      Scalar float32.
    """
    mask = mask.astype(jnp.float32)
    return jnp.sum(values.astype(jnp.float32) * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def per_example_grads(loss_fn: Callable, params: Any, batch: Any, batch_size: int = 16):
    """Flat per-example gradients ``[B, P]`` float32 (no projection), ``batch_size`` at a time.

    Args:
      loss_fn: ``loss_fn(params, example) -> scalar``.
      params: pytree.
      batch: pytree of arrays with leading example axis B.
      batch_size: examples per vmapped chunk.

    Returns:
      [B, P] float32 in ``ravel_pytree(params)`` order.
    """

    def one(ex):
        return ravel_pytree(jax.grad(loss_fn)(params, ex))[0].astype(jnp.float32)

    return jax.lax.map(one, batch, batch_size=batch_size)


class Finalized(NamedTuple):
    """Training features after the curvature step.

    Attributes:
      features: [n_train, k] float32 as given (``cosine``/``adam`` rows are normalised block by
        block at score time, so a memmapped pool is never loaded whole).
      query_transform: [k, k] float32 applied to query features (the inverse projected Fisher for
        ``fisher``), or None.
      curvature: the curvature name.
    """

    features: Any
    query_transform: Any
    curvature: str


@dataclasses.dataclass(frozen=True)
class _Options:
    proj_dim: int | None
    projector: str
    curvature: str
    damping: float
    seed: int
    batch_size: int
    score_block: int
    ihvp_solver: str
    cg_maxiter: int
    cg_tol: float
    lissa_depth: int
    lissa_scale: float | None


class InfluenceScorer:
    """Projected-gradient influence for any pure ``loss_fn(params, example) -> scalar``.

    Args:
      loss_fn: pure function of a parameter pytree and ONE example (a pytree of arrays without
        the batch axis); returns a scalar loss. When :meth:`featurize` gets ``context=...``, it is
        called as ``loss_fn(params, example, context)``: pass large fixed inputs (frozen base
        weights) this way, as traced arguments, rather than closing over them, which would bake
        them into the compiled program as constants.
      proj_dim: k, the projected dimension (ignored for ``projector="identity"``).
      projector: one of ``identity, dense, dense_gaussian, sjlt, chunked, pallas``
        (see :mod:`duet_jax.influence.projectors`).
      curvature: one of ``identity`` (gradient dot product, TracIn-like), ``cosine`` (LESS),
        ``adam`` (LESS: training gradients preconditioned by Adam's second moments before
        projection, then cosine), ``fisher`` (TRAK: ``(Phi^T Phi / n + damping I)^-1``),
        ``ihvp`` (Koh-Liang: ``(H + damping I)^-1`` applied to query gradients by CG or LiSSA
        with forward-over-reverse HVPs; small models).
      damping: lambda for ``fisher`` and ``ihvp``.
      seed: projection seed.
      batch_size: examples per vmapped gradient chunk (bounds memory to ``batch_size * P``).
      loss_mask: optional ``example -> number of loss tokens``; examples with 0 are flagged.
      score_block: training rows per block in :meth:`score` and :meth:`finalize`.
      ihvp_solver: ``cg`` or ``lissa``.
      cg_maxiter, cg_tol: CG settings.
      lissa_depth, lissa_scale: LiSSA settings (scale must exceed the largest eigenvalue of
        ``H + damping I``).
      projector_options: passed to :func:`~duet_jax.influence.projectors.make_projector`
        (``block_rows``, ``interpret``).
      mesh: ``None`` or a ``jax.sharding.Mesh`` / :class:`~duet_jax.sharding.MeshConfig`:
        featurize shards the examples over every device (each vmapped chunk of ``batch_size``
        examples spans the devices), replicates ``params`` and the projector (a pure function of
        its seed: every device projects identically, no communication) and FSDP-shards
        ``context`` (the frozen weights); the features come back sharded by rows.

    Example::

        scorer = InfluenceScorer(loss_fn, proj_dim=512, projector="sjlt", curvature="fisher")
        train = scorer.featurize(params, train_batch)          # [n, 512]
        query = scorer.featurize_query(params, val_batch, mean=True)   # [1, 512]
        scores = scorer.score(scorer.finalize(train), query)   # [n, 1], higher = helps
    """

    def __init__(
        self,
        loss_fn: Callable,
        *,
        proj_dim: int | None = None,
        projector: str = "sjlt",
        curvature: str = "identity",
        damping: float = 1e-3,
        seed: int = 0,
        batch_size: int = 16,
        loss_mask: Callable | None = None,
        score_block: int = 4096,
        ihvp_solver: str = "cg",
        cg_maxiter: int = 100,
        cg_tol: float = 1e-6,
        lissa_depth: int = 1000,
        lissa_scale: float | None = None,
        projector_options: dict | None = None,
        mesh=None,
    ):
        if not callable(loss_fn):
            raise InfluenceError(f"loss_fn must be callable; got {type(loss_fn).__name__}")
        if projector not in PROJECTORS:
            raise InfluenceError(f"unknown projector {projector!r}; expected one of {PROJECTORS}")
        if curvature not in CURVATURES:
            raise InfluenceError(f"unknown curvature {curvature!r}; expected one of {CURVATURES}")
        if projector != "identity" and (proj_dim is None or int(proj_dim) <= 0):
            raise InfluenceError(f"projector {projector!r} needs proj_dim > 0; got {proj_dim!r}")
        if int(batch_size) <= 0:
            raise InfluenceError(f"batch_size must be > 0; got {batch_size}")
        if damping < 0:
            raise InfluenceError(f"damping must be >= 0; got {damping}")
        if ihvp_solver not in ("cg", "lissa"):
            raise InfluenceError(f"ihvp_solver must be 'cg' or 'lissa'; got {ihvp_solver!r}")
        self.loss_fn = loss_fn
        self.loss_mask = loss_mask
        self.options = _Options(
            proj_dim=None if proj_dim is None else int(proj_dim),
            projector=projector,
            curvature=curvature,
            damping=float(damping),
            seed=int(seed),
            batch_size=int(batch_size),
            score_block=int(score_block),
            ihvp_solver=ihvp_solver,
            cg_maxiter=int(cg_maxiter),
            cg_tol=float(cg_tol),
            lissa_depth=int(lissa_depth),
            lissa_scale=lissa_scale,
        )
        self._projector_options = dict(projector_options or {})
        from duet_jax.sharding import as_mesh

        self.mesh = as_mesh(mesh)
        self._by_dim: dict[int, tuple[Projector, Any, Callable]] = {}
        self._score_fn = jax.jit(lambda t, q: t @ q.T)
        self.trace_count = 0  # times the featurize function was traced (= compiled)

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def from_nnx(cls, model, loss_fn: Callable, wrt: Any = None, **kwargs):
        """Scorer over the parameters of an NNX model selected by a filter (e.g. LoRA).

        Splits ``graphdef, params, rest = nnx.split(model, wrt, ...)`` and closes over
        ``graphdef`` and ``rest``: the pure loss is
        ``lambda p, ex: loss_fn(nnx.merge(graphdef, p, rest), ex)``.

        Args:
          model: an ``nnx.Module``.
          loss_fn: ``loss_fn(model, example) -> scalar``.
          wrt: an NNX filter (default ``nnx.LoRAParam``).
          **kwargs: :class:`InfluenceScorer` options.

        Returns:
          ``(scorer, params)``: pass ``params`` (an ``nnx.State``) to :meth:`featurize`.
        """
        from flax import nnx

        wrt = nnx.LoRAParam if wrt is None else wrt
        graphdef, params, rest = nnx.split(model, wrt, ...)

        def pure_loss(p, ex):
            return loss_fn(nnx.merge(graphdef, p, rest), ex)

        return cls(pure_loss, **kwargs), params

    @property
    def proj_dim(self) -> int | None:
        return self.options.proj_dim

    def projector_for(self, params_or_dim: Any) -> Projector:
        """The projector used for these parameters (or this parameter count P)."""
        return self._get(self._dim(params_or_dim))[0]

    def metadata(self) -> dict:
        """JSON-able description of the scorer (for :class:`~duet_jax.influence.store.FeatureStore`)."""
        o = self.options
        return {
            "projector": o.projector,
            "proj_dim": o.proj_dim,
            "seed": o.seed,
            "curvature": o.curvature,
            "damping": o.damping,
        }

    @staticmethod
    def _dim(params_or_dim) -> int:
        if isinstance(params_or_dim, (int, np.integer)):
            return int(params_or_dim)
        return int(sum(np.size(x) for x in jax.tree_util.tree_leaves(params_or_dim)))

    def _get(self, p: int):
        if p not in self._by_dim:
            proj = make_projector(
                self.options.projector, self.options.seed, p, self.options.proj_dim,
                **self._projector_options,
            )
            state = proj.init()
            fn = jax.jit(self._make_featurize(proj))
            self._by_dim[p] = (proj, state, fn)
        return self._by_dim[p]

    # ------------------------------------------------------------------ featurize
    def _make_featurize(self, proj: Projector):
        loss_fn, loss_mask, bs = self.loss_fn, self.loss_mask, self.options.batch_size
        spec = None
        if self.mesh is not None:
            from duet_jax.sharding import batch_sharding

            spec = batch_sharding(self.mesh, bs)

        def featurize(params, batch, precondition, proj_state, context):
            self.trace_count += 1

            def grad_one(ex):
                fn = loss_fn if context is None else (lambda p, e: loss_fn(p, e, context))
                return ravel_pytree(jax.grad(fn)(params, ex))[0].astype(jnp.float32)

            def chunk(exs):
                if spec is not None:
                    exs = jax.tree_util.tree_map(
                        lambda x: jax.lax.with_sharding_constraint(x, spec), exs)
                g = jax.vmap(grad_one)(exs)  # [bs, P]
                ok = jnp.all(jnp.isfinite(g), axis=1)
                if loss_mask is not None:
                    ok = ok & (jax.vmap(loss_mask)(exs) > 0)
                g = jnp.where(ok[:, None], g, 0.0)
                if precondition is not None:
                    g = g * precondition[None, :]
                return proj.apply(proj_state, g), ok

            b = jax.tree_util.tree_leaves(batch)[0].shape[0]
            n_full, rem = divmod(b, bs)
            outs = []
            if n_full and spec is not None:
                # examples sharded by contiguous rows: chunk c takes rows a * n_full + c, so every
                # chunk spans the devices without moving data
                main = jax.tree_util.tree_map(
                    lambda x: x[: n_full * bs].reshape(bs, n_full, *x.shape[1:]).swapaxes(0, 1), batch
                )
                f, ok = jax.lax.map(chunk, main)
                outs.append((f.swapaxes(0, 1).reshape(n_full * bs, -1), ok.T.reshape(-1)))
            elif n_full:
                main = jax.tree_util.tree_map(
                    lambda x: x[: n_full * bs].reshape(n_full, bs, *x.shape[1:]), batch
                )
                f, ok = jax.lax.map(chunk, main)
                outs.append((f.reshape(n_full * bs, -1), ok.reshape(-1)))
            if rem:
                tail = jax.tree_util.tree_map(lambda x: x[n_full * bs :], batch)
                outs.append(chunk(tail))
            if len(outs) == 1:
                return outs[0]
            return (
                jnp.concatenate([o[0] for o in outs]),
                jnp.concatenate([o[1] for o in outs]),
            )

        return featurize

    def _check_batch(self, batch) -> int:
        leaves = jax.tree_util.tree_leaves(batch)
        if not leaves:
            raise InfluenceError("batch is empty: expected a pytree of arrays [B, ...]")
        sizes = {int(np.shape(x)[0]) if np.ndim(x) else -1 for x in leaves}
        if len(sizes) != 1 or -1 in sizes:
            raise InfluenceError(
                f"every batch leaf needs the same leading example axis; got sizes {sorted(sizes)}"
            )
        (b,) = sizes
        if b == 0:
            raise InfluenceError("batch has 0 examples; expected B >= 1")
        return b

    def featurize(self, params, batch, *, precondition: Any = None, return_flags: bool = False,
                  context: Any = None):
        """Projected per-example gradients.

        Args:
          params: parameter pytree (the same structure every call: P = its size).
          batch: pytree of arrays with leading example axis B.
          precondition: optional pytree like ``params`` (or flat [P]) multiplied elementwise into
            each gradient before projection, e.g. :func:`~duet_jax.influence.curvature.adam_preconditioner`
            for LESS's ``adam`` curvature (training examples only).
          return_flags: also return ``valid: [B] bool`` (False: non-finite gradient or no loss
            tokens; the feature row is then all zeros, so its score is 0).
          context: optional pytree passed to ``loss_fn`` as a third argument (traced, not
            differentiated).

        Returns:
          ``features: [B, k]`` float32, or ``(features, valid)``.
        """
        self._check_batch(batch)
        p = self._dim(params)
        proj, state, fn = self._get(p)
        pre = None
        if precondition is not None:
            pre = ravel_pytree(precondition)[0].astype(jnp.float32)
            if pre.shape != (p,):
                raise InfluenceError(
                    f"precondition must have the parameters' size P={p}; got {pre.shape}"
                )
        if self.mesh is not None:
            params, batch, pre, state, context = self._place(params, batch, pre, state, context)
        features, valid = fn(params, batch, pre, state, context)
        return (features, valid) if return_flags else features

    def _place(self, params, batch, pre, state, context):
        from duet_jax.sharding import replicate, shard_frozen, shard_rows

        m = self.mesh
        params, pre, state = replicate((params, pre, state), m)
        batch = jax.tree_util.tree_map(lambda x: shard_rows(x, m), batch)
        if context is not None:
            context = shard_frozen(context, m)
        return params, batch, pre, state, context

    def featurize_query(
        self,
        params,
        batch,
        *,
        hessian_batch: Any = None,
        mean: bool = False,
        return_flags: bool = False,
        context: Any = None,
    ):
        """Query features: projected gradients, or for ``ihvp`` projected ``(H+lambda I)^-1 g``.

        With ``mean=True`` the query is the mean gradient over the valid examples of ``batch``
        (DUET: the domain's validation set), a single row ``[1, k]``. The projection is linear,
        so the mean of projected gradients equals the projection of the mean gradient.

        Args:
          params: parameter pytree.
          batch: query examples [Q, ...].
          hessian_batch: for ``ihvp``: training examples defining ``H`` (Hessian of their mean
            loss). Required for ``ihvp``, ignored otherwise.
          mean: return the mean query row.
          return_flags: also return ``valid: [Q] bool``.

        Returns:
          ``[Q, k]`` (or ``[1, k]``) float32, or ``(features, valid)``.
        """
        o = self.options
        if o.curvature != "ihvp":
            f, ok = self.featurize(params, batch, return_flags=True, context=context)
            if mean:
                f = _masked_mean_rows(f, ok)
            return (f, ok) if return_flags else f
        if hessian_batch is None:
            raise InfluenceError("curvature 'ihvp' needs hessian_batch= (training examples)")
        if context is not None:
            raise InfluenceError("curvature 'ihvp' does not take context=; close over it instead")
        self._check_batch(batch)
        self._check_batch(hessian_batch)
        g = per_example_grads(self.loss_fn, params, batch, o.batch_size)
        ok = jnp.all(jnp.isfinite(g), axis=1)
        if self.loss_mask is not None:
            ok = ok & (jax.vmap(self.loss_mask)(batch) > 0)
        g = jnp.where(ok[:, None], g, 0.0)
        if mean:
            g = _masked_mean_rows(g, ok)
        hvp = hvp_fn(self.loss_fn, params, hessian_batch)
        if o.ihvp_solver == "cg":
            s = cg_solve(hvp, g, o.damping, tol=o.cg_tol, maxiter=o.cg_maxiter)
        else:
            if o.lissa_scale is None:
                raise InfluenceError("ihvp_solver='lissa' needs lissa_scale > largest eigenvalue")
            s = lissa_solve(hvp, g, o.damping, o.lissa_scale, o.lissa_depth)
        proj, state, _ = self._get(self._dim(params))
        f = proj.apply(state, s)
        return (f, ok) if return_flags else f

    # ------------------------------------------------------------------ finalize / score
    def finalize(self, train_features) -> Finalized:
        """The curvature step over the training features.

        ``identity``/``ihvp``: unchanged. ``cosine``/``adam``: unchanged here; rows are
        normalised to unit length block by block in :meth:`score` (zero rows stay zero). ``fisher``: ``F^-1 = (Phi^T Phi / n + damping I)^-1`` computed in
        blocks of ``score_block`` rows; applied to the (few) queries at score time.

        Args:
          train_features: [n, k] (numpy, memmap or jax array).

        Returns:
          :class:`Finalized`.
        """
        c = self.options.curvature
        if np.ndim(train_features) != 2:
            raise InfluenceError(f"train_features must be [n, k]; got {np.shape(train_features)}")
        if c == "fisher":
            finv = fisher_inverse(train_features, self.options.damping, self.options.score_block)
            return Finalized(train_features, finv.astype(np.float32), c)
        return Finalized(train_features, None, c)

    def score(self, train, query_features) -> np.ndarray:
        """Scores ``[n_train, n_query]``, higher = up-weighting the training example helps.

        Computed ``score_block`` training rows at a time (one compiled block shape).

        Args:
          train: :class:`Finalized` or raw training features [n, k] (then finalized here).
          query_features: [Q, k] from :meth:`featurize_query` (or [k]).

        Returns:
          [n_train, n_query] float32 numpy array (finite).
        """
        if not isinstance(train, Finalized):
            train = self.finalize(train)
        q = jnp.asarray(query_features, jnp.float32)
        if q.ndim == 1:
            q = q[None, :]
        n, k = np.shape(train.features)
        if q.ndim != 2 or q.shape[1] != k:
            raise InfluenceError(
                f"query features must be [Q, {k}] to match the training features; got {q.shape}"
            )
        if train.curvature in ("cosine", "adam"):
            q = jnp.asarray(_normalize_rows(np.asarray(q)))
        if train.query_transform is not None:
            q = q @ jnp.asarray(train.query_transform)
        out = np.empty((n, q.shape[0]), np.float32)
        blk = min(self.options.score_block, max(n, 1))
        for s in range(0, n, blk):
            rows = np.asarray(train.features[s : s + blk], np.float32)
            if train.curvature in ("cosine", "adam"):
                rows = _normalize_rows(rows)
            m = rows.shape[0]
            if m < blk:
                rows = np.pad(rows, ((0, blk - m), (0, 0)))
            out[s : s + m] = np.asarray(self._score_fn(jnp.asarray(rows), q))[:m]
        return out


def _masked_mean_rows(x, ok):
    w = ok.astype(jnp.float32)
    return (jnp.sum(x * w[:, None], axis=0) / jnp.maximum(jnp.sum(w), 1.0))[None, :]


def _normalize_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, np.float32(1e-30))
