"""Fine-tuning inside jit: learns, deterministic, one compile per size, k adapters, frozen trunk
exact, NaN stops with an error, bad mixtures refused."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from duet_jax.errors import ConfigError, TrainingError
from duet_jax.train import (
    TrainConfig,
    answer_loss,
    finetune,
    finetune_many,
    restore_checkpoint,
    save_checkpoint,
    slot_logprobs,
    trunk_hidden,
)
from duet_jax.train import trainer as ft_module

CFG = TrainConfig(epochs=4, batch_size=8, learning_rate=1e-2, warmup_ratio=0.0)


def test_frozen_trunk_cache_equals_full_forward(setup):
    s = setup
    rows = jnp.arange(16)
    full = slot_logprobs(s["g"], s["lora"], s["frozen"], s["pool"].take(rows), start=0)
    cached = slot_logprobs(s["g"], s["lora"], s["frozen"], s["cached"].take(rows), start=s["start"])
    m = s["pool"].loss_mask[:16]
    assert float(jnp.max(jnp.abs((full - cached) * m))) < 1e-5
    # length buckets (many small ones vs one) give the same states at the real positions
    fine = trunk_hidden(s["g"], s["lora"], s["frozen"], s["pool"], start=s["start"], bucket=8)
    one = trunk_hidden(s["g"], s["lora"], s["frozen"], s["pool"], start=s["start"], bucket=1024)
    real = np.asarray(s["pool"].attention_mask)[..., None] > 0
    assert np.abs(np.where(real, np.asarray(fine) - np.asarray(one), 0)).max() < 1e-5


def test_learns_and_is_deterministic(setup):
    s = setup
    idx = jnp.arange(48)
    before = answer_loss(s["g"], s["lora"], s["frozen"], s["cached"], start=s["start"])["loss"]
    r1 = finetune(s["g"], s["lora"], s["frozen"], s["cached"], idx, jax.random.key(0), CFG, start=s["start"])
    after = answer_loss(s["g"], r1.lora, s["frozen"], s["cached"], start=s["start"])["loss"]
    assert after < before - 0.3
    assert r1.losses.shape == (24,) and float(r1.losses[-1]) < float(r1.losses[0])
    r2 = finetune(s["g"], s["lora"], s["frozen"], s["cached"], idx, jax.random.key(0), CFG, start=s["start"])
    for a, b in zip(jax.tree.leaves(r1.lora), jax.tree.leaves(r2.lora), strict=False):
        assert np.array_equal(np.asarray(a), np.asarray(b))  # bit for bit
    r3 = finetune(s["g"], s["lora"], s["frozen"], s["cached"], idx, jax.random.key(1), CFG, start=s["start"])
    assert not all(np.array_equal(np.asarray(a), np.asarray(b))
                   for a, b in zip(jax.tree.leaves(r1.lora), jax.tree.leaves(r3.lora), strict=False))


def test_full_model_and_cache_train_the_same(setup):
    s = setup
    cfg = TrainConfig(steps=3, batch_size=8, learning_rate=1e-2)
    idx = jnp.arange(0, 48, 2)
    a = finetune(s["g"], s["lora"], s["frozen"], s["pool"], idx, jax.random.key(3), cfg, start=0)
    b = finetune(s["g"], s["lora"], s["frozen"], s["cached"], idx, jax.random.key(3), cfg, start=s["start"])
    assert np.allclose(np.asarray(a.losses), np.asarray(b.losses), atol=1e-5)


def test_new_mixture_same_size_does_not_recompile(setup):
    s = setup
    cfg = TrainConfig(steps=2, batch_size=8)
    finetune(s["g"], s["lora"], s["frozen"], s["cached"], jnp.arange(16), jax.random.key(0), cfg, start=s["start"])
    before = ft_module._finetune_jit._cache_size()
    rng = np.random.default_rng(0)
    for i in range(3):
        idx = rng.integers(0, 48, size=16)
        finetune(s["g"], s["lora"], s["frozen"], s["cached"], idx, jax.random.key(i), cfg, start=s["start"])
    assert ft_module._finetune_jit._cache_size() == before


def test_k_adapters_match_single_calls(setup):
    s = setup
    cfg = TrainConfig(steps=3, batch_size=8, learning_rate=5e-3)
    idx = jnp.stack([jnp.arange(16), jnp.arange(16, 32)])
    keys = jax.random.split(jax.random.key(5), 2)
    many = finetune_many(s["g"], s["lora"], s["frozen"], s["cached"], idx, keys, cfg, start=s["start"])
    assert many.losses.shape == (2, 3)
    one = finetune(s["g"], s["lora"], s["frozen"], s["cached"], idx[1], keys[1], cfg, start=s["start"])
    assert np.allclose(np.asarray(many.losses[1]), np.asarray(one.losses), atol=1e-5)
    ev = answer_loss(s["g"], many.lora, s["frozen"], s["cached"], start=s["start"])
    assert ev["loss"].shape == (2,)


def test_nan_loss_stops_with_step_and_lr(setup):
    s = setup
    poisoned = s["cached"].with_hidden(s["cached"].hidden.at[40].set(jnp.nan))
    cfg = TrainConfig(epochs=1, batch_size=8, learning_rate=1e-3, warmup_ratio=0.0, schedule="constant")
    with pytest.raises(TrainingError, match=r"step \d+ of 6 \(adapter 0, learning rate 0.001\)"):
        finetune(s["g"], s["lora"], s["frozen"], poisoned, jnp.arange(48), jax.random.key(0), cfg,
                 start=s["start"])
    # without the poisoned row the same call succeeds
    finetune(s["g"], s["lora"], s["frozen"], poisoned, jnp.arange(40), jax.random.key(0), cfg, start=s["start"])


def test_bad_mixtures(setup):
    s = setup
    for idx, msg in [(jnp.zeros((0,), jnp.int32), "empty"), (jnp.arange(4), "fewer than one batch"),
                     (jnp.array([0, 1, 2, 3, 4, 5, 6, 999]), "indices")]:
        with pytest.raises(ConfigError, match=msg):
            finetune(s["g"], s["lora"], s["frozen"], s["cached"], idx, jax.random.key(0), CFG, start=s["start"])
    with pytest.raises(ConfigError, match="frozen-trunk cache"):
        finetune(s["g"], s["lora"], s["frozen"], s["pool"], jnp.arange(8), jax.random.key(0), CFG, start=s["start"])


def test_checkpoint_round_trip(setup, tmp_path):
    s = setup
    r = finetune(s["g"], s["lora"], s["frozen"], s["cached"], jnp.arange(16), jax.random.key(0),
                 TrainConfig(steps=2, batch_size=8), start=s["start"])
    save_checkpoint(tmp_path / "ck", r.lora, r.opt_state, step=2, metadata={"ratio": [0.5, 0.5]})
    lora, opt, step, meta = restore_checkpoint(tmp_path / "ck", s["lora"], r.opt_state)
    assert step == 2 and meta["ratio"] == [0.5, 0.5]
    for a, b in zip(jax.tree.leaves(r.lora), jax.tree.leaves(lora), strict=False):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(jax.tree.leaves(r.opt_state), jax.tree.leaves(opt), strict=False):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_remat_trains_the_same(setup):
    s = setup
    idx = jnp.arange(0, 48, 3)
    kw = dict(steps=2, batch_size=8, learning_rate=1e-2)
    a = finetune(s["g"], s["lora"], s["frozen"], s["pool"], idx, jax.random.key(2), TrainConfig(**kw), start=0)
    b = finetune(s["g"], s["lora"], s["frozen"], s["pool"], idx, jax.random.key(2),
                 TrainConfig(**kw, remat=True), start=0)
    assert np.allclose(np.asarray(a.losses), np.asarray(b.losses), atol=1e-5)
    for x, y in zip(jax.tree.leaves(a.lora), jax.tree.leaves(b.lora), strict=True):
        assert np.allclose(np.asarray(x), np.asarray(y), atol=1e-5)


def test_remat_with_mixed_layers_and_dropout(tok, setup):
    """Adapters on the last layer only (two runs of equal layers, the second starting at layer 2)
    and LoRA dropout on: the scanned recomputation gives the unrolled forward's losses and adapters
    (the dropout masks are keyed by the same layer index)."""
    from flax import nnx

    from duet_jax.models import LlamaModel, LoRAConfig, ModelConfig, add_lora
    from duet_jax.train import split_model

    model = LlamaModel(ModelConfig.preset("tiny-llama", vocab_size=len(tok)), rngs=nnx.Rngs(0))
    add_lora(model, LoRAConfig(rank=4, alpha=8, targets=("q", "v"), last_layers=1, dropout=0.1),
             rngs=nnx.Rngs(1))
    g, lora, frozen = split_model(model)
    idx = jnp.arange(16)
    kw = dict(steps=2, batch_size=8, learning_rate=1e-2)
    a = finetune(g, lora, frozen, setup["pool"], idx, jax.random.key(3), TrainConfig(**kw))
    b = finetune(g, lora, frozen, setup["pool"], idx, jax.random.key(3), TrainConfig(**kw, remat=True))
    assert np.allclose(np.asarray(a.losses), np.asarray(b.losses), atol=1e-5)
    for x, y in zip(jax.tree.leaves(a.lora), jax.tree.leaves(b.lora), strict=True):
        assert np.allclose(np.asarray(x), np.asarray(y), atol=1e-5)


def test_remat_memory_does_not_grow_with_layer_activations():
    """XLA's CPU compiler hoists the recomputation of per-layer ``jax.checkpoint`` in an unrolled
    loop, so the old remat kept every layer's activations anyway. The scanned form stores only each
    layer's input: compiled temporaries grow by about ``B x T x D`` floats per layer, far less than one
    layer's attention probabilities (``B x heads x T x T``). Compile only (abstract weights)."""
    from flax import nnx

    from duet_jax.models import LlamaModel, LoRAConfig, ModelConfig, add_lora
    from duet_jax.train import Pool, split_model

    B, T, N, A = 8, 128, 16, 8

    def temp_bytes(layers):
        cfg = ModelConfig.preset("tiny-llama", num_layers=layers)

        def make():
            m = LlamaModel(cfg, rngs=nnx.Rngs(0))
            return add_lora(m, LoRAConfig(rank=4, alpha=8, targets=("q", "v")), rngs=nnx.Rngs(1))

        g, lora, frozen = split_model(nnx.eval_shape(make))
        S, i32, f32 = jax.ShapeDtypeStruct, jnp.int32, jnp.float32
        pool = Pool(S((N, T), i32), S((N, T), i32), S((N, A), i32), S((N, A), i32), S((N, A), f32),
                    S((N, A), f32))
        compiled = ft_module._finetune_jit.lower(
            g, lora, frozen, pool, S((N,), i32), jax.random.key(0),
            config=TrainConfig(steps=1, batch_size=B, remat=True), steps=1, start=0).compile()
        return compiled.memory_analysis().temp_size_in_bytes, cfg

    (small, cfg), (big, _) = temp_bytes(2), temp_bytes(6)
    per_layer = (big - small) / 4
    layer_input = B * T * cfg.hidden_size * 4
    attention_probs = B * cfg.num_heads * T * T * 4
    assert per_layer <= 2 * layer_input < attention_probs / 4, (per_layer, layer_input)


def test_training_program_does_not_grow_with_depth():
    """Stacked layers run in lax.scan: the lowered training program of a 2-layer and a 6-layer model
    has the same number of operations (one traced layer per stack), so compile time does not grow
    with depth. Lowering only (abstract weights)."""
    from flax import nnx

    from duet_jax.models import LlamaModel, LoRAConfig, ModelConfig, add_lora
    from duet_jax.train import Pool, split_model

    def ops(layers, last):
        cfg = ModelConfig.preset("tiny-llama", num_layers=layers)

        def make():
            m = LlamaModel(cfg, rngs=nnx.Rngs(0))
            return add_lora(m, LoRAConfig(rank=4, alpha=8, targets=("q", "v"), last_layers=last),
                            rngs=nnx.Rngs(1))

        g, lora, frozen = split_model(nnx.eval_shape(make))
        S, i32, f32 = jax.ShapeDtypeStruct, jnp.int32, jnp.float32
        N, T, A = 16, 32, 4
        pool = Pool(S((N, T), i32), S((N, T), i32), S((N, A), i32), S((N, A), i32), S((N, A), f32),
                    S((N, A), f32))
        text = ft_module._finetune_jit.lower(
            g, lora, frozen, pool, S((N,), i32), jax.random.key(0),
            config=TrainConfig(steps=1, batch_size=8), steps=1, start=0).as_text()
        return sum(1 for line in text.splitlines() if " = " in line)

    assert ops(2, 1) == ops(6, 3)
    assert ops(2, None) == ops(6, None)
