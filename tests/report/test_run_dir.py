"""The run directory's reliability rules: one run per directory (flock), best_adapter/ always
absent or complete and saying which evaluation it holds (a fault injected at every write), writes
that fail on a full disk leave nothing behind, a one-line error for an unwritable directory."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from duet_jax import report
from duet_jax.errors import ConfigError
from duet_jax.report import (
    best_adapter_evaluation,
    check_writable,
    clean_stale,
    lock_run_dir,
    save_best_adapter,
)

ROOT = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------ lock
HOLDER = textwrap.dedent("""
    import sys
    from duet_jax.report import lock_run_dir
    try:
        lock = lock_run_dir(sys.argv[1])
    except Exception as e:
        print("refused:", e, flush=True)
        sys.exit(3)
    print("locked", flush=True)
    sys.stdin.read()  # hold it until killed (or stdin closes)
    lock.release()
""")


def _holder(run_dir: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], cwd=ROOT, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)


def test_second_process_on_a_locked_dir_is_refused_with_the_holders_pid(tmp_path):
    d = tmp_path / "run"
    holder = _holder(d)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert (d / ".lock").read_text().strip() == str(holder.pid)
        with pytest.raises(ConfigError) as e:
            lock_run_dir(d)
        assert str(e.value) == (f"{d} is in use by pid {holder.pid} (another duet-jax run); wait for "
                                "it or choose another --out_dir")
        other = subprocess.run([sys.executable, "-c", HOLDER, str(d)], cwd=ROOT, text=True,
                               capture_output=True, stdin=subprocess.DEVNULL)
        assert other.returncode == 3 and f"in use by pid {holder.pid}" in other.stdout
    finally:
        holder.kill()  # SIGKILL: no clean release, the .lock file stays
        holder.wait()
    assert (d / ".lock").exists()  # stale, from a dead process ...
    with lock_run_dir(d) as lock:  # ... and it does not block
        assert lock.held and (d / ".lock").read_text().strip() == str(os.getpid())
        refused = subprocess.run([sys.executable, "-c", HOLDER, str(d)], cwd=ROOT, text=True,
                                 capture_output=True, stdin=subprocess.DEVNULL)
        assert refused.returncode == 3 and f"in use by pid {os.getpid()}" in refused.stdout
    assert not (d / ".lock").exists()  # a clean release removes it
    lock_run_dir(d).release()  # free again


def test_lock_twice_in_one_process_is_refused_and_release_is_idempotent(tmp_path):
    a = lock_run_dir(tmp_path)
    with pytest.raises(ConfigError, match=f"in use by pid {os.getpid()}"):
        lock_run_dir(tmp_path)
    a.release()
    a.release()
    with lock_run_dir(tmp_path):
        pass


def test_lock_with_an_empty_or_garbled_pid_file(tmp_path):
    holder = _holder(tmp_path)
    try:
        assert holder.stdout.readline().strip() == "locked"
        (tmp_path / ".lock").write_text("not a pid")  # same inode, still locked by the holder
        with pytest.raises(ConfigError, match="in use by another process"):
            lock_run_dir(tmp_path)
    finally:
        holder.kill()
        holder.wait()


# ----------------------------------------------------------------------------- best adapter
class _Kill(BaseException):
    """A kill -9 between two steps: no except clause runs (report catches Exception only)."""


class Faults:
    """Counts the filesystem steps of save_best_adapter and fails the n-th one."""

    def __init__(self, fail_at: int | None, exc: type[BaseException]):
        self.fail_at, self.exc, self.n, self.fired, self.labels = fail_at, exc, 0, False, []

    def step(self, label: str) -> None:
        self.labels.append(label)
        self.n += 1
        if self.n - 1 == self.fail_at:
            self.fired = True
            raise self.exc(errno.ENOSPC, "No space left on device") if self.exc is OSError else self.exc()


def _install(monkeypatch, faults: Faults) -> None:
    real_replace, real_rmtree, real_fsync = os.replace, shutil.rmtree, os.fsync

    def replace(src, dst, *a, **k):
        faults.step("replace")
        return real_replace(src, dst, *a, **k)

    def rmtree(path, *a, **k):
        files = sorted(p for p in Path(path).rglob("*") if p.is_file())
        try:
            faults.step("rmtree")
        except BaseException:
            if files:  # half-way through: some files are gone already
                files[0].unlink()
            raise
        return real_rmtree(path, *a, **k)

    def fsync(fd):
        faults.step("fsync")
        return real_fsync(fd)

    def checkpoint(directory, lora, step, metadata):
        d = Path(directory)
        (d / "state").mkdir(parents=True, exist_ok=True)
        faults.step("checkpoint")
        (d / "state" / "arrays.json").write_text(json.dumps(lora))
        (d / "meta.json").write_text(json.dumps({"step": step, **metadata}))

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(report, "_write_checkpoint", checkpoint)


def _export(lora, faults: Faults):
    def export(d: Path) -> Path:
        d.mkdir(parents=True)
        (d / "adapter_config.json").write_text(json.dumps({"r": 8}))
        faults.step("export")
        (d / "adapter_model.safetensors").write_text(json.dumps(lora))
        return d
    return export


def _save(run_dir: Path, ev: int, faults: Faults) -> None:
    lora = {"eval": ev}
    save_best_adapter(run_dir, lora, _export(lora, faults), {"eval": ev, "feedback": 0.1 * ev})


def _check(run_dir: Path, allowed: set) -> int | None:
    """best_adapter/ is absent or complete and self-consistent; no temporary leftovers."""
    ev = best_adapter_evaluation(run_dir)
    assert ev in allowed
    d = run_dir / "best_adapter"
    if ev is None:
        assert not d.exists()
    else:
        assert (d / "peft" / "adapter_config.json").is_file() and (d / "state").is_dir()
        # every part of it is the same evaluation's
        assert json.loads((d / "state" / "arrays.json").read_text()) == {"eval": ev}
        assert json.loads((d / "peft" / "adapter_model.safetensors").read_text()) == {"eval": ev}
        assert json.loads((d / "meta.json").read_text())["evaluation"]["eval"] == ev
    left = sorted(p.name for p in run_dir.iterdir() if p.name.startswith("."))
    assert left == [], left
    return ev


@pytest.mark.parametrize("exc", [OSError, _Kill], ids=["oserror", "kill"])
@pytest.mark.parametrize("prior", [True, False], ids=["replacing", "first"])
def test_fault_at_every_step_of_save_best_adapter(tmp_path, monkeypatch, exc, prior):
    """Fail step 0, 1, 2, ... of a save until one completes: after clean_stale (what a resume
    runs) best_adapter/ holds the old or the new evaluation, complete, and nothing else is left."""
    labels = set()
    for fail_at in range(100):
        run_dir = tmp_path / f"{fail_at}"
        run_dir.mkdir()
        with monkeypatch.context() as m:
            _install(m, Faults(None, OSError))
            if prior:
                _save(run_dir, 1, Faults(None, OSError))
            faults = Faults(fail_at, exc)
            _install(m, faults)
            try:
                _save(run_dir, 2, faults)
                returned = True
            except (OSError, _Kill):
                assert faults.fired
                returned = False
        labels.update(faults.labels)
        if returned and faults.fired:  # only removing the replaced adapter may fail unnoticed
            assert faults.labels[-1] == "rmtree"
        if not returned and exc is OSError:  # cleaned at once, before any resume
            assert not (run_dir / ".best_adapter.tmp").exists()
        assert clean_stale(run_dir) is not None
        ev = _check(run_dir, {1, 2} if prior else {None, 2})
        if returned:
            assert ev == 2
        if not faults.fired:
            break
        with monkeypatch.context() as m:  # a later save, without clean_stale first, still works
            _install(m, Faults(None, OSError))
            _save(run_dir, 3, Faults(None, OSError))
        assert _check(run_dir, {3}) == 3
    else:
        pytest.fail("save_best_adapter never completed")
    assert {"checkpoint", "export", "fsync", "replace"} <= labels
    if prior:
        assert "rmtree" in labels
    assert fail_at >= 5


def test_kill_between_the_two_renames_is_repaired_by_restoring_the_old(tmp_path, monkeypatch):
    with monkeypatch.context() as m:
        _install(m, Faults(None, OSError))
        _save(tmp_path, 4, Faults(None, OSError))
    os.replace(tmp_path / "best_adapter", tmp_path / ".best_adapter.old")  # step 2 done, 3 not
    (tmp_path / ".best_adapter.tmp").mkdir()
    assert best_adapter_evaluation(tmp_path) is None
    done = clean_stale(tmp_path)
    assert any("restored best_adapter/" in line for line in done)
    assert _check(tmp_path, {4}) == 4
    assert clean_stale(tmp_path) == []


def test_best_adapter_evaluation_is_none_when_missing_or_unreadable(tmp_path):
    assert best_adapter_evaluation(tmp_path) is None
    d = tmp_path / "best_adapter"
    (d / "state").mkdir(parents=True)
    (d / "peft").mkdir()
    (d / "peft" / "adapter_config.json").write_text("{}")
    assert best_adapter_evaluation(tmp_path) is None  # no meta.json
    for bad in ["{not json", "[]", '{"evaluation": {}}', '{"evaluation": {"eval": "2"}}']:
        (d / "meta.json").write_text(bad)
        assert best_adapter_evaluation(tmp_path) is None
    (d / "meta.json").write_text('{"evaluation": {"eval": 2}}')
    assert best_adapter_evaluation(tmp_path) == 2
    (d / "peft" / "adapter_config.json").unlink()
    assert best_adapter_evaluation(tmp_path) is None  # incomplete


def test_clean_stale_removes_interrupted_json_writes(tmp_path):
    (tmp_path / "influence").mkdir()
    (tmp_path / ".tmp-abc").write_text("{")
    (tmp_path / "influence" / ".tmp-def").write_text("{")
    (tmp_path / "summary.json").write_text("{}")
    done = clean_stale(tmp_path)
    assert len(done) == 2
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["influence", "summary.json"]


def test_save_best_adapter_with_the_real_checkpoint_writer(tmp_path):
    pytest.importorskip("orbax.checkpoint")

    def export(d: Path) -> Path:
        d.mkdir(parents=True)
        (d / "adapter_config.json").write_text("{}")
        return d

    rec = {"eval": 3, "feedback": 0.5, "ratio": {"a": 1.0}}
    save_best_adapter(tmp_path, {"a": np.ones(2, np.float32)}, export, rec)
    assert best_adapter_evaluation(tmp_path) == 3
    meta = json.loads((tmp_path / "best_adapter" / "meta.json").read_text())
    assert meta == {"step": 3, "evaluation": rec}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best_adapter"]


# ------------------------------------------------------------------------- writes and disks
def _enospc(*a, **k):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("where", ["fsync", "replace", "write"])
def test_write_json_on_a_full_disk_leaves_no_temp_file(tmp_path, monkeypatch, where):
    path = tmp_path / "summary.json"
    report.write_json(path, {"v": 1})
    if where == "write":
        real_fdopen = os.fdopen

        class FullDisk:  # a file on which part of the text lands, then the disk is full
            def __init__(self, fd, *a, **k):
                self.f = real_fdopen(fd, *a, **k)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.f.close()

            def write(self, text):
                self.f.write(text[:3])
                self.f.flush()
                _enospc()

        monkeypatch.setattr(os, "fdopen", FullDisk)
    else:
        monkeypatch.setattr(os, where, _enospc)
    with pytest.raises(OSError) as e:
        report.write_json(path, {"v": 2})
    monkeypatch.undo()
    assert e.value.errno == errno.ENOSPC
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]
    assert json.loads(path.read_text()) == {"v": 1}


def test_write_json_of_something_unserialisable_writes_nothing(tmp_path):
    with pytest.raises(TypeError):
        report.write_json(tmp_path / "x.json", {"v": object()})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("where", ["write", "fsync"])
def test_append_history_on_a_full_disk_leaves_no_partial_line(tmp_path, monkeypatch, where):
    report.append_history(tmp_path, {"eval": 0, "feedback": 0.5})
    before = (tmp_path / "history.jsonl").read_bytes()
    real_write = os.write

    def half_write(fd, data):  # part of the line reaches the file, then the disk is full
        real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, where, half_write if where == "write" else _enospc)
    with pytest.raises(OSError):
        report.append_history(tmp_path, {"eval": 1, "feedback": 0.7, "pad": "x" * 100})
    monkeypatch.undo()
    assert (tmp_path / "history.jsonl").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["history.jsonl"]
    report.append_history(tmp_path, {"eval": 1, "feedback": 0.7})
    assert [r["eval"] for r in report.read_history(tmp_path)] == [0, 1]


def test_read_history_repairs_a_torn_last_line_atomically(tmp_path):
    (tmp_path / "history.jsonl").write_text('{"eval": 0}\n{"eval": 1, "feedb')
    assert report.read_history(tmp_path) == [{"eval": 0}]
    assert (tmp_path / "history.jsonl").read_text() == '{"eval": 0}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["history.jsonl"]


def test_check_writable(tmp_path):
    check_writable(tmp_path / "new" / "run")  # created
    assert (tmp_path / "new" / "run").is_dir() and list((tmp_path / "new" / "run").iterdir()) == []
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match="cannot create the run directory .*afile/run") as e:
        check_writable(tmp_path / "afile" / "run")
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="exists and is not a directory"):
        check_writable(tmp_path / "afile")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_check_writable_read_only(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(ConfigError, match="is not writable: Permission denied"):
            check_writable(ro)
        with pytest.raises(ConfigError, match="cannot create the run directory"):
            check_writable(ro / "run")
    finally:
        ro.chmod(0o755)


def test_check_writable_when_writing_fails(tmp_path, monkeypatch):
    """What a read-only mount or a full disk gives (as root, chmod alone cannot show it)."""
    monkeypatch.setattr(os, "write", lambda fd, data: _enospc())
    with pytest.raises(ConfigError, match=r"is not writable: No space left on device; choose another --out_dir"):
        check_writable(tmp_path)
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []
