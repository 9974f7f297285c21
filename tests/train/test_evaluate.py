"""Evaluators: MC accuracy from per-choice log-likelihood, answer loss, generation exact match."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from duet_jax.data import EncodeConfig, Example
from duet_jax.errors import ConfigError
from duet_jax.train import (
    answer_loss,
    build_mc_set,
    generation_match,
    multiple_choice,
    row_scores,
    trunk_hidden,
)

MC = [Example(f"m{i}", f"Question: pick {i}\nAnswer:", f" {c[i % 3]}", "mc", tuple(c), i % 3)
      for i, c in enumerate([["red", "green", "blue"]] * 6 + [["a", "b"]] * 2)]
MC = [Example(e.id, e.prompt, " " + e.choices[e.gold], "mc", e.choices, e.gold) for e in MC]


def test_mc_matches_manual_argmax(setup, tok):
    s = setup
    mc = build_mc_set(MC, tok, EncodeConfig(max_length=64, buckets=()))
    assert len(mc.pool) == 6 * 3 + 2 * 2 and mc.valid.sum() == 22
    res = multiple_choice(s["g"], s["lora"], s["frozen"], mc, start=0)
    _, _, ll = row_scores(s["g"], s["lora"], s["frozen"], mc.pool)
    ll = np.asarray(ll)
    manual = []
    for i, e in enumerate(MC):
        rows = np.flatnonzero(mc.row_example == i)
        manual.append(float(np.argmax(ll[rows]) == e.gold))
    assert res["acc"] == pytest.approx(np.mean(manual))
    # the frozen-trunk path gives the same numbers
    cached = mc.pool.with_hidden(trunk_hidden(s["g"], s["lora"], s["frozen"], mc.pool, start=s["start"]))
    mc2 = type(mc)(**{**mc.__dict__, "pool": cached})
    res2 = multiple_choice(s["g"], s["lora"], s["frozen"], mc2, start=s["start"])
    assert res2["acc"] == res["acc"] and res2["acc_norm"] == res["acc_norm"]


def test_mc_stacked_adapters(setup, tok):
    s = setup
    mc = build_mc_set(MC, tok, EncodeConfig(max_length=64, buckets=()))
    stacked = jax.tree.map(lambda a: jnp.stack([a, a]), s["lora"])
    res = multiple_choice(s["g"], stacked, s["frozen"], mc)
    assert res["acc"].shape == (2,) and res["acc"][0] == res["acc"][1]


def test_answer_loss_is_token_weighted(setup):
    s = setup
    out = answer_loss(s["g"], s["lora"], s["frozen"], s["pool"])
    nll, cnt, _ = (np.asarray(x) for x in row_scores(s["g"], s["lora"], s["frozen"], s["pool"]))
    assert out["loss"] == pytest.approx(nll.sum() / cnt.sum(), rel=1e-6)
    assert out["perplexity"] == pytest.approx(np.exp(out["loss"]))
    # the flat answer-slot head equals the per-slot forward used in training
    from duet_jax.train import slot_logprobs

    lp = np.asarray(slot_logprobs(s["g"], s["lora"], s["frozen"], s["pool"]))
    direct = -(lp * np.asarray(s["pool"].loss_mask)).sum(-1)
    assert np.allclose(nll, direct, atol=1e-4)


def test_generation_match_runs_and_scores(setup, tok):
    s = setup
    exs = [Example("g0", "Question: what is 2 plus 2?\nAnswer:", " 4", "math", meta={"short_answer": "4"}),
           Example("g1", "Question: capital?\nAnswer:", " Paris", "qa", meta={"aliases": ["paris"]})]
    out = generation_match(s["g"], s["lora"], s["frozen"], exs, tok, max_new_tokens=4,
                           config=EncodeConfig(max_length=64, buckets=()))
    assert out["per_example"].shape == (2,) and len(out["predictions"]) == 2
    assert 0.0 <= out["exact_match"] <= 1.0
    sampled = generation_match(s["g"], s["lora"], s["frozen"], exs, tok, max_new_tokens=4, temperature=0.75,
                               key=jax.random.key(0), config=EncodeConfig(max_length=64, buckets=()))
    again = generation_match(s["g"], s["lora"], s["frozen"], exs, tok, max_new_tokens=4, temperature=0.75,
                             key=jax.random.key(0), config=EncodeConfig(max_length=64, buckets=()))
    assert sampled["predictions"] == again["predictions"]  # seeded


def test_errors(setup, tok):
    with pytest.raises(ConfigError, match="choices"):
        build_mc_set([Example("q", "p", " a", "qa")], tok)
    s = setup
    empty = s["pool"].__class__(**{**s["pool"].__dict__, "loss_mask": jnp.zeros_like(s["pool"].loss_mask)})
    with pytest.raises(ConfigError, match="no scorable"):
        answer_loss(s["g"], s["lora"], s["frozen"], empty)
