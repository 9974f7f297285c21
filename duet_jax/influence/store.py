"""A resumable on-disk store of projected features (and scores), checked against its metadata.

Layout of a store directory::

    header.json             {"format": 1, "layout": {n_examples, dim, chunk_size},
                             "metadata": {domain, example_ids, model_hash, projector, proj_dim,
                                          seed, curvature, damping, ...}}
    chunks/000003.npz       features [m, k] float32 and valid [m] bool of chunk 3 (its done flag)
    arrays/NAME.npy         named arrays (e.g. scores), written atomically

Every file is written to a temporary name in the same directory and moved into place with
``os.replace``, so a chunk file exists only when it is complete: a run killed part-way leaves
only done chunks, and the next run computes the rest (:func:`featurize_into_store`).
Opening a directory whose header differs from the requested metadata raises
:class:`StoreMismatchError` naming the differing keys.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from duet_jax.errors import InfluenceError
from duet_jax.report import atomic_write

__all__ = [
    "FeatureStore",
    "StoreMismatchError",
    "featurize_into_store",
    "params_fingerprint",
    "store_metadata",
]

_FORMAT = 1


class StoreMismatchError(InfluenceError):
    """A store directory was made with different metadata than requested."""


def params_fingerprint(params: Any) -> str:
    """sha256 (hex, 16 chars) of a parameter pytree: structure, shapes, dtypes and values."""
    h = hashlib.sha256()
    leaves, treedef = jax.tree_util.tree_flatten(params)
    h.update(str(treedef).encode())
    for x in leaves:
        a = np.ascontiguousarray(np.asarray(x))
        h.update(f"{a.shape}{a.dtype}".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def store_metadata(
    scorer, params: Any, *, domain: str, example_ids: Sequence, model_hash: str | None = None,
    **extra,
) -> dict:
    """The metadata a feature store records for one (domain, model, scorer).

    Args:
      scorer: an :class:`~duet_jax.influence.scorer.InfluenceScorer`.
      params: the parameters being featurized (hashed unless ``model_hash`` is given).
      domain: domain name.
      example_ids: ids of the examples, in store order (JSON-able: str or int).
      model_hash: overrides :func:`params_fingerprint` (e.g. a hash of base + adapter).
      **extra: more JSON-able keys (e.g. ``split="train"``).

    Returns:
      A JSON-able dict.
    """
    p = int(sum(np.size(x) for x in jax.tree_util.tree_leaves(params)))
    meta = {
        "domain": str(domain),
        "example_ids": [x if isinstance(x, (int, str)) else str(x) for x in example_ids],
        "model_hash": model_hash or params_fingerprint(params),
        "num_params": p,
        **scorer.metadata(),
        **extra,
    }
    return json.loads(json.dumps(meta))  # normalise (tuples -> lists) so comparisons are exact


class FeatureStore:
    """Features of ``n_examples`` examples, ``dim`` columns, in chunks of ``chunk_size`` rows.

    Use :meth:`open` (creates or checks the directory).
    """

    def __init__(self, path: str, header: dict):
        self.path = str(path)
        self.header = header
        lay = header["layout"]
        self.n_examples = int(lay["n_examples"])
        self.dim = int(lay["dim"])
        self.chunk_size = int(lay["chunk_size"])
        self.metadata = header["metadata"]

    @classmethod
    def open(
        cls, path: str, metadata: dict, *, n_examples: int, dim: int, chunk_size: int
    ) -> FeatureStore:
        """Create the store at ``path``, or reopen it if its header matches.

        Args:
          path: directory.
          metadata: JSON-able dict (see :func:`store_metadata`).
          n_examples, dim, chunk_size: the layout (> 0).

        Returns:
          The store.

        Raises:
          StoreMismatchError: the directory holds a store with other metadata or layout.
        """
        for name, v in (("n_examples", n_examples), ("dim", dim), ("chunk_size", chunk_size)):
            if int(v) <= 0:
                raise InfluenceError(f"store {name} must be > 0; got {v}")
        header = {
            "format": _FORMAT,
            "layout": {"n_examples": int(n_examples), "dim": int(dim), "chunk_size": int(chunk_size)},
            "metadata": json.loads(json.dumps(metadata)),
        }
        if "example_ids" in header["metadata"] and len(header["metadata"]["example_ids"]) != n_examples:
            raise InfluenceError(
                f"metadata has {len(header['metadata']['example_ids'])} example_ids; "
                f"expected n_examples={n_examples}"
            )
        hpath = os.path.join(path, "header.json")
        if os.path.exists(hpath):
            with open(hpath) as f:
                old = json.load(f)
            diff = _diff(old, header)
            if diff:
                raise StoreMismatchError(
                    f"store {path} was made with different settings; differing keys: "
                    f"{', '.join(diff)}. Use another directory, or delete this one to recompute."
                )
        else:
            os.makedirs(os.path.join(path, "chunks"), exist_ok=True)
            os.makedirs(os.path.join(path, "arrays"), exist_ok=True)
            payload = json.dumps(header, indent=1, sort_keys=True).encode()
            atomic_write(hpath, lambda f: f.write(payload), "wb")
        return cls(path, header)

    @classmethod
    def in_memory(cls, *, n_examples: int, dim: int, chunk_size: int, metadata: dict | None = None) -> FeatureStore:
        """A store of the same layout kept in memory (nothing written, nothing to resume): the
        same chunk loop (:func:`featurize_into_store`) without a directory."""
        for name, v in (("n_examples", n_examples), ("dim", dim), ("chunk_size", chunk_size)):
            if int(v) <= 0:
                raise InfluenceError(f"store {name} must be > 0; got {v}")
        header = {"format": _FORMAT,
                  "layout": {"n_examples": int(n_examples), "dim": int(dim), "chunk_size": int(chunk_size)},
                  "metadata": json.loads(json.dumps(metadata or {}))}
        return _MemoryStore(header)

    # -------------------------------------------------------------- chunks
    @property
    def num_chunks(self) -> int:
        return -(-self.n_examples // self.chunk_size)

    def chunk_range(self, i: int) -> tuple[int, int]:
        """``(start, stop)`` example indices of chunk ``i``."""
        if not 0 <= i < self.num_chunks:
            raise InfluenceError(f"chunk index must be in [0, {self.num_chunks}); got {i}")
        s = i * self.chunk_size
        return s, min(s + self.chunk_size, self.n_examples)

    def _chunk_path(self, i: int) -> str:
        return os.path.join(self.path, "chunks", f"{i:06d}.npz")

    def is_done(self, i: int) -> bool:
        return os.path.exists(self._chunk_path(i))

    def pending(self) -> list[int]:
        """Chunk indices not yet written, ascending."""
        return [i for i in range(self.num_chunks) if not self.is_done(i)]

    def complete(self) -> bool:
        return not self.pending()

    def write_chunk(self, i: int, features, valid=None) -> None:
        """Write chunk ``i`` atomically (features ``[m, dim]``, valid ``[m]``)."""
        f, v = self._checked_chunk(i, features, valid)
        atomic_write(self._chunk_path(i), lambda fh: np.savez(fh, features=f, valid=v), "wb")

    def _checked_chunk(self, i: int, features, valid) -> tuple[np.ndarray, np.ndarray]:
        """Chunk ``i``'s features ``[m, dim]`` float32 and valid flags ``[m]`` bool, shapes checked."""
        s, e = self.chunk_range(i)
        f = np.asarray(features, np.float32)
        if f.shape != (e - s, self.dim):
            raise InfluenceError(f"chunk {i} features must be {(e - s, self.dim)}; got {f.shape}")
        v = np.ones(e - s, bool) if valid is None else np.asarray(valid, bool)
        if v.shape != (e - s,):
            raise InfluenceError(f"chunk {i} valid must be {(e - s,)}; got {v.shape}")
        return f, v

    def read_chunk(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        if not self.is_done(i):
            raise InfluenceError(f"chunk {i} of {self.path} is not written yet")
        with np.load(self._chunk_path(i)) as z:
            return z["features"], z["valid"]

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        """All features ``[n, dim]`` float32 and flags ``[n]`` bool (the store must be complete)."""
        missing = self.pending()
        if missing:
            raise InfluenceError(
                f"store {self.path} is incomplete: {len(missing)} of {self.num_chunks} chunks "
                f"missing (first: {missing[:5]}); run featurize_into_store again"
            )
        parts = [self.read_chunk(i) for i in range(self.num_chunks)]
        return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))

    # -------------------------------------------------------------- named arrays
    def save_array(self, name: str, array) -> None:
        """Save a named array (e.g. ``"scores"``) atomically."""
        if not name.replace("_", "").replace("-", "").isalnum():
            raise InfluenceError(f"array name must be alphanumeric (with _ or -); got {name!r}")
        a = np.asarray(array)
        atomic_write(os.path.join(self.path, "arrays", f"{name}.npy"), lambda f: np.save(f, a), "wb")

    def load_array(self, name: str) -> np.ndarray:
        p = os.path.join(self.path, "arrays", f"{name}.npy")
        if not os.path.exists(p):
            raise InfluenceError(f"store {self.path} has no array {name!r}")
        return np.load(p)


class _MemoryStore(FeatureStore):
    """:meth:`FeatureStore.in_memory`: chunks and named arrays in dicts."""

    def __init__(self, header: dict):
        super().__init__("<memory>", header)
        self._chunks: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._arrays: dict[str, np.ndarray] = {}

    def is_done(self, i: int) -> bool:
        return i in self._chunks

    def write_chunk(self, i: int, features, valid=None) -> None:
        f, v = self._checked_chunk(i, features, valid)
        self._chunks[i] = (f.copy(), v.copy())  # own copies: the caller may reuse its buffers

    def read_chunk(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        if not self.is_done(i):
            raise InfluenceError(f"chunk {i} of the in-memory store is not written yet")
        return self._chunks[i]

    def save_array(self, name: str, array) -> None:
        self._arrays[name] = np.array(array)

    def load_array(self, name: str) -> np.ndarray:
        if name not in self._arrays:
            raise InfluenceError(f"the in-memory store has no array {name!r}")
        return self._arrays[name]


def _diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = sorted(set(old) | set(new))
    out = []
    for k in keys:
        name = f"{prefix}{k}"
        a, b = old.get(k, "<missing>"), new.get(k, "<missing>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, prefix=f"{name}." if k not in ("metadata",) else "")
        elif a != b:
            out.append(name)
    return out


def featurize_into_store(
    scorer,
    params: Any,
    examples: Any,
    store: FeatureStore,
    *,
    precondition: Any = None,
    progress: Callable[[int, int], None] | None = None,
    context: Any = None,
    trim: Callable[[Any], Any] | None = None,
) -> FeatureStore:
    """Featurize ``examples`` chunk by chunk into ``store``, skipping chunks already done.

    The last (short) chunk is padded with copies of its first rows to ``chunk_size`` so that every
    chunk has one shape (one compile); the padding rows are dropped before writing.

    Args:
      scorer: an :class:`~duet_jax.influence.scorer.InfluenceScorer`.
      params: parameter pytree.
      examples: pytree of host (numpy) arrays with leading axis ``store.n_examples``.
      store: an open :class:`FeatureStore` whose ``dim`` is the scorer's output dimension.
      precondition: passed to :meth:`InfluenceScorer.featurize`.
      progress: called as ``progress(done_chunks, num_chunks)`` after each chunk.
      context: passed to :meth:`InfluenceScorer.featurize` (fixed inputs such as frozen weights).
      trim: applied to each chunk before it is featurized (e.g. cut padding off the sequence axis,
        :func:`duet_jax.influence.domains.trim_pool`); it must not change the features.

    Returns:
      The store (complete).
    """
    n = int(np.shape(jax.tree_util.tree_leaves(examples)[0])[0])
    if n != store.n_examples:
        raise InfluenceError(f"store expects {store.n_examples} examples; got {n}")
    k = scorer.projector_for(params).out_dim
    if k != store.dim:
        raise InfluenceError(f"store dim is {store.dim}; the scorer projects to {k}")
    todo = store.pending()
    done = store.num_chunks - len(todo)
    for i in todo:
        s, e = store.chunk_range(i)
        idx = np.arange(s, s + store.chunk_size)
        idx = np.where(idx < e, idx, s + (idx - s) % (e - s))
        chunk = jax.tree_util.tree_map(lambda x, idx=idx: np.asarray(x)[idx], examples)
        if trim is not None:
            chunk = trim(chunk)
        f, ok = scorer.featurize(params, chunk, precondition=precondition, return_flags=True,
                                 context=context)
        store.write_chunk(i, np.asarray(f)[: e - s], np.asarray(ok)[: e - s])
        done += 1
        if progress is not None:
            progress(done, store.num_chunks)
    return store
