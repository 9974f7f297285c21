"""``duet-jax bench influence``'s SmolLM2 LoRA case on a tiny random Llama (no timing assertions),
the length-bucketed featurize, and the bounded memory of the projectors at P > 10M."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from duet_jax.bench import influence as bench
from duet_jax.data import Example
from duet_jax.models import LlamaModel, ModelConfig
from duet_jax.testing import tiny_tokenizer


def _setup(n=8):
    tok = tiny_tokenizer()
    model = LlamaModel(ModelConfig.preset("tiny-smollm2", vocab_size=len(tok)), rngs=nnx.Rngs(0))
    exs = [Example(f"e{i}", f"Q: {i}+{7 * i}?" + " ok" * (i % 5) + "\nA:",
                   f" {8 * i}", "qa") for i in range(n)]
    return model, tok, exs


def test_bucketed_featurize_equals_full_length():
    from duet_jax.influence import InfluenceScorer
    from duet_jax.influence.domains import example_loss_fn, featurize_pool, length_chunks
    from duet_jax.train import build_pool

    model, tok, exs = _setup()
    case = bench._LlamaCase(model, tok, exs, seq_len=64)
    pool, _ = build_pool(case.tok, length=64)
    chunks = length_chunks(pool, 4, bucket=16)
    assert sorted(np.concatenate([r for r, _ in chunks]).tolist()) == list(range(len(pool)))
    assert all(sub.length < 64 and len(sub) == 4 for _, sub in chunks)
    scorer = InfluenceScorer(example_loss_fn(case.g, 0), proj_dim=64, projector="sjlt", batch_size=4)
    bucketed, ok = featurize_pool(scorer, case.lora, pool, case.frozen, chunks=chunks, return_flags=True)
    full = np.asarray(scorer.featurize(case.lora, jax.tree.map(np.asarray, pool), context=case.frozen))
    assert ok.all() and np.abs(full).max() > 0
    np.testing.assert_allclose(bucketed, full, rtol=1e-4, atol=1e-5 * np.abs(full).max())


def test_llama_case_ours_only():
    model, tok, exs = _setup()
    r = bench.run_llama(model=model, tokenizer=tok, example_list=exs, seq_len=64, proj_dim=64,
                        batch_size=4, repeats=1, peer=False, large_p=None, matmul_n=128,
                        projection=False)
    assert r["ours_examples_per_s"] > 0 and r["ratio"] is None
    assert r["ours"]["feature_shape"] == [8, 64] and r["ours"]["valid"] == 8
    assert r["num_params"] == 3 * 8 * (48 + 48 + 48 + 16 + 48 + 16 + 48 + 48)  # q,k,v,o: r(in + out)
    assert "ours:" in bench._llama_summary(r)
    json.dumps(r)


def test_projectors_never_form_p_by_k_at_12m():
    """XLA's compiled temporaries for [2, 12M] -> 8192: a P x k float32 matrix would be 366 GiB."""
    from duet_jax.influence import make_projector

    p, k = 12_000_000, 8192
    x = jax.ShapeDtypeStruct((2, p), jnp.float32)
    for name in ("sjlt", "chunked"):
        pr = make_projector(name, 0, p, k)
        temp = jax.jit(lambda x, pr=pr: pr.apply((), x)).lower(x).compile().memory_analysis().temp_size_in_bytes
        assert temp < 2**30, (name, temp)  # < 1 GiB, against 366 GiB for the matrix


@pytest.mark.bench_peer
def test_peer_gradients_equal_ours_on_a_tiny_model():
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    model, tok, exs = _setup()
    r = bench.run_llama(model=model, tokenizer=tok, example_list=exs, seq_len=64, proj_dim=64,
                        batch_size=4, repeats=1, project_every=4, peer=True, large_p=None, matmul_n=128,
                        projection=False)
    c = r["check"]
    assert len(c["grad_cosine"]) == 2 and min(c["grad_cosine"]) > 0.9999, c
    assert max(c["grad_rel_diff"]) < 1e-3, c
    assert c["max_abs_loss_diff"] < 1e-4, c
    assert r["ratio"] > 0 and r["peer_grad_only_examples_per_s"] > 0
    assert "gradient cosine" in bench._llama_summary(r)
    json.dumps(r)
