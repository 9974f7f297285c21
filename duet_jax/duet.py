"""The loop (Algorithm 1 of the paper), for every method of :mod:`duet_jax.loop.methods`.

::

    plan the data, check the feedback source          (nothing loaded, nothing written yet)
    lock the run directory, write config.json          (RunShell)
    prepare the model, pool and trunk cache once       (Setting)
    selector weights inside each domain                (IF / uniform / remove-harmful / LESS)
    proposer of ratios                                 (BO / random / fixed; proxy runs first)
    for each evaluation t = 1 .. warm_start + rounds:
        r_t = proposer.ask()                           (global step)
        k mixtures of r_t -> k fine-tunes -> k feedbacks, best of k   (local step)
        history <- r_t, feedback; proposer.tell(r_t, feedback)
    best ratio, its adapter, summary, plots

The pieces live in ``duet_jax/loop/``: ``setting.py`` (preparation), ``selectors.py``,
``proposers.py``, ``proxies.py`` (the baselines' proxy runs), ``local_step.py``, ``feedback.py`` and
``shell.py`` (run directory, history, resume, best adapter). Every evaluation ``i`` draws its keys
from its own seed, and a resume replays the history through the proposer, so a resumed run ends
exactly like an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np

from duet_jax import report
from duet_jax.loop.feedback import export_adapter, make_feedback
from duet_jax.loop.local_step import LocalStep
from duet_jax.loop.methods import METHODS
from duet_jax.loop.proposers import BOProposer, FixedRatio, RandomSearch
from duet_jax.loop.selectors import selector_weights
from duet_jax.loop.setting import LeakError, Setting, check_no_leak, plan_data
from duet_jax.loop.shell import Progress, RunShell

__all__ = ["LeakError", "check_no_leak", "make_proposer", "run"]


def run(config, run_dir: str | Path | None = None, *, log: Callable[[str], None] = print,
        progress: bool = True) -> dict:
    """Run ``config.method`` in ``run_dir`` (new, or resumed where it stopped); the summary."""
    run_dir = Path(run_dir or config.out_dir or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S")))
    if jax.process_index() != 0:  # multi-host: every process runs the loop, process 0 speaks
        log, progress = (lambda s: None), False
    method = METHODS[config.method]
    plan = plan_data(config, log)  # domains, splits, leak check: before anything is written
    feedback = make_feedback(config)  # a bad command or callable fails here, before any training
    with RunShell(run_dir, config, log=log) as shell:
        bar = Progress(progress)
        setting = Setting.build(config, plan, run_dir, log=log, progress=bar.update)
        feedback.prepare(setting)
        weights, sampling = selector_weights(config.selector.kind or method.selector, setting, config.selector)
        proposer, proxy = make_proposer(method, setting, run_dir)
        bar.close()
        step = LocalStep(setting, weights, feedback, divergence_check=config.divergence_check)
        export = lambda lora, d: export_adapter(setting, lora, d)
        shell.repair_best_adapter(lambda rec: step(_ratio(rec, setting.names), rec["eval"], rec["round"],
                                                   rec["phase"]), export)
        bar = Progress(progress, total=config.evaluations, desc=f"evaluations ({method.name})")
        bar.advance(len(shell.history))
        for i in range(config.evaluations):
            phase, rnd = ("warm", 0) if i < config.warm_start else ("round", i - config.warm_start + 1)
            ratio = proposer.ask()  # the global step
            if i < len(shell.history):  # finished before a kill: replay it
                proposer.tell(*shell.replay(i, setting.names, ratio))
                continue
            ev = step(ratio, i, rnd, phase)  # the local step: k mixtures -> k fine-tunes -> k feedbacks
            shell.record(ev, export)
            proposer.tell(_ratio(ev.record, setting.names), ev.feedback)
            bar.advance(1, report.eval_line(ev.record, setting.names, shell.best))
        bar.close()
        summary = shell.finish(setting.names, {
            "method": method.name, "oracle": method.oracle, "uses_feedback": method.uses_feedback,
            "selector": config.selector.kind or method.selector,
            "proxy_finetunes": int(proxy.get("proxy_finetunes", 0)), "proxy": proxy or None,
            "influence": sampling or None, "metric": feedback.name, "target": config.target,
            "mode": config.mode})
    log(report.closing_table(summary, setting.names))
    return summary


def _ratio(rec: dict, names: list[str]) -> np.ndarray:
    return np.asarray([rec["ratio"][n] for n in names], np.float64)


def make_proposer(method, setting, run_dir: Path):
    """The method's proposer; proxy-based methods run their proxies first (once: the answer is
    kept in ``RUN_DIR/proxy.json`` and reused on resume)."""
    from duet_jax.config import config_hash

    cfg = setting.config
    n = setting.n_domains
    caps = setting.caps
    if method.proposer == "bo":
        return BOProposer(n, warm_start=cfg.warm_start, seed=cfg.seed, config=cfg.bo, caps=caps), {}
    if method.proposer == "random":
        return RandomSearch(n, seed=cfg.seed, caps=caps), {}
    if method.proposer == "uniform":
        return FixedRatio(np.full(n, 1.0 / n), caps), {}
    from duet_jax.loop.proxies import run_proxy
    from duet_jax.sharding import broadcast_json, is_primary

    path = Path(run_dir) / "proxy.json"
    h = config_hash(cfg)
    saved = broadcast_json(json.loads(path.read_text()) if is_primary() and path.exists() else None)
    if saved is not None:
        if saved.get("config_hash") == h:
            setting.log(f"{method.name}: proxy ratio read back from {path}")
            return FixedRatio(saved["ratio"], caps), saved["info"]
    t = time.time()
    ratio, info = run_proxy(method.proposer, setting, cfg.baselines,
                            jax.random.fold_in(jax.random.key(cfg.seed), 2 * 10**6))
    info = {**info, "proxy_seconds": round(time.time() - t, 2)}
    if is_primary():
        report.write_json(path, {"config_hash": h, "ratio": ratio.tolist(), "info": info})
    setting.log(f"{method.name}: {info['proxy_finetunes']} proxy fine-tune(s) in {info['proxy_seconds']:.1f} s "
                "-> ratio " + ", ".join(f"{nm} {s:.3f}" for nm, s in zip(setting.names, ratio, strict=True)))
    return FixedRatio(ratio, caps), info
