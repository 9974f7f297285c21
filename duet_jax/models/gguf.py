"""GGUF checkpoints -> Hugging Face-named float32 tensors (+ a :class:`ModelConfig`).

* Tensors are dequantised with ``gguf.quants.dequantize`` (F32, F16, BF16, Q4_0 ... Q8_0, K-quants,
  ...); a type gguf cannot dequantise raises :class:`ModelError` naming the tensors and the type.
* llama.cpp stores Q and K of Llama-architecture models with rows permuted for its interleaved
  RoPE; they are un-permuted here (``w.reshape(n_head, hd // 2, 2, d).swapaxes(1, 2)``) so the model
  keeps Hugging Face's ``rotate_half`` RoPE. Qwen2 GGUFs use NeoX RoPE and are not permuted.
* Dequantising takes seconds (~10 s for SmolLM2-135M), so the float32 tensors are cached as one
  safetensors file under ``duet_jax.assets.cache_dir()/gguf``, keyed by the GGUF's path, size and
  modification time, with the config in its metadata. A second load reads only that file.
* A file cut short (an interrupted download or copy) is reported as such:
  ``... is truncated (expected N bytes, found M)`` (:func:`gguf_truncation` reads the header and
  tensor table to work out N).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from duet_jax.errors import ModelError
from duet_jax.models.config import ModelConfig

__all__ = [
    "GGUF_TO_HF",
    "PERMUTED_ARCHITECTURES",
    "read_gguf",
    "cached_gguf",
    "gguf_cache_path",
    "permute_qk",
    "unpermute_qk",
    "supported_quant_types",
    "gguf_truncation",
    "check_gguf_size",
]

CACHE_FORMAT = 1  # bump when the cached layout changes
PERMUTED_ARCHITECTURES = ("llama", "mistral")

# GGUF name (blk.{i}. prefix stripped) -> HF name (model.layers.{i}. prefix stripped)
_LAYER_MAP = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "ffn_gate.bias": "mlp.gate_proj.bias",
    "ffn_up.bias": "mlp.up_proj.bias",
    "ffn_down.bias": "mlp.down_proj.bias",
}
_GLOBAL_MAP = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLK = re.compile(r"^blk\.(\d+)\.(.+)$")
#: documentation of the name mapping (``{i}`` is the layer)
GGUF_TO_HF = {**_GLOBAL_MAP,
              **{f"blk.{{i}}.{k}": f"model.layers.{{i}}.{v}" for k, v in _LAYER_MAP.items()}}
# tensors that configure the model rather than being parameters
_CONFIG_TENSORS = ("rope_freqs.weight",)


def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face name of a GGUF tensor (``None`` if it has none)."""
    if gguf_name in _GLOBAL_MAP:
        return _GLOBAL_MAP[gguf_name]
    m = _BLK.match(gguf_name)
    if m and m.group(2) in _LAYER_MAP:
        return f"model.layers.{m.group(1)}.{_LAYER_MAP[m.group(2)]}"
    return None


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's permutation (HF rotate_half layout -> interleaved pairs), rows of ``w``."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of :func:`permute_qk` (interleaved pairs -> HF rotate_half layout)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def supported_quant_types() -> tuple[str, ...]:
    import gguf

    traits = getattr(gguf.quants, "_type_traits", {})
    types = {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, *traits}
    return tuple(t.name for t in sorted(types))


def _field_value(field) -> Any:
    try:
        return field.contents()
    except Exception:  # pragma: no cover - exotic field types
        return None


def _metadata(reader) -> dict[str, Any]:
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.ggml.") and key in (
                "tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                "tokenizer.ggml.scores"):
            continue  # large arrays the model does not need (the tokenizer reads them)
        meta[key] = _field_value(field)
    tok = reader.fields.get("tokenizer.ggml.tokens")
    if tok is not None:
        meta["tokenizer.ggml.tokens"] = range(len(tok.data))  # only its length is used
    return meta


# ---------------------------------------------------------------------------------------- truncation
class _Short(Exception):
    """The file ends before the byte ``need``."""

    def __init__(self, need: int):
        self.need = need


# GGUF metadata value types -> size in bytes of a scalar (8: string, 9: array are variable)
_SCALAR_SIZE = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def gguf_truncation(path: str | Path) -> tuple[int, int, bool] | None:
    """``(expected, found, exact)`` when the GGUF file at ``path`` is shorter than its header says,
    else ``None``.

    ``expected`` is the end of the last tensor's data (``exact``) or, when the file ends inside the
    header or the tensor table, the least size that the part read so far needs (``exact`` False).
    ``None`` also when the file is not a little-endian GGUF or uses a tensor type whose size is not
    known (then nothing can be said).
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        pos = 0

        def read(n: int) -> bytes:
            nonlocal pos
            b = f.read(n)
            if len(b) < n:
                raise _Short(pos + n)
            pos += n
            return b

        def u32() -> int:
            return struct.unpack("<I", read(4))[0]

        def u64() -> int:
            return struct.unpack("<Q", read(8))[0]

        def skip(n: int) -> None:
            nonlocal pos
            if pos + n > size:
                raise _Short(pos + n)
            f.seek(n, os.SEEK_CUR)
            pos += n

        def skip_value(vtype: int, depth: int = 0) -> None:
            if vtype in _SCALAR_SIZE:
                skip(_SCALAR_SIZE[vtype])
            elif vtype == 8:
                skip(u64())
            elif vtype == 9 and depth < 4:
                etype, count = u32(), u64()
                if etype in _SCALAR_SIZE:
                    skip(_SCALAR_SIZE[etype] * count)
                else:
                    for _ in range(count):
                        skip_value(etype, depth + 1)
            else:
                raise ValueError(f"unknown metadata type {vtype}")

        try:
            if read(4) != b"GGUF":
                return None
            version = u32()
            if version not in (2, 3):
                return None
            n_tensors, n_kv = u64(), u64()
            if n_tensors > 1 << 24 or n_kv > 1 << 24:
                return None  # not a plausible header (e.g. big-endian)
            alignment = 32
            for _ in range(n_kv):
                key = read(u64()).decode("utf-8", "replace")
                vtype = u32()
                if key == "general.alignment" and vtype == 4:
                    alignment = u32()
                else:
                    skip_value(vtype)
            infos = []
            for _ in range(n_tensors):
                skip(u64())  # the name
                n_dims = u32()
                if n_dims > 8:
                    return None
                dims = [u64() for _ in range(n_dims)]
                ttype, offset = u32(), u64()
                infos.append((dims, ttype, offset))
        except _Short as e:
            return (e.need, size, False) if e.need > size else None
        except (ValueError, struct.error, OverflowError):
            return None
    import gguf

    if alignment <= 0 or alignment & (alignment - 1):
        return None
    data_start = pos + (-pos) % alignment
    end = data_start
    for dims, ttype, offset in infos:
        try:
            block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ttype)]
        except (ValueError, KeyError):
            return None
        n = int(np.prod(dims, dtype=np.int64)) if dims else 1
        end = max(end, data_start + offset + n // block * type_size)
    return (end, size, True) if end > size else None


def check_gguf_size(path: str | Path, error: type[Exception] = ModelError) -> None:
    """Raise ``error`` ("<path> is truncated (expected N bytes, found M) ...") when the GGUF file
    is shorter than its header says; do nothing otherwise (other damage is left to the reader)."""
    t = gguf_truncation(path)
    if t is not None:
        expected, found, exact = t
        raise error(f"GGUF file {path} is truncated (expected {'' if exact else 'at least '}{expected} "
                    f"bytes, found {found}): an interrupted download or copy? Fetch it again")


def read_gguf(path: str | Path) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """Read and dequantise a GGUF file: its config and float32 tensors under HF names.

    Raises:
      ModelError: a truncated file ("truncated (expected N bytes, found M)"), unsupported
        architecture, an unsupported quantisation type, a tensor with no Hugging Face counterpart
        (every problem listed at once).
    """
    import gguf

    path = Path(path)
    check_gguf_size(path)
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:
        raise ModelError(f"{path} is not a readable GGUF file: {e}") from None
    meta = _metadata(reader)
    names = [t.name for t in reader.tensors]
    by_name = {t.name: t for t in reader.tensors}
    supported = set(supported_quant_types())
    errors = []
    bad_types: dict[str, list[str]] = {}
    for t in reader.tensors:
        if t.tensor_type.name not in supported:
            bad_types.setdefault(t.tensor_type.name, []).append(t.name)
    for qt, ts in bad_types.items():
        shown = ", ".join(ts[:5]) + (f" and {len(ts) - 5} more" if len(ts) > 5 else "")
        errors.append(f"quantisation type {qt} is not supported (tensors {shown}); supported: "
                      f"{', '.join(sorted(supported))}")
    rope_freqs = None
    if "rope_freqs.weight" in by_name and not bad_types:
        rope_freqs = _dequantize(by_name["rope_freqs.weight"])
    if errors:
        raise ModelError(f"cannot load {path}:\n  " + "\n  ".join(errors))
    config = ModelConfig.from_gguf(meta, names, rope_freqs=rope_freqs, name=str(meta.get("general.name") or path.stem))
    permuted = config.architecture in PERMUTED_ARCHITECTURES
    out: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        if t.name in _CONFIG_TENSORS:
            continue
        name = hf_name(t.name)
        if name is None:
            errors.append(f"tensor {t.name!r} has no counterpart in the model")
            continue
        w = _dequantize(t)
        if permuted and t.name.endswith(("attn_q.weight", "attn_q.bias")):
            w = unpermute_qk(w, config.num_heads)
        elif permuted and t.name.endswith(("attn_k.weight", "attn_k.bias")):
            w = unpermute_qk(w, config.num_kv_heads)
        out[name] = np.ascontiguousarray(w, dtype=np.float32)
    if errors:
        raise ModelError(f"cannot load {path}:\n  " + "\n  ".join(errors))
    return config, out


def _dequantize(t) -> np.ndarray:
    import gguf

    shape = tuple(int(x) for x in reversed(t.shape.tolist()))  # GGUF lists ne0 (innermost) first
    try:
        w = gguf.quants.dequantize(t.data, t.tensor_type)
    except NotImplementedError:
        raise ModelError(f"tensor {t.name!r}: quantisation type {t.tensor_type.name} is not supported") from None
    return np.asarray(w, np.float32).reshape(shape)


# ---------------------------------------------------------------------------------------- cache
def gguf_cache_path(path: str | Path) -> Path:
    """Where the float32 tensors of ``path`` are cached (depends on path, size and mtime)."""
    from duet_jax.assets import cache_dir

    p = Path(path).resolve()
    st = p.stat()
    key = json.dumps([str(p), st.st_size, st.st_mtime_ns, CACHE_FORMAT])
    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    return cache_dir() / "gguf" / f"{p.stem}-{digest}.safetensors"


def cached_gguf(path: str | Path, *, use_cache: bool = True) -> tuple[ModelConfig, Path | dict[str, np.ndarray]]:
    """The config, and either the cached safetensors file or (no cache) the tensors themselves.

    The first call dequantises and writes the cache atomically; later calls read the config from
    the cache's metadata without opening the GGUF.
    """
    from safetensors import safe_open
    from safetensors.numpy import save_file

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"GGUF file {path} not found")
    if not use_cache:
        return read_gguf(path)
    target = gguf_cache_path(path)
    if target.exists():
        try:
            with safe_open(str(target), "numpy") as f:
                meta = f.metadata() or {}
            return ModelConfig.from_dict(json.loads(meta["duet_jax_config"])), target
        except Exception:  # a corrupt or foreign file: rebuild it
            pass
    config, tensors = read_gguf(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(f".tmp{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata={"duet_jax_config": json.dumps(config.to_dict()),
                                                "source": str(path.resolve()), "format": "pt"})
        os.replace(tmp, target)
    except OSError:  # read-only cache: carry on without it
        tmp.unlink(missing_ok=True)
        return config, tensors
    return config, target


def metadata_of(path: str | Path) -> Mapping[str, Any]:
    """GGUF metadata (without the big tokenizer arrays), for inspection."""
    import gguf

    return _metadata(gguf.GGUFReader(str(path)))
