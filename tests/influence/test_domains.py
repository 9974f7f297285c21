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
    monkeypatch.setattr(dom_mod, "trim_pool", lambda c, *a: seen.append(real(c, *a).length) or real(c, *a))
    trimmed = domain_influence(**kw, buckets=(16, 40), store_root=tmp_path / "if")
    full = domain_influence(**kw, buckets=(kw["pool"].length,))  # in memory, every chunk untrimmed
    assert min(seen) < kw["pool"].length
    # float32 sums in another order: equal to 1e-5 of the scores' scale
    scale = np.abs(full.scores).max()
    np.testing.assert_allclose(trimmed.scores, full.scores, rtol=1e-4, atol=1e-5 * scale)
    assert (trimmed.valid == full.valid).all()


def _stored(root, name):
    import json

    from duet_jax.influence import FeatureStore

    with open(root / name / "header.json") as f:
        return FeatureStore(str(root / name), json.load(f)).load()


def test_in_memory_is_the_store_path(tmp_path):
    """Without a store root the same chunk loop runs (an in-memory store): the same scores, bit
    for bit, and the stored features are what featurize_rows returns."""
    import jax

    from duet_jax.influence.domains import domain_scorer, featurize_rows

    kw = _setup()
    on_disk = domain_influence(**kw, buckets=(16, 40), store_root=tmp_path / "if")
    in_memory = domain_influence(**kw, buckets=(16, 40))
    assert np.array_equal(on_disk.scores, in_memory.scores) and (on_disk.valid == in_memory.valid).all()
    # featurize_rows alone (the bench's call) on domain b's rows, shortest first: one trimmed
    # chunk of chunk_size rows per store chunk
    cfg = kw["config"]
    scorer = domain_scorer(kw["graphdef"], kw["start"], cfg)
    rows = np.flatnonzero(np.asarray(kw["domain_of"]) == 1)
    rows = rows[np.argsort(np.asarray(kw["pool"].attention_mask).sum(1)[rows], kind="stable")]
    ex = jax.tree.map(lambda a: np.asarray(a)[rows], kw["pool"])
    lengths = []
    f, ok = featurize_rows(scorer, kw["lora0"], ex, kw["frozen"], chunk_size=cfg.chunk_size, buckets=(16, 40),
                           on_trim=lambda t: lengths.append(t.length))
    assert f.shape == (rows.size, cfg.proj_dim) and ok.all() and set(lengths) <= {16, 40}
    assert len(lengths) == -(-rows.size // cfg.chunk_size)


def test_pallas_projector_in_a_cpu_run_matches_chunked(tmp_path):
    """``--influence.projector pallas`` in a CPU run: the kernel is interpreted (chosen from the
    backend) and the stored features are the ``chunked`` projector's (the same signs, pure jnp:
    ``duet_kernels.projection.project_reference``) up to float summation order."""
    import dataclasses

    import jax

    from duet_jax.influence.domains import domain_scorer

    assert jax.default_backend() == "cpu"
    kw = _setup()
    base = kw["config"]
    pal = dataclasses.replace(base, projector="pallas")
    assert domain_scorer(kw["graphdef"], kw["start"], pal).projector_for(kw["lora0"]).interpret is True
    out = {}
    for name in ("pallas", "chunked"):
        kw["config"] = dataclasses.replace(base, projector=name)
        out[name] = domain_influence(**kw, buckets=(16, 40), store_root=tmp_path / name)
    for d in ("a", "b"):
        fp, okp = _stored(tmp_path / "pallas", d)
        fc, okc = _stored(tmp_path / "chunked", d)
        assert (okp == okc).all() and np.abs(fc).max() > 0
        np.testing.assert_allclose(fp, fc, rtol=1e-5, atol=1e-5 * np.abs(fc).max())
    scale = np.abs(out["chunked"].scores).max()
    np.testing.assert_allclose(out["pallas"].scores, out["chunked"].scores, rtol=1e-4, atol=1e-5 * scale)
