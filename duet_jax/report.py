"""The run directory: what a DUET run leaves behind, written so that nothing finished is ever lost.

::

    RUN_DIR/
      config.json          the resolved configuration (a resume reads it back)
      history.jsonl        one line per evaluation, appended and fsynced as each finishes
      summary.json         best_ratio (domain -> share, sums to 1), best_feedback, uniform_feedback,
                           n_evaluations, wall_seconds, ...
      best_adapter/        the best adapter so far: orbax checkpoint (state/) and PEFT (peft/)
      influence/           resumable per-domain feature stores, scores.npy, summary.json
      best_so_far.png      best feedback against evaluations
      ratios.png           the ratio evaluated at each evaluation (stacked shares)
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from duet_jax.errors import ConfigError

__all__ = ["init_run_dir", "read_history", "append_history", "best_of", "save_best_adapter",
           "summarize", "plots", "closing_table", "eval_line", "write_json", "read_config"]


def write_json(path: str | Path, obj) -> None:
    """Atomic JSON write (tmp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False, default=_jsonable)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _jsonable(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def init_run_dir(run_dir: Path, config: dict) -> None:
    """Create the directory and write config.json; an existing run must have the same config."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.json"
    if path.exists():
        old = json.loads(path.read_text())
        if old != json.loads(json.dumps(config)):
            diff = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
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
                path.write_text("".join(json.dumps(r) + "\n" for r in out))
                break
            raise ConfigError(f"{path}:{i + 1}: corrupt history line") from None
    for j, r in enumerate(out):
        if r.get("eval") != j:
            raise ConfigError(f"{path}: evaluation {j} is recorded as {r.get('eval')}")
    return out


def append_history(run_dir: Path, record: dict) -> None:
    with open(run_dir / "history.jsonl", "a") as f:
        f.write(json.dumps(record, default=_jsonable) + "\n")
        f.flush()
        os.fsync(f.fileno())


def best_of(history: list[dict]) -> dict | None:
    ok = [r for r in history if r.get("feedback") is not None]
    return max(ok, key=lambda r: r["feedback"]) if ok else None


def save_best_adapter(run_dir: Path, lora, export_peft: Callable[[Path], Path], record: dict) -> None:
    """Replace best_adapter/ atomically with this adapter (orbax state + PEFT export)."""
    from duet_jax.train.checkpoint import save_checkpoint

    final = run_dir / "best_adapter"
    tmp = run_dir / ".best_adapter.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    save_checkpoint(tmp, lora, step=int(record["eval"]), metadata={"evaluation": record})
    export_peft(tmp / "peft")
    old = run_dir / ".best_adapter.old"
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)


def summarize(run_dir: Path, history: list[dict], names: list[str], wall: float, extra=None) -> dict:
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
    w = max(len(n) for n in names + ["uniform mixture"])
    lines = ["", "DUET result", "-" * (w + 24),
             f"{'uniform mixture':<{w}}  feedback {_fmt(summary['uniform_feedback'])}",
             f"{'DUET best':<{w}}  feedback {_fmt(summary['best_feedback'])}"
             f"  (evaluation {summary['best_evaluation']})",
             "-" * (w + 24), "best ratio:"]
    if summary["best_ratio"]:
        for n in names:
            s = summary["best_ratio"][n]
            lines.append(f"  {n:<{w}} {s:6.3f}  {'#' * int(round(s * 30))}")
    lines.append(f"{summary['n_evaluations']} evaluations ({summary['n_failed']} failed) in "
                 f"{summary['wall_seconds']:.0f} s")
    return "\n".join(lines)
