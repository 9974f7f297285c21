"""Smoke tests of ``duet-jax bench bo`` at tiny sizes (no timing assertions)."""

import json

import pytest

from duet_jax.bench import bo as bench

from .common import FAST


def test_runs_ours_only_and_reports_the_fields():
    out = bench.run(dims=[3], sizes=[6], repeats=1, peer=False, regret=False, config=FAST)
    assert out["ours_s_per_round"] > 0 and out["peer_s_per_round"] is None
    assert out["ratio"] is None and out["timing"][0]["n"] == 6
    json.loads(json.dumps(out))
    table = {"evals": [10, 20], "rows": [{"function": "smooth-3d", "method": "ours", "seeds": 2,
                                          "median_regret": [0.5, 0.25], "seconds": 1.0}]}
    assert bench.regret_markdown(table).splitlines()[-1] == "| smooth-3d | ours | 2 | 0.5000 | 0.2500 |"


@pytest.mark.bench_peer
def test_botorch_peer_and_the_regret_table_on_tiny_sizes():
    pytest.importorskip("botorch")
    out = bench.run(dims=[3], sizes=[6], evals=[5, 6], seeds=2, peer_seeds=1, repeats=1,
                    peer=True, config=FAST)
    assert out["peer_s_per_round"] > 0 and out["ratio"] > 0
    rows = out["regret"]["rows"]
    assert {r["function"] for r in rows} == {"smooth-3d", "multimodal-3d"}
    assert {r["method"] for r in rows} == {"ours", "random", "botorch"}
    for r in rows:
        assert r["seeds"] == (1 if r["method"] == "botorch" else 2)
        assert r["median_regret"][1] <= r["median_regret"][0]
    json.loads(json.dumps(out))
