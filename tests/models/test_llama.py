"""The decoder against the numpy reference, per family; forward pieces; KV cache; generation."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from duet_jax.errors import ModelError
from duet_jax.models import KVCache, LlamaModel, ModelConfig, RopeScaling, generate
from duet_jax.models.generation import _generate, bucket
from duet_jax.models.loaders import model_from_tensors
from tests.models.reference import TOL, random_weights, reference_logits

FAMILIES = ["tiny-llama", "tiny-llama3", "tiny-qwen2", "tiny-mistral", "tiny-smollm2"]


def build(cfg: ModelConfig, seed: int = 0, **kw):
    W = random_weights(cfg, seed)
    return model_from_tensors(cfg, list(W), W.__getitem__, **kw), W


@functools.cache
def built(name: str):
    """One model per preset for the whole module (tests do not modify it)."""
    return build(ModelConfig.preset(name))


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    model, W = built(request.param)
    return model.config, model, W


def tokens(cfg, B, T, seed=0):
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, (B, T))


# Eager calls compile every primitive for every new shape (slow on CPU): tests call jitted forwards.
@nnx.jit
def _logits(model, toks, mask):
    return model(toks, attention_mask=mask)


def logits(model, toks, mask=None):
    toks = jnp.asarray(toks)
    mask = jnp.ones(toks.shape, bool) if mask is None else jnp.asarray(mask)
    return np.asarray(_logits(model, toks, mask))


@nnx.jit(static_argnames=("split",))
def _pieces(model, toks, mask, idx, *, split):
    h = model.embed(toks)
    h, _ = model.run_layers(h, attention_mask=mask, end=split)  # frozen trunk: input of layer N-1
    h, _ = model.run_layers(h, attention_mask=mask, start=split)
    return (model(toks, attention_mask=mask), model.head(h), model.head(h, positions=idx),
            model(toks, attention_mask=mask, logits_at=idx))


@nnx.jit
def _step(model, toks, cache):
    return model.forward(toks, cache=cache)


def test_logits_match_numpy_reference(family):
    cfg, model, W = family
    toks = tokens(cfg, 2, 12)
    got = logits(model, toks)
    want = reference_logits(cfg, W, toks)
    assert got.dtype == np.float32 and got.shape == (2, 12, cfg.vocab_size)
    assert np.abs(got - want).max() < TOL
    assert np.abs(want).max() > 1.0  # the comparison is not vacuous


def test_padding_matches_unpadded_rows(family):
    """Left- and right-padded rows (one batch) give the logits of the unpadded rows."""
    cfg, model, W = family
    lens = [12, 7, 3]
    T = max(lens)
    rows = [tokens(cfg, 1, n, seed=10 + b)[0] for b, n in enumerate(lens)]
    toks = np.zeros((2 * len(rows), T), np.int64)
    mask = np.zeros(toks.shape, bool)
    for b, r in enumerate(rows):
        for side, row in (("left", b), ("right", b + len(rows))):
            sl = slice(T - len(r), T) if side == "left" else slice(0, len(r))
            toks[row, sl], mask[row, sl] = r, True
    got = logits(model, toks, mask)
    for b, r in enumerate(rows):
        want = reference_logits(cfg, W, r[None])[0]
        for row in (b, b + len(rows)):
            assert np.abs(got[row][mask[row]] - want).max() < TOL


def test_pieces_compose_to_the_whole(family):
    cfg, model, _ = family
    toks = jnp.asarray(tokens(cfg, 2, 10))
    mask = jnp.ones((2, 10), bool).at[1, :3].set(False)
    idx = jnp.array([[9, 2], [4, 9]])
    whole, pieces, sel, sel2 = _pieces(model, toks, mask, idx, split=cfg.num_layers - 1)
    np.testing.assert_allclose(pieces, whole, atol=1e-5)
    assert sel.shape == (2, 2, cfg.vocab_size)
    np.testing.assert_allclose(sel, jnp.take_along_axis(whole, idx[..., None], axis=1), atol=1e-5)
    np.testing.assert_allclose(sel2, sel, atol=1e-5)


def test_bad_layer_range():
    model, _ = build(ModelConfig.preset("tiny-llama"))
    with pytest.raises(ModelError, match="layer range"):
        model.run_layers(jnp.zeros((1, 2, 32)), start=2, end=7)


def test_kv_cache_forward_equals_recompute(family):
    cfg, model, _ = family
    toks = jnp.asarray(tokens(cfg, 2, 12))
    full = logits(model, toks)
    cache = model.init_cache(2, 16)
    out, cache = _step(model, toks[:, :6], cache)
    steps = [out]
    for t in range(6, 12):
        out, cache = _step(model, toks[:, t:t + 1], cache)
        steps.append(out)
    assert int(cache.index) == 12 and bool(cache.valid[:, :12].all()) and not cache.valid[:, 12:].any()
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=1e-5)


def naive_greedy(model, prompt, n, stops=()):
    """Greedy decoding by recomputing the whole sequence every step (no cache; right padding to one
    fixed length, which cannot affect earlier positions under the causal mask)."""
    seq = list(prompt)
    out = []
    L = bucket(len(prompt) + n)  # one shape (one compile) for every prompt here
    for _ in range(n):
        buf = np.zeros((1, L), np.int64)
        buf[0, :len(seq)] = seq
        mask = np.arange(L)[None] < len(seq)
        nxt = int(np.argmax(logits(model, buf, mask)[0, len(seq) - 1]))
        if nxt in stops:
            break
        out.append(nxt)
        seq.append(nxt)
    return out


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2", "tiny-mistral", "tiny-smollm2"])
def test_generation_with_cache_equals_recompute(name):
    cfg = ModelConfig.preset(name)
    model, _ = built(name)
    prompts = [tokens(cfg, 1, n, seed=n)[0].tolist() for n in (5, 9, 1)]
    got = generate(model, prompts, max_new_tokens=7, stop_tokens=())
    for p, g in zip(prompts, got.tokens, strict=True):
        assert g == naive_greedy(model, p, 7)
    assert got.finish_reasons == ["length"] * 3


def test_stop_tokens_end_rows():
    cfg = ModelConfig.preset("tiny-llama")
    model, _ = build(cfg)
    prompts = [[5, 6, 7], [9, 10]]
    free = generate(model, prompts, max_new_tokens=6, stop_tokens=())
    stop = free.tokens[0][2]  # the third token of row 0 becomes a stop token
    out = generate(model, prompts, max_new_tokens=6, stop_tokens=[stop])
    assert out.tokens[0] == free.tokens[0][:free.tokens[0].index(stop)]
    assert out.finish_reasons[0] == "stop"
    cut = free.tokens[1].index(stop) if stop in free.tokens[1] else None
    assert out.tokens[1] == (free.tokens[1] if cut is None else free.tokens[1][:cut])
    assert out.tokens[1] == naive_greedy(model, prompts[1], 6, stops=(stop,))


def test_sampling_needs_a_key_and_is_reproducible():
    cfg = ModelConfig.preset("tiny-llama")
    model, _ = build(cfg)
    prompts = [[5, 6, 7]]
    with pytest.raises(ModelError, match="key"):
        generate(model, prompts, temperature=1.0)
    a = generate(model, prompts, max_new_tokens=16, temperature=1.5, key=jax.random.key(1),
                 stop_tokens=())
    b = generate(model, prompts, max_new_tokens=16, temperature=1.5, key=jax.random.key(1),
                 stop_tokens=())
    c = generate(model, prompts, max_new_tokens=16, temperature=1.5, key=jax.random.key(2),
                 stop_tokens=())
    assert a.tokens == b.tokens and a.tokens != c.tokens
    greedy = generate(model, prompts, max_new_tokens=16, stop_tokens=())
    assert a.tokens != greedy.tokens


def test_generation_compiles_once_per_bucket():
    cfg = ModelConfig.preset("tiny-qwen2")
    model, _ = build(cfg)
    before = _generate._cache_size()
    generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=5)
    generate(model, [[7, 8, 9, 10, 11], [3]], max_new_tokens=3)
    generate(model, [[7, 8, 9, 10, 11]], max_new_tokens=2, temperature=0.5, key=jax.random.key(0))
    # same buckets (B=2, T=8, S=16): one compile for greedy decoding, one for sampling
    assert _generate._cache_size() - before == 2
    assert bucket(3) == 8 and bucket(9) == 16 and bucket(16) == 16


def test_generation_rejects_bad_input():
    model, _ = build(ModelConfig.preset("tiny-llama"))
    with pytest.raises(ModelError, match="vocabulary"):
        generate(model, [[1, 500]])
    with pytest.raises(ModelError, match="at least one token"):
        generate(model, [[1], []])
    with pytest.raises(ModelError, match="list of token-id lists"):
        generate(model, [1, 2, 3])


def test_bfloat16_compute_is_close_to_float32():
    cfg = ModelConfig.preset("tiny-llama")
    W = random_weights(cfg, 0, std=0.05)
    f32 = model_from_tensors(cfg, list(W), W.__getitem__)
    bf16 = model_from_tensors(cfg, list(W), W.__getitem__, dtype="bfloat16")
    mixed = model_from_tensors(cfg, list(W), W.__getitem__, dtype="bfloat16", param_dtype="float32")
    assert bf16.stacks[0].layer.self_attn.q_proj.kernel[...].dtype == jnp.bfloat16
    assert mixed.stacks[0].layer.self_attn.q_proj.kernel[...].dtype == jnp.float32
    toks = jnp.asarray(tokens(cfg, 2, 8))
    ref = logits(f32, toks)
    for m in (bf16, mixed):
        got = logits(m, toks)
        assert got.dtype == np.float32
        assert np.abs(got - ref).max() < 0.1 * np.abs(ref).max()
    out = generate(bf16, [[1, 2, 3]], max_new_tokens=4)
    assert len(out.tokens[0]) <= 4
    with pytest.raises(ModelError, match="dtype"):
        model_from_tensors(cfg, list(W), W.__getitem__, dtype="int8")


@pytest.mark.parametrize("scaling", [
    RopeScaling(rope_type="linear", factor=4.0),
    RopeScaling(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                original_max_position_embeddings=16),
    RopeScaling(rope_type="yarn", factor=4.0, original_max_position_embeddings=32),
    RopeScaling(rope_type="dynamic", factor=2.0),
])
def test_rope_scaling_variants_match_reference(scaling):
    # max_position_embeddings 8 < 12 tokens, so dynamic NTK scaling is active
    cfg = ModelConfig.preset("tiny-llama", rope_scaling=scaling, max_position_embeddings=8)
    model, W = build(cfg)
    toks = tokens(cfg, 2, 12)
    got = logits(model, toks)
    assert np.abs(got - reference_logits(cfg, W, toks)).max() < TOL


def test_model_init_and_state_split():
    cfg = ModelConfig.preset("tiny-smollm2")
    model = nnx.eval_shape(lambda: LlamaModel(cfg, rngs=nnx.Rngs(0)))
    assert model.lm_head is None  # tied
    n = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert n == cfg.num_params
    cache = KVCache.create(cfg, 2, 8)
    assert len(cache.k) == cfg.num_layers and cache.k[0].shape == (2, 8, cfg.num_kv_heads, cfg.head_dim)


def test_layers_are_stacked_and_split_by_window():
    """Qwen2-style sliding window on the upper layers only: two stacks (one per window), still
    equal to the reference; a plain model is one stack of all layers."""
    cfg = ModelConfig.preset("tiny-qwen2", num_layers=4, sliding_window=3, sliding_layers=(2, 3))
    model, W = build(cfg)
    assert [(s.first, s.count, s.window) for s in model.stacks] == [(0, 2, None), (2, 2, 3)]
    toks = tokens(cfg, 2, 8)
    assert np.abs(logits(model, toks) - reference_logits(cfg, W, toks)).max() < TOL
    plain, _ = built("tiny-llama")
    assert len(plain.stacks) == 1 and plain.stacks[0].count == plain.num_layers
    k = plain.stacks[0].layer.self_attn.q_proj.kernel
    c = plain.config
    assert k.shape == (c.num_layers, c.hidden_size, c.num_heads * c.head_dim)
