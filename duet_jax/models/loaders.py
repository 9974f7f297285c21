"""Load a model from a SPEC: a built-in name, a local Hugging Face directory, a ``.gguf`` file, or
a hub name. All paths end in the same parameter tree.

How a load works (bonsai's pattern): an abstract model from ``nnx.eval_shape`` (no memory, no
random init), then a key table maps each checkpoint name to (parameter path, transform). Every
failure (unexpected tensor, missing tensor, shape mismatch naming the key and both shapes) is
collected and raised once as :class:`ModelError`.

Example::

    >>> from duet_jax.models import load_model
    >>> model = load_model("smollm2-135m-instruct")           # doctest: +SKIP
    >>> model = load_model("path/to/hf_dir", dtype="bfloat16")  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from duet_jax.errors import ModelError, OfflineError
from duet_jax.models.config import ModelConfig
from duet_jax.models.llama import LlamaModel, as_dtype

__all__ = [
    "BUILTIN_MODELS",
    "ResolvedSpec",
    "resolve_spec",
    "load_model",
    "load_config",
    "model_from_tensors",
    "hf_state_dict",
    "save_hf",
    "param_path",
    "hf_key",
]

HUB_PATTERNS = ["config.json", "*.safetensors", "model.safetensors.index.json",
                "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt"]


def _smollm2_path() -> Path:
    from duet_jax.assets import smollm2_gguf_path

    return smollm2_gguf_path()


#: built-in names -> function returning the local file
BUILTIN_MODELS: dict[str, Callable[[], Path]] = {"smollm2-135m-instruct": _smollm2_path}
#: the hub checkpoint each built-in was converted from (the config's name, so an exported PEFT
#: adapter names a base model that PEFT / vLLM can fetch)
BUILTIN_HUB_IDS = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}


# ---------------------------------------------------------------------------------------- spec
@dataclasses.dataclass(frozen=True)
class ResolvedSpec:
    kind: str  # "gguf" | "hf_dir" | "hub"
    location: str  # a path, or the hub name
    name: str


_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_spec(spec: str | os.PathLike) -> ResolvedSpec:
    """What a SPEC names. Built-in names win; then existing paths; then ``owner/name`` hub names.

    Raises:
      ModelError: a path that does not exist, a directory without config.json or a single .gguf,
        or a string that is none of the above (the message lists the built-in names).
    """
    s = os.fspath(spec)
    if s in BUILTIN_MODELS:
        return ResolvedSpec("gguf", str(BUILTIN_MODELS[s]()), s)
    p = Path(s).expanduser()
    if p.exists():
        if p.is_file():
            if p.suffix.lower() != ".gguf":
                raise ModelError(f"{p} is a file but not a .gguf; give a .gguf file or a directory "
                                 "with config.json and *.safetensors")
            return ResolvedSpec("gguf", str(p), p.stem)
        if (p / "config.json").exists():
            return ResolvedSpec("hf_dir", str(p), str(p.resolve()))
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return ResolvedSpec("gguf", str(ggufs[0]), ggufs[0].stem)
        raise ModelError(f"directory {p} has no config.json" +
                         (f" and {len(ggufs)} .gguf files (name one)" if ggufs else " and no .gguf file"))
    looks_like_path = s.endswith(".gguf") or s.startswith((".", "/", "~")) or s.count("/") > 1
    if _HUB_NAME.match(s) and not s.endswith(".gguf"):
        return ResolvedSpec("hub", s, s)
    if looks_like_path:
        raise ModelError(f"model path {s!r} does not exist")
    raise ModelError(f"unknown model {s!r}: not a built-in name ({', '.join(BUILTIN_MODELS)}), an "
                     "existing directory or .gguf file, or a hub name owner/name")


def _offline() -> bool:
    val = os.environ.get("HF_HUB_OFFLINE", "")
    return val.strip().upper() in {"1", "ON", "YES", "TRUE"}


def download(name: str) -> Path:
    """``snapshot_download`` of config, safetensors and tokenizer files. Offline (HF_HUB_OFFLINE=1)
    only the local Hugging Face cache is used, and a miss raises :class:`OfflineError` at once."""
    from huggingface_hub import errors as hf_errors
    from huggingface_hub import snapshot_download

    offline = _offline()
    try:
        return Path(snapshot_download(name, allow_patterns=HUB_PATTERNS, local_files_only=offline))
    except hf_errors.LocalEntryNotFoundError:
        if offline:
            raise OfflineError(
                f"{name!r} is not a local path, so it was taken as a Hugging Face hub name, but the "
                "process is offline (HF_HUB_OFFLINE=1) and it is not in the local Hugging Face "
                "cache. Use the built-in "
                f"{', '.join(BUILTIN_MODELS)}, a local directory or a .gguf path, or unset "
                "HF_HUB_OFFLINE on a machine with a network.") from None
        raise OfflineError(f"cannot reach the Hugging Face hub to download {name!r} "
                           "(no network?); use a local directory or .gguf path") from None
    except (hf_errors.RepositoryNotFoundError, hf_errors.RevisionNotFoundError,
            hf_errors.GatedRepoError) as e:
        raise ModelError(f"hub model {name!r} is not available: {type(e).__name__}") from None
    except Exception as e:  # network failures come in many types
        if any(w in type(e).__name__ for w in ("Connect", "Timeout", "Network")):
            raise OfflineError(f"cannot reach the Hugging Face hub to download {name!r}: {e}") from None
        raise


def local_dir(spec: str | os.PathLike) -> ResolvedSpec:
    """Resolve a SPEC to local files (downloading a hub name): kind is ``gguf`` or ``hf_dir``."""
    r = resolve_spec(spec)
    if r.kind == "hub":
        return ResolvedSpec("hf_dir", str(download(r.location)), r.name)
    return r


# ---------------------------------------------------------------------------------------- key table
_LAYER_PARAM = {
    "input_layernorm.weight": ("input_layernorm", "weight"),
    "post_attention_layernorm.weight": ("post_attention_layernorm", "weight"),
    **{f"self_attn.{p}_proj.{w}": ("self_attn", f"{p}_proj", "kernel" if w == "weight" else "bias")
       for p in "qkvo" for w in ("weight", "bias")},
    **{f"mlp.{p}_proj.{w}": ("mlp", f"{p}_proj", "kernel" if w == "weight" else "bias")
       for p in ("gate", "up", "down") for w in ("weight", "bias")},
}
_GLOBAL_PARAM = {
    "model.embed_tokens.weight": ("embed_tokens", "embedding"),
    "model.norm.weight": ("norm", "weight"),
    "lm_head.weight": ("lm_head", "kernel"),
}
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
# checkpoint tensors that are not parameters of ours and are skipped
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


def param_path(key: str) -> tuple[tuple, bool] | None:
    """HF checkpoint key -> (parameter path in the NNX tree, transpose?) or ``None``."""
    if key in _GLOBAL_PARAM:
        path = _GLOBAL_PARAM[key]
        return path, path[-1] == "kernel"
    m = _LAYER_KEY.match(key)
    if m and m.group(2) in _LAYER_PARAM:
        path = ("layers", int(m.group(1)), *_LAYER_PARAM[m.group(2)])
        return path, path[-1] == "kernel"
    return None


_INV_LAYER = {v: k for k, v in _LAYER_PARAM.items()}
_INV_GLOBAL = {v: k for k, v in _GLOBAL_PARAM.items()}


def hf_key(path: tuple) -> str:
    """Parameter path -> HF checkpoint key (inverse of :func:`param_path`)."""
    path = tuple(path)
    if path in _INV_GLOBAL:
        return _INV_GLOBAL[path]
    if len(path) > 2 and path[0] == "layers" and tuple(path[2:]) in _INV_LAYER:
        return f"model.layers.{path[1]}.{_INV_LAYER[tuple(path[2:])]}"
    return ".".join(str(p) for p in path)


def _abstract(config: ModelConfig, dtype, param_dtype) -> LlamaModel:
    return nnx.eval_shape(lambda: LlamaModel(config, dtype=dtype, param_dtype=param_dtype,
                                             rngs=nnx.Rngs(0)))


def model_from_tensors(config: ModelConfig, keys: Iterable[str],
                       get: Callable[[str], np.ndarray], *, dtype="float32",
                       param_dtype=None, source: str = "checkpoint", mesh=None,
                       get_slice: Callable[[str], Any] | None = None) -> LlamaModel:
    """Build a model from named HF tensors (``get(key)`` loads one lazily).

    With ``mesh`` (a ``jax.sharding.Mesh`` or :class:`~duet_jax.sharding.MeshConfig`) every
    parameter is created directly on its FSDP sharding (:func:`duet_jax.sharding.param_spec`) with
    ``jax.make_array_from_callback``: each device's shard is read from ``get_slice(key)`` (an object
    with ``get_shape()`` and numpy-style slicing, e.g. a safetensors memory-mapped slice), so no
    full host copy of the weights is ever made. Without ``get_slice``, ``get`` is used per shard.

    Raises:
      ModelError: every unexpected, missing or mis-shaped tensor, listed together.
    """
    dtype = as_dtype(dtype)
    param_dtype = dtype if param_dtype is None else as_dtype(param_dtype)
    model = _abstract(config, dtype, param_dtype)
    slots = _logical_slots(model)  # logical path -> (variable, index in its stack or None)
    if mesh is not None:
        return _sharded_from_tensors(model, config, slots, keys, get, get_slice, param_dtype,
                                     source, mesh)
    buffers: dict[int, np.ndarray] = {}  # id(variable) -> host buffer of the stacked array
    owners: dict[int, Any] = {}
    filled: set[tuple] = set()
    errors: list[str] = []
    for key in keys:
        if _IGNORED.search(key):
            continue
        if key == "lm_head.weight" and config.tie_word_embeddings:
            continue  # some tied checkpoints store the head anyway
        hit = param_path(key)
        if hit is None or hit[0] not in slots:
            errors.append(f"unexpected tensor {key!r}: the {config.architecture} model has no such "
                          "parameter" + (" (check attention_bias / mlp_bias / tie_word_embeddings)"
                                         if hit is not None else ""))
            continue
        path, transpose = hit
        var, j = slots[path]
        want = tuple(var.shape) if j is None else tuple(var.shape[1:])
        arr = get(key)
        got = tuple(arr.shape[::-1]) if (transpose and arr.ndim == 2) else tuple(arr.shape)
        filled.add(path)  # reported either way: not "missing" as well
        if got != want:
            shown_want = want[::-1] if transpose else want
            errors.append(f"tensor {key!r} has shape {tuple(arr.shape)} in the {source}, "
                          f"but the model expects {shown_want}")
            continue
        arr = np.asarray(arr.T if transpose else arr)
        if j is None:
            var.set_value(jnp.asarray(arr, param_dtype))
            continue
        buf = buffers.get(id(var))
        if buf is None:
            buf = buffers[id(var)] = np.empty(tuple(var.shape), param_dtype)
            owners[id(var)] = var
        buf[j] = arr.astype(param_dtype)
    missing = [hf_key(p) for p in slots if p not in filled]
    errors += [f"missing tensor {k!r}" for k in missing]
    if errors:
        raise ModelError(f"cannot load the {source}: {len(errors)} problem(s)\n  " + "\n  ".join(errors))
    for vid, buf in buffers.items():
        owners[vid].set_value(jnp.asarray(buf))
    return model


def _sharded_from_tensors(model, config, slots, keys, get, get_slice, param_dtype, source, mesh):
    import jax
    from jax.sharding import NamedSharding

    from duet_jax.sharding import as_mesh, param_spec

    mesh = as_mesh(mesh)
    sliced = get_slice or (lambda k: get(k))
    where: dict[tuple, tuple[str, bool]] = {}  # logical path -> (key, transpose)
    errors: list[str] = []
    for key in keys:
        if _IGNORED.search(key) or (key == "lm_head.weight" and config.tie_word_embeddings):
            continue
        hit = param_path(key)
        if hit is None or hit[0] not in slots:
            errors.append(f"unexpected tensor {key!r}: the {config.architecture} model has no such "
                          "parameter")
            continue
        path, transpose = hit
        var, j = slots[path]
        want = tuple(var.shape) if j is None else tuple(var.shape[1:])
        src = sliced(key)
        shape = tuple(src.get_shape() if hasattr(src, "get_shape") else np.shape(src))
        got = shape[::-1] if (transpose and len(shape) == 2) else shape
        where[path] = (key, transpose)
        if got != want:
            errors.append(f"tensor {key!r} has shape {shape} in the {source}, but the model expects "
                          f"{want[::-1] if transpose else want}")
    errors += [f"missing tensor {hf_key(p)!r}" for p in slots if p not in where]
    if errors:
        raise ModelError(f"cannot load the {source}: {len(errors)} problem(s)\n  " + "\n  ".join(errors))

    def read(path, index):  # index: slices in the model's layout of one layer / global tensor
        key, transpose = where[path]
        src = sliced(key)
        idx = tuple(index)
        if transpose:
            idx = idx[::-1]
        arr = np.asarray(src[idx] if idx else src[...])
        return (arr.T if transpose else arr).astype(param_dtype)

    members: dict[int, list] = {}
    for path, (var, j) in slots.items():
        members.setdefault(id(var), [var, []])[1].append((j, path))
    for var, entries in members.values():
        entries.sort(key=lambda e: -1 if e[0] is None else e[0])
        stacked = entries[0][0] is not None
        shape = tuple(var.shape)
        sharding = NamedSharding(mesh, param_spec(shape, mesh, stacked=stacked))
        if stacked:
            paths = [p for _, p in entries]

            def cb(index, paths=paths):
                rows = range(*index[0].indices(len(paths)))
                return np.stack([read(paths[r], index[1:]) for r in rows])
        else:
            path = entries[0][1]

            def cb(index, path=path):
                return read(path, index)
        var.set_value(jax.make_array_from_callback(shape, sharding, cb))
    return model


def _logical_slots(model: LlamaModel, flt=nnx.Param) -> dict[tuple, tuple[Any, int | None]]:
    """Every parameter under its logical path (``("layers", i, "self_attn", "q_proj", "kernel")``
    or a global one) -> (its variable, the layer's index in the variable's stack, or None)."""
    out: dict[tuple, tuple[Any, int | None]] = {}
    for path, var in nnx.state(model, flt).flat_state():
        path = tuple(path)
        if path[0] == "stacks":
            st = model.stacks[path[1]]
            for j in range(st.count):
                out[("layers", st.first + j, *path[3:])] = (var, j)
        else:
            out[path] = (var, None)
    return out


# ---------------------------------------------------------------------------------------- sources
class _Safetensors:
    """Lazy access to the tensors of one or more safetensors files."""

    def __init__(self, files: Iterable[Path]):
        from safetensors import safe_open

        self._handles = []
        self._where: dict[str, Any] = {}
        for f in files:
            h = safe_open(str(f), "numpy")
            self._handles.append(h)
            for k in h.keys():
                self._where[k] = h

    def keys(self) -> list[str]:
        return list(self._where)

    def get(self, key: str) -> np.ndarray:
        arr = self._where[key].get_tensor(key)
        return arr if arr.dtype == np.float32 else arr.astype(np.float32)

    def get_slice(self, key: str):
        """A lazy slice of the memory-mapped tensor (``get_shape()``, ``[idx]`` reads only idx)."""
        return self._where[key].get_slice(key)


def _hf_files(d: Path) -> list[Path]:
    index = d / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ModelError(f"{index} is malformed: {e}") from None
        files = sorted({d / f for f in weight_map.values()})
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise ModelError(f"{index} names shard(s) that are missing: {', '.join(missing)}")
        return files
    if (d / "model.safetensors").exists():
        return [d / "model.safetensors"]
    shards = sorted(d.glob("*.safetensors"))
    if shards:
        return shards
    raise ModelError(f"{d} has config.json but no model.safetensors (or sharded index); "
                     "PyTorch .bin checkpoints are not supported, convert them to safetensors")


def load_config(spec: str | os.PathLike) -> ModelConfig:
    """The config of a SPEC without loading weights (a GGUF is dequantised once, into the cache)."""
    r = local_dir(spec)
    if r.kind == "gguf":
        from duet_jax.models.gguf import cached_gguf

        config = cached_gguf(r.location)[0]
        return config.replace(name=BUILTIN_HUB_IDS.get(r.name, config.name))
    return _read_hf_config(Path(r.location), r.name)


def _read_hf_config(d: Path, name: str) -> ModelConfig:
    try:
        raw = json.loads((d / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise ModelError(f"{d / 'config.json'} is not valid JSON: {e}") from None
    return ModelConfig.from_hf(raw, name=name)


def load_model(spec: str | os.PathLike, *, dtype="float32", param_dtype=None,
               use_cache: bool = True, mesh=None) -> LlamaModel:
    """Load a model.

    Args:
      spec: built-in name (``smollm2-135m-instruct``), local HF directory (config.json +
        model.safetensors or a sharded index), ``.gguf`` file, or hub name ``owner/name``.
      dtype: compute dtype, ``"float32"`` or ``"bfloat16"``.
      param_dtype: storage dtype of the weights (default: ``dtype``).
      use_cache: for GGUF, keep the dequantised float32 tensors under ``cache_dir()``.
      mesh: a ``jax.sharding.Mesh`` / :class:`~duet_jax.sharding.MeshConfig`: every weight is read
        shard by shard from the memory-mapped safetensors (an HF directory with one file or a
        sharded index, or the GGUF cache) straight onto its FSDP sharding, never a full host copy.

    Raises:
      ModelError: unsupported architecture or quantisation, missing / mis-shaped tensors, bad SPEC.
      OfflineError: a hub name while offline and not in the local Hugging Face cache.
    """
    r = local_dir(spec)
    if r.kind == "gguf":
        from duet_jax.models.gguf import cached_gguf

        config, src = cached_gguf(r.location, use_cache=use_cache)
        if r.name in BUILTIN_HUB_IDS:
            config = config.replace(name=BUILTIN_HUB_IDS[r.name])
        if isinstance(src, dict):
            return model_from_tensors(config, list(src), src.__getitem__, dtype=dtype,
                                      param_dtype=param_dtype, source=f"GGUF {r.location}",
                                      mesh=mesh)
        st = _Safetensors([src])
        return model_from_tensors(config, st.keys(), st.get, dtype=dtype, param_dtype=param_dtype,
                                  source=f"GGUF {r.location} (cached as {src})", mesh=mesh,
                                  get_slice=st.get_slice)
    d = Path(r.location)
    config = _read_hf_config(d, r.name)
    st = _Safetensors(_hf_files(d))
    return model_from_tensors(config, st.keys(), st.get, dtype=dtype, param_dtype=param_dtype,
                              source=f"checkpoint in {d}", mesh=mesh, get_slice=st.get_slice)


# ---------------------------------------------------------------------------------------- export
def hf_state_dict(model: LlamaModel, dtype=np.float32) -> dict[str, np.ndarray]:
    """The base weights under Hugging Face names and layouts (``[out, in]``); LoRA excluded
    (merge it first with :func:`duet_jax.models.lora.merge_lora` to include it)."""
    from duet_jax.models.lora import FROZEN

    out = {}
    host: dict[int, np.ndarray] = {}
    for path, (var, j) in _logical_slots(model, FROZEN).items():
        if id(var) not in host:
            host[id(var)] = np.asarray(var[...].astype(jnp.float32)).astype(dtype)
        arr = host[id(var)] if j is None else host[id(var)][j]
        out[hf_key(path)] = np.ascontiguousarray(arr.T if path[-1] == "kernel" else arr)
    return out


def save_hf(model: LlamaModel, directory: str | os.PathLike, *, dtype=np.float32) -> Path:
    """Write ``config.json`` + ``model.safetensors`` (transformers and :func:`load_model` read it)."""
    from safetensors.numpy import save_file

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(model.config.to_hf(), indent=2) + "\n")
    save_file(hf_state_dict(model, dtype), str(d / "model.safetensors"), metadata={"format": "pt"})
    return d

