"""DUET's per-domain IF scores on a tiny model: finite, flagged, resumable, refusing a changed store."""

import numpy as np
import pytest

from duet_jax.data import EncodeConfig, Example, encode_examples
from duet_jax.influence import StoreMismatchError
from duet_jax.influence.domains import InfluenceConfig, domain_influence
from duet_jax.testing import tiny_tokenizer
from duet_jax.train import TrainConfig, build_pool, split_model, trunk_hidden, trunk_start
from tests.train.conftest import make_model

TOK = tiny_tokenizer()


def _setup():
    model = make_model(TOK)
    cfg = EncodeConfig(max_length=48, buckets=())
    a = [Example(f"a{i}", f"Question: add {i} and {i}?\nAnswer:", f" {2 * i}", "qa") for i in range(20)]
    b = [Example(f"b{i}", f"Colour number {i} is", " red" if i % 2 else " blue", "qa") for i in range(12)]
    pool, dom = build_pool([encode_examples(a, TOK, cfg), encode_examples(b, TOK, cfg)], length=48)
    val, vdom = build_pool([encode_examples(a[:4], TOK, cfg), encode_examples(b[:4], TOK, cfg)],
                           length=48, answer_slots=pool.answer_slots)
    g, lora, frozen = split_model(model)
    start = trunk_start(model)
    pool = pool.with_hidden(trunk_hidden(g, lora, frozen, pool, start=start))
    val = val.with_hidden(trunk_hidden(g, lora, frozen, val, start=start))
    ids = [f"a{i}" for i in range(20)] + [f"b{i}" for i in range(12)]
    return dict(graphdef=g, lora0=lora, frozen=frozen, start=start, pool=pool, domain_of=dom,
                val_pool=val, val_domain_of=vdom, names=["a", "b"], example_ids=ids,
                base_model_id="tiny", train_config=TrainConfig(batch_size=4, learning_rate=1e-2),
                config=InfluenceConfig(proxy_examples=8, proj_dim=32, chunk_size=8))


def test_scores_resume_and_refuse(tmp_path, monkeypatch):
    kw = _setup()
    out = domain_influence(**kw, store_root=tmp_path / "if")
    assert out.scores.shape == (32,) and np.isfinite(out.scores).all() and out.valid.all()
    assert set(out.per_domain) == {"a", "b"} and out.scores.std() > 0
    # a second run reads every chunk back: featurize is never called
    from duet_jax.influence import scorer as scorer_mod
    calls = []
    real = scorer_mod.InfluenceScorer.featurize
    monkeypatch.setattr(scorer_mod.InfluenceScorer, "featurize",
                        lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    again = domain_influence(**kw, store_root=tmp_path / "if")
    assert np.allclose(again.scores, out.scores) and calls == [1, 1]  # only the two query calls
    with pytest.raises(StoreMismatchError, match="model_hash"):
        domain_influence(**{**kw, "base_model_id": "other"}, store_root=tmp_path / "if")


def test_examples_without_loss_tokens_are_flagged_not_nan():
    kw = _setup()
    pool = kw["pool"]
    lm = pool.loss_mask.at[3].set(0.0)
    kw["pool"] = type(pool)(**{**pool.__dict__, "loss_mask": lm})
    out = domain_influence(**kw)
    assert not out.valid[3] and out.scores[3] == 0.0 and np.isfinite(out.scores).all()
    assert out.per_domain["a"]["flagged"] == 1


def test_length_sorted_trimmed_featurize_equals_the_untrimmed_one(tmp_path, monkeypatch):
    """The run's path (store, rows shortest first, each chunk cut to its bucket) gives the scores
    of featurizing every row at the pool's full length."""
    from duet_jax.influence import domains as dom_mod

    kw = _setup()
    lengths = np.asarray(kw["pool"].attention_mask).sum(1)
    assert lengths.min() < 40 < kw["pool"].length  # some chunks are really cut
    seen = []
    real = dom_mod.trim_pool
    monkeypatch.setattr(dom_mod, "trim_pool", lambda c, b: seen.append(real(c, b).length) or real(c, b))
    trimmed = domain_influence(**kw, buckets=(16, 40), store_root=tmp_path / "if")
    full = domain_influence(**kw)  # in memory: one featurize of each domain, untrimmed
    assert min(seen) < kw["pool"].length
    # float32 sums in another order: equal to 1e-5 of the scores' scale
    scale = np.abs(full.scores).max()
    np.testing.assert_allclose(trimmed.scores, full.scores, rtol=1e-4, atol=1e-5 * scale)
    assert (trimmed.valid == full.valid).all()
