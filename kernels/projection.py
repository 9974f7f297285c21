"""Random-sign projection with the signs made on the fly from a counter-based hash.

The projection is ``y = x @ S / sqrt(k)`` with ``S[i, j] in {-1, +1}`` a pure function of
``(seed, i, j)``:

    word(seed, i, w) = fmix32(fmix32(i XOR key(seed)) + w * 0x9E3779B9)      (uint32)
    S[i, j]          = +1 if bit (j mod 32) of word(seed, i, j div 32) is 1, else -1

where ``fmix32`` is MurmurHash3's 32-bit finaliser and ``key(seed) = fmix32(seed * 0x27D4EB2F +
0x165667B1)``. Because ``S`` depends only on the global coordinate ``(i, j)``, the result is the
same for any batch size, any split of the input coordinates into chunks (the chunks' outputs add
up), any tile size and any number of devices. No ``P x k`` matrix is ever formed.

Two implementations give the same numbers (up to float summation order):

- :func:`project_reference` (pure jnp): scans over row blocks of ``x``; per block it hashes one
  word per 32 columns and expands the bits (cheap on CPU).
- :func:`project_pallas` (Pallas): a ``(k blocks, P blocks)`` grid; each tile makes its signs in
  the kernel from the row and column indices and multiplies on the MXU / tensor cores. On CPU run
  it with ``interpret=True`` (tests do).

Both take ``row_offset``: the global index of ``x``'s first column, so that a coordinate chunk can
be projected separately.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

__all__ = ["seed_key", "seed_key_array", "fmix32", "sign_words", "signs", "project_reference", "project_pallas"]

_GOLDEN = 0x9E3779B9


def _u32(x: int) -> int:
    return int(x) & 0xFFFFFFFF


def _fmix32_py(h: int) -> int:
    h = _u32(h)
    h ^= h >> 16
    h = _u32(h * 0x85EBCA6B)
    h ^= h >> 13
    h = _u32(h * 0xC2B2AE35)
    h ^= h >> 16
    return h


def seed_key(seed: int, salt: int = 0) -> int:
    """A 32-bit key from a Python seed (and a salt that separates independent streams).

    Args:
      seed: any Python int (taken modulo 2**32).
      salt: small int; different salts give unrelated keys.

    Returns:
      An int in ``[0, 2**32)``.
    """
    return _fmix32_py(_u32(seed) * 0x27D4EB2F + 0x165667B1 + _u32(salt) * 0x61C88647)


def seed_key_array(seed) -> jax.Array:
    """:func:`seed_key` (salt 0) computed in jnp from a traced seed: same value, no recompile."""
    s = jnp.asarray(seed).astype(jnp.uint32)
    return fmix32(s * jnp.uint32(0x27D4EB2F) + jnp.uint32(0x165667B1))


def fmix32(h: jax.Array) -> jax.Array:
    """MurmurHash3's finaliser on a uint32 array (elementwise, wraps modulo 2**32)."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    h = h ^ (h >> 16)
    return h


def sign_words(key, rows: jax.Array, words: jax.Array) -> jax.Array:
    """The uint32 word holding the signs of columns ``32*w .. 32*w+31`` of row ``i``.

    Args:
      key: :func:`seed_key` of the seed (static int, or a uint32 scalar array).
      rows: uint32 global row (input coordinate) indices; broadcasts with ``words``.
      words: uint32 word indices (column div 32).

    Returns:
      uint32 array of the broadcast shape.
    """
    h = fmix32(rows ^ jnp.uint32(key))
    return fmix32(h + words * jnp.uint32(_GOLDEN))


def signs(key: int, rows: jax.Array, cols: jax.Array) -> jax.Array:
    """float32 signs ``S[rows, cols]`` in {-1, +1}, elementwise (broadcasting) from indices."""
    rows = rows.astype(jnp.uint32)
    cols = cols.astype(jnp.uint32)
    w = sign_words(key, rows, cols >> 5)
    bit = (w >> (cols & jnp.uint32(31))) & jnp.uint32(1)
    return bit.astype(jnp.float32) * 2.0 - 1.0


def _block_signs(key, row0: jax.Array, block_rows: int, k: int) -> jax.Array:
    """Signs of rows ``row0 .. row0+block_rows-1``, all ``k`` columns: [block_rows, k] float32."""
    n_words = -(-k // 32)
    rows = (row0 + jnp.arange(block_rows, dtype=jnp.uint32))[:, None]
    words = jnp.arange(n_words, dtype=jnp.uint32)[None, :]
    w = sign_words(key, rows, words)  # [r, n_words]
    bits = (w[:, :, None] >> jnp.arange(32, dtype=jnp.uint32)) & jnp.uint32(1)
    s = bits.reshape(block_rows, n_words * 32)[:, :k]
    return s.astype(jnp.float32) * 2.0 - 1.0


@functools.partial(jax.jit, static_argnames=("k", "block_rows"))
def project_reference(x: jax.Array, *, seed, k: int, row_offset=0, block_rows: int = 1024):
    """``x @ S[row_offset : row_offset + P] / sqrt(k)`` without forming S (pure jnp).

    Args:
      x: [B, P] float array.
      seed: the projection's seed (int in [0, 2**32) or a traced integer; not static, so a new
        seed does not recompile).
      k: output dimension (static).
      row_offset: global index of x's first column (int or traced int).
      block_rows: rows of S generated at a time (memory ``block_rows * k`` floats). The result
        does not depend on it beyond float summation order.

    Returns:
      [B, k] float32.
    """
    x = jnp.asarray(x, jnp.float32)
    b, p = x.shape
    key = seed_key_array(seed)
    block_rows = max(1, min(block_rows, p))
    n_blocks = -(-p // block_rows)
    pad = n_blocks * block_rows - p
    xb = jnp.pad(x, ((0, 0), (0, pad))).reshape(b, n_blocks, block_rows).transpose(1, 0, 2)
    offset = jnp.asarray(row_offset, jnp.uint32)

    def body(acc, inp):
        i, xi = inp
        row0 = offset + (i * block_rows).astype(jnp.uint32)
        return acc + xi @ _block_signs(key, row0, block_rows, k), None

    acc, _ = jax.lax.scan(body, jnp.zeros((b, k), jnp.float32), (jnp.arange(n_blocks), xb))
    return acc / jnp.sqrt(jnp.float32(k))


def _kernel(x_ref, o_ref, *, key: int, row_offset: int, block_p: int, block_k: int):
    j = pl.program_id(0)  # output (k) block
    i = pl.program_id(1)  # input (P) block, the reduction axis

    @pl.when(i == 0)
    def _init():
        o_ref[...] = jnp.zeros(o_ref.shape, o_ref.dtype)

    rows = (jax.lax.broadcasted_iota(jnp.int32, (block_p, block_k), 0) + i * block_p).astype(
        jnp.uint32
    ) + jnp.uint32(row_offset)
    cols = (jax.lax.broadcasted_iota(jnp.int32, (block_p, block_k), 1) + j * block_k).astype(
        jnp.uint32
    )
    s = signs(key, rows, cols)
    o_ref[...] += jnp.dot(x_ref[...], s, preferred_element_type=jnp.float32)


@functools.partial(
    jax.jit, static_argnames=("seed", "k", "row_offset", "block_p", "block_k", "interpret")
)
def project_pallas(
    x: jax.Array,
    *,
    seed: int,
    k: int,
    row_offset: int = 0,
    block_p: int = 512,
    block_k: int = 512,
    interpret: bool = False,
):
    """Pallas version of :func:`project_reference` (same signs, same result).

    Args:
      x: [B, P] float array. B is padded to a multiple of 8, P to a multiple of ``block_p``
        (zero rows of x contribute nothing), k to a multiple of ``block_k``.
      seed: the projection's seed (static).
      k: output dimension (static).
      row_offset: global index of x's first column (static int here).
      block_p, block_k: tile sizes (multiples of 128 suit TPU and GPU).
      interpret: run the kernel in the Pallas interpreter (CPU, tests).

    Returns:
      [B, k] float32.
    """
    x = jnp.asarray(x, jnp.float32)
    b, p = x.shape
    block_p = min(block_p, -(-p // 128) * 128)
    block_k = min(block_k, -(-k // 128) * 128)
    b_pad = -(-b // 8) * 8
    p_pad = -(-p // block_p) * block_p
    k_pad = -(-k // block_k) * block_k
    xp = jnp.pad(x, ((0, b_pad - b), (0, p_pad - p)))
    kernel = functools.partial(
        _kernel, key=seed_key(seed), row_offset=row_offset, block_p=block_p, block_k=block_k
    )
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((b_pad, k_pad), jnp.float32),
        grid=(k_pad // block_k, p_pad // block_p),
        in_specs=[pl.BlockSpec((b_pad, block_p), lambda j, i: (0, i))],
        out_specs=pl.BlockSpec((b_pad, block_k), lambda j, i: (0, j)),
        interpret=interpret,
    )(xp)
    return out[:b, :k] / jnp.sqrt(jnp.float32(k))
