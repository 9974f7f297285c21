"""Multi-host on CPU: two processes joined by ``jax.distributed`` (2 CPU devices each, one 2 x 2
mesh over both) run the DUET loop like one process with 4 devices; process 0 alone writes the run
directory (process 1 is given its own directory, as on hosts without a shared file system, and
writes there only its copy of the influence store); a resume after a cut history replays process 0's
history in both processes and ends with the same history and best adapter."""

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from duet_jax.config import preset
from duet_jax.duet import run

pytestmark = pytest.mark.multidevice
ROOT = Path(__file__).resolve().parents[2]
CFG = {"method": "duet_if", "k": 2, "warm_start": 2, "rounds": 1, "mesh": {"data": 2, "fsdp": 2}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _launch(dirs: list[Path], cfg: dict = CFG) -> list[dict]:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "tests.multidevice.multihost_worker", str(i), "2", str(port),
                               str(d), json.dumps(cfg)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i, d in enumerate(dirs)]
    outs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=400)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        assert p.returncode == 0, out[-3000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    return outs


def _hist(d: Path) -> list[dict]:
    return [json.loads(x) for x in (d / "history.jsonl").read_text().splitlines()]


def test_two_processes_run_like_one_and_only_process_0_writes(tmp_path):
    ref_dir = tmp_path / "one-process"
    lines = []
    ref = run(preset("smoke", **CFG), ref_dir, log=lines.append, progress=False)
    ref_h = _hist(ref_dir)
    n_pool = int(re.search(r"pool: (\d+) examples", "\n".join(lines)).group(1))
    p0, p1 = tmp_path / "p0", tmp_path / "p1"
    trunk = tmp_path / "trunk"  # each process caches its own block of the pool's trunk states
    cfg = {**CFG, "trunk_dir": str(trunk)}
    outs = _launch([p0, p1], cfg)
    assert [o["process"] for o in outs] == [0, 1]
    same = lambda o: {k: v for k, v in o["summary"].items() if k != "wall_seconds"}
    assert same(outs[0]) == same(outs[1])  # every process ends with the same answer
    h = _hist(p0)
    assert [r["seed"] for r in h] == [r["seed"] for r in ref_h]
    assert [r["counts"] for r in h] == [r["counts"] for r in ref_h]
    np.testing.assert_allclose([r["feedbacks"] for r in h], [r["feedbacks"] for r in ref_h], rtol=1e-4)
    assert outs[0]["summary"]["best_evaluation"] == ref["best_evaluation"]
    # process 1 wrote nothing but its own copy of the influence store
    written = sorted(str(f.relative_to(p1)) for f in p1.rglob("*") if f.is_file())
    assert written and all(f.startswith("influence/process1/") for f in written), written
    assert (p0 / "influence" / "process0").is_dir() and (p0 / "summary.json").exists()
    meta = json.loads((p0 / "best_adapter" / "meta.json").read_text())
    assert meta["step"] == ref["best_evaluation"]
    # the adapter written by process 0 alone reads back in a single process
    from duet_jax.loop.setting import load_run_model
    from duet_jax.train import restore_checkpoint, split_model

    _, lora0, _ = split_model(load_run_model(preset("smoke", **CFG), lambda s: None)[1])
    restore_checkpoint(p0 / "best_adapter", lora0)

    # per-process data: the pool's trunk states (padded to a multiple of the 4 devices) split in
    # two blocks, one per process; no process holds every row
    n_rows = -(-n_pool // 4) * 4
    for i in (0, 1):
        files = [f for f in (trunk / f"process{i}").glob("*.npy") if f"of{n_rows}" in f.name]
        assert len(files) == 1, sorted((trunk / f"process{i}").glob("*"))
        lo, hi = (0, n_rows // 2) if i == 0 else (n_rows // 2, n_rows)
        assert f"-rows{lo}-{hi}of{n_rows}" in files[0].name
        assert np.load(files[0]).shape[0] == n_rows // 2 < n_pool

    # resume: process 0's history cut after its first evaluation, best_adapter/ gone
    (p0 / "history.jsonl").write_text(json.dumps(h[0]) + "\n")
    import shutil

    shutil.rmtree(p0 / "best_adapter")
    outs2 = _launch([p0, p1], cfg)  # the trunk states now read back from each process's block
    h2 = _hist(p0)
    assert [r["seed"] for r in h2] == [r["seed"] for r in h]
    np.testing.assert_allclose([r["feedbacks"] for r in h2], [r["feedbacks"] for r in h], rtol=1e-6)
    assert outs2[0]["summary"]["best_evaluation"] == outs[0]["summary"]["best_evaluation"]
    assert json.loads((p0 / "best_adapter" / "meta.json").read_text())["step"] == meta["step"]
    assert not (p1 / "history.jsonl").exists()
