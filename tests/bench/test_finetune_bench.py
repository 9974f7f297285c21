"""Smoke test of ``duet-jax bench finetune`` on a tiny random model (no timing assertions)."""

import json

import pytest
from flax import nnx

from duet_jax.bench import finetune as bench
from duet_jax.data import Example
from duet_jax.models import LlamaModel, ModelConfig
from duet_jax.testing import tiny_tokenizer


def _setup():
    tok = tiny_tokenizer()
    model = LlamaModel(ModelConfig.preset("tiny-smollm2", vocab_size=len(tok)), rngs=nnx.Rngs(0))
    exs = [Example(f"e{i}", f"Question: what is {i} plus {i}?\nAnswer:", f" {2 * i}", "qa")
           for i in range(16)]
    return model, tok, exs


def test_flops_count_shrinks_with_the_head_and_the_trunk():
    cfg = ModelConfig.preset("smollm2-135m")
    full = bench.train_flops(cfg, rows=8, seq=128, head_positions=8 * 128)
    slots = bench.train_flops(cfg, rows=8, seq=128, head_positions=8 * 16)
    trunk = bench.train_flops(cfg, rows=8, seq=128, head_positions=8 * 16, start=26, first_trained=26,
                              lora_layers=4)
    fwd = bench.train_flops(cfg, rows=8, seq=128, head_positions=8 * 128, first_trained=None)
    assert trunk < slots < full and fwd < full


def test_runs_ours_only_on_a_tiny_model():
    model, tok, exs = _setup()
    r = bench.run(model=model, tokenizer=tok, example_list=exs, seq_len=32, repeats=1, last_layers=1,
                  k=2, cases=("k4_vmapped",), peer=False, matmul_n=256)
    names = [c["name"] for c in r["cases"]]
    assert names == ["k2_vmapped"]
    for c in r["cases"]:
        assert c["ours_examples_per_s"] > 0
        assert {"name", "ours_examples_per_s", "peer_examples_per_s", "ratio"} <= set(c)
    assert r["cases"][0]["ratio"] > 0  # both sides are ours there
    json.dumps(r)


@pytest.mark.bench_peer
def test_peer_agrees_on_a_tiny_model():
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    model, tok, exs = _setup()
    r = bench.run(model=model, tokenizer=tok, example_list=exs, seq_len=32, repeats=1, last_layers=1,
                  cases=("full_lora", "eval_loglik"), peer=True, matmul_n=256)
    full, ev = r["cases"]
    assert full["ratio"] > 0 and full["peer_fraction_of_matmul_peak"] > 0
    assert abs(full["ours_mean_loss"] - full["peer_mean_loss"]) < 0.5  # same data, same model
    assert ev["max_abs_loglik_diff"] < 1e-3 and ev["max_abs_nll_diff"] < 1e-3
