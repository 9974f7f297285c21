"""Seeded random projections ``R^P -> R^k``, each a pure function of ``(seed, P, k)``.

A projector is a small frozen record (:class:`Projector`) with two pure functions:

- ``init() -> state``: arrays the projection needs (the materialised matrix for the dense
  projectors, nothing for the others). Built once, outside jit, passed into jitted code.
- ``apply(state, x, row_offset=0) -> [B, k]``: projects ``x: [B, P_chunk]`` whose first column is
  global coordinate ``row_offset``. For every projector the chunks' outputs add up to the output
  of the whole vector, so a huge gradient can be projected piece by piece.

All projectors satisfy ``E[<Px, Py>] = <x, y>`` (unbiased inner products).

=================  ==========================================================================
name               projection
=================  ==========================================================================
``identity``       ``y = x`` (k = P), exact; for small models and tests.
``dense``          ``x @ R / sqrt(k)``, R Rademacher (+-1) from ``jax.random`` (materialised
                   ``P x k``; small P only).
``dense_gaussian`` ``x @ G / sqrt(k)``, G standard normal (materialised).
``sjlt``           sparse JL: coordinate i goes to one bucket ``h(i)`` with sign ``s(i)``, both
                   from a counter-based hash of ``(seed, i)``; ``y[h(i)] += s(i) x[i]``
                   (``segment_sum``). O(P) work, no matrix. The CPU default.
``chunked``        dense Rademacher with signs hashed from ``(seed, i, j)``, generated a row
                   block at a time (``duet_kernels.projection.project_reference``); never forms
                   ``P x k``.
``pallas``         the same matrix as ``chunked``, signs made inside a Pallas kernel
                   (``duet_kernels.projection.project_pallas``); for TPU/GPU. On the CPU
                   backend it runs in the Pallas interpreter (``interpret=None``, the default,
                   chooses: interpreted on CPU, compiled elsewhere).
=================  ==========================================================================

Determinism: same ``(name, seed, P, k)`` gives the same projection for any batch size, any
chunking of the coordinates and any number of devices (the random numbers depend only on global
indices). ``dense`` depends on ``jax.random`` (threefry), the others only on our uint32 hash.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from duet_jax.errors import InfluenceError

__all__ = ["PROJECTORS", "Projector", "make_projector", "pallas_interpret", "sjlt_buckets"]

PROJECTORS = ("identity", "dense", "dense_gaussian", "sjlt", "chunked", "pallas")


def sjlt_buckets(seed: int, rows: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """Bucket and sign of each input coordinate for the sparse JL transform.

    Args:
      seed: projection seed (static int).
      rows: uint32/int global coordinate indices, any shape.
      k: number of buckets (output dimension).

    Returns:
      ``(bucket, sign)``: int32 in ``[0, k)`` and float32 in {-1, +1}, shapes of ``rows``.
    """
    from duet_kernels.projection import fmix32, seed_key

    rows = rows.astype(jnp.uint32)
    hb = fmix32(rows ^ jnp.uint32(seed_key(seed, salt=1)))
    hs = fmix32(rows ^ jnp.uint32(seed_key(seed, salt=2)))
    bucket = (hb % jnp.uint32(k)).astype(jnp.int32)
    sign = (hs >> 31).astype(jnp.float32) * 2.0 - 1.0
    return bucket, sign


def pallas_interpret(interpret: bool | None = None) -> bool:
    """Whether the Pallas kernel runs in the interpreter: ``interpret`` if given, else ``True``
    exactly when JAX's default backend is CPU (where Pallas refuses to compile: "Only interpret
    mode is supported on CPU backend"), so a run selecting ``pallas`` works on every backend."""
    return jax.default_backend() == "cpu" if interpret is None else bool(interpret)


@dataclasses.dataclass(frozen=True)
class Projector:
    """A seeded projection ``R^P -> R^k`` (see the module docstring for the names).

    Attributes:
      name: one of :data:`PROJECTORS`.
      seed: int seed.
      in_dim: P, the flattened parameter count.
      out_dim: k (equals P for ``identity``).
      block_rows: rows generated at a time by ``chunked`` (memory ``block_rows * k`` floats).
      interpret: run the ``pallas`` kernel in interpret mode; ``None``: when JAX's default
        backend is CPU (Pallas compiles only for TPU/GPU), compiled otherwise.
    """

    name: str
    seed: int
    in_dim: int
    out_dim: int
    block_rows: int = 2048
    interpret: bool | None = None

    def init(self) -> Any:
        """Arrays the projection needs: ``[P, k]`` float32 for the dense kinds, else ``()``."""
        key = jax.random.PRNGKey(self.seed)
        if self.name == "dense":
            m = jax.random.rademacher(key, (self.in_dim, self.out_dim), jnp.float32)
            return m / jnp.sqrt(jnp.float32(self.out_dim))
        if self.name == "dense_gaussian":
            m = jax.random.normal(key, (self.in_dim, self.out_dim), jnp.float32)
            return m / jnp.sqrt(jnp.float32(self.out_dim))
        return ()

    def apply(self, state: Any, x: jax.Array, row_offset: int = 0) -> jax.Array:
        """Project ``x: [B, P_chunk]`` (first column = global coordinate ``row_offset``).

        Returns:
          [B, k] float32.
        """
        x = jnp.asarray(x, jnp.float32)
        if x.ndim != 2:
            raise InfluenceError(f"projector input must be [B, P]; got shape {x.shape}")
        p = x.shape[1]
        if isinstance(row_offset, int) and row_offset + p > self.in_dim:
            raise InfluenceError(
                f"projector built for P={self.in_dim} inputs; got columns "
                f"{row_offset}..{row_offset + p} (x shape {x.shape})"
            )
        if self.name == "identity":
            if p != self.in_dim:
                z = jnp.zeros((x.shape[0], self.out_dim), jnp.float32)
                return jax.lax.dynamic_update_slice(z, x, (0, row_offset))
            return x
        if self.name in ("dense", "dense_gaussian"):
            m = jax.lax.dynamic_slice_in_dim(state, row_offset, p, axis=0)
            return x @ m
        if self.name == "sjlt":
            rows = jnp.arange(p, dtype=jnp.uint32) + jnp.asarray(row_offset, jnp.uint32)
            bucket, sign = sjlt_buckets(self.seed, rows, self.out_dim)
            out = jax.ops.segment_sum((x * sign).T, bucket, num_segments=self.out_dim)
            return out.T
        if self.name == "chunked":
            from duet_kernels.projection import project_reference

            return project_reference(
                x, seed=jnp.uint32(self.seed & 0xFFFFFFFF), k=self.out_dim,
                row_offset=row_offset, block_rows=self.block_rows,
            )
        if self.name == "pallas":
            from duet_kernels.projection import project_pallas

            if not isinstance(row_offset, int):
                raise InfluenceError("the pallas projector needs a static (Python int) row_offset")
            return project_pallas(
                x, seed=self.seed, k=self.out_dim, row_offset=row_offset,
                interpret=pallas_interpret(self.interpret),
            )
        raise InfluenceError(f"unknown projector {self.name!r}; expected one of {PROJECTORS}")


def make_projector(
    name: str, seed: int, in_dim: int, out_dim: int | None, **options
) -> Projector:
    """Build a :class:`Projector`, checking its arguments.

    Args:
      name: one of :data:`PROJECTORS`.
      seed: int seed.
      in_dim: P > 0.
      out_dim: k > 0 (ignored, may be None, for ``identity``).
      **options: ``block_rows``, ``interpret`` (``pallas``; default: interpreted on the CPU
        backend only, :func:`pallas_interpret`).

    Returns:
      The projector.
    """
    if name not in PROJECTORS:
        raise InfluenceError(f"unknown projector {name!r}; expected one of {PROJECTORS}")
    if in_dim <= 0:
        raise InfluenceError(f"projector input size must be > 0; got P={in_dim}")
    if name == "identity":
        out_dim = in_dim
    elif out_dim is None or int(out_dim) <= 0:
        raise InfluenceError(f"projector {name!r} needs proj_dim > 0; got {out_dim!r}")
    if name in ("dense", "dense_gaussian") and in_dim * int(out_dim) > 2**31:
        raise InfluenceError(
            f"projector {name!r} would materialise a {in_dim} x {out_dim} matrix; "
            "use 'sjlt', 'chunked' or 'pallas' for large P"
        )
    if name == "pallas":
        options = {**options, "interpret": pallas_interpret(options.get("interpret"))}
    return Projector(name=name, seed=int(seed), in_dim=int(in_dim), out_dim=int(out_dim), **options)
