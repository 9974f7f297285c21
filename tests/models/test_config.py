"""ModelConfig from HF config.json and GGUF metadata, presets, rope scaling; peers where installed."""

from __future__ import annotations

import numpy as np
import pytest

from duet_jax.errors import ModelError
from duet_jax.models import PRESETS, ModelConfig, RopeScaling
from duet_jax.models.config import rope_inv_freq
from tests.models.reference import inv_freq as ref_inv_freq

SMOLLM2 = {  # HuggingFaceTB/SmolLM2-135M-Instruct/config.json (abridged)
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "bos_token_id": 1,
    "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 576, "intermediate_size": 1536,
    "max_position_embeddings": 8192, "mlp_bias": False, "model_type": "llama",
    "num_attention_heads": 9, "num_hidden_layers": 30, "num_key_value_heads": 3, "pad_token_id": 2,
    "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 100000, "tie_word_embeddings": True,
    "vocab_size": 49152, "initializer_range": 0.041666666666666664,
}
QWEN25 = {  # Qwen/Qwen2.5-0.5B-Instruct/config.json (abridged)
    "architectures": ["Qwen2ForCausalLM"], "bos_token_id": 151643, "eos_token_id": 151645,
    "hidden_act": "silu", "hidden_size": 896, "intermediate_size": 4864,
    "max_position_embeddings": 32768, "max_window_layers": 21, "model_type": "qwen2",
    "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768,
    "tie_word_embeddings": True, "use_sliding_window": False, "vocab_size": 151936,
}
LLAMA31 = {  # meta-llama/Llama-3.1-8B-Instruct/config.json (abridged)
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu", "hidden_size": 4096,
    "intermediate_size": 14336, "max_position_embeddings": 131072, "model_type": "llama",
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "tie_word_embeddings": False,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "vocab_size": 128256,
}
MISTRAL7B = {  # mistralai/Mistral-7B-v0.1/config.json (abridged)
    "architectures": ["MistralForCausalLM"], "hidden_act": "silu", "hidden_size": 4096,
    "intermediate_size": 14336, "max_position_embeddings": 32768, "model_type": "mistral",
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "sliding_window": 4096,
    "tie_word_embeddings": False, "vocab_size": 32000, "bos_token_id": 1, "eos_token_id": 2,
}


def test_from_hf_real_configs():
    s = ModelConfig.from_hf(SMOLLM2)
    assert s == PRESETS["smollm2-135m"].replace(name="", rms_norm_eps=1e-5)
    assert s.num_params == 134_515_008
    q = ModelConfig.from_hf(QWEN25)
    assert (q.architecture, q.qkv_bias, q.o_bias, q.head_dim, q.sliding_window) == ("qwen2", True, False, 64, None)
    assert q.tie_word_embeddings and q.num_groups == 7
    ll = ModelConfig.from_hf(LLAMA31)
    assert ll.rope_scaling.rope_type == "llama3" and ll.eos_token_ids == (128001, 128008, 128009)
    m = ModelConfig.from_hf(MISTRAL7B)
    assert m.sliding_window == 4096 and m.window(0) == 4096 and m.window(31) == 4096
    qs = ModelConfig.from_hf({**QWEN25, "use_sliding_window": True, "sliding_window": 4096})
    assert qs.sliding_layers == tuple(range(21, 24)) and qs.window(20) is None


def test_transformers5_rope_parameters_form():
    d = {k: v for k, v in LLAMA31.items() if k not in ("rope_scaling", "rope_theta")}
    d["rope_parameters"] = {**LLAMA31["rope_scaling"], "rope_theta": 500000.0}
    assert ModelConfig.from_hf(d) == ModelConfig.from_hf(LLAMA31)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_round_trips(name):
    c = PRESETS[name]
    assert ModelConfig.from_dict(c.to_dict()) == c
    assert ModelConfig.from_hf(c.to_hf(), name=c.name) == c


def test_unsupported_and_invalid():
    with pytest.raises(ModelError, match=r"unsupported architecture 'phi3'.*llama \(LlamaForCausalLM\)"):
        ModelConfig.from_hf({**SMOLLM2, "model_type": "phi3", "architectures": ["Phi3ForCausalLM"]})
    with pytest.raises(ModelError, match="gelu"):
        ModelConfig.from_hf({**SMOLLM2, "hidden_act": "gelu"})
    with pytest.raises(ModelError, match="num_hidden_layers"):
        ModelConfig.from_hf({k: v for k, v in SMOLLM2.items() if k != "num_hidden_layers"})
    with pytest.raises(ModelError, match="multiple of num_kv_heads"):
        ModelConfig.preset("tiny-llama", num_kv_heads=3)
    with pytest.raises(ModelError, match="longrope"):
        ModelConfig.from_hf({**SMOLLM2, "rope_scaling": {"rope_type": "longrope", "factor": 2.0}})
    with pytest.raises(ModelError, match="unknown model preset"):
        ModelConfig.preset("nope")


def test_from_gguf_metadata():
    meta = {
        "general.architecture": "llama", "general.name": "x", "llama.block_count": 30,
        "llama.context_length": 8192, "llama.embedding_length": 576,
        "llama.feed_forward_length": 1536, "llama.attention.head_count": 9,
        "llama.attention.head_count_kv": 3, "llama.rope.freq_base": 100000.0,
        "llama.attention.layer_norm_rms_epsilon": 1e-5, "llama.rope.dimension_count": 64,
        "tokenizer.ggml.tokens": range(49152), "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.padding_token_id": 2,
    }
    names = ["token_embd.weight", "blk.0.attn_q.weight"]
    c = ModelConfig.from_gguf(meta, names)
    assert c == PRESETS["smollm2-135m"].replace(name="x", initializer_range=0.02)
    assert not ModelConfig.from_gguf(meta, names + ["output.weight"]).tie_word_embeddings
    with pytest.raises(ModelError, match="embedding_length"):
        ModelConfig.from_gguf({k: v for k, v in meta.items() if k != "llama.embedding_length"}, names)
    with pytest.raises(ModelError, match="unsupported architecture 'gemma2'"):
        ModelConfig.from_gguf({**meta, "general.architecture": "gemma2"}, names)
    f = ModelConfig.from_gguf(meta, names, rope_freqs=np.full(32, 2.0))
    np.testing.assert_allclose(rope_inv_freq(f)[0], rope_inv_freq(c)[0] / 2)


SCALINGS = [
    RopeScaling(rope_type="linear", factor=4.0),
    RopeScaling(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                original_max_position_embeddings=8192),
    RopeScaling(rope_type="yarn", factor=4.0, original_max_position_embeddings=32768),
]


@pytest.mark.parametrize("scaling", SCALINGS, ids=lambda s: s.rope_type)
def test_rope_scaling_frequencies(scaling):
    cfg = ModelConfig.from_hf(LLAMA31).replace(rope_scaling=scaling)
    got, att = rope_inv_freq(cfg)
    want, watt = ref_inv_freq(cfg)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert att == pytest.approx(watt)


@pytest.mark.bench_peer
@pytest.mark.parametrize("scaling", SCALINGS + [None], ids=lambda s: s.rope_type if s else "default")
def test_rope_frequencies_match_transformers(scaling):
    pytest.importorskip("torch")
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = ModelConfig.from_hf(LLAMA31).replace(rope_scaling=scaling)
    hf = transformers.LlamaConfig(**cfg.to_hf())
    if scaling is None:
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        want, watt = LlamaRotaryEmbedding.compute_default_rope_parameters(hf)
    else:
        want, watt = ROPE_INIT_FUNCTIONS[scaling.rope_type](hf, "cpu")
    got, att = rope_inv_freq(cfg)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5)
    assert att == pytest.approx(watt)


@pytest.mark.bench_peer
@pytest.mark.parametrize("family", ["tiny-llama", "tiny-llama3", "tiny-qwen2", "tiny-mistral",
                                    "tiny-smollm2"])
def test_logits_match_transformers(tmp_path, family):
    """The peer: transformers' PyTorch model built from the same config.json and weights."""
    torch = pytest.importorskip("torch")
    import transformers

    from duet_jax.models import load_model
    from tests.models.reference import random_weights, write_hf_dir

    cfg = ModelConfig.preset(family)
    d = write_hf_dir(tmp_path / family, cfg, random_weights(cfg, seed=5))
    toks = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 12))
    tm = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    with torch.no_grad():
        want = tm(torch.tensor(toks)).logits.numpy()
    got = np.asarray(load_model(d)(toks))
    assert np.abs(got - want).max() < 1e-4
