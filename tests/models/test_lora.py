"""LoRA: identity at init, scale, layer range, merge, dropout, state split, PEFT round trip."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from duet_jax.errors import ModelError
from duet_jax.models import (
    FROZEN,
    LlamaModel,
    LoRAConfig,
    LoRAParam,
    ModelConfig,
    add_lora,
    load_peft,
    merge_lora,
    remove_lora,
    save_peft,
)
from duet_jax.models.loaders import model_from_tensors
from duet_jax.models.lora import lora_layers
from tests.models.reference import TOL, random_weights, reference_logits

TOKS = np.random.default_rng(0).integers(0, 97, (2, 9))
ALL = ("q", "k", "v", "o", "gate", "up", "down")


@nnx.jit
def _logits(model, toks, key):
    return model(toks, dropout_key=key)


def logits(model, toks=TOKS, key=None):
    return np.asarray(_logits(model, jnp.asarray(toks), key))


def build(name="tiny-llama", seed=0):
    cfg = ModelConfig.preset(name)
    W = random_weights(cfg, seed)
    return model_from_tensors(cfg, list(W), W.__getitem__), W


def randomize_b(model, seed=1, std=0.3):
    """Give every B a non-zero value (a trained adapter)."""
    rng = np.random.default_rng(seed)
    for lora in lora_layers(model).values():
        lora.lora_b[...] = jnp.asarray(rng.standard_normal(lora.lora_b.shape) * std, jnp.float32)


def test_b_zero_changes_nothing():
    model, _ = build("tiny-qwen2")
    before = logits(model)
    add_lora(model, LoRAConfig(rank=4, alpha=8, targets=ALL), rngs=nnx.Rngs(1))
    loras = lora_layers(model)
    assert len(loras) == model.num_layers * 7
    assert all(float(jnp.abs(lo.lora_a[...]).max()) > 0 for lo in loras.values())
    np.testing.assert_array_equal(logits(model), before)


def test_scale_is_alpha_over_rank_and_matches_reference():
    model, W = build("tiny-mistral")
    add_lora(model, LoRAConfig(rank=2, alpha=6.0, targets=("q", "down")), rngs=nnx.Rngs(1))
    randomize_b(model)
    peft_names = {"q": "q_proj", "down": "down_proj"}
    ref_lora = {(i, peft_names[t]): (np.asarray(lo.lora_a[...]).T, np.asarray(lo.lora_b[...]).T, 3.0)
                for (i, t), lo in lora_layers(model).items()}
    assert all(lo.scale == 3.0 for lo in lora_layers(model).values())
    want = reference_logits(model.config, W, TOKS, lora=ref_lora)
    assert np.abs(logits(model) - want).max() < TOL
    assert np.abs(want - reference_logits(model.config, W, TOKS)).max() > 1e-2


def test_merge_equals_unmerged_forward():
    model, _ = build("tiny-llama")
    add_lora(model, LoRAConfig(rank=4, alpha=16, targets=ALL), rngs=nnx.Rngs(1))
    randomize_b(model)
    unmerged = logits(model)
    merge_lora(model)
    assert not lora_layers(model) and not jax.tree.leaves(nnx.state(model, LoRAParam))
    np.testing.assert_allclose(logits(model), unmerged, atol=1e-4)


def test_last_layers_and_state_split():
    model, _ = build("tiny-llama")
    N = model.num_layers
    add_lora(model, LoRAConfig(rank=3, targets=("q_proj", "v"), last_layers=1), rngs=nnx.Rngs(0))
    assert set(lora_layers(model)) == {(N - 1, "q"), (N - 1, "v")}
    lora_state = nnx.state(model, LoRAParam)
    assert len(jax.tree.leaves(lora_state)) == 4
    frozen = nnx.state(model, FROZEN)
    assert not any("lora" in str(p) for p, _ in frozen.flat_state())
    n_all = len(jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert n_all == len(jax.tree.leaves(frozen)) + 4
    # explicit layers
    m2, _ = build("tiny-llama")
    add_lora(m2, LoRAConfig(targets=("gate",), layers=(0,)), rngs=nnx.Rngs(0))
    assert set(lora_layers(m2)) == {(0, "gate")}


def test_optimizer_updates_only_lora():
    model, _ = build("tiny-llama")
    add_lora(model, LoRAConfig(rank=2, targets=("q", "v")), rngs=nnx.Rngs(0))
    frozen_before = jax.tree.map(np.asarray, nnx.state(model, FROZEN))
    opt = nnx.Optimizer(model, optax.sgd(0.1), wrt=LoRAParam)

    @nnx.jit
    def step(m, opt, toks):
        def loss_fn(m):
            return jnp.mean(m(toks) ** 2)

        grads = nnx.grad(loss_fn, argnums=nnx.DiffState(0, LoRAParam))(m)
        opt.update(m, grads)

    step(model, opt, jnp.asarray(TOKS))
    assert any(float(jnp.abs(lo.lora_b[...]).max()) > 0 for lo in lora_layers(model).values())
    jax.tree.map(np.testing.assert_array_equal, frozen_before,
                 jax.tree.map(np.asarray, nnx.state(model, FROZEN)))


def test_dropout_is_functional():
    model, _ = build("tiny-llama")
    add_lora(model, LoRAConfig(rank=4, dropout=0.5, targets=ALL), rngs=nnx.Rngs(0))
    randomize_b(model)
    no_key = logits(model)
    np.testing.assert_array_equal(logits(model), no_key)  # no key: no dropout
    k1 = logits(model, key=jax.random.key(1))
    assert np.abs(k1 - no_key).max() > 1e-3
    np.testing.assert_array_equal(logits(model, key=jax.random.key(1)), k1)
    assert np.abs(logits(model, key=jax.random.key(2)) - k1).max() > 1e-3


def test_bad_lora_configs():
    with pytest.raises(ModelError, match=r"target\(s\) \['lm_head'\] not in the model.*q, k, v"):
        LoRAConfig(targets=("q", "lm_head"))
    with pytest.raises(ModelError, match="rank"):
        LoRAConfig(rank=0)
    with pytest.raises(ModelError, match="dropout"):
        LoRAConfig(dropout=1.0)
    model, _ = build("tiny-llama")
    with pytest.raises(ModelError, match="last_layers=5"):
        add_lora(model, LoRAConfig(last_layers=5), rngs=nnx.Rngs(0))
    with pytest.raises(ModelError, match="outside"):
        add_lora(model, LoRAConfig(layers=(0, 9)), rngs=nnx.Rngs(0))
    add_lora(model, LoRAConfig(targets=("q",)), rngs=nnx.Rngs(0))
    with pytest.raises(ModelError, match="already has"):
        add_lora(model, LoRAConfig(targets=("q",)), rngs=nnx.Rngs(0))
    remove_lora(model)
    assert not lora_layers(model)


# ------------------------------------------------------------------------------------------ PEFT
def test_peft_export_format_and_round_trip(tmp_path):
    model, W = build("tiny-qwen2")
    add_lora(model, LoRAConfig(rank=4, alpha=8, targets=("q", "k", "v", "o", "up"), last_layers=1),
             rngs=nnx.Rngs(3))
    randomize_b(model)
    want = logits(model)
    d = save_peft(model, tmp_path / "adapter", base_model_name_or_path="tiny")
    cfg = json.loads((d / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    assert cfg["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"]
    assert cfg["layers_to_transform"] == [model.num_layers - 1]
    tensors = load_file(str(d / "adapter_model.safetensors"))
    i = model.num_layers - 1
    a = tensors[f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight"]
    b = tensors[f"base_model.model.model.layers.{i}.mlp.up_proj.lora_B.weight"]
    assert a.shape == (4, 32) and b.shape == (48, 4)  # PEFT layouts: A [r, in], B [out, r]
    assert len(tensors) == 10

    fresh, _ = build("tiny-qwen2")
    load_peft(fresh, d)
    np.testing.assert_array_equal(logits(fresh), want)
    assert set(lora_layers(fresh)) == set(lora_layers(model))


def test_peft_import_errors(tmp_path):
    model, _ = build("tiny-llama")
    add_lora(model, LoRAConfig(rank=2, targets=("q", "v")), rngs=nnx.Rngs(0))
    d = save_peft(model, tmp_path / "a")
    t = load_file(str(d / "adapter_model.safetensors"))
    t["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"] = np.zeros((3, 32), np.float32)
    t["base_model.model.model.layers.7.self_attn.v_proj.lora_A.weight"] = np.zeros((2, 32), np.float32)
    t["base_model.model.lm_head.lora_A.weight"] = np.zeros((2, 32), np.float32)
    save_file(t, str(d / "adapter_model.safetensors"))
    fresh, _ = build("tiny-llama")
    with pytest.raises(ModelError) as e:
        load_peft(fresh, d)
    msg = str(e.value)
    assert "layers.0.self_attn.q_proj.lora_A.weight: shape (3, 32) in the file, expected (2, 32)" in msg
    assert "layer 7" in msg and "unexpected tensor 'base_model.model.lm_head.lora_A.weight'" in msg
    assert not lora_layers(fresh)  # nothing attached on failure
    with pytest.raises(ModelError, match="adapter_config.json"):
        load_peft(fresh, tmp_path / "nowhere")
    m0, _ = build("tiny-llama")
    with pytest.raises(ModelError, match="no LoRA adapter"):
        save_peft(m0, tmp_path / "empty")


@pytest.mark.bench_peer
def test_peft_loads_our_adapter(tmp_path):
    """PEFT (the peer) loads our adapter by its key names and computes the same logits."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    import transformers

    from duet_jax.models import save_hf

    model, _ = build("tiny-llama")
    base_dir = save_hf(model, tmp_path / "base")
    add_lora(model, LoRAConfig(rank=4, alpha=8, targets=("q", "v", "gate", "down"), last_layers=1),
             rngs=nnx.Rngs(0))
    randomize_b(model)
    ours = logits(model)
    ad = save_peft(model, tmp_path / "adapter", base_model_name_or_path=str(base_dir))
    tm = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    pm = peft.PeftModel.from_pretrained(tm, ad).eval()
    with torch.no_grad():
        theirs = pm(torch.tensor(TOKS)).logits.numpy()
    assert np.abs(theirs - ours).max() < 1e-4


def test_lora_splits_and_joins_stacks():
    """LoRA on the last layer splits the single stack into a frozen and an adapted one; removing
    it joins them again, and the weights are unchanged by the round trip."""
    from duet_jax.models.loaders import hf_state_dict

    cfg = ModelConfig.preset("tiny-llama", num_layers=3)
    model = LlamaModel(cfg, rngs=nnx.Rngs(0))
    before = hf_state_dict(model)
    add_lora(model, LoRAConfig(rank=2, alpha=4, targets=("q", "v"), last_layers=1), rngs=nnx.Rngs(1))
    assert [(s.first, s.count) for s in model.stacks] == [(0, 2), (2, 1)]
    assert model.stacks[1].layer.self_attn.q_proj.lora.lora_a.shape == (1, cfg.hidden_size, 2)
    remove_lora(model)
    assert [(s.first, s.count) for s in model.stacks] == [(0, 3)]
    after = hf_state_dict(model)
    assert set(before) == set(after) and all(np.array_equal(before[k], after[k]) for k in before)
