"""The feature store: resume after a kill, refusal of other metadata, atomic chunk files."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from duet_jax.errors import InfluenceError
from duet_jax.influence import (
    FeatureStore,
    InfluenceScorer,
    StoreMismatchError,
    featurize_into_store,
    params_fingerprint,
    store_metadata,
)


def _loss(w, ex):
    return jax.nn.softplus(-ex["y"] * (ex["x"] @ w))


def _data(n=23, d=6):
    rng = np.random.default_rng(0)
    return {"x": rng.normal(size=(n, d)).astype(np.float32),
            "y": np.sign(rng.normal(size=n)).astype(np.float32)}


def _setup(tmp_path, w=None, **meta_extra):
    w = jnp.linspace(-1, 1, 6) if w is None else w
    scorer = InfluenceScorer(_loss, proj_dim=8, projector="sjlt", seed=3, batch_size=4)
    data = _data()
    meta = store_metadata(scorer, w, domain="sciq", example_ids=[f"id{i}" for i in range(23)],
                          **meta_extra)
    store = FeatureStore.open(tmp_path / "s", meta, n_examples=23, dim=8, chunk_size=5)
    return scorer, w, data, store


class _Killed(Exception):
    pass


def test_resume_after_kill_does_not_redo_done_chunks(tmp_path):
    scorer, w, data, store = _setup(tmp_path)

    def kill_after_two(done, total):
        if done == 2:
            raise _Killed

    with pytest.raises(_Killed):
        featurize_into_store(scorer, w, data, store, progress=kill_after_two)
    assert store.pending() == [2, 3, 4]
    stamps = {i: os.stat(store._chunk_path(i)).st_mtime_ns for i in (0, 1)}
    assert not [f for f in os.listdir(tmp_path / "s" / "chunks") if f.startswith(".tmp")]

    # a new process: reopen with the same metadata and continue
    scorer2, _, _, store2 = _setup(tmp_path)
    calls = []
    featurize_into_store(scorer2, w, data, store2, progress=lambda d, t: calls.append(d))
    assert calls == [3, 4, 5]  # only the three missing chunks ran
    assert {i: os.stat(store2._chunk_path(i)).st_mtime_ns for i in (0, 1)} == stamps
    feats, valid = store2.load()
    want = scorer.featurize(w, jax.tree_util.tree_map(jnp.asarray, data))
    np.testing.assert_allclose(feats, np.asarray(want), rtol=1e-5, atol=1e-6)
    assert valid.shape == (23,) and valid.all()


def test_refuses_store_made_with_other_model_or_projector(tmp_path):
    _setup(tmp_path)
    with pytest.raises(StoreMismatchError, match="model_hash"):
        _setup(tmp_path, w=jnp.zeros(6))
    with pytest.raises(StoreMismatchError, match="split") as e:
        _setup(tmp_path, split="validation")
    assert "model_hash" not in str(e.value)
    scorer = InfluenceScorer(_loss, proj_dim=16, projector="dense", seed=4)
    meta = store_metadata(scorer, jnp.linspace(-1, 1, 6), domain="sciq",
                          example_ids=[f"id{i}" for i in range(23)])
    with pytest.raises(StoreMismatchError) as e:
        FeatureStore.open(tmp_path / "s", meta, n_examples=23, dim=16, chunk_size=5)
    for key in ("projector", "proj_dim", "seed", "dim"):
        assert key in str(e.value)
    assert isinstance(e.value, InfluenceError)


def test_header_records_the_metadata(tmp_path):
    _, w, _, store = _setup(tmp_path)
    with open(tmp_path / "s" / "header.json") as f:
        h = json.load(f)
    m = h["metadata"]
    assert m["domain"] == "sciq" and m["example_ids"][:2] == ["id0", "id1"]
    assert m["model_hash"] == params_fingerprint(w)
    assert (m["projector"], m["proj_dim"], m["seed"], m["curvature"]) == ("sjlt", 8, 3, "identity")
    assert h["layout"] == {"n_examples": 23, "dim": 8, "chunk_size": 5}


def test_incomplete_store_and_bad_chunks_raise(tmp_path):
    _, _, _, store = _setup(tmp_path)
    with pytest.raises(InfluenceError, match="incomplete"):
        store.load()
    with pytest.raises(InfluenceError, match=r"\(5, 8\)"):
        store.write_chunk(0, np.zeros((4, 8)))
    store.save_array("scores", np.arange(3.0))
    np.testing.assert_array_equal(store.load_array("scores"), np.arange(3.0))


def test_fingerprint_changes_with_values_and_structure():
    a = {"w": jnp.ones(3)}
    assert params_fingerprint(a) == params_fingerprint({"w": jnp.ones(3)})
    assert params_fingerprint(a) != params_fingerprint({"w": jnp.ones(3).at[0].set(2)})
    assert params_fingerprint(a) != params_fingerprint({"v": jnp.ones(3)})
