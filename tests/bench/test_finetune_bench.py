"""``duet-jax bench finetune`` on a tiny random model (no timing assertions): every case names its
strongest peer with every side's fraction of the matmul peak, dynamic padding computes the same
losses as fixed padding, and the evaluation peers agree with ours."""

import json

import numpy as np
import pytest
from flax import nnx

from duet_jax.bench import common
from duet_jax.bench import finetune as bench
from duet_jax.data import Example
from duet_jax.models import LlamaModel, ModelConfig
from duet_jax.testing import tiny_tokenizer


def _setup(n=16):
    tok = tiny_tokenizer()
    model = LlamaModel(ModelConfig.preset("tiny-smollm2", vocab_size=len(tok)), rngs=nnx.Rngs(0))
    exs = [Example(f"e{i}", f"Question: what is {i} plus {i}?" + " Think." * (i % 4) + "\nAnswer:",
                   f" {2 * i}", "qa") for i in range(n)]
    return model, tok, exs


def _check_case(c, timed=True):
    assert {"ours", "peers", "strongest_peer", "ratio_vs_strongest", "ratios", "ratio",
            "peer_examples_per_s"} <= set(c), c["name"]
    assert c["strongest_peer"] in c["peers"] and c["ratio_vs_strongest"] > 0, c["name"]
    best = max(c["peers"], key=lambda k: c["peers"][k]["examples_per_s"])
    assert c["strongest_peer"] == best
    if timed:
        assert c["ours"]["fraction_of_matmul_peak"] > 0, c["name"]
        for k, p in c["peers"].items():
            assert p["fraction_of_matmul_peak"] > 0, (c["name"], k)


def test_flops_count_shrinks_with_the_head_and_the_trunk():
    cfg = ModelConfig.preset("smollm2-135m")
    full = common.train_flops(cfg, rows=8, seq=128, head_positions=8 * 128)
    slots = common.train_flops(cfg, rows=8, seq=128, head_positions=8 * 16)
    trunk = common.train_flops(cfg, rows=8, seq=128, head_positions=8 * 16, start=26, first_trained=26,
                               lora_layers=4)
    fwd = common.train_flops(cfg, rows=8, seq=128, head_positions=8 * 128, first_trained=None)
    assert trunk < slots < full and fwd < full
    assert bench.train_flops is common.train_flops


def test_runs_ours_only_on_a_tiny_model():
    model, tok, exs = _setup()
    r = bench.run(model=model, tokenizer=tok, example_list=exs, seq_len=32, repeats=1, last_layers=1,
                  k=2, cases=("k4_vmapped",), peer=False, matmul_n=256)
    names = [c["name"] for c in r["cases"]]
    assert names == ["k2_vmapped"]
    c = r["cases"][0]
    assert c["ours_examples_per_s"] > 0 and c["ratio"] > 0  # both sides are ours there
    assert c["strongest_peer"] == "sequential_2_finetune"
    assert "local_program" in c["ours"]["what"]
    _check_case(c)
    json.dumps(r)


@pytest.mark.bench_peer
def test_dynamic_padding_gives_the_fixed_padding_losses():
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    model, tok, exs = _setup(8)
    s = bench._Setup(model, tok, exs, 96)
    assert s.lengths.max() < 96  # so dynamic batches really are shorter
    pm = common.peer_model(s.cfg, s.weights, None)
    t = common.peer_tensors(s.tok_split, s.seq_len)
    order = np.argsort(s.lengths)
    trainers = {p: bench._PeerTrainer(pm, t, s.lengths, 4, 8, padding=p, order=order)
                for p in ("fixed", "dynamic")}  # both built first: the same initial adapter
    grouped = bench._PeerTrainer(pm, t, s.lengths, 4, 8, padding="dynamic", group_by_length=True)
    losses = {p: pt.epoch() for p, pt in trainers.items()}
    dyn = trainers["dynamic"].batch_lengths
    assert max(dyn) < 96 and dyn[0] < dyn[1] and trainers["fixed"].batch_lengths == [96, 96]
    np.testing.assert_allclose(losses["dynamic"], losses["fixed"], rtol=1e-5, atol=1e-5)
    assert len(grouped.epoch()) == 2 and len(grouped.batch_lengths) == 2
    f_ll, f_nll, _ = bench._peer_eval(pm, s.tok_split, s.seq_len, 4, "fixed")
    d_ll, d_nll, d_len = bench._peer_eval(pm, s.tok_split, s.seq_len, 4, "dynamic")
    assert max(d_len) < 96
    np.testing.assert_allclose(d_ll, f_ll, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(d_nll, f_nll, rtol=1e-5, atol=1e-4)


@pytest.mark.bench_peer
def test_peers_agree_on_a_tiny_model():
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    model, tok, exs = _setup()
    r = bench.run(model=model, tokenizer=tok, example_list=exs, seq_len=32, repeats=1, last_layers=1,
                  cases=("full_lora", "frozen_trunk", "eval_loglik"), peer=True, matmul_n=256)
    full, trunk, ev = r["cases"]
    for c in r["cases"]:
        assert set(c["peers"]) == set(bench.PEERS)
        _check_case(c)
    assert full["ratio"] == full["ratios"]["peft_fixed"] and full["peer_fraction_of_matmul_peak"] > 0
    for p in bench.PEERS:  # same data, same model
        assert abs(full["ours_mean_loss"] - full[f"{p}_mean_loss"]) < 0.5
        assert ev[f"{p}_max_abs_loglik_diff"] < 1e-3 and ev[f"{p}_max_abs_nll_diff"] < 1e-3
    assert max(full["peers"]["peft_dynamic"]["batch_lengths"]) <= 32
    assert trunk["ratio_with_trunk"] > 0 and trunk["trunk_s"] > 0
    assert "vs strongest" in bench._line(full)
    json.dumps(r)
