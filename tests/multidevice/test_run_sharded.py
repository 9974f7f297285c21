"""The DUET loop on a mesh: a smoke run on 1, 4 and 8 CPU devices gives the single-device
history (same ratios, counts and seeds; feedbacks within float tolerance)."""

import json

import numpy as np
import pytest

from duet_jax.config import preset
from duet_jax.duet import run

pytestmark = pytest.mark.multidevice


def _hist(d):
    return [json.loads(x) for x in (d / "history.jsonl").read_text().splitlines()]


def test_smoke_run_on_meshes_matches_one_device(tmp_path):
    runs = {}
    for data, fsdp in [(1, 1), (2, 2), (2, 4)]:  # 1 x 2: tests/multidevice/test_sharded.py
        cfg = preset("smoke", method="duet_ur", k=2, warm_start=2, rounds=1, mesh={"data": data, "fsdp": fsdp})
        d = tmp_path / f"m{data}x{fsdp}"
        runs[(data, fsdp)] = (run(cfg, d, log=lambda s: None, progress=False), _hist(d))
    ref_s, ref_h = runs[(1, 1)]
    for mesh, (s, h) in runs.items():
        assert [r["seed"] for r in h] == [r["seed"] for r in ref_h], mesh
        assert [r["counts"] for r in h] == [r["counts"] for r in ref_h], mesh
        np.testing.assert_allclose([r["feedbacks"] for r in h], [r["feedbacks"] for r in ref_h],
                                   rtol=1e-4, err_msg=str(mesh))
        assert s["best_evaluation"] == ref_s["best_evaluation"], mesh
