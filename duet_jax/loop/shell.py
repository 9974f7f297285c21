"""The run shell: everything around the loop that makes a run safe to kill and to trust.

* one run per directory: the directory is locked for the whole run (a second run on it gets
  "in use by pid N");
* ``config.json`` is written once; every history record carries the config's hash, so a resume
  with an edited config (or one naming other domains) is refused instead of mixing two runs;
* ``history.jsonl`` is the source of truth, appended and fsynced as each evaluation finishes; a
  resume replays it through the proposer (same asks for the same tells);
* ``best_adapter/`` always holds the history's best evaluation: it is written after the history
  line, and a resume that finds it holding another evaluation (a kill in between, a full disk)
  re-runs that evaluation (deterministic: its keys come from its recorded seed) and puts it there;
* ``summary.json``, plots and the closing table at the end;
* several processes (multi-host): every process runs the loop (the programs are collectives), process
  0 alone locks and writes the directory, and the others receive its history by broadcast (no shared
  file system needed).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from duet_jax import report
from duet_jax.errors import ConfigError

__all__ = ["Progress", "RunShell"]


class RunShell:
    """``with RunShell(run_dir, config) as shell:`` locks, initialises or reopens the directory."""

    def __init__(self, run_dir: str | Path, config, *, log: Callable[[str], None] = print):
        from duet_jax.config import config_hash, to_dict
        from duet_jax.sharding import is_primary

        self.dir = Path(run_dir)
        self.config = config
        self.values = to_dict(config)
        self.hash = config_hash(config)
        self.log = log
        self.history: list[dict] = []
        self.t0 = time.time()
        self._lock = None
        self._have_best: int | None = None
        #: multi-host: process 0 alone locks and writes the run directory; the others get its state
        #: (history, which evaluation best_adapter/ holds) by broadcast and keep the history in memory
        self.primary = is_primary()

    # ------------------------------------------------------------------ open / close
    def __enter__(self) -> RunShell:
        from duet_jax.sharding import broadcast_json

        state, exc = None, None
        if self.primary:
            try:
                self._open()
                state = {"history": self.history, "best_adapter": report.best_adapter_evaluation(self.dir)}
            except BaseException as e:  # the other processes must not wait for a state that never comes
                exc, state = e, {"error": f"{type(e).__name__}: {e}"}
        state = broadcast_json(state)
        if exc is not None:
            raise exc
        if "error" in state:
            raise ConfigError(f"process 0 could not open the run directory: {state['error']}")
        self.history, self._have_best = state["history"], state["best_adapter"]
        if self.history:
            self.log(f"resuming {self.dir}: {len(self.history)} evaluation(s) already done")
        return self

    def _open(self) -> None:
        self._lock = report.lock_run_dir(self.dir)
        try:
            for line in report.clean_stale(self.dir):
                self.log(f"  {line}")
            from duet_jax.config import LOCATION_FIELDS, config_diff

            report.init_run_dir(self.dir, self.values, ignore=LOCATION_FIELDS, differ=config_diff)
            self.history = report.read_history(self.dir)
            self._check_history()
        except BaseException:
            self._lock.release()
            self._lock = None
            raise

    def __exit__(self, *exc) -> None:
        if self._lock is not None:
            self._lock.release()

    def _check_history(self) -> None:
        from duet_jax.data.domain import domain_name

        names = [domain_name(d) for d in self.config.domains]
        for r in self.history:
            if set(r.get("ratio", {})) != set(names):
                raise ConfigError(
                    f"{self.dir}: evaluation {r['eval']} mixes the domains {sorted(r.get('ratio', {}))}, "
                    f"but the config names {sorted(names)}; this directory holds another run")
            h = r.get("config_hash")
            if h is not None and h != self.hash:
                raise ConfigError(
                    f"{self.dir}: evaluation {r['eval']} was made with another configuration (hash {h}, "
                    f"config.json now gives {self.hash}); config.json was changed after the run started. "
                    "Restore it, or start a new run in another --out_dir")
        if len(self.history) > self.config.evaluations:
            raise ConfigError(f"{self.dir}: the history holds {len(self.history)} evaluations, more than "
                              f"the config's {self.config.evaluations}; config.json was changed")

    # ------------------------------------------------------------------ the loop's records
    def replay(self, i: int, names: list[str], proposal: np.ndarray) -> tuple[np.ndarray, float | None]:
        """The ratio and best feedback of finished evaluation ``i`` (noting a proposal that moved)."""
        rec = self.history[i]
        done = np.asarray([rec["ratio"][n] for n in names])
        if not np.allclose(done, proposal, atol=1e-6):
            self.log(f"  note: evaluation {i} replays ratio {np.round(done, 4).tolist()} "
                     f"(the proposal now is {np.round(proposal, 4).tolist()})")
        return done, rec["feedback"]

    @property
    def best(self) -> dict | None:
        return report.best_of(self.history)

    def record(self, evaluation, export: Callable) -> None:
        """Append the evaluation to the history, then (if it is the new best) put its best adapter
        in ``best_adapter/``: in that order, so a kill between leaves a state the next resume
        repairs, never a wrong adapter that looks right."""
        rec = {**evaluation.record, "config_hash": self.hash}
        before = self.best
        if self.primary:
            report.append_history(self.dir, rec)
        self.history.append(rec)
        if rec["feedback"] is not None and (before is None or rec["feedback"] > before["feedback"]):
            self._save_best(rec, evaluation.loras, export)

    def _save_best(self, rec: dict, loras, export: Callable) -> None:
        import jax

        from duet_jax.sharding import gather_tree

        lo = jax.tree.map(lambda a, j=rec["best_of_k"]: a[j], gather_tree(loras))  # every process
        if self.primary:
            report.save_best_adapter(self.dir, lo, lambda d, lo=lo: export(lo, d), rec)
        self._have_best = int(rec["eval"])

    def repair_best_adapter(self, rerun: Callable[[dict], object], export: Callable) -> None:
        """Make ``best_adapter/`` hold the history's best evaluation, re-running it if needed."""
        best = self.best
        have = self._have_best
        if best is None or have == best["eval"]:
            return
        self.log(f"  best_adapter/ holds evaluation {have}, the history's best is {best['eval']}: "
                 "re-running that evaluation to restore its adapter")
        ev = rerun(best)
        got = ev.record["feedback"]
        if got is None or not math.isclose(got, best["feedback"], rel_tol=1e-4, abs_tol=1e-6):
            raise ConfigError(
                f"{self.dir}: re-running evaluation {best['eval']} gave feedback {got}, the history says "
                f"{best['feedback']}; the run is not reproducible here (another backend or version?). "
                "best_adapter/ is left as it is")
        self._save_best({**best}, ev.loras, export)

    # ------------------------------------------------------------------ the end
    def finish(self, names: list[str], extra: dict) -> dict:
        hist = self.history
        ok = [r["feedback"] for r in hist if r["feedback"] is not None]
        first = hist[0] if hist else None
        uniform = None
        if first is not None and np.allclose([first["ratio"][n] for n in names], 1.0 / len(names), atol=1e-9):
            uniform = first["feedback"]
        summary = report.summarize(self.dir, hist, names, time.time() - self.t0, extra={
            "uniform_feedback": uniform,
            "feedback_evaluations": len(hist),
            "feedback_mean": float(np.mean(ok)) if ok else None,
            "feedback_std": float(np.std(ok, ddof=1)) if len(ok) > 1 else None,
            "config_hash": self.hash,
            **extra,
        }, write=self.primary)
        if self.primary:
            report.plots(self.dir, hist, names)
        return summary


class Progress:
    """A tqdm progress bar on stderr when enabled, plain lines otherwise."""

    def __init__(self, enabled: bool, total: int | None = None, desc: str = "influence"):
        import jax

        self.silent = jax.process_index() != 0  # multi-host: process 0 speaks
        self.enabled = enabled and not self.silent
        self.bar = None
        self.total = total
        self.desc = desc

    def _ensure(self, total):
        if self.enabled and self.bar is None:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=self.desc, leave=False, dynamic_ncols=True)

    def update(self, name: str, done: int, total: int):
        """The influence step's callback: ``(domain, chunks done, chunks)``; without a bar, one
        line on stderr per finished domain (the step can take many minutes)."""
        if self.silent:
            return
        if not self.enabled:
            if done == total:
                import sys

                print(f"  influence {name}: {total} chunk(s) featurized", file=sys.stderr, flush=True)
            return
        self._ensure(total)
        if self.bar is not None:
            self.bar.total = total
            self.bar.n = done
            self.bar.set_description(f"influence {name}")
            self.bar.refresh()

    def advance(self, n: int, line: str | None = None):
        if self.silent:
            return
        self._ensure(self.total)
        if self.bar is not None:
            self.bar.update(n)
            if line:
                self.bar.write(line)
        elif line:
            print(line, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
