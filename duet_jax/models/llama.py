"""A Flax NNX decoder for the Llama family (Llama 2/3, Qwen2/2.5, Mistral, SmolLM2).

Hugging Face conventions throughout, so checkpoints load without reshuffling: RMSNorm (float32
statistics), rotary embeddings in the ``rotate_half`` layout, grouped-query attention, SwiGLU MLP,
tied or untied embeddings, optional q/k/v (Qwen2) and o / MLP biases, optional sliding window.

The forward comes in pieces, so callers can build what they need without rewriting it::

    h = model.embed(tokens)                                    # [B, T, D]
    h, _ = model.run_layers(h, attention_mask=m, start=0, end=model.num_layers - L)
    # ... frozen trunk: h is the input of layer N-L, reusable across fine-tunes ...
    h, _ = model.run_layers(h, attention_mask=m, start=model.num_layers - L)
    logits = model.head(h, positions=answer_idx)               # [B, P, V], float32

``model(tokens)`` is the whole thing; ``model.forward(tokens, cache=...)`` also returns the KV cache.

Stacked layers: the decoder layers are stored as a few :class:`LayerStack` s, each holding ``count``
consecutive layers of the same structure (the same adapters, the same attention window) with every
parameter stacked along a leading ``[count]`` axis, and run with ``lax.scan``: the layer is traced
and compiled once per stack, so compile time does not grow with depth. A plain model is one stack;
``add_lora`` on the last L layers splits it into a frozen stack and an adapted one.

Shapes: B batch, T new tokens, S cache slots, D model width, N query heads, K KV heads,
G = N // K query heads per KV head, H head width, V vocabulary.

Dtypes: parameters are stored in ``param_dtype``; matmuls run in ``dtype`` (float32 or bfloat16);
norm statistics, rotary angles, attention softmax and logits are float32.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from duet_jax.errors import ModelError
from duet_jax.models.config import ModelConfig, rope_inv_freq

__all__ = [
    "Linear",
    "RMSNorm",
    "Embedding",
    "Attention",
    "MLP",
    "DecoderLayer",
    "LayerStack",
    "LlamaModel",
    "stack_modules",
    "slice_module",
    "remat_policy",
    "KVCache",
    "rope_cos_sin",
    "apply_rope",
    "causal_mask",
    "default_positions",
    "as_dtype",
    "ATTENTION_TARGETS",
    "MLP_TARGETS",
]

Array = jax.Array
ATTENTION_TARGETS = ("q", "k", "v", "o")
MLP_TARGETS = ("gate", "up", "down")
_MASKED = float(np.finfo(np.float32).min)


def as_dtype(dtype) -> np.dtype:
    """``"float32"`` / ``"bfloat16"`` / a jnp dtype -> a numpy dtype; anything else -> ModelError."""
    if isinstance(dtype, str):
        names = {"float32": jnp.float32, "fp32": jnp.float32, "f32": jnp.float32,
                 "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16, "float16": jnp.float16}
        if dtype not in names:
            raise ModelError(f"unsupported dtype {dtype!r}; use float32 or bfloat16")
        dtype = names[dtype]
    dt = np.dtype(dtype)
    if dt not in (np.dtype(jnp.float32), np.dtype(jnp.bfloat16), np.dtype(jnp.float16)):
        raise ModelError(f"unsupported dtype {dt}; use float32 or bfloat16")
    return dt


def _fold(key: Array | None, i: int) -> Array | None:
    return None if key is None else jax.random.fold_in(key, i)


# ---------------------------------------------------------------------------------------- blocks
class Linear(nnx.Module):
    """``y = x @ kernel (+ bias) (+ LoRA(x))``; ``kernel`` is ``[in, out]`` (HF stores ``[out, in]``).

    ``lora`` is ``None`` until :func:`duet_jax.models.lora.add_lora` sets it.
    """

    def __init__(self, in_features: int, out_features: int, *, use_bias: bool = False,
                 dtype=jnp.float32, param_dtype=jnp.float32, init_std: float = 0.02,
                 key: jax.Array):
        self.in_features = in_features
        self.out_features = out_features
        self.dtype = as_dtype(dtype)
        self.kernel = nnx.Param(
            (jax.random.normal(key, (in_features, out_features), jnp.float32) * init_std
             ).astype(param_dtype))
        self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype)) if use_bias else nnx.data(None)
        self.lora = nnx.data(None)

    def __call__(self, x_bti: Array, *, dropout_key: Array | None = None) -> Array:
        x = x_bti.astype(self.dtype)
        y = jnp.einsum("...i,io->...o", x, self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        if self.lora is not None:
            y = y + self.lora(x, dropout_key=dropout_key).astype(self.dtype)
        return y


class RMSNorm(nnx.Module):
    """``weight * x / sqrt(mean(x^2) + eps)``, statistics in float32 (as Hugging Face)."""

    def __init__(self, dim: int, *, eps: float, dtype=jnp.float32, param_dtype=jnp.float32):
        self.eps = float(eps)
        self.dtype = as_dtype(dtype)
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype))

    def __call__(self, x: Array) -> Array:
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(self.dtype) * xf.astype(self.dtype)


class Embedding(nnx.Module):
    """Token embedding ``[V, D]``; ``attend`` is the tied output projection (float32 logits)."""

    def __init__(self, vocab: int, dim: int, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 init_std: float = 0.02, key: jax.Array):
        self.dtype = as_dtype(dtype)
        self.embedding = nnx.Param(
            (jax.random.normal(key, (vocab, dim), jnp.float32) * init_std).astype(param_dtype))

    def __call__(self, tokens_bt: Array) -> Array:
        return jnp.take(self.embedding[...], tokens_bt, axis=0).astype(self.dtype)

    def attend(self, h_btd: Array) -> Array:
        return jnp.einsum("...d,vd->...v", h_btd.astype(self.dtype),
                          self.embedding[...].astype(self.dtype),
                          preferred_element_type=jnp.float32)


# ---------------------------------------------------------------------------------------- rope
def rope_cos_sin(config: ModelConfig, positions_bt: Array) -> tuple[Array, Array]:
    """cos and sin ``[B, T, H]`` (float32) for integer positions, HF layout (frequencies repeated
    twice along H), including the rope-scaling variant of ``config``."""
    inv_np, scale = rope_inv_freq(config)
    inv = jnp.asarray(inv_np, jnp.float32)
    rs = config.rope_scaling
    if rs is not None and rs.rope_type == "dynamic":
        dim, max_pos = config.head_dim, config.max_position_embeddings
        seq = jnp.maximum(jnp.max(positions_bt) + 1, max_pos).astype(jnp.float32)
        base = config.rope_theta * ((rs.factor * seq / max_pos) - (rs.factor - 1)) ** (dim / (dim - 2))
        dyn = 1.0 / (base ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
        if config.rope_freq_factors is not None:
            dyn = dyn / jnp.asarray(config.rope_freq_factors, jnp.float32)
        inv = jnp.where(seq > max_pos, dyn, inv)
    freqs = positions_bt.astype(jnp.float32)[..., None] * inv  # [B, T, H/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb) * scale, jnp.sin(emb) * scale


def apply_rope(x_btnh: Array, cos_bth: Array, sin_bth: Array) -> Array:
    """``x * cos + rotate_half(x) * sin`` with ``rotate_half(x) = [-x2, x1]`` (HF convention)."""
    xf = x_btnh.astype(jnp.float32)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    rot = jnp.concatenate([-x2, x1], axis=-1)
    out = xf * cos_bth[:, :, None, :] + rot * sin_bth[:, :, None, :]
    return out.astype(x_btnh.dtype)


def default_positions(attention_mask_bt: Array, offset_b: Array | None = None) -> Array:
    """Positions from a validity mask: the k-th valid token of a row has position ``offset + k``
    (left padding is skipped; padded slots repeat the previous position, clipped at 0)."""
    pos = jnp.cumsum(attention_mask_bt.astype(jnp.int32), axis=-1) - 1
    if offset_b is not None:
        pos = pos + offset_b[:, None]
    return jnp.maximum(pos, 0)


def causal_mask(q_slots_t: Array, kv_valid_bs: Array, window: int | None = None) -> Array:
    """``[B, T, S]`` bool: query slot ``i`` may see key slot ``j`` iff ``j <= i``, ``j`` holds a valid
    token and, with a sliding window, ``i - j < window``."""
    kv_slots = jnp.arange(kv_valid_bs.shape[-1])
    allowed = kv_slots[None, :] <= q_slots_t[:, None]
    if window is not None:
        allowed = allowed & (kv_slots[None, :] > q_slots_t[:, None] - window)
    return allowed[None] & kv_valid_bs[:, None, :].astype(bool)


# ---------------------------------------------------------------------------------------- cache
class KVCache(NamedTuple):
    """Keys and values of every layer, stacked: ``[L, B, S, K, H]`` each (``k[i]`` is layer ``i``),
    with the validity of every slot and the next slot to write. All rows write at the same slot
    (prompts are left-padded)."""

    k: Array
    v: Array
    valid: Array  # [B, S] bool
    index: Array  # [] int32

    @classmethod
    def create(cls, config: ModelConfig, batch: int, length: int, dtype=jnp.float32) -> KVCache:
        shape = (config.num_layers, batch, length, config.num_kv_heads, config.head_dim)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                   valid=jnp.zeros((batch, length), bool), index=jnp.zeros((), jnp.int32))

    @property
    def length(self) -> int:
        return self.valid.shape[1]

    def valid_after(self, attention_mask_bt: Array) -> Array:
        """Slot validity once ``T`` new tokens with this mask are written at ``index``."""
        return jax.lax.dynamic_update_slice(self.valid, attention_mask_bt.astype(bool), (0, self.index))

    def advance(self, attention_mask_bt: Array) -> KVCache:
        """Record ``T`` new tokens (after their keys and values were written)."""
        return self._replace(valid=self.valid_after(attention_mask_bt),
                             index=self.index + attention_mask_bt.shape[1])


# ---------------------------------------------------------------------------------------- layers
class Attention(nnx.Module):
    def __init__(self, config: ModelConfig, *, dtype, param_dtype, key: jax.Array):
        c = config
        d, hd = c.hidden_size, c.head_dim
        kw = dict(dtype=dtype, param_dtype=param_dtype, init_std=c.initializer_range)
        kq, kk, kv, ko = jax.random.split(key, 4)
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, hd
        self.dtype = as_dtype(dtype)
        self.q_proj = Linear(d, c.num_heads * hd, use_bias=c.qkv_bias, key=kq, **kw)
        self.k_proj = Linear(d, c.num_kv_heads * hd, use_bias=c.qkv_bias, key=kk, **kw)
        self.v_proj = Linear(d, c.num_kv_heads * hd, use_bias=c.qkv_bias, key=kv, **kw)
        self.o_proj = Linear(c.num_heads * hd, d, use_bias=c.o_bias, key=ko, **kw)

    def __call__(self, x_btd: Array, cos: Array, sin: Array, mask_bts: Array, *,
                 kv: tuple[Array, Array] | None = None, index: Array | None = None,
                 dropout_key: Array | None = None) -> tuple[Array, tuple[Array, Array] | None]:
        B, T, _ = x_btd.shape
        N, K, H = self.num_heads, self.num_kv_heads, self.head_dim
        q = self.q_proj(x_btd, dropout_key=_fold(dropout_key, 0)).reshape(B, T, N, H)
        k = self.k_proj(x_btd, dropout_key=_fold(dropout_key, 1)).reshape(B, T, K, H)
        v = self.v_proj(x_btd, dropout_key=_fold(dropout_key, 2)).reshape(B, T, K, H)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        new_kv = None
        if kv is not None:
            k = jax.lax.dynamic_update_slice(kv[0], k.astype(kv[0].dtype), (0, index, 0, 0))
            v = jax.lax.dynamic_update_slice(kv[1], v.astype(kv[1].dtype), (0, index, 0, 0))
            new_kv = (k, v)
        q = q.reshape(B, T, K, N // K, H)
        scores = jnp.einsum("btkgh,bskh->bkgts", q, k.astype(self.dtype),
                            preferred_element_type=jnp.float32) * (H ** -0.5)
        scores = jnp.where(mask_bts[:, None, None], scores, _MASKED)
        probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        out = jnp.einsum("bkgts,bskh->btkgh", probs, v.astype(self.dtype)).reshape(B, T, N * H)
        return self.o_proj(out, dropout_key=_fold(dropout_key, 3)), new_kv


class MLP(nnx.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, config: ModelConfig, *, dtype, param_dtype, key: jax.Array):
        c = config
        kw = dict(dtype=dtype, param_dtype=param_dtype, init_std=c.initializer_range,
                  use_bias=c.mlp_bias)
        kg, ku, kd = jax.random.split(key, 3)
        self.gate_proj = Linear(c.hidden_size, c.intermediate_size, key=kg, **kw)
        self.up_proj = Linear(c.hidden_size, c.intermediate_size, key=ku, **kw)
        self.down_proj = Linear(c.intermediate_size, c.hidden_size, key=kd, **kw)

    def __call__(self, x: Array, *, dropout_key: Array | None = None) -> Array:
        g = self.gate_proj(x, dropout_key=_fold(dropout_key, 4))
        u = self.up_proj(x, dropout_key=_fold(dropout_key, 5))
        return self.down_proj(jax.nn.silu(g) * u, dropout_key=_fold(dropout_key, 6))


class DecoderLayer(nnx.Module):
    def __init__(self, config: ModelConfig, *, dtype, param_dtype, key: jax.Array):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        ka, km = jax.random.split(key)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, **kw)
        self.self_attn = Attention(config, key=ka, **kw)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, **kw)
        self.mlp = MLP(config, key=km, **kw)

    def __call__(self, h: Array, cos: Array, sin: Array, mask_bts: Array, *,
                 kv: tuple[Array, Array] | None = None, index: Array | None = None,
                 dropout_key: Array | None = None) -> tuple[Array, tuple[Array, Array] | None]:
        a, kv = self.self_attn(self.input_layernorm(h), cos, sin, mask_bts, kv=kv, index=index,
                               dropout_key=dropout_key)
        h = h + a
        h = h + self.mlp(self.post_attention_layernorm(h), dropout_key=dropout_key)
        return h, kv

    def linears(self) -> dict[str, Linear]:
        """The seven projections by short name (q, k, v, o, gate, up, down)."""
        a, m = self.self_attn, self.mlp
        return {"q": a.q_proj, "k": a.k_proj, "v": a.v_proj, "o": a.o_proj,
                "gate": m.gate_proj, "up": m.up_proj, "down": m.down_proj}


# ---------------------------------------------------------------------------------------- stacks
def stack_modules(modules) -> nnx.Module:
    """One module whose parameters are those of ``modules`` (same structure) stacked on a new leading
    axis."""
    parts = [nnx.split(m) for m in modules]
    gd = parts[0][0]
    state = jax.tree.map(lambda *xs: jnp.stack(xs), *[st for _, st in parts])
    return nnx.merge(gd, state)


def slice_module(module: nnx.Module, lo: int, hi: int) -> nnx.Module:
    """A copy of a stacked module holding entries ``lo .. hi-1`` of its leading axis."""
    gd, state = nnx.split(module)
    return nnx.merge(gd, jax.tree.map(lambda x: x[lo:hi], state))


def _concat_modules(modules) -> nnx.Module:
    parts = [nnx.split(m) for m in modules]
    state = jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *[st for _, st in parts])
    return nnx.merge(parts[0][0], state)


def remat_policy(remat) -> object | None:
    """``False`` / ``None`` -> no remat; ``True`` -> save nothing (recompute each layer from its
    input); a string -> that ``jax.checkpoint_policies`` entry (e.g.
    ``"dots_with_no_batch_dims_saveable"``: keep the matmul outputs, recompute the rest)."""
    if remat is None or remat is False:
        return None
    if remat is True:
        return jax.checkpoint_policies.nothing_saveable
    if isinstance(remat, str):
        pol = getattr(jax.checkpoint_policies, remat, None)
        if pol is None or remat.startswith("_"):
            raise ModelError(f"unknown remat policy {remat!r}; use a jax.checkpoint_policies name "
                             "such as nothing_saveable or dots_with_no_batch_dims_saveable")
        return pol
    if callable(remat):
        return remat
    raise ModelError(f"remat must be a bool or a jax.checkpoint_policies name, got {remat!r}")


class LayerStack(nnx.Module):
    """Layers ``first .. first+count-1``, all of the same structure and attention ``window``, stored
    as one :class:`DecoderLayer` whose parameters carry a leading ``[count]`` axis."""

    def __init__(self, layer: DecoderLayer, *, first: int, count: int, window: int | None):
        self.first = int(first)
        self.count = int(count)
        self.window = window
        self.layer = layer

    @property
    def stop(self) -> int:
        return self.first + self.count

    def structure(self):
        """What must match for two stacks to be joined: the layer's graph and the window."""
        return nnx.graphdef(self.layer), self.window

    def run(self, h: Array, cos: Array, sin: Array, mask_bts: Array, *, lo: int, hi: int,
            kv: tuple[Array, Array] | None = None, index: Array | None = None,
            dropout_key: Array | None = None, remat=False) -> tuple[Array, tuple | None]:
        """Layers ``first+lo .. first+hi-1`` in ``lax.scan`` (one traced layer). ``kv`` is the
        whole model's stacked cache ``([L, B, S, K, H], ...)``, carried and updated in place at each
        layer's index. ``remat`` (see :func:`remat_policy`) checkpoints the scanned layer, so under
        ``grad`` only each layer's input is stored and the backward loop recomputes one layer per
        iteration."""
        gd, state = nnx.split(self.layer)
        if (lo, hi) != (0, self.count):
            state = jax.tree.map(lambda x: x[lo:hi], state)
        layer_ids = jnp.arange(self.first + lo, self.first + hi, dtype=jnp.int32)

        def body(carry, xs):
            x, cache_kv = carry
            st, i = xs
            layer = nnx.merge(gd, st)
            key = None if dropout_key is None else jax.random.fold_in(dropout_key, i)
            if cache_kv is None:
                x, _ = layer(x, cos, sin, mask_bts, dropout_key=key)
                return (x, None), None
            kl = (jax.lax.dynamic_index_in_dim(cache_kv[0], i, 0, keepdims=False),
                  jax.lax.dynamic_index_in_dim(cache_kv[1], i, 0, keepdims=False))
            x, (nk, nv) = layer(x, cos, sin, mask_bts, kv=kl, index=index, dropout_key=key)
            cache_kv = (jax.lax.dynamic_update_index_in_dim(cache_kv[0], nk, i, 0),
                        jax.lax.dynamic_update_index_in_dim(cache_kv[1], nv, i, 0))
            return (x, cache_kv), None

        policy = remat_policy(remat)
        if policy is not None:
            body = jax.checkpoint(body, policy=policy, prevent_cse=False)
        (h, kv), _ = jax.lax.scan(body, (h, kv), (state, layer_ids))
        return h, kv


def _window_runs(config: ModelConfig) -> list[tuple[int, int, int | None]]:
    runs: list[list] = []
    for i in range(config.num_layers):
        w = config.window(i)
        if runs and runs[-1][2] == w:
            runs[-1][1] += 1
        else:
            runs.append([i, 1, w])
    return [tuple(r) for r in runs]


# ---------------------------------------------------------------------------------------- model
class LlamaModel(nnx.Module):
    """The decoder with its LM head.

    Args:
      config: the architecture.
      dtype: compute dtype (float32 or bfloat16).
      param_dtype: storage dtype of the parameters.
      rngs: initialisation keys (use ``nnx.eval_shape`` to build an abstract model for loading).

    The layers live in ``stacks`` (an ``nnx.List`` of :class:`LayerStack`); ``locate(i)`` finds
    layer ``i`` and ``layer_linears(i)`` its projections.
    """

    def __init__(self, config: ModelConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.config = config
        self.dtype = as_dtype(dtype)
        self.param_dtype = as_dtype(param_dtype)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        # One key from rngs, split per block: much cheaper than one rngs.params() per weight.
        k_emb, k_head, k_layers = jax.random.split(rngs.params(), 3)
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size,
                                      init_std=config.initializer_range, key=k_emb, **kw)
        stacks = []
        for first, count, window in _window_runs(config):
            layers = [DecoderLayer(config, key=jax.random.fold_in(k_layers, i), **kw)
                      for i in range(first, first + count)]
            stacks.append(LayerStack(stack_modules(layers), first=first, count=count, window=window))
        self.stacks = nnx.List(stacks)
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, **kw)
        if config.tie_word_embeddings:
            self.lm_head = nnx.data(None)
        else:
            self.lm_head = Linear(config.hidden_size, config.vocab_size,
                                  init_std=config.initializer_range, key=k_head, **kw)

    @property
    def num_layers(self) -> int:
        return self.config.num_layers

    # ---- stacks
    def locate(self, layer: int) -> tuple[int, int]:
        """``(stack index, offset in the stack)`` of layer ``layer``."""
        for s, st in enumerate(self.stacks):
            if st.first <= layer < st.stop:
                return s, layer - st.first
        raise ModelError(f"layer {layer} outside the model's {self.num_layers} layers")

    def layer_linears(self, layer: int) -> tuple[dict[str, Linear], int]:
        """The seven projections (stacked) of the stack holding ``layer``, and its offset there."""
        s, j = self.locate(layer)
        return self.stacks[s].layer.linears(), j

    def split_stacks(self, cuts) -> None:
        """Split stacks so that every layer index in ``cuts`` starts a stack (in place)."""
        cuts = sorted({int(c) for c in cuts})
        out = []
        for st in self.stacks:
            inner = [c for c in cuts if st.first < c < st.stop]
            if not inner:
                out.append(st)
                continue
            bounds = [st.first, *inner, st.stop]
            for a, b in zip(bounds[:-1], bounds[1:], strict=True):
                out.append(LayerStack(slice_module(st.layer, a - st.first, b - st.first),
                                      first=a, count=b - a, window=st.window))
        self.stacks = nnx.List(out)

    def join_stacks(self) -> None:
        """Join neighbouring stacks of the same structure (after adapters were removed; in place)."""
        out: list[LayerStack] = []
        for st in self.stacks:
            if out and out[-1].structure() == st.structure():
                prev = out.pop()
                st = LayerStack(_concat_modules([prev.layer, st.layer]), first=prev.first,
                                count=prev.count + st.count, window=st.window)
            out.append(st)
        self.stacks = nnx.List(out)

    # ---- pieces
    def embed(self, tokens_bt: Array) -> Array:
        """Token ids ``[B, T]`` -> hidden states ``[B, T, D]`` entering layer 0."""
        return self.embed_tokens(tokens_bt)

    def run_layers(self, h_btd: Array, *, attention_mask: Array | None = None,
                   positions: Array | None = None, start: int = 0, end: int | None = None,
                   cache: KVCache | None = None, dropout_key: Array | None = None, remat=False
                   ) -> tuple[Array, KVCache | None]:
        """Layers ``start .. end-1`` on hidden states entering layer ``start``.

        Args:
          h_btd: hidden states ``[B, T, D]``.
          attention_mask: ``[B, T]``, 1 for real tokens, 0 for padding (default: all real).
          positions: ``[B, T]`` rotary positions (default: from the mask, continuing the cache).
          start, end: the layer range (``end`` defaults to the last layer).
          cache: keys and values written at ``cache.index`` for the layers in the range; the
            returned cache has those layers updated but is not advanced (``forward`` advances it).
          dropout_key: enables LoRA dropout (one key per call; folded per layer and projection).
          remat: recompute each layer in the backward pass (``True``, or a
            ``jax.checkpoint_policies`` name; see :func:`remat_policy`).

        Returns:
          (hidden states leaving layer ``end - 1``, the cache or ``None``).
        """
        end = self.num_layers if end is None else end
        if not 0 <= start <= end <= self.num_layers:
            raise ModelError(f"layer range [{start}, {end}) outside [0, {self.num_layers}]")
        B, T = h_btd.shape[:2]
        mask_bt = jnp.ones((B, T), bool) if attention_mask is None else attention_mask.astype(bool)
        if cache is None:
            q_slots = jnp.arange(T)
            kv_valid = mask_bt
            offset = None
        else:
            q_slots = cache.index + jnp.arange(T)
            kv_valid = cache.valid_after(mask_bt)
            offset = jnp.sum(cache.valid, axis=-1, dtype=jnp.int32)
        if positions is None:
            positions = default_positions(mask_bt, offset)
        cos, sin = rope_cos_sin(self.config, positions)
        masks: dict[int | None, Array] = {}
        kv = None if cache is None else (cache.k, cache.v)
        for st in self.stacks:
            lo, hi = max(start, st.first), min(end, st.stop)
            if lo >= hi:
                continue
            if st.window not in masks:
                masks[st.window] = causal_mask(q_slots, kv_valid, st.window)
            h_btd, kv = st.run(h_btd, cos, sin, masks[st.window], lo=lo - st.first,
                               hi=hi - st.first, kv=kv,
                               index=None if cache is None else cache.index,
                               dropout_key=dropout_key, remat=remat)
        if cache is not None:
            cache = cache._replace(k=kv[0], v=kv[1])
        return h_btd, cache

    def final_norm(self, h_btd: Array) -> Array:
        return self.norm(h_btd)

    def project(self, h_btd: Array) -> Array:
        """The LM head alone (tied: the embedding matrix), float32 logits."""
        if self.lm_head is None:
            return self.embed_tokens.attend(h_btd)
        x = h_btd.astype(self.dtype)
        return jnp.einsum("...d,dv->...v", x, self.lm_head.kernel[...].astype(self.dtype),
                          preferred_element_type=jnp.float32)

    def head(self, h_btd: Array, *, positions: Array | None = None) -> Array:
        """Final norm + LM head -> float32 logits; with ``positions`` ``[B, P]`` (indices along T)
        only those positions are projected: ``[B, P, V]`` instead of ``[B, T, V]``."""
        if positions is not None:
            h_btd = jnp.take_along_axis(h_btd, positions[..., None].astype(jnp.int32), axis=1)
        return self.project(self.final_norm(h_btd))

    # ---- whole
    def forward(self, tokens_bt: Array, *, attention_mask: Array | None = None,
                positions: Array | None = None, cache: KVCache | None = None,
                logits_at: Array | None = None, dropout_key: Array | None = None
                ) -> tuple[Array, KVCache | None]:
        """Logits (float32) and the advanced cache (or ``None``)."""
        h = self.embed(tokens_bt)
        h, cache = self.run_layers(h, attention_mask=attention_mask, positions=positions,
                                   cache=cache, dropout_key=dropout_key)
        if cache is not None:
            mask = (jnp.ones(tokens_bt.shape, bool) if attention_mask is None else attention_mask)
            cache = cache.advance(mask)
        return self.head(h, positions=logits_at), cache

    def __call__(self, tokens_bt: Array, *, attention_mask: Array | None = None,
                 positions: Array | None = None, logits_at: Array | None = None,
                 dropout_key: Array | None = None) -> Array:
        """Logits ``[B, T, V]`` (or ``[B, P, V]`` with ``logits_at``), float32, no cache."""
        logits, _ = self.forward(tokens_bt, attention_mask=attention_mask, positions=positions,
                                 logits_at=logits_at, dropout_key=dropout_key)
        return logits

    def init_cache(self, batch: int, length: int) -> KVCache:
        return KVCache.create(self.config, batch, length, self.dtype)


def param_count(model: nnx.Module) -> int:
    """Number of parameters (LoRA included)."""
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
