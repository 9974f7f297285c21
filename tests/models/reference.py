"""An independent plain-numpy (float64) Llama-family forward, and helpers that write tiny checkpoints.

Written from the Hugging Face modeling code's equations, not from duet_jax.models: weights come in
as a dict of HF-named ``[out, in]`` arrays, attention repeats KV heads explicitly, RoPE uses
``rotate_half``, rope scaling is recomputed from the formulas here.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from duet_jax.models.config import ModelConfig

TOL = 1e-4  # max abs logit difference allowed against this reference in float32


def random_weights(cfg: ModelConfig, seed: int = 0, std: float = 0.2) -> dict[str, np.ndarray]:
    """HF-named float32 weights with non-trivial norms."""
    rng = np.random.default_rng(seed)
    d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    nq, nk = cfg.num_heads * hd, cfg.num_kv_heads * hd

    def w(*shape):
        return (rng.standard_normal(shape) * std).astype(np.float32)

    out = {"model.embed_tokens.weight": w(cfg.vocab_size, d),
           "model.norm.weight": (1 + w(d)).astype(np.float32)}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = w(cfg.vocab_size, d)
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = 1 + w(d)
        out[p + "post_attention_layernorm.weight"] = 1 + w(d)
        out[p + "self_attn.q_proj.weight"] = w(nq, d)
        out[p + "self_attn.k_proj.weight"] = w(nk, d)
        out[p + "self_attn.v_proj.weight"] = w(nk, d)
        out[p + "self_attn.o_proj.weight"] = w(d, nq)
        if cfg.qkv_bias:
            out[p + "self_attn.q_proj.bias"] = w(nq)
            out[p + "self_attn.k_proj.bias"] = w(nk)
            out[p + "self_attn.v_proj.bias"] = w(nk)
        if cfg.o_bias:
            out[p + "self_attn.o_proj.bias"] = w(d)
        out[p + "mlp.gate_proj.weight"] = w(f, d)
        out[p + "mlp.up_proj.weight"] = w(f, d)
        out[p + "mlp.down_proj.weight"] = w(d, f)
    return out


def inv_freq(cfg: ModelConfig, seq_len: int | None = None) -> tuple[np.ndarray, float]:
    """Rotary inverse frequencies and cos/sin scale, from HF's formulas."""
    dim, base = cfg.head_dim, cfg.rope_theta
    freqs = 1.0 / base ** (np.arange(0, dim, 2) / dim)
    rs = cfg.rope_scaling
    if rs is None:
        return freqs, 1.0
    if rs.rope_type == "linear":
        return freqs / rs.factor, 1.0
    if rs.rope_type == "dynamic":
        L = max(seq_len or 0, cfg.max_position_embeddings)
        if L > cfg.max_position_embeddings:
            base = base * ((rs.factor * L / cfg.max_position_embeddings) - (rs.factor - 1)) ** (dim / (dim - 2))
            freqs = 1.0 / base ** (np.arange(0, dim, 2) / dim)
        return freqs, 1.0
    if rs.rope_type == "llama3":
        old = rs.original_max_position_embeddings
        out = []
        for fq in freqs:
            wl = 2 * math.pi / fq
            if wl < old / rs.high_freq_factor:
                out.append(fq)
            elif wl > old / rs.low_freq_factor:
                out.append(fq / rs.factor)
            else:
                s = (old / wl - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor)
                out.append((1 - s) * fq / rs.factor + s * fq)
        return np.array(out), 1.0
    if rs.rope_type == "yarn":
        omax = rs.original_max_position_embeddings

        def cdim(rot):
            return dim * math.log(omax / (rot * 2 * math.pi)) / (2 * math.log(base))

        lo, hi = math.floor(cdim(rs.beta_fast)), math.ceil(cdim(rs.beta_slow))
        lo, hi = max(lo, 0), min(hi, dim - 1)
        ramp = np.clip((np.arange(dim // 2) - lo) / ((hi - lo) or 0.001), 0, 1)
        blend = (freqs / rs.factor) * ramp + freqs * (1 - ramp)
        att = rs.attention_factor or (0.1 * math.log(rs.factor) + 1.0 if rs.factor > 1 else 1.0)
        return blend, att
    raise NotImplementedError(rs.rope_type)


def _rms(x, w, eps):
    return w * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps))


def _rotate_half(x):
    h = x.shape[-1] // 2
    return np.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def reference_logits(cfg: ModelConfig, W: dict[str, np.ndarray], tokens, attention_mask=None,
                     lora: dict | None = None) -> np.ndarray:
    """Logits ``[B, T, V]`` (float64). ``attention_mask`` 1/0 ``[B, T]`` (padding anywhere; positions
    count valid tokens). ``lora``: ``{(layer, "q_proj"): (A [r, in], B [out, r], scale)}``."""
    W = {k: v.astype(np.float64) for k, v in W.items()}
    tokens = np.asarray(tokens)
    B, T = tokens.shape
    m = np.ones((B, T), bool) if attention_mask is None else np.asarray(attention_mask, bool)
    pos = np.maximum(np.cumsum(m, axis=1) - 1, 0)
    freqs, att = inv_freq(cfg, seq_len=int(pos.max()) + 1)
    ang = pos[..., None] * freqs  # [B, T, hd/2]
    cos = np.cos(np.concatenate([ang, ang], -1)) * att
    sin = np.sin(np.concatenate([ang, ang], -1)) * att
    N, K, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    x = W["model.embed_tokens.weight"][tokens]

    def lin(h, i, name, kind):
        y = h @ W[f"model.layers.{i}.{kind}.{name}.weight"].T
        b = W.get(f"model.layers.{i}.{kind}.{name}.bias")
        if b is not None:
            y = y + b
        if lora and (i, name) in lora:
            A, Bm, s = lora[(i, name)]
            y = y + s * (h @ A.T @ Bm.T)
        return y

    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        h = _rms(x, W[p + "input_layernorm.weight"], cfg.rms_norm_eps)
        q = lin(h, i, "q_proj", "self_attn").reshape(B, T, N, hd)
        k = lin(h, i, "k_proj", "self_attn").reshape(B, T, K, hd)
        v = lin(h, i, "v_proj", "self_attn").reshape(B, T, K, hd)
        q = q * cos[:, :, None] + _rotate_half(q) * sin[:, :, None]
        k = k * cos[:, :, None] + _rotate_half(k) * sin[:, :, None]
        k = np.repeat(k, N // K, axis=2)  # [B, T, N, hd]: kv head j serves q heads j*G .. j*G+G-1
        v = np.repeat(v, N // K, axis=2)
        s = np.einsum("bqnh,bknh->bnqk", q, k) / math.sqrt(hd)
        qi, ki = np.arange(T)[:, None], np.arange(T)[None, :]
        allowed = (ki <= qi)[None] & m[:, None, :]
        w = cfg.window(i)
        if w is not None:
            allowed = allowed & (ki > qi - w)[None]
        s = np.where(allowed[:, None], s, -np.inf)
        s = s - s.max(-1, keepdims=True)
        pr = np.exp(s)
        pr = pr / pr.sum(-1, keepdims=True)
        o = np.einsum("bnqk,bknh->bqnh", pr, v).reshape(B, T, N * hd)
        x = x + lin(o, i, "o_proj", "self_attn")
        h = _rms(x, W[p + "post_attention_layernorm.weight"], cfg.rms_norm_eps)
        g = lin(h, i, "gate_proj", "mlp")
        x = x + lin(g / (1 + np.exp(-g)) * lin(h, i, "up_proj", "mlp"), i, "down_proj", "mlp")
    x = _rms(x, W["model.norm.weight"], cfg.rms_norm_eps)
    head = W["model.embed_tokens.weight"] if cfg.tie_word_embeddings else W["lm_head.weight"]
    return x @ head.T


# ------------------------------------------------------------------------------ checkpoint writers
def write_hf_dir(path: Path, cfg: ModelConfig, W: dict[str, np.ndarray], shards: int = 1) -> Path:
    """config.json + model.safetensors (or ``shards`` files with an index), from HF-named weights."""
    from safetensors.numpy import save_file

    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg.to_hf()))
    if shards == 1:
        save_file(W, str(path / "model.safetensors"))
        return path
    keys = sorted(W)
    weight_map = {}
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: W[k] for k in keys[s::shards]}
        save_file(part, str(path / name))
        weight_map.update({k: name for k in part})
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf ``LlamaModel.permute`` (HF -> interleaved rows)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_GGUF_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def write_gguf(path: Path, cfg: ModelConfig, W: dict[str, np.ndarray], *,
               extra_tensors: dict | None = None) -> Path:
    """An F32 GGUF the way llama.cpp's converter writes it (Q/K rows permuted for Llama).

    ``extra_tensors``: ``{name: (array, raw_dtype or None)}`` added as is.
    """
    import gguf

    arch = cfg.architecture
    permute = arch in ("llama", "mistral")
    wr = gguf.GGUFWriter(str(path), arch)
    wr.add_name("tiny-test")
    wr.add_block_count(cfg.num_layers)
    wr.add_context_length(cfg.max_position_embeddings)
    wr.add_embedding_length(cfg.hidden_size)
    wr.add_feed_forward_length(cfg.intermediate_size)
    wr.add_head_count(cfg.num_heads)
    wr.add_head_count_kv(cfg.num_kv_heads)
    wr.add_key_length(cfg.head_dim)
    wr.add_value_length(cfg.head_dim)
    wr.add_rope_dimension_count(cfg.head_dim)
    wr.add_rope_freq_base(cfg.rope_theta)
    wr.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    wr.add_vocab_size(cfg.vocab_size)
    if cfg.sliding_window is not None:
        wr.add_sliding_window(cfg.sliding_window)
    wr.add_file_type(gguf.LlamaFileType.ALL_F32)
    if cfg.bos_token_id is not None:
        wr.add_bos_token_id(cfg.bos_token_id)
    if cfg.eos_token_ids:
        wr.add_eos_token_id(cfg.eos_token_ids[0])
    if cfg.pad_token_id is not None:
        wr.add_pad_token_id(cfg.pad_token_id)
    wr.add_tensor("token_embd.weight", W["model.embed_tokens.weight"])
    for i in range(cfg.num_layers):
        for hf, gg in _GGUF_LAYER.items():
            key = f"model.layers.{i}.{hf}"
            if key not in W:
                continue
            t = W[key]
            if permute and gg.startswith("attn_q."):
                t = llamacpp_permute(t, cfg.num_heads)
            elif permute and gg.startswith("attn_k."):
                t = llamacpp_permute(t, cfg.num_kv_heads)
            wr.add_tensor(f"blk.{i}.{gg}", np.ascontiguousarray(t))
    wr.add_tensor("output_norm.weight", W["model.norm.weight"])
    if not cfg.tie_word_embeddings:
        wr.add_tensor("output.weight", W["lm_head.weight"])
    for name, (arr, raw) in (extra_tensors or {}).items():
        if raw is None:
            wr.add_tensor(name, arr)
        else:
            wr.add_tensor(name, arr, raw_dtype=raw)
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()
    return path
