"""Model configuration: one frozen dataclass for the Llama family (Llama 2/3, Qwen2/2.5, Mistral,
SmolLM2), built from a Hugging Face ``config.json`` dict, from GGUF metadata, or from a preset.

The config is static (hashable): it lives on the module as a static attribute, so it is part of the
NNX graphdef and never traced.

Example::

    >>> from duet_jax.models.config import ModelConfig
    >>> cfg = ModelConfig.preset("tiny-qwen2")
    >>> cfg.qkv_bias, cfg.num_heads // cfg.num_kv_heads
    (True, 2)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from duet_jax.errors import ModelError

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "SUPPORTED_ROPE_TYPES",
    "RopeScaling",
    "ModelConfig",
    "PRESETS",
    "rope_inv_freq",
]

# model_type (config.json) / general.architecture (GGUF) -> HF class name.
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "mistral": "MistralForCausalLM",
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeScaling:
    """A rope-scaling variant, as Hugging Face's ``rope_scaling`` / ``rope_parameters`` gives it.

    * ``linear``: inverse frequencies divided by ``factor``.
    * ``dynamic``: NTK-aware; the base grows with the sequence length once it exceeds
      ``max_position_embeddings`` (computed in the forward from the largest position).
    * ``llama3``: Llama 3.1's piecewise scaling (``low_freq_factor``, ``high_freq_factor``,
      ``original_max_position_embeddings``).
    * ``yarn``: blend of interpolated and extrapolated frequencies plus an attention factor that
      scales cos and sin.
    """

    rope_type: str
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True

    def __post_init__(self):
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ModelError(
                f"unsupported rope scaling type {self.rope_type!r}; supported: "
                f"{', '.join(SUPPORTED_ROPE_TYPES)}"
            )
        if not self.factor > 0:
            raise ModelError(f"rope scaling factor must be > 0, got {self.factor}")

    @classmethod
    def from_hf(cls, d: Mapping[str, Any] | None, max_position_embeddings: int) -> RopeScaling | None:
        """From an HF ``rope_scaling`` (or v5 ``rope_parameters``) dict; ``None`` for the default."""
        if not d:
            return None
        rope_type = d.get("rope_type", d.get("type", "default"))
        if rope_type == "default":
            return None
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ModelError(
                f"unsupported rope scaling type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
            )
        kw: dict[str, Any] = {"rope_type": rope_type}
        for name in ("factor", "low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow",
                     "attention_factor", "mscale", "mscale_all_dim"):
            if d.get(name) is not None:
                kw[name] = float(d[name])
        if d.get("truncate") is not None:
            kw["truncate"] = bool(d["truncate"])
        if rope_type in ("llama3", "yarn"):
            kw["original_max_position_embeddings"] = int(
                d.get("original_max_position_embeddings") or max_position_embeddings
            )
        return cls(**kw)

    def to_hf(self) -> dict[str, Any]:
        out: dict[str, Any] = {"rope_type": self.rope_type, "factor": self.factor}
        if self.rope_type == "llama3":
            out.update(low_freq_factor=self.low_freq_factor, high_freq_factor=self.high_freq_factor,
                       original_max_position_embeddings=self.original_max_position_embeddings)
        if self.rope_type == "yarn":
            out.update(beta_fast=self.beta_fast, beta_slow=self.beta_slow, truncate=self.truncate,
                       original_max_position_embeddings=self.original_max_position_embeddings)
            for name in ("attention_factor", "mscale", "mscale_all_dim"):
                if getattr(self, name) is not None:
                    out[name] = getattr(self, name)
        return out


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """A Llama-family decoder.

    Attributes:
      architecture: ``llama`` | ``qwen2`` | ``mistral`` (SmolLM2 is ``llama``).
      head_dim: per-head width (``hidden_size // num_heads`` unless the checkpoint says otherwise).
      qkv_bias / o_bias / mlp_bias: biases on q,k,v / o / the MLP (Qwen2: q,k,v only).
      sliding_window, sliding_layers: keys further than ``sliding_window`` slots back are masked in
        the layers listed in ``sliding_layers`` (Mistral: all; Qwen2 with ``use_sliding_window``:
        layers from ``max_window_layers`` on).
      rope_freq_factors: per-frequency divisors of the inverse frequencies (GGUF's
        ``rope_freqs.weight``, which is how llama.cpp stores Llama 3.1 scaling).
      eos_token_ids: every token that ends generation.
    """

    architecture: str = "llama"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rope_freq_factors: tuple[float, ...] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    sliding_layers: tuple[int, ...] = ()
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    name: str = ""

    def __post_init__(self):
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ModelError(_unsupported(self.architecture))
        if self.head_dim is None:
            if self.num_heads <= 0 or self.hidden_size % self.num_heads:
                raise ModelError(
                    f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}; "
                    "give head_dim explicitly"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        for f in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                  "num_kv_heads", "head_dim"):
            if int(getattr(self, f)) <= 0:
                raise ModelError(f"{f} must be a positive integer, got {getattr(self, f)!r}")
        if self.num_heads % self.num_kv_heads:
            raise ModelError(
                f"num_heads {self.num_heads} must be a multiple of num_kv_heads {self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ModelError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.rope_freq_factors is not None and len(self.rope_freq_factors) != self.head_dim // 2:
            raise ModelError(
                f"rope_freq_factors has {len(self.rope_freq_factors)} entries, expected head_dim/2 = "
                f"{self.head_dim // 2}"
            )
        if self.sliding_window is None and self.sliding_layers:
            raise ModelError("sliding_layers given without sliding_window")
        bad = [i for i in self.sliding_layers if not 0 <= i < self.num_layers]
        if bad:
            raise ModelError(f"sliding_layers {bad} out of range for {self.num_layers} layers")
        object.__setattr__(self, "eos_token_ids", tuple(int(t) for t in self.eos_token_ids))
        object.__setattr__(self, "sliding_layers", tuple(sorted(set(self.sliding_layers))))
        if self.rope_freq_factors is not None:
            object.__setattr__(self, "rope_freq_factors", tuple(float(x) for x in self.rope_freq_factors))

    # ------------------------------------------------------------------ derived
    @property
    def num_groups(self) -> int:
        """Query heads per KV head."""
        return self.num_heads // self.num_kv_heads

    def window(self, layer: int) -> int | None:
        """The sliding window of ``layer`` (``None``: full causal attention)."""
        return self.sliding_window if layer in self.sliding_layers else None

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    @property
    def num_params(self) -> int:
        d, f, v, hd = self.hidden_size, self.intermediate_size, self.vocab_size, self.head_dim
        attn = d * hd * (self.num_heads * 2 + self.num_kv_heads * 2)
        if self.qkv_bias:
            attn += hd * (self.num_heads + 2 * self.num_kv_heads)
        if self.o_bias:
            attn += d
        mlp = 3 * d * f + ((2 * f + d) if self.mlp_bias else 0)
        per_layer = attn + mlp + 2 * d
        return v * d * (1 if self.tie_word_embeddings else 2) + self.num_layers * per_layer + d

    def to_dict(self) -> dict[str, Any]:
        """Every field, JSON-serialisable (``from_dict`` inverts it exactly)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelConfig:
        d = dict(d)
        if d.get("rope_scaling") is not None:
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        for f in ("eos_token_ids", "sliding_layers"):
            d[f] = tuple(d.get(f) or ())
        if d.get("rope_freq_factors") is not None:
            d["rope_freq_factors"] = tuple(d["rope_freq_factors"])
        return cls(**d)

    # ------------------------------------------------------------------ HF config.json
    @classmethod
    def from_hf(cls, d: Mapping[str, Any], *, name: str = "") -> ModelConfig:
        """From a Hugging Face ``config.json`` dict (Llama, Qwen2, Mistral; transformers 4 or 5 keys).

        Raises:
          ModelError: unsupported architecture (the message lists the supported ones), a non-SiLU
            activation, or a missing required field.
        """
        arch = _hf_architecture(d)
        act = d.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ModelError(f"unsupported activation {act!r} (the Llama family uses 'silu')")
        try:
            num_heads = int(d["num_attention_heads"])
            max_pos = int(d.get("max_position_embeddings", 2048))
            rope_params = d.get("rope_parameters") or {}
            if isinstance(rope_params, Mapping) and any(
                isinstance(v, Mapping) for v in rope_params.values()
            ):
                raise ModelError("per-layer-type rope_parameters are not supported")
            rope_scaling_d = d.get("rope_scaling") or rope_params or None
            rope_theta = float(d.get("rope_theta") or rope_params.get("rope_theta") or 10000.0)
            if d.get("partial_rotary_factor", 1.0) not in (None, 1, 1.0):
                raise ModelError("partial rotary embeddings are not supported")
            eos = d.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, list | tuple) else (() if eos is None else (eos,))
            sliding_window, sliding_layers = _hf_sliding(arch, d)
            n_layers = int(d["num_hidden_layers"])
            return cls(
                architecture=arch,
                vocab_size=int(d["vocab_size"]),
                hidden_size=int(d["hidden_size"]),
                intermediate_size=int(d["intermediate_size"]),
                num_layers=n_layers,
                num_heads=num_heads,
                num_kv_heads=int(d.get("num_key_value_heads") or num_heads),
                head_dim=int(d["head_dim"]) if d.get("head_dim") else None,
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-6 if arch == "qwen2" else 1e-5)),
                rope_theta=rope_theta,
                rope_scaling=RopeScaling.from_hf(rope_scaling_d, max_pos),
                max_position_embeddings=max_pos,
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                qkv_bias=True if arch == "qwen2" else bool(d.get("attention_bias", False)),
                o_bias=False if arch == "qwen2" else bool(d.get("attention_bias", False)),
                mlp_bias=bool(d.get("mlp_bias", False)) if arch == "llama" else False,
                sliding_window=sliding_window,
                sliding_layers=tuple(i for i in sliding_layers if i < n_layers),
                initializer_range=float(d.get("initializer_range", 0.02)),
                bos_token_id=d.get("bos_token_id"),
                eos_token_ids=eos_ids,
                pad_token_id=d.get("pad_token_id"),
                name=name or str(d.get("_name_or_path", "")),
            )
        except KeyError as e:
            raise ModelError(f"config.json lacks the required field {e.args[0]!r}") from None

    def to_hf(self) -> dict[str, Any]:
        """A Hugging Face ``config.json`` dict (transformers builds the same model from it)."""
        d: dict[str, Any] = {
            "architectures": [SUPPORTED_ARCHITECTURES[self.architecture]],
            "model_type": self.architecture,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling.to_hf() if self.rope_scaling else None,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "initializer_range": self.initializer_range,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": (list(self.eos_token_ids) if len(self.eos_token_ids) != 1
                             else self.eos_token_ids[0]) if self.eos_token_ids else None,
            "pad_token_id": self.pad_token_id,
        }
        if self.rope_freq_factors is not None:
            raise ModelError("rope_freq_factors (from GGUF rope_freqs) have no config.json form")
        if self.architecture == "llama":
            if self.qkv_bias != self.o_bias:
                raise ModelError("a Llama config.json cannot express bias on q/k/v without o")
            d["attention_bias"] = self.qkv_bias
            d["mlp_bias"] = self.mlp_bias
        if self.architecture == "mistral":
            d["sliding_window"] = self.sliding_window
        if self.architecture == "qwen2":
            d["use_sliding_window"] = self.sliding_window is not None
            d["sliding_window"] = self.sliding_window
            if self.sliding_window is not None:
                d["layer_types"] = [
                    "sliding_attention" if i in self.sliding_layers else "full_attention"
                    for i in range(self.num_layers)
                ]
                d["max_window_layers"] = min(self.sliding_layers, default=self.num_layers)
        return d

    # ------------------------------------------------------------------ GGUF metadata
    @classmethod
    def from_gguf(
        cls,
        metadata: Mapping[str, Any],
        tensor_names: Sequence[str] = (),
        *,
        rope_freqs: np.ndarray | None = None,
        name: str = "",
    ) -> ModelConfig:
        """From GGUF key/value metadata (already decoded to Python values) and the tensor names.

        Biases and tied embeddings are read from which tensors exist (``blk.0.attn_q.bias``,
        ``output.weight``). ``rope_freqs`` is llama.cpp's ``rope_freqs.weight`` tensor, if any.
        """
        arch = metadata.get("general.architecture")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ModelError(_unsupported(arch, where="GGUF general.architecture"))
        p = f"{arch}."

        def get(key, default=None, required=False):
            if p + key in metadata:
                return metadata[p + key]
            if required:
                raise ModelError(f"GGUF metadata lacks {p + key!r}")
            return default

        names = set(tensor_names)
        n_heads = int(get("attention.head_count", required=True))
        d_model = int(get("embedding_length", required=True))
        vocab = get("vocab_size")
        if vocab is None:
            toks = metadata.get("tokenizer.ggml.tokens")
            if toks is None:
                raise ModelError("GGUF metadata has neither vocab_size nor tokenizer.ggml.tokens")
            vocab = len(toks)
        head_dim = get("attention.key_length") or get("rope.dimension_count")
        if head_dim is not None and get("rope.dimension_count") not in (None, head_dim):
            raise ModelError("partial rotary embeddings (rope.dimension_count < head_dim) are not supported")
        max_pos = int(get("context_length", 2048))
        scaling = None
        stype = get("rope.scaling.type")
        if stype in ("linear", "yarn"):
            scaling = RopeScaling.from_hf(
                {
                    "rope_type": stype,
                    "factor": get("rope.scaling.factor", 1.0),
                    "original_max_position_embeddings": get("rope.scaling.original_context_length"),
                    "beta_fast": get("rope.scaling.yarn_beta_fast"),
                    "beta_slow": get("rope.scaling.yarn_beta_slow"),
                },
                max_pos,
            )
        elif stype not in (None, "none"):
            raise ModelError(f"unsupported GGUF rope.scaling.type {stype!r}")
        eos = [metadata.get("tokenizer.ggml.eos_token_id"), metadata.get("tokenizer.ggml.eot_token_id")]
        eos_ids = tuple(dict.fromkeys(int(e) for e in eos if e is not None))
        window = get("attention.sliding_window")
        n_layers = int(get("block_count", required=True))
        return cls(
            architecture=arch,
            vocab_size=int(vocab),
            hidden_size=d_model,
            intermediate_size=int(get("feed_forward_length", required=True)),
            num_layers=n_layers,
            num_heads=n_heads,
            num_kv_heads=int(get("attention.head_count_kv", n_heads)),
            head_dim=int(head_dim) if head_dim else None,
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(get("rope.freq_base", 10000.0)),
            rope_scaling=scaling,
            rope_freq_factors=None if rope_freqs is None else tuple(np.asarray(rope_freqs, np.float64).ravel()),
            max_position_embeddings=max_pos,
            tie_word_embeddings=bool(names) and "output.weight" not in names,
            qkv_bias="blk.0.attn_q.bias" in names,
            o_bias="blk.0.attn_output.bias" in names,
            mlp_bias="blk.0.ffn_up.bias" in names,
            sliding_window=int(window) if window else None,
            sliding_layers=tuple(range(n_layers)) if window else (),
            bos_token_id=metadata.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=eos_ids,
            pad_token_id=metadata.get("tokenizer.ggml.padding_token_id"),
            name=name or str(metadata.get("general.name", "")),
        )

    # ------------------------------------------------------------------ presets
    @classmethod
    def preset(cls, name: str, **overrides) -> ModelConfig:
        """A named config (see ``PRESETS``), with field overrides."""
        if name not in PRESETS:
            raise ModelError(f"unknown model preset {name!r}; available: {', '.join(sorted(PRESETS))}")
        return dataclasses.replace(PRESETS[name], **overrides)


def _unsupported(arch, where="model_type") -> str:
    return (
        f"unsupported architecture {arch!r} ({where}); supported: "
        + ", ".join(f"{k} ({v})" for k, v in SUPPORTED_ARCHITECTURES.items())
    )


def _hf_architecture(d: Mapping[str, Any]) -> str:
    mt = d.get("model_type")
    if mt in SUPPORTED_ARCHITECTURES:
        return mt
    by_class = {v: k for k, v in SUPPORTED_ARCHITECTURES.items()}
    for a in d.get("architectures") or ():
        if a in by_class:
            return by_class[a]
    found = mt if mt is not None else (d.get("architectures") or None)
    raise ModelError(_unsupported(found))


def _hf_sliding(arch: str, d: Mapping[str, Any]) -> tuple[int | None, tuple[int, ...]]:
    n = int(d.get("num_hidden_layers", 0))
    if arch == "mistral":
        w = d.get("sliding_window", 4096)  # MistralConfig's default when the key is absent
        return (int(w), tuple(range(n))) if w else (None, ())
    if arch == "qwen2":
        w = d.get("sliding_window")
        if not d.get("use_sliding_window") or not w:
            return None, ()
        types = d.get("layer_types")
        if types:
            return int(w), tuple(i for i, t in enumerate(types) if t == "sliding_attention")
        start = int(d.get("max_window_layers", 28))
        return int(w), tuple(range(start, n))
    return None, ()


# ---------------------------------------------------------------------- rotary frequencies
def rope_inv_freq(cfg: ModelConfig) -> tuple[np.ndarray, float]:
    """Static inverse frequencies ``[head_dim // 2]`` (float64) and the cos/sin scale.

    ``dynamic`` scaling is resolved in the forward (it depends on the sequence length); here it
    returns the unscaled frequencies.
    """
    dim = cfg.head_dim
    base = cfg.rope_theta
    inv_freq = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    attention_factor = 1.0
    rs = cfg.rope_scaling
    if rs is None or rs.rope_type == "dynamic":
        pass
    elif rs.rope_type == "linear":
        inv_freq = inv_freq / rs.factor
    elif rs.rope_type == "llama3":
        old = rs.original_max_position_embeddings
        low_wl, high_wl = old / rs.low_freq_factor, old / rs.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wl, inv_freq / rs.factor, inv_freq)
        smooth = (old / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
        medium = (wavelen >= high_wl) & (wavelen <= low_wl)
        inv_freq = np.where(medium, smoothed, scaled)
    elif rs.rope_type == "yarn":
        factor = rs.factor

        def get_mscale(scale, m=1.0):
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        if rs.attention_factor is not None:
            attention_factor = rs.attention_factor
        elif rs.mscale and rs.mscale_all_dim:
            attention_factor = get_mscale(factor, rs.mscale) / get_mscale(factor, rs.mscale_all_dim)
        else:
            attention_factor = get_mscale(factor)

        def corr_dim(rot):
            return dim * math.log(rs.original_max_position_embeddings / (rot * 2 * math.pi)) / (2 * math.log(base))

        low, high = corr_dim(rs.beta_fast), corr_dim(rs.beta_slow)
        if rs.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
        extrap = 1 - ramp
        pos_freqs = base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
        inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrap) + (1.0 / pos_freqs) * extrap
    if cfg.rope_freq_factors is not None:
        inv_freq = inv_freq / np.asarray(cfg.rope_freq_factors, np.float64)
    return inv_freq, float(attention_factor)


# ---------------------------------------------------------------------- presets
def _tiny(arch: str, **kw) -> ModelConfig:
    base = dict(
        architecture=arch, vocab_size=97, hidden_size=32, intermediate_size=48, num_layers=3,
        num_heads=4, num_kv_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0,
        max_position_embeddings=128, bos_token_id=1, eos_token_ids=(2,), pad_token_id=0,
        initializer_range=0.2,
    )
    base.update(kw)
    return ModelConfig(**base)


PRESETS: dict[str, ModelConfig] = {
    "smollm2-135m": ModelConfig(
        architecture="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
        num_layers=30, num_heads=9, num_kv_heads=3, rms_norm_eps=1e-5, rope_theta=100000.0,
        max_position_embeddings=8192, tie_word_embeddings=True, initializer_range=0.041666666666666664,
        bos_token_id=1, eos_token_ids=(2,), pad_token_id=2, name="SmolLM2-135M",
    ),
    # Tiny random configs, one per family, for tests (float32 parity with a numpy reference).
    "tiny-llama": _tiny("llama", name="tiny-llama"),
    "tiny-llama3": _tiny(
        "llama", name="tiny-llama3", rope_theta=500000.0,
        rope_scaling=RopeScaling(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                 high_freq_factor=4.0, original_max_position_embeddings=16),
    ),
    "tiny-qwen2": _tiny("qwen2", name="tiny-qwen2", qkv_bias=True, rms_norm_eps=1e-6,
                        rope_theta=1_000_000.0, num_kv_heads=2),
    "tiny-mistral": _tiny("mistral", name="tiny-mistral", num_kv_heads=1, head_dim=16,
                          sliding_window=5, sliding_layers=(0, 1, 2)),
    "tiny-smollm2": _tiny("llama", name="tiny-smollm2", num_heads=6, num_kv_heads=2, hidden_size=48,
                          rope_theta=100000.0, tie_word_embeddings=True),
}
