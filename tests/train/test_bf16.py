"""bfloat16 compute with float32 master LoRA weights: logits within a stated tolerance of float32,
gradients and trained adapters in float32."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from duet_jax.models import LlamaModel, LoRAConfig, ModelConfig, add_lora
from duet_jax.models.loaders import model_from_tensors
from duet_jax.train import TrainConfig, finetune, split_model
from duet_jax.train.trainer import _masked_mean_nll
from tests.models.reference import random_weights

#: bf16 vs float32 logits on the tiny presets (random weights, std 0.02): measured max 2.4% and
#: mean 0.3% of the largest |logit|; the test allows 5% and 1%, and 90% equal argmax.
MAX_REL, MEAN_REL, ARGMAX_AGREE = 0.05, 0.01, 0.9


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
def test_bf16_logits_within_tolerance_of_float32(name):
    cfg = ModelConfig.preset(name)
    W = random_weights(cfg, 0)
    f32 = model_from_tensors(cfg, list(W), W.__getitem__)
    bf16 = model_from_tensors(cfg, list(W), W.__getitem__, dtype="bfloat16")
    toks = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 16)))
    fwd = nnx.jit(lambda m, t: m(t))
    a, b = np.asarray(fwd(f32, toks)), np.asarray(fwd(bf16, toks))
    assert b.dtype == np.float32
    scale = np.abs(a).max()
    assert np.abs(a - b).max() <= MAX_REL * scale
    assert np.abs(a - b).mean() <= MEAN_REL * scale
    assert (a.argmax(-1) == b.argmax(-1)).mean() >= ARGMAX_AGREE
    assert np.abs(a - b).max() > 0  # really computed in bf16


def _pair(vocab):
    cfg = ModelConfig.preset("tiny-llama", vocab_size=vocab)
    out = []
    for dt in (jnp.float32, jnp.bfloat16):
        m = LlamaModel(cfg, dtype=dt, param_dtype=dt, rngs=nnx.Rngs(0))
        add_lora(m, LoRAConfig(rank=4, alpha=8, targets=("q", "v")), rngs=nnx.Rngs(1))
        out.append(split_model(m))
    return out


def test_bf16_training_keeps_float32_master_weights_and_gradients(tok, setup):
    (g32, l32, f32), (g16, l16, f16) = _pair(len(tok))
    assert {x.dtype for x in jax.tree.leaves(l16)} == {jnp.dtype(jnp.float32)}
    assert jnp.dtype(jnp.bfloat16) in {x.dtype for x in jax.tree.leaves(f16)}
    batch = setup["pool"].take(jnp.arange(8))
    vg = jax.jit(jax.value_and_grad(_masked_mean_nll, argnums=1), static_argnums=(0, 4))
    loss32, grad32 = vg(g32, l32, f32, batch, 0, None)
    loss16, grad16 = vg(g16, l16, f16, batch, 0, None)
    assert loss16.dtype == jnp.float32
    assert {x.dtype for x in jax.tree.leaves(grad16)} == {jnp.dtype(jnp.float32)}
    np.testing.assert_allclose(float(loss16), float(loss32), rtol=2e-2)
    a = np.concatenate([np.ravel(x) for x in jax.tree.leaves(grad32)])
    b = np.concatenate([np.ravel(x) for x in jax.tree.leaves(grad16)])
    assert a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) > 0.98
    cfg = TrainConfig(steps=2, batch_size=8, learning_rate=1e-2, warmup_ratio=0.0)
    r16 = finetune(g16, l16, f16, setup["pool"], jnp.arange(16), jax.random.key(0), cfg)
    assert {x.dtype for x in jax.tree.leaves(r16.lora)} == {jnp.dtype(jnp.float32)}
    floats = {x.dtype for x in jax.tree.leaves(r16.opt_state)
              if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)}
    assert floats == {jnp.dtype(jnp.float32)}
    assert np.isfinite(np.asarray(r16.losses)).all()
