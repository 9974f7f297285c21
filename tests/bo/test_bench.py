"""Smoke tests of ``duet-jax bench bo`` at tiny sizes (no timing assertions)."""

import json

import numpy as np
import pytest

from duet_jax.bench import bo as bench

from .common import FAST


def test_suite_appends_resumes_and_tabulates(tmp_path):
    path = tmp_path / "suite.jsonl"
    case = bench.Case("peaks", 3)
    assert case.name == "peaks-3d" and bench.Case("smooth", 5, 0.1).name == "smooth-5d-noise0.1"
    new = bench.run_suite([case], ["ours", "random"], seeds=2, n_evals=6, results=path,
                          configs={"ours": FAST})
    assert len(new) == 4 and len(path.read_text().splitlines()) == 4
    assert bench.run_suite([case], ["ours", "random"], seeds=2, n_evals=6, results=path,
                           configs={"ours": FAST}) == []  # all done: nothing reruns
    with path.open("a") as fh:
        fh.write('{"cut short')  # an interrupted line is skipped
    recs = bench._load(path)
    assert len(recs) == 4
    for r in recs:
        assert len(r["regret"]) == 6 and np.all(np.diff(r["regret"]) <= 0)
    rows = bench.summarize(recs, (3, 6), fingerprints={"ours": bench._fingerprint(FAST)})
    assert [r["method"] for r in rows] == ["ours", "random"] and rows[0]["seeds"] == 2
    q25, med, q75 = rows[0]["@6"]
    assert q25 <= med <= q75
    md = bench.table_markdown(rows, (3, 6))
    assert md.splitlines()[2].startswith("| peaks-3d | ours | 2 | ")
    json.loads(json.dumps(rows))


def test_verdicts_compare_ours_with_the_best_botorch_acquisition_and_random():
    row = lambda case, m, med, n=5: {"case": case, "method": m, "seeds": n, "@30": [med, med, med]}  # noqa: E731
    rows = [row("smooth-3d", "ours", 0.00105), row("smooth-3d", "botorch-logei", 0.0010),
            row("smooth-3d", "botorch-ucb", 0.0200), row("smooth-3d", "random", 0.02),
            row("peaks-3d", "ours", 0.30), row("peaks-3d", "botorch-ucb", 0.20), row("peaks-3d", "random", 0.5),
            row("needle-3d", "ours", 0.6), row("needle-3d", "botorch-logei", 0.9), row("needle-3d", "random", 0.5),
            row("smooth-5d", "ours", 0.01), row("smooth-5d", "random", 0.1),
            row("peaks-5d", "ours", 0.8), row("peaks-5d", "random", 0.7)]
    v = {x["case"]: x for x in bench.verdicts(rows, 30)}
    assert v["smooth-3d"]["botorch"] == ("botorch-logei", 0.0010, 5)  # the better of the two
    assert v["smooth-3d"]["ratio"] == pytest.approx(1.05) and v["smooth-3d"]["meets"] is True
    assert v["peaks-3d"]["ratio"] == pytest.approx(1.5) and v["peaks-3d"]["meets"] is False
    assert v["needle-3d"]["meets"] is False  # ahead of BoTorch but not below random
    assert v["smooth-5d"]["ratio"] is None and v["smooth-5d"]["meets"] is None  # no BoTorch run
    assert v["peaks-5d"]["meets"] is False  # above random: fails without a BoTorch run
    md = bench.verdict_markdown(list(v.values()), 30)
    assert "| peaks-3d | 0.3000 (5) | 0.2000 (5, ucb) | 0.5000 (5) | 1.50x | **no** |" in md
    assert "| smooth-5d | 0.0100 (5) | - | 0.1000 (5) | - | BoTorch not measured |" in md


def test_near_duplicates_counts_repeats_after_the_warm_start():
    x = np.array([[1, 0, 0], [0, 1, 0], [0.5, 0.5, 0], [0.51, 0.49, 0], [0, 0, 1.0], [0, 0.005, 0.995]])
    assert bench.near_duplicates(x, n_init=2) == 2
    assert bench.near_duplicates(x, n_init=5) == 1


@pytest.mark.bench_peer
def test_botorch_peer_on_tiny_sizes(tmp_path):
    pytest.importorskip("botorch")
    path = tmp_path / "suite.jsonl"
    new = bench.run_suite([bench.Case("smooth", 3, 0.1)], ["botorch-logei", "botorch-ucb"],
                          seeds=1, n_evals=5, results=path)
    assert {r["method"] for r in new} == {"botorch-logei", "botorch-ucb"}
    for r in new:
        assert len(r["regret"]) == 5 and r["s_per_round"] > 0
    out = bench.timing(dims=[3], sizes=[6], repeats=1, config=FAST)
    assert out["ratio"] > 0 and out["load_average_before"] is not None
