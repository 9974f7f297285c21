"""``duet-jax bench influence``'s SmolLM2 LoRA case on a tiny random Llama (no timing assertions):
ours is the run's featurize step, the peers (torch.func vmap, LESS's batch-1 loop, three
projections) compute the same gradients, every case names its strongest peer; the length-bucketed
featurize, and the bounded memory of the projectors at P > 10M."""

import json
import os

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


def _check_cases(r, peers: bool):
    for c in r["cases"]:
        assert {"ours", "peers", "strongest_peer", "ratio_vs_strongest", "ratios"} <= set(c), c["name"]
        assert c["ours"]["examples_per_s"] > 0 and c["ours"]["fraction_of_matmul_peak"] > 0, c["name"]
        if peers:
            assert c["strongest_peer"] in c["peers"] and c["ratio_vs_strongest"] > 0, c["name"]
            for k, p in c["peers"].items():
                assert p["examples_per_s"] > 0 and p["fraction_of_matmul_peak"] > 0, (c["name"], k)
            best = max((p["examples_per_s"], k) for k, p in c["peers"].items() if p.get("feasible", True))[1]
            assert c["strongest_peer"] == best
        else:
            assert c["strongest_peer"] is None and c["ratio_vs_strongest"] is None
    json.dumps(r)


def test_bucketed_featurize_equals_full_length(monkeypatch):
    from duet_jax.influence import InfluenceScorer
    from duet_jax.influence import domains as dom_mod
    from duet_jax.train import build_pool

    model, tok, exs = _setup()
    case = bench._LlamaCase(model, tok, exs, seq_len=64)
    pool, _ = build_pool(case.tok, length=64)
    seen = []
    real = dom_mod.trim_pool
    monkeypatch.setattr(dom_mod, "trim_pool", lambda c, *a: seen.append(real(c, *a)) or seen[-1])
    scorer = InfluenceScorer(dom_mod.example_loss_fn(case.g, 0), proj_dim=64, projector="sjlt", batch_size=4)
    bucketed, ok = dom_mod.featurize_pool(scorer, case.lora, pool, case.frozen, return_flags=True)
    assert len(seen) == 2 and all(sub.length < 64 and len(sub) == 4 for sub in seen)
    full = np.asarray(scorer.featurize(case.lora, jax.tree.map(np.asarray, pool), context=case.frozen))
    assert ok.all() and np.abs(full).max() > 0
    np.testing.assert_allclose(bucketed, full, rtol=1e-4, atol=1e-5 * np.abs(full).max())


@pytest.mark.parametrize("last_layers,projector", [(1, "sjlt")])  # the run's trunk path; pallas: tests/influence/test_domains.py
def test_bench_featurize_is_the_runs(tmp_path, monkeypatch, last_layers, projector):
    """Ours calls the run's own functions (``domain_scorer``, ``domain_store``, ``featurize_rows``
    of ``duet_jax.influence.domains``, what ``domain_influence`` calls), with the configured
    projector, chunk size and the run's buckets, and gets the features ``domain_influence`` stores
    for a domain (its proxy fine-tune at a learning rate of 1e-30 leaves the adapter as it was),
    with LoRA on every layer and on the last one only (from the frozen trunk's hidden states;
    there with the Pallas projector, interpreted on CPU)."""
    from duet_jax.influence import domains as dom_mod
    from duet_jax.influence.domains import InfluenceConfig, domain_influence
    from duet_jax.influence.store import FeatureStore
    from duet_jax.train import TrainConfig, build_pool, trunk_hidden

    model, tok, exs = _setup(8)
    case = bench._LlamaCase(model, tok, exs, seq_len=64, last_layers=last_layers)
    g, lora, frozen, start = case.g, case.lora, case.frozen, case.start
    assert (start > 0) == (last_layers is not None)
    pool, _ = build_pool(case.tok, length=64)
    if start:
        pool = pool.with_hidden(trunk_hidden(g, lora, frozen, pool, start=start))
    icfg = InfluenceConfig(proj_dim=32, projector=projector, chunk_size=4, proxy_examples=8, validation_examples=2)
    n = len(pool)
    domain_influence(graphdef=g, lora0=lora, frozen=frozen, start=start, pool=pool, domain_of=np.zeros(n, np.int32),
                     val_pool=pool, val_domain_of=np.zeros(n, np.int32), names=["d"],
                     example_ids=[e.id for e in exs], base_model_id="tiny",
                     train_config=TrainConfig(batch_size=4, learning_rate=1e-30), config=icfg,
                     buckets=case.buckets, store_root=tmp_path / "run")
    with open(tmp_path / "run" / "d" / "header.json") as f:
        header = json.load(f)
    run_feats, run_ok = FeatureStore(str(tmp_path / "run" / "d"), header).load()

    calls = {"scorer": [], "store": [], "rows": []}
    real_scorer, real_store, real_rows = dom_mod.domain_scorer, dom_mod.domain_store, dom_mod.featurize_rows

    def spy_scorer(*a, **k):
        calls["scorer"].append((a, k))
        return real_scorer(*a, **k)

    def spy_store(*a, **k):
        st = real_store(*a, **k)
        calls["store"].append(st)
        return st

    def spy_rows(*a, **k):
        out = real_rows(*a, **k)
        calls["rows"].append((a, k, out))
        return out

    monkeypatch.setattr(dom_mod, "domain_scorer", spy_scorer)
    monkeypatch.setattr(dom_mod, "domain_store", spy_store)
    monkeypatch.setattr(dom_mod, "featurize_rows", spy_rows)
    info, _ = bench._ours_llama(case, proj_dim=32, projector=projector, chunk_size=4, repeats=1, check=1)
    assert info["influence_config"]["projector"] == projector and info["influence_config"]["chunk_size"] == 4
    assert len(calls["scorer"]) == 1 and calls["scorer"][0][0][:2] == (g, start)
    assert len(calls["rows"]) == 2 == len(calls["store"])  # the compiling call and one timed repeat
    for (a, k, (feats, ok)), store in zip(calls["rows"], calls["store"], strict=True):
        scorer = a[0]
        assert scorer.projector_for(lora).name == projector and scorer.options.batch_size == 4
        assert k["store"] is store and store.chunk_size == icfg.chunk_size and k["buckets"] == case.buckets
        for key in ("projector", "proj_dim", "seed", "curvature", "damping", "start_layer", "layout"):
            assert header["metadata"][key] == store.metadata[key], key
        assert ok.all() and run_ok.all() and np.abs(feats).max() > 0
        np.testing.assert_allclose(feats, run_feats, rtol=1e-4, atol=1e-5 * np.abs(run_feats).max())
    assert set(info["chunk_lengths"]) <= set(case.buckets) and len(info["chunk_lengths"]) == 2


def test_llama_case_ours_only():
    model, tok, exs = _setup()
    r = bench.run_llama(model=model, tokenizer=tok, example_list=exs, seq_len=64, proj_dim=64,
                        chunk_size=4, repeats=1, peer=False, large_p=None, matmul_n=128)
    assert r["ours_examples_per_s"] > 0 and r["ratio"] is None
    assert r["ours"]["feature_shape"] == [8, 64] and r["ours"]["valid"] == 8
    assert r["ours"]["vmapped_rows"] == 4 and len(r["ours"]["chunk_lengths"]) == 2
    assert r["num_params"] == 3 * 8 * (48 + 48 + 48 + 16 + 48 + 16 + 48 + 48)  # q,k,v,o: r(in + out)
    assert [c["name"] for c in r["cases"]] == ["featurize", "projection"]
    _check_cases(r, peers=False)
    assert "featurize: ours" in bench._llama_summary(r)


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
def test_every_peer_computes_our_gradients_on_a_tiny_model():
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    model, tok, exs = _setup()
    r = bench.run_llama(model=model, tokenizer=tok, example_list=exs, seq_len=64, proj_dim=64,
                        chunk_size=4, batch_size=4, repeats=1, project_every=4, peer=True, large_p=None,
                        matmul_n=128)
    assert set(r["check"]) == {"vmap", "loop"}
    for kind, c in r["check"].items():
        assert len(c["grad_cosine"]) == 2 and min(c["grad_cosine"]) > 0.9999, (kind, c)
        assert max(c["grad_rel_diff"]) < 1e-3, (kind, c)
        assert c["max_abs_loss_diff"] < 1e-4, (kind, c)
    loop = r["peer"]["grads"]["loop"]
    # LESS's loop: SDPA with is_causal and no mask, at each example's real length
    assert loop["sdpa_calls_in_one_example"]["causal_no_mask"] > 0, loop
    assert loop["sdpa_calls_in_one_example"]["masked"] == 0, loop
    assert loop["mean_length"] < 64
    f = r["cases"][0]
    assert set(f["peers"]) == {f"{g}+{p}" for g in bench.GRADS for p in bench.PROJECTIONS}
    assert all(p["feasible"] for p in f["peers"].values())  # P x k is small here: the matrix is kept
    assert set(r["cases"][1]["peers"]) == set(bench.PROJECTIONS)
    _check_cases(r, peers=True)
    assert r["strongest_peer"] == f["strongest_peer"] and r["ratio"] > 0
    assert "strongest peer" in bench._llama_summary(r) and "check vs loop" in bench._llama_summary(r)


@pytest.mark.bench_peer
def test_peers_on_the_last_layer_only_from_the_trunk():
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    model, tok, exs = _setup()
    r = bench.run_llama(model=model, tokenizer=tok, example_list=exs, seq_len=64, proj_dim=64, last_layers=1,
                        chunk_size=4, batch_size=4, repeats=1, project_every=4, peer=True, large_p=None,
                        matmul_n=128, projection=False, peer_projections=("sjlt",))
    assert r["ours"]["start"] == model.config.num_layers - 1 and r["ours"]["trunk_s"] > 0
    assert r["num_params"] == 8 * (48 + 48 + 48 + 16 + 48 + 16 + 48 + 48)  # one layer
    for kind, c in r["check"].items():
        assert min(c["grad_cosine"]) > 0.9999 and c["max_abs_loss_diff"] < 1e-4, (kind, c)
    _check_cases(r, peers=True)


@pytest.mark.bench_peer
def test_quick_mlp_case_names_its_strongest_peer():
    pytest.importorskip("torch")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    r = bench.run(quick=True, proj_dim=64)
    c = r["cases"][0]
    assert c["strongest_peer"] in c["peers"] and c["ratio_vs_strongest"] > 0
    assert {"vmap+trak", "loop+sjlt"} <= set(c["peers"])
    _check_cases(r, peers=True)
