"""The run directory: what a DUET run leaves behind, written so that nothing finished is ever lost.

::

    RUN_DIR/
      config.json          the resolved configuration (a resume reads it back)
      history.jsonl        one line per evaluation, appended and fsynced as each finishes
      summary.json         best_ratio (domain -> share, sums to 1), best_feedback, uniform_feedback,
                           n_evaluations, wall_seconds, ...
      best_adapter/        the best adapter so far: orbax checkpoint (state/) and PEFT (peft/)
      influence/           resumable per-domain feature stores, scores.npy, valid.npy, summary.json,
                           scores_key.json (the fingerprint of their inputs: reused when it matches)
      best_so_far.png      best feedback against evaluations
      ratios.png           the ratio evaluated at each evaluation (stacked shares)
      .lock                held (flock) by the running process, which wrote its pid in it

Reliability rules (docs/reliability.md lists the cases):

* One run per directory: :func:`lock_run_dir` holds an exclusive ``flock`` on ``RUN_DIR/.lock`` for
  the whole run. The kernel drops it when the holder dies (even by kill -9), so a stale ``.lock``
  file never blocks a later run.
* ``best_adapter/`` is only ever replaced by renaming a complete directory over it
  (:func:`save_best_adapter`); :func:`best_adapter_evaluation` says which evaluation it holds and
  :func:`clean_stale` repairs what a kill between two renames leaves.
* JSON files are written to a temporary file and renamed; history lines are appended and fsynced;
  a failed write (a full disk) leaves neither a temporary file nor a partial line behind.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from duet_jax.errors import ConfigError

__all__ = ["init_run_dir", "read_history", "append_history", "best_of", "save_best_adapter",
           "best_adapter_evaluation", "clean_stale", "lock_run_dir", "RunLock", "check_writable",
           "summarize", "plots", "closing_table", "eval_line", "write_json", "write_npy", "atomic_write",
           "read_config"]

BEST = "best_adapter"
BEST_TMP = ".best_adapter.tmp"
BEST_OLD = ".best_adapter.old"
TMP_PREFIX = ".tmp-"
LOCK = ".lock"


def atomic_write(path: str | Path, write, mode: str = "w") -> None:
    """Call ``write(file)`` on a temporary file next to ``path``, fsync, rename it over ``path``. On
    any failure (ENOSPC, a kill signal turned into an exception) the temporary file is removed and
    the error re-raised; ``path`` keeps its old content. The one atomic writer of the package (run
    directories, trunk caches, the influence store)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=TMP_PREFIX)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text))


def write_npy(path: str | Path, array: np.ndarray) -> None:
    """Atomic ``.npy`` write (complete or absent, like :func:`write_json`)."""
    atomic_write(path, lambda f: np.save(f, array), "wb")


def write_json(path: str | Path, obj) -> None:
    """Atomic JSON write (tmp file + fsync + rename).

    Raises:
      OSError: the write failed (e.g. ENOSPC); no temporary file is left and ``path`` is unchanged.
      TypeError: ``obj`` is not JSON serialisable (nothing is written).
    """
    text = json.dumps(obj, indent=2, sort_keys=False, default=_jsonable)
    _atomic_write_text(Path(path), text)


def _jsonable(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _differing_keys(a: dict, b: dict) -> list[str]:
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def init_run_dir(run_dir: Path, config: dict, *, ignore: tuple[str, ...] = (),
                 differ: Callable[[dict, dict], list[str]] = _differing_keys) -> None:
    """Create the directory and write config.json; an existing run must have the same config
    (but for the top-level keys in ``ignore``: where things are written, not what is computed).
    ``differ(old, new)``: the differing top-level keys, when "the same" is more than equal dicts
    (the run config's :func:`duet_jax.config.config_diff`)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.json"
    if path.exists():
        old = json.loads(path.read_text())
        new = json.loads(json.dumps(config))
        diff = [k for k in differ(old, new) if k not in ignore]
        if diff:
            raise ConfigError(
                f"{run_dir} holds a run with another configuration (differs in {diff}); resume it "
                "with --resume, or choose another --out_dir")
        return
    write_json(path, config)


def read_config(run_dir: str | Path) -> dict:
    path = Path(run_dir) / "config.json"
    if not path.exists():
        raise ConfigError(f"{run_dir} is not a duet-jax run directory (no config.json)")
    return json.loads(path.read_text())


def read_history(run_dir: Path) -> list[dict]:
    """Finished evaluations. A torn last line (a kill mid-write) is dropped and the file repaired."""
    path = run_dir / "history.jsonl"
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # the write was interrupted: that evaluation did not finish
                _atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in out))
                break
            raise ConfigError(f"{path}:{i + 1}: corrupt history line") from None
    for j, r in enumerate(out):
        if r.get("eval") != j:
            raise ConfigError(f"{path}: evaluation {j} is recorded as {r.get('eval')}")
    return out


def append_history(run_dir: Path, record: dict) -> None:
    """Append one evaluation to history.jsonl and fsync it.

    Raises:
      OSError: the write or the fsync failed (e.g. ENOSPC); the file is cut back to its length
        before the call, so no partial line is left, and the record counts as not written.
    """
    line = (json.dumps(record, default=_jsonable) + "\n").encode()
    fd = os.open(Path(run_dir) / "history.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                 0o644)
    try:
        start = os.fstat(fd).st_size
        try:
            view = memoryview(line)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, start)
            raise
    finally:
        os.close(fd)


def best_of(history: list[dict]) -> dict | None:
    ok = [r for r in history if r.get("feedback") is not None]
    return max(ok, key=lambda r: r["feedback"]) if ok else None


def _write_checkpoint(directory: Path, lora, step: int, metadata: dict) -> None:
    from duet_jax.train.checkpoint import save_checkpoint

    save_checkpoint(directory, lora, step=step, metadata=metadata)


def _complete(d: Path) -> bool:
    """An adapter directory with everything :func:`save_best_adapter` writes."""
    return ((d / "meta.json").is_file() and (d / "state").is_dir()
            and (d / "peft" / "adapter_config.json").is_file())


def save_best_adapter(run_dir: Path, lora, export_peft: Callable[[Path], Path], record: dict) -> None:
    """Replace ``best_adapter/`` with this adapter (orbax ``state/``, PEFT ``peft/``, ``meta.json``).

    The steps, in order::

        0. clean_stale(run_dir)                      what an earlier kill left
        1. .best_adapter.tmp/ <- state/, peft/, then meta.json (the evaluation record) last
        2. best_adapter/  -> .best_adapter.old/      (rename; skipped when there is none)
        3. .best_adapter.tmp/ -> best_adapter/       (rename)
        4. remove .best_adapter.old/

    So ``best_adapter/`` is always absent or complete, and its ``meta.json`` says which evaluation
    it holds (:func:`best_adapter_evaluation`). A kill between 2 and 3 leaves only
    ``.best_adapter.old/``, which :func:`clean_stale` puts back. On an error (a full disk) the
    partial state is cleaned the same way at once (the previous best adapter stays) and the error
    re-raised; a failure of step 4 alone is not an error (the new adapter is in place; the next
    :func:`clean_stale` removes the leftover).

    Raises:
      OSError: writing the new adapter failed (or so did the checkpoint writer or ``export_peft``
        with another exception, re-raised as is); ``best_adapter/`` holds the previous one (or none).
    """
    run_dir = Path(run_dir)
    final, tmp, old = run_dir / BEST, run_dir / BEST_TMP, run_dir / BEST_OLD
    clean_stale(run_dir)
    meta = {"step": int(record["eval"]), "evaluation": record}
    try:
        _write_checkpoint(tmp, lora, int(record["eval"]), {"evaluation": record})
        export_peft(tmp / "peft")
        write_json(tmp / "meta.json", meta)
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
    except Exception:  # a kill (or Ctrl-C) skips this; clean_stale on resume does the same
        with contextlib.suppress(OSError):
            clean_stale(run_dir)
        raise
    with contextlib.suppress(OSError):
        if old.exists():
            shutil.rmtree(old)


def best_adapter_evaluation(run_dir: str | Path) -> int | None:
    """The evaluation (its ``eval`` index) that ``RUN_DIR/best_adapter/`` holds, from its
    ``meta.json``; ``None`` when there is no best adapter, it is incomplete (no ``state/``, no
    ``peft/adapter_config.json``), or its ``meta.json`` is missing or unreadable. A resume compares
    this with the history's best and re-runs that evaluation when they differ."""
    d = Path(run_dir) / BEST
    if not _complete(d):
        return None
    try:
        ev = json.loads((d / "meta.json").read_text())["evaluation"]["eval"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return ev if isinstance(ev, int) and not isinstance(ev, bool) else None


def clean_stale(run_dir: str | Path) -> list[str]:
    """Repair what a kill (or a failed write) left in a run directory; call it holding the lock.

    * ``.best_adapter.old/`` with no complete ``best_adapter/``: renamed back to ``best_adapter/``
      (it is the last good one; a kill came between the two renames of :func:`save_best_adapter`);
      otherwise removed.
    * ``.best_adapter.tmp/``: removed (an adapter that was never put in place).
    * ``.tmp-*`` files of interrupted JSON writes, in the directory and its subdirectories one
      level down (``influence/``): removed.

    Returns:
      One line per thing done (empty when there was nothing to do), for the log.

    Raises:
      OSError: something could not be removed or renamed.
    """
    run_dir = Path(run_dir)
    final, tmp, old = run_dir / BEST, run_dir / BEST_TMP, run_dir / BEST_OLD
    done = []
    if tmp.exists():
        shutil.rmtree(tmp)
        done.append(f"removed {BEST_TMP}/ (an unfinished best-adapter write)")
    if old.exists():
        if not _complete(final) and _complete(old):
            if final.exists():
                shutil.rmtree(final)
            os.replace(old, final)
            done.append(f"restored {BEST}/ from {BEST_OLD}/ (a replacement was interrupted)")
        else:
            shutil.rmtree(old)
            done.append(f"removed {BEST_OLD}/")
    if run_dir.is_dir():
        for d in [run_dir, *(c for c in run_dir.iterdir() if c.is_dir() and not c.is_symlink())]:
            for f in d.glob(TMP_PREFIX + "*"):
                if f.is_file() or f.is_symlink():
                    f.unlink()
                    done.append(f"removed {f.relative_to(run_dir)} (an unfinished write)")
    return done


# ---------------------------------------------------------------------------------------- the lock
class RunLock:
    """An exclusive lock on a run directory (``flock`` on ``RUN_DIR/.lock``, which holds the
    holder's pid). Use :func:`lock_run_dir`, or ``with RunLock(run_dir):``.

    The kernel releases an flock when the process holding it exits, however it exits, so a
    ``.lock`` file left by a killed run does not block. The descriptor is close-on-exec (feedback
    commands do not inherit it); a child made by ``fork`` without ``exec`` shares it until it exits.
    A clean release removes the file. flock may not work across machines on some network file
    systems.
    """

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> RunLock:
        """Take the lock (creating the directory).

        Raises:
          ConfigError: another process holds it ("<dir> is in use by pid N ..."), or the directory
            cannot be created or written.
        """
        if self._fd is not None:
            return self
        check_writable(self.run_dir)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                pid = _read_pid(fd)
                os.close(fd)
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise ConfigError(f"cannot lock the run directory {self.run_dir}: {e.strerror}") from None
                who = f"pid {pid}" if pid is not None else "another process"
                raise ConfigError(f"{self.run_dir} is in use by {who} (another duet-jax run); wait for "
                                  "it or choose another --out_dir") from None
            # A holder that was releasing may have removed the file we opened: lock the one there now.
            try:
                st, now = os.fstat(fd), os.stat(self.path)
                same = (st.st_dev, st.st_ino) == (now.st_dev, now.st_ino)
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            pass  # the lock holds without the pid; a second run then says "another process"
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)  # while still holding it (see acquire)
        with contextlib.suppress(OSError):
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self):  # pragma: no cover - a safety net; the process exit releases it anyway
        with contextlib.suppress(Exception):
            self.release()


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None


def lock_run_dir(run_dir: str | Path) -> RunLock:
    """Lock ``run_dir`` for this process and return the held lock (a context manager: leaving it
    releases the lock). Hold it for the whole run, from before the first write.

    Raises:
      ConfigError: ``"<dir> is in use by pid N (another duet-jax run); wait for it or choose another
        --out_dir"``, or the directory cannot be created or written (see :func:`check_writable`).
    """
    return RunLock(run_dir).acquire()


def check_writable(run_dir: str | Path) -> None:
    """Create ``run_dir`` if needed and check that a file can be written in it.

    Raises:
      ConfigError: one line naming the directory and the reason (read-only, permission denied, a
        file in the way, no space).
    """
    run_dir = Path(run_dir)
    hint = "choose another --out_dir"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ConfigError(f"the run directory {run_dir} exists and is not a directory; {hint}") from None
    except OSError as e:
        raise ConfigError(f"cannot create the run directory {run_dir}: {e.strerror or e}; {hint}") from None
    if not run_dir.is_dir():
        raise ConfigError(f"the run directory {run_dir} exists and is not a directory; {hint}")
    try:
        fd, probe = tempfile.mkstemp(dir=run_dir, prefix=TMP_PREFIX + "writable-")
        try:
            os.write(fd, b"ok")
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        raise ConfigError(f"the run directory {run_dir} is not writable: {e.strerror or e}; {hint}") from None


def summarize(run_dir: Path, history: list[dict], names: list[str], wall: float, extra=None, *,
              write: bool = True) -> dict:
    best = best_of(history)
    uniform = next((r for r in history if r["phase"] == "warm" and r["eval"] == 0), None)
    best_ratio = None
    if best is not None:
        r = np.asarray([best["ratio"][n] for n in names], np.float64)
        best_ratio = dict(zip(names, (r / r.sum()).tolist(), strict=True))
    summary = {
        "best_ratio": best_ratio,
        "best_feedback": None if best is None else best["feedback"],
        "best_evaluation": None if best is None else best["eval"],
        "uniform_feedback": None if uniform is None else uniform["feedback"],
        "n_evaluations": len(history),
        "n_failed": sum(1 for r in history if r["failed"]),
        "wall_seconds": round(wall, 2),
        "domains": names,
        **(extra or {}),
    }
    if write:
        write_json(run_dir / "summary.json", summary)
    return summary


def plots(run_dir: Path, history: list[dict], names: list[str]) -> None:
    if not history:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ys = [r["feedback"] for r in history]
    best, cur = [], None
    for y in ys:
        if y is not None and (cur is None or y > cur):
            cur = y
        best.append(np.nan if cur is None else cur)
    x = np.arange(1, len(ys) + 1)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(x, [np.nan if y is None else y for y in ys], "o", alpha=0.5, label="feedback (best of k)")
    ax.step(x, best, where="post", label="best so far")
    n_warm = sum(1 for r in history if r["phase"] == "warm")
    ax.axvline(n_warm + 0.5, color="gray", ls=":", label="end of warm start")
    ax.set_xlabel("evaluation")
    ax.set_ylabel("feedback")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(run_dir / "best_so_far.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7.5, 3.5))
    bottom = np.zeros(len(history))
    for n in names:
        share = np.asarray([r["ratio"][n] for r in history])
        ax.bar(x, share, bottom=bottom, label=n)
        bottom += share
    ax.set_xlabel("evaluation")
    ax.set_ylabel("share of the mixture")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(run_dir / "ratios.png", dpi=110)
    plt.close(fig)


def _fmt(v) -> str:
    return "failed" if v is None else f"{v:.4f}"


def eval_line(rec: dict, names: list[str], best: dict | None) -> str:
    ratio = " ".join(f"{n}={rec['ratio'][n]:.2f}" for n in names)
    return (f"[{rec['phase']} {rec['round']:>2}] eval {rec['eval']:>3}: feedback {_fmt(rec['feedback'])}"
            f"  (best {_fmt(None if best is None else best['feedback'])})  {ratio}  {rec['time_s']:.1f}s")


def closing_table(summary: dict, names: list[str]) -> str:
    method = summary.get("method") or "duet_if"
    label = f"{method} best" + (" (oracle)" if summary.get("oracle") else "")
    w = max(len(n) for n in names + ["uniform mixture", label])
    lines = ["", f"result of {method}", "-" * (w + 24)]
    if summary["uniform_feedback"] is not None:
        lines.append(f"{'uniform mixture':<{w}}  feedback {_fmt(summary['uniform_feedback'])}")
    lines += [f"{label:<{w}}  feedback {_fmt(summary['best_feedback'])}"
              f"  (evaluation {summary['best_evaluation']})"]
    if summary.get("feedback_std") is not None:
        lines.append(f"{'all evaluations':<{w}}  mean {summary['feedback_mean']:.4f}, "
                     f"std {summary['feedback_std']:.4f}")
    lines += ["-" * (w + 24), "best ratio:"]
    if summary["best_ratio"]:
        for n in names:
            s = summary["best_ratio"][n]
            lines.append(f"  {n:<{w}} {s:6.3f}  {'#' * int(round(s * 30))}")
    proxy = summary.get("proxy_finetunes")
    extra = f", plus {proxy} proxy fine-tune(s)" if proxy else ""
    lines.append(f"{summary['n_evaluations']} evaluations ({summary['n_failed']} failed){extra} in "
                 f"{summary['wall_seconds']:.0f} s")
    return "\n".join(lines)
