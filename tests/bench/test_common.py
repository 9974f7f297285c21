"""The shared bench module: one definition of timing / memory / peak / FLOPs / peers, the case
comparison, and no bench module importing another."""

import ast
import re
from pathlib import Path

import numpy as np
import pytest

import duet_jax.bench
from duet_jax.bench import common

BENCH_DIR = Path(duet_jax.bench.__file__).parent


def _bench_imports(path: Path) -> set[str]:
    """The duet_jax.bench modules ``path`` imports, or names in strings (code run in children)."""
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("duet_jax.bench."):
                    found.add(a.name.split(".")[2])
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "duet_jax.bench":
                found.update(a.name for a in node.names)
            elif node.module.startswith("duet_jax.bench."):
                found.add(node.module.split(".")[2])
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            found.update(re.findall(r"duet_jax\.bench\.(\w+)", node.value))
    return found


def test_no_bench_module_imports_another():
    modules = sorted(p for p in BENCH_DIR.glob("*.py") if p.name != "__init__.py")
    assert {p.stem for p in modules} >= {"common", "influence", "finetune", "model", "bo"}
    for p in modules:
        others = _bench_imports(p) - {p.stem, "common"}
        assert not others, f"{p.name} imports bench module(s) {sorted(others)}; share code via common.py"
    assert "duet_jax.bench." not in "".join(
        ln for ln in (BENCH_DIR / "common.py").read_text().splitlines() if ln.lstrip().startswith(("import", "from")))


def test_one_definition_of_the_shared_helpers():
    """No bench module defines its own peak / timing / memory / FLOP helpers any more."""
    shared = {"matmul_peak_gflops", "_matmul_peak", "_time", "_median_time", "_rss_mib", "_vm_hwm_mib",
              "_vm_rss_mib", "_proc_status_mib", "train_flops", "_layer_linear_params", "_peer_model",
              "_peer_tensors", "_with_lora", "_nonzero_b", "_examples", "_alternate", "_load_average"}
    for p in BENCH_DIR.glob("*.py"):
        if p.name in ("common.py", "__init__.py"):
            continue
        defs = {n.name for n in ast.parse(p.read_text()).body if isinstance(n, ast.FunctionDef)}
        assert not defs & shared, (p.name, defs & shared)


def test_compare_names_the_fastest_feasible_peer_and_every_fraction():
    ours = common.side(10.0, seconds=2.0, gflops=100.0)
    peers = {"slow": common.side(2.0, seconds=10.0, gflops=100.0),
             "fast": common.side(5.0, seconds=4.0, gflops=100.0),
             "hypothetical": common.side(50.0, seconds=0.4, gflops=100.0, feasible=False),
             "skipped": common.side(None)}
    c = common.compare("x", ours, peers, peak=100.0)
    assert c["strongest_peer"] == "fast" and c["ratio_vs_strongest"] == pytest.approx(2.0)
    assert c["ratios"]["slow"] == pytest.approx(5.0) and c["ratios"]["skipped"] is None
    assert c["ours"]["fraction_of_matmul_peak"] == pytest.approx(0.5)
    assert c["peers"]["fast"]["fraction_of_matmul_peak"] == pytest.approx(0.25)
    assert common.compare("y", ours, {}, peak=1.0)["strongest_peer"] is None


def test_alternate_and_median_time():
    calls = []
    res = common.alternate({"a": lambda: calls.append("a"), "b": lambda: calls.append("b"), "c": None}, 3)
    assert calls == ["a", "b"] * 3 and set(res) == {"a", "b"} and len(res["a"][1]) == 3
    t, reps = common.median_time(lambda: None, 2)
    assert t >= 0 and len(reps) == 2
    assert common.peak_rss_mib() > 0


def test_matmul_peak_keeps_the_largest_sample():
    p = common.MatmulPeak(64)
    p.add(1.0, "a")
    p.add(3.0, "b")
    p.add(None, "skipped")
    assert p.peak == 3.0 and p.info()["matmul_peak_sample_sources"] == ["a", "b"]
    assert common.matmul_peak_gflops(64, repeats=1) > 0


@pytest.mark.bench_peer
def test_torch_projections_are_linear_maps_of_the_right_kind():
    torch = pytest.importorskip("torch")
    from duet_jax.bench import influence as bench

    p, k = 300, 16
    g = torch.randn(3, p, generator=torch.Generator().manual_seed(1))
    eye = torch.eye(p)
    for proj in (bench.torch_sjlt(p, k), bench.torch_trak_projector(p, k),
                 bench.torch_rademacher_kept(p, k)[0]):
        m = proj(eye)  # the matrix itself, [P, k]
        assert m.shape == (p, k)
        np.testing.assert_allclose(proj(g).numpy(), (g @ m).numpy(), rtol=1e-5, atol=1e-5)
    s = bench.torch_sjlt(p, k)(eye)
    assert ((s != 0).sum(1) == 1).all() and set(s[s != 0].abs().unique().tolist()) == {1.0}
    r = bench.torch_rademacher_kept(p, k)[0](eye) * k**0.5
    assert set(r.abs().unique().tolist()) == {1.0}
    _, info = bench.torch_rademacher_kept(p, k, cap_gib=(p // 3) * k * 4 / 2**30)
    assert not info["feasible"] and info["rows_kept"] == p // 3 and info["scale"] == pytest.approx(3.0)
