"""Curvature pieces: Adam preconditioner, projected Fisher, inverse-Hessian-vector products.

All functions work on flat float32 vectors (``jax.flatten_util.ravel_pytree`` order of the
parameters) or on projected features, and are pure.

Sign convention used by the scorer (for every curvature): with the training objective
``R(theta) = (1/n) sum_i l(theta, z_i)`` and ``H`` its Hessian (plus damping), up-weighting
``z`` by ``eps`` moves the optimum by ``-eps H^-1 g_z`` and the query loss by
``-eps g_q^T H^-1 g_z``. The *helpful* score is ``g_q^T H^-1 g_z`` (higher = up-weighting ``z``
lowers the query loss).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from duet_jax.errors import InfluenceError

__all__ = [
    "CURVATURES",
    "adam_preconditioner",
    "fisher_inverse",
    "hvp_fn",
    "cg_solve",
    "lissa_solve",
]

CURVATURES = ("identity", "cosine", "adam", "fisher", "ihvp")


def adam_preconditioner(opt_state: Any, eps: float = 1e-8, b2: float | None = 0.999) -> Any:
    """LESS's Adam preconditioner ``1 / (sqrt(v_hat) + eps)`` from an optax Adam state.

    Multiply a training gradient by this (elementwise, in parameter space) *before*
    projecting it; the projection is linear, so the projected feature is
    ``P (g / (sqrt(v_hat) + eps))``. Query gradients are not preconditioned (LESS).

    Args:
      opt_state: an optax state containing a ``ScaleByAdamState`` (``count``, ``mu``, ``nu``),
        e.g. ``optax.adam(...).init(params)`` after some updates, or directly the ``nu`` pytree
        (second moments, same structure as the parameters).
      eps: Adam's epsilon.
      b2: Adam's beta2, used for bias correction ``v_hat = nu / (1 - b2**count)``; None (or a
        bare ``nu`` without a count) skips bias correction.

    Returns:
      A pytree with the parameters' structure (float32).
    """
    nu, count = None, None
    for s in jax.tree_util.tree_leaves(
        opt_state, is_leaf=lambda x: hasattr(x, "nu") and hasattr(x, "count")
    ):
        if hasattr(s, "nu") and hasattr(s, "count"):
            nu, count = s.nu, s.count
            break
    if nu is None:
        nu = opt_state
    if count is not None and b2 is not None:
        c = jnp.maximum(jnp.asarray(count, jnp.float32), 1.0)
        corr = 1.0 - jnp.float32(b2) ** c
    else:
        corr = jnp.float32(1.0)
    return jax.tree_util.tree_map(
        lambda v: 1.0 / (jnp.sqrt(jnp.asarray(v, jnp.float32) / corr) + jnp.float32(eps)), nu
    )


def fisher_inverse(train_features, damping: float, block_size: int = 4096) -> np.ndarray:
    """``(Phi^T Phi / n + damping I)^-1`` from projected training features, in blocks.

    This is TRAK's projected Gauss-Newton / empirical-Fisher inverse with the Fisher normalised
    by n (so ``damping`` is on the scale of a mean loss's Hessian). TRAK's unnormalised
    ``(Phi^T Phi + lambda' I)^-1`` equals ours divided by n when ``lambda' = n * damping``.

    Args:
      train_features: [n, k] (numpy, memmap or jax array); read ``block_size`` rows at a time.
      damping: lambda > 0 (or >= 0 when n >= k and Phi has full rank).
      block_size: rows per block.

    Returns:
      [k, k] float64 numpy array (symmetric positive definite).
    """
    n, k = train_features.shape
    if n == 0:
        raise InfluenceError("fisher curvature needs at least one training feature row; got 0")
    gram = _gram(train_features, block_size)
    f = gram / n + damping * np.eye(k)
    try:
        c = np.linalg.cholesky(f)
    except np.linalg.LinAlgError as e:
        raise InfluenceError(
            f"projected Fisher is singular (n={n}, k={k}, damping={damping}); raise damping"
        ) from e
    ci = np.linalg.inv(c)
    return ci.T @ ci


def _gram(x, block_size: int) -> np.ndarray:
    n, k = x.shape
    g = np.zeros((k, k), np.float64)
    for s in range(0, n, block_size):
        b = np.asarray(x[s : s + block_size], np.float64)
        g += b.T @ b
    return g


def hvp_fn(loss_fn: Callable, params: Any, batch: Any) -> Callable[[jax.Array], jax.Array]:
    """Flat Hessian-vector product of the mean loss over ``batch``, forward-over-reverse.

    ``H v = d/dt grad R(theta + t v)`` computed by ``jax.jvp(jax.grad(R), (theta,), (v,))``
    with ``R(theta) = mean_i loss_fn(theta, batch_i)``.

    Args:
      loss_fn: ``loss_fn(params, example) -> scalar``.
      params: parameter pytree (the point of expansion).
      batch: pytree of arrays with a leading example axis.

    Returns:
      ``hvp(v: [P]) -> [P]`` float32 (pure, jit/vmap friendly).
    """
    flat, unravel = ravel_pytree(params)

    def mean_loss(f):
        p = unravel(f)
        return jnp.mean(jax.vmap(lambda ex: loss_fn(p, ex))(batch))

    grad = jax.grad(mean_loss)

    def hvp(v):
        return jax.jvp(grad, (flat,), (v.astype(flat.dtype),))[1].astype(jnp.float32)

    return hvp


@functools.partial(jax.jit, static_argnames=("hvp", "maxiter"))
def _cg(hvp, b, damping, tol, maxiter):
    op = lambda v: hvp(v) + damping * v
    x, _ = jax.scipy.sparse.linalg.cg(op, b, tol=tol, maxiter=maxiter)
    return x


def cg_solve(
    hvp: Callable, b: jax.Array, damping: float, tol: float = 1e-6, maxiter: int = 200
) -> jax.Array:
    """Solve ``(H + damping I) x = b`` by conjugate gradients (H symmetric PSD).

    Args:
      hvp: flat Hessian-vector product ``[P] -> [P]``.
      b: [P] or [Q, P] right-hand sides (solved together under vmap).
      damping: lambda >= 0.
      tol: relative residual tolerance.
      maxiter: iteration cap (static).

    Returns:
      Same shape as ``b``, float32.
    """
    b = jnp.asarray(b, jnp.float32)
    if b.ndim == 1:
        return _cg(hvp, b, jnp.float32(damping), tol, maxiter)
    return jax.vmap(lambda r: _cg(hvp, r, jnp.float32(damping), tol, maxiter))(b)


def lissa_solve(
    hvp: Callable,
    b: jax.Array,
    damping: float,
    scale: float,
    depth: int = 1000,
) -> jax.Array:
    """LiSSA (Agarwal et al. 2017; Koh and Liang 2017): ``(H + damping I)^-1 b`` by the series

    ``h_0 = b``, ``h_j = b + (I - (H + damping I) / scale) h_{j-1}``, result ``h_depth / scale``.
    Converges when ``scale`` exceeds the largest eigenvalue of ``H + damping I``. Here the HVP is
    exact (full batch, deterministic); pass a minibatch ``hvp`` for the stochastic version.

    Args:
      hvp: flat Hessian-vector product.
      b: [P] or [Q, P].
      damping: lambda >= 0.
      scale: > largest eigenvalue of ``H + damping I``.
      depth: number of iterations.

    Returns:
      Same shape as ``b``, float32.
    """
    b = jnp.asarray(b, jnp.float32)
    if scale <= 0:
        raise InfluenceError(f"lissa scale must be > 0; got {scale}")

    def one(rhs):
        def step(h, _):
            return rhs + h - (hvp(h) + damping * h) / scale, None

        h, _ = jax.lax.scan(step, rhs, None, length=depth)
        return h / scale

    fn = jax.jit(one)
    return fn(b) if b.ndim == 1 else jax.vmap(fn)(b)
