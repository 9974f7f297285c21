"""The DUET loop (Algorithm 1): warm start, then T rounds of GP proposal -> k IF-weighted mixtures
-> k LoRA fine-tunes (one vmapped call) -> k feedbacks -> best of k -> GP data.

Everything a run produces lives in its run directory (:mod:`duet_jax.report`); ``history.jsonl``
is the source of truth. Every evaluation ``i`` draws its keys from ``fold_in(seed, i)`` and the BO
is replayed from the history on resume, so a resumed run ends exactly like an uninterrupted one.

The unseen task never leaks into training: in ``ood`` mode its domain is not in the pool; in
``in_domain`` mode only its train split is, and it is scored on its disjoint evaluation split.
:func:`check_no_leak` verifies this on the actual examples before any training.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from duet_jax import report
from duet_jax.config import RunConfig, to_dict
from duet_jax.data import (
    Domain,
    EncodeConfig,
    Example,
    SplitSpec,
    encode_examples,
    get_domain,
    get_domains,
    load_tokenizer,
)
from duet_jax.errors import ConfigError, DuetError, FeedbackError
from duet_jax.feedback import CallableFeedback, CommandFeedback, FeedbackRequest
from duet_jax.mixture import (
    if_weights,
    ratio_to_counts,
    remove_harmful_weights,
    sample_mixtures,
    uniform_weights,
)
from duet_jax.train import (
    TrainConfig,
    answer_loss,
    build_mc_set,
    build_pool,
    finetune_many,
    generation_match,
    multiple_choice,
    split_model,
    trunk_hidden,
    trunk_start,
)

__all__ = ["Duet", "LeakError", "check_no_leak", "run"]


class LeakError(DuetError):
    """The unseen task's evaluation data would enter the training pool or the influence step."""


def _size(v):
    return int(v) if float(v) >= 1 else float(v)


def check_no_leak(pool_examples: list[Example], influence_examples: list[Example],
                  eval_examples: list[Example]) -> None:
    """Raise :class:`LeakError` when an evaluation example (by id or normalised prompt) is in the
    pool or in the influence validation sets."""
    ev_ids = {e.id for e in eval_examples}
    ev_keys = {e.key for e in eval_examples}
    for where, exs in (("training pool", pool_examples), ("influence step", influence_examples)):
        bad = [e.id for e in exs if e.id in ev_ids or e.key in ev_keys]
        if bad:
            raise LeakError(
                f"{len(bad)} example(s) of the unseen task's evaluation set are in the {where} "
                f"(e.g. {bad[:3]}); DUET must never train or compute influence on them")


def _sel(examples: list[Example], n: int, salt: str) -> list[Example]:
    """A deterministic subset of ``n`` examples (by a hash of their ids, not by row order)."""
    if n <= 0 or n >= len(examples):
        return list(examples)
    key = lambda e: hashlib.sha256(f"{salt}|{e.id}".encode()).hexdigest()
    return sorted(examples, key=key)[:n]


@dataclasses.dataclass
class Prepared:
    names: list[str]
    pool: Any
    domain_of: np.ndarray
    pool_examples: list[Example]
    graphdef: Any
    lora0: Any
    frozen: Any
    start: int
    tokenizer: Any
    encode: EncodeConfig
    target_examples: list[Example]
    target_mc: Any = None
    target_pool: Any = None
    weights: Any = None
    influence: dict | None = None
    available: np.ndarray | None = None


class Duet:
    """One DUET run in a run directory (new or resumed)."""

    def __init__(self, config: RunConfig, run_dir: str | Path, *, log: Callable[[str], None] = print,
                 progress: bool = True):
        self.config = config
        self.dir = Path(run_dir)
        self.log = log
        self.progress = progress
        self.t0 = time.time()

    # ------------------------------------------------------------------------------ preparation
    def _domains(self) -> tuple[list[Domain], Domain]:
        cfg = self.config
        domains = get_domains(list(cfg.domains))
        target = get_domain(cfg.target)
        if cfg.mode == "ood" and target.name in [d.name for d in domains]:
            raise ConfigError(f"the target {target.name!r} is also in the pool; ood mode leaves it out")
        if cfg.mode == "in_domain" and target.name not in [d.name for d in domains]:
            raise ConfigError(f"in_domain mode needs the target {target.name!r} among the domains")
        return domains, target

    def prepare(self, *, target: bool = True) -> Prepared:
        """Splits, the encoded pool (and its frozen-trunk cache), the IF weights and, with
        ``target=True``, the unseen task's evaluation set (``duet-jax influence`` skips it)."""
        cfg = self.config
        spec = SplitSpec(validation=_size(cfg.validation), evaluation=_size(cfg.evaluation))
        domains, target = self._domains()
        names = [d.name for d in domains]
        self.log(f"domains: {', '.join(names)} | unseen task: {target.name} ({cfg.mode}, "
                 f"metric {cfg.feedback.metric})")
        splits = {d.name: d.splits(spec) for d in domains}
        tsplits = splits.get(target.name) or target.splits(spec)
        n_eval = cfg.feedback.examples
        target_examples = _sel(list(tsplits.evaluation), n_eval, f"{cfg.seed}|eval")
        train = {n: _sel(list(s.train), cfg.train_per_domain, f"{cfg.seed}|train|{n}") for n, s in splits.items()}
        val = {n: _sel(list(s.validation), cfg.influence.validation_examples, f"{cfg.seed}|val|{n}")
               for n, s in splits.items()}
        pool_examples = [e for n in names for e in train[n]]
        check_no_leak(pool_examples, [e for n in names for e in val[n]], target_examples)

        tok, model = self._model()
        enc = EncodeConfig(max_length=cfg.encode.max_length,
                           buckets=tuple(b for b in (32, 64, 128, 256, 512) if b < cfg.encode.max_length),
                           chat_template=cfg.encode.chat_template, system_prompt=cfg.encode.system_prompt)
        toks = [encode_examples(train[n], tok, enc) for n in names]
        for n, t in zip(names, toks, strict=True):
            if len(t) == 0:
                raise ConfigError(f"domain {n!r}: no training example fits max_length={enc.max_length}")
            if t.skipped:
                self.log(f"  {n}: {len(t.skipped)} example(s) skipped (answer longer than max_length)")
        kept = {n: set(t.ids) for n, t in zip(names, toks, strict=True)}
        pool_examples = [e for n in names for e in train[n] if e.id in kept[n]]
        pool, domain_of = build_pool(toks)
        graphdef, lora0, frozen = split_model(model)
        start = trunk_start(model)
        self.log(f"pool: {len(pool)} examples x {pool.length} tokens; LoRA from layer {start} of "
                 f"{model.num_layers} ({'frozen trunk cached' if start else 'full model'})")
        if start:
            t = time.time()
            pool = pool.with_hidden(trunk_hidden(graphdef, lora0, frozen, pool, start=start))
            self.log(f"  frozen trunk of the pool computed in {time.time() - t:.1f} s")
        prep = Prepared(names, pool, domain_of, pool_examples, graphdef, lora0, frozen, start, tok, enc,
                        target_examples)
        prep.available = np.bincount(domain_of, minlength=len(names))
        if target:
            self._prepare_target(prep)
        self._prepare_weights(prep, val)
        return prep

    def _model(self):
        cfg = self.config
        from flax import nnx

        from duet_jax.models import LlamaModel, LoRAConfig, ModelConfig, add_lora, load_model
        from duet_jax.models.config import PRESETS as MODEL_PRESETS

        t = time.time()
        if cfg.model in MODEL_PRESETS:  # a random tiny model: tests and smoke runs
            from duet_jax.testing import tiny_tokenizer

            tok = tiny_tokenizer(chat=True)
            mcfg = ModelConfig.preset(cfg.model, vocab_size=len(tok))
            model = LlamaModel(mcfg, rngs=nnx.Rngs(cfg.seed))
        else:
            tok = load_tokenizer(cfg.model)
            model = load_model(cfg.model, dtype=cfg.dtype)
        lcfg = LoRAConfig(rank=cfg.lora.rank, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
                          targets=tuple(cfg.lora.targets), last_layers=cfg.lora.last_layers)
        add_lora(model, lcfg, rngs=nnx.Rngs(cfg.seed + 1))
        self.log(f"model {cfg.model}: {model.num_layers} layers, loaded in {time.time() - t:.1f} s")
        return tok, model

    def _prepare_target(self, prep: Prepared) -> None:
        cfg, m = self.config, self.config.feedback.metric
        if cfg.feedback.command or cfg.feedback.callable:
            return
        if m in ("acc", "acc_norm"):
            mc = build_mc_set(prep.target_examples, prep.tokenizer, prep.encode)
            if mc.skipped:
                self.log(f"  unseen task: {len(mc.skipped)} example(s) skipped (too long)")
            if prep.start:
                mc = dataclasses.replace(mc, pool=mc.pool.with_hidden(
                    trunk_hidden(prep.graphdef, prep.lora0, prep.frozen, mc.pool, start=prep.start)))
            prep.target_mc = mc
            self.log(f"unseen task: {len(mc.gold)} multiple-choice examples ({len(mc.pool)} choice rows)")
        elif m == "neg_loss":
            t = encode_examples(prep.target_examples, prep.tokenizer, prep.encode)
            p, _ = build_pool(t)
            if prep.start:
                p = p.with_hidden(trunk_hidden(prep.graphdef, prep.lora0, prep.frozen, p, start=prep.start))
            prep.target_pool = p
        elif m == "exact_match":
            self.log(f"unseen task: {len(prep.target_examples)} examples scored by generation")

    def _prepare_weights(self, prep: Prepared, val: dict) -> None:
        cfg = self.config
        n_dom = len(prep.names)
        dom = jnp.asarray(prep.domain_of)
        if cfg.sampler == "uniform":
            prep.weights = uniform_weights(dom)
            return
        from duet_jax.influence.domains import domain_influence

        vtoks = [encode_examples(val[n], prep.tokenizer, prep.encode) for n in prep.names]
        vpool, vdom = build_pool(vtoks)
        if prep.start:
            vpool = vpool.with_hidden(trunk_hidden(prep.graphdef, prep.lora0, prep.frozen, vpool,
                                                   start=prep.start))
        inf = cfg.influence
        tc = self._train_config(epochs=inf.proxy_epochs)
        bar = _Bar(self.progress)
        t = time.time()
        res = domain_influence(
            graphdef=prep.graphdef, lora0=prep.lora0, frozen=prep.frozen, start=prep.start,
            pool=prep.pool, domain_of=prep.domain_of, val_pool=vpool, val_domain_of=vdom,
            names=prep.names, example_ids=[e.id for e in prep.pool_examples],
            base_model_id=f"{cfg.model}|{cfg.seed}|{json.dumps(to_dict(cfg)['lora'], sort_keys=True)}",
            train_config=tc, proxy_examples=max(inf.proxy_examples, cfg.train.batch_size),
            validation_examples=inf.validation_examples, proj_dim=inf.proj_dim,
            projector=inf.projector, curvature=inf.curvature, damping=inf.damping, seed=inf.seed,
            chunk_size=inf.chunk_size, store_root=self.dir / "influence",
            key=jax.random.fold_in(jax.random.key(cfg.seed), 10**6), progress=bar.update)
        bar.close()
        scores, valid = jnp.asarray(res.scores), jnp.asarray(res.valid)
        if cfg.sampler == "if":
            prep.weights = if_weights(scores, dom, n_dom, temperature=cfg.if_temperature, valid=valid)
        else:
            prep.weights = remove_harmful_weights(scores, dom, n_dom, cfg.harmful_fraction, valid=valid)
        from duet_jax.mixture import effective_sample_size

        ess = np.asarray(effective_sample_size(prep.weights, dom, n_dom))
        for n, e in zip(prep.names, ess, strict=True):
            res.per_domain.setdefault(n, {})["effective_sample_size"] = float(e)
        prep.influence = res.per_domain
        np.save(self.dir / "influence" / "scores.npy", res.scores)
        report.write_json(self.dir / "influence" / "summary.json", res.per_domain)
        self.log(f"influence scores for {len(prep.names)} domains in {time.time() - t:.1f} s; sampling "
                 "ESS/N: " + ", ".join(f"{n} {e:.3f}" for n, e in zip(prep.names, ess, strict=True)))

    def _train_config(self, epochs: float | None = None) -> TrainConfig:
        t = self.config.train
        return TrainConfig(epochs=t.epochs if epochs is None else epochs, batch_size=t.batch_size,
                           grad_accum=t.grad_accum, learning_rate=t.learning_rate,
                           warmup_ratio=t.warmup_ratio, schedule=t.schedule,
                           weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm,
                           remat=t.remat)

    # ------------------------------------------------------------------------------ evaluation
    def _feedback_values(self, prep: Prepared, loras, ratio: np.ndarray, index: int, phase_round: int,
                         seed: int) -> list[float | None]:
        """One value per adapter (None: failed, with the error logged)."""
        cfg = self.config
        fb = cfg.feedback
        k = self.config.k
        if fb.command or fb.callable:
            source = (CommandFeedback(fb.command, timeout_s=fb.timeout_s, retries=fb.retries)
                      if fb.command else CallableFeedback(fb.callable))
            out = []
            for j in range(k):
                lo = jax.tree.map(lambda a, j=j: a[j], loras)
                adir = self._export(prep, lo, self.dir / "adapters" / f"eval{index:04d}_{j}")
                req = FeedbackRequest(adir, dict(zip(prep.names, map(float, ratio), strict=True)),
                                      phase_round, seed)
                try:
                    out.append(source(req))
                except FeedbackError as e:
                    if fb.on_failure == "stop":
                        raise
                    self.log(f"  feedback failed for adapter {j}: {e}")
                    out.append(None)
            return out
        m = fb.metric
        if m in ("acc", "acc_norm"):
            res = multiple_choice(prep.graphdef, loras, prep.frozen, prep.target_mc, start=prep.start)
            return [float(v) for v in np.atleast_1d(res[m])]
        if m == "neg_loss":
            res = answer_loss(prep.graphdef, loras, prep.frozen, prep.target_pool, start=prep.start)
            return [float(-v) for v in np.atleast_1d(res["loss"])]
        out = []
        for j in range(k):
            lo = jax.tree.map(lambda a, j=j: a[j], loras)
            key = jax.random.fold_in(jax.random.key(seed), 7) if fb.temperature > 0 else None
            res = generation_match(prep.graphdef, lo, prep.frozen, prep.target_examples, prep.tokenizer,
                                   max_new_tokens=fb.max_new_tokens, temperature=fb.temperature,
                                   key=key, config=prep.encode)
            out.append(res["exact_match"])
        return out

    def _export(self, prep: Prepared, lora, directory: Path) -> Path:
        from flax import nnx

        from duet_jax.models import save_peft

        model = nnx.merge(prep.graphdef, lora, prep.frozen)
        return save_peft(model, directory, base_model_name_or_path=self.config.model)

    def evaluate(self, prep: Prepared, ratio: np.ndarray, index: int, phase: str, rnd: int):
        """Draw k mixtures of ``ratio``, fine-tune k adapters at once, get k feedbacks."""
        cfg = self.config
        t = time.time()
        ratio = np.asarray(ratio, np.float64)
        ratio = np.clip(ratio, 0, None) / ratio.sum()
        counts = ratio_to_counts(ratio, cfg.budget, prep.available, replace=cfg.replace)
        seed = int(np.asarray(jax.random.randint(jax.random.fold_in(jax.random.key(cfg.seed), index),
                                                 (), 0, 2**31 - 1)))
        key = jax.random.key(seed)
        k_mix, k_train = jax.random.split(key)
        idx, ok = sample_mixtures(k_mix, prep.weights, jnp.asarray(prep.domain_of),
                                  jnp.asarray(counts, jnp.int32), k=cfg.k, budget=cfg.budget,
                                  n_domains=len(prep.names), replace=cfg.replace)
        if not bool(np.asarray(ok).all()):
            raise ConfigError("a mixture could not be filled; lower the budget or sample with replacement")
        res = finetune_many(prep.graphdef, prep.lora0, prep.frozen, prep.pool, idx,
                            jax.random.split(k_train, cfg.k), self._train_config(), start=prep.start)
        values = self._feedback_values(prep, res.lora, ratio, index, rnd, seed)
        finite = [(v, j) for j, v in enumerate(values) if v is not None and math.isfinite(v)]
        best_v, best_j = max(finite) if finite else (None, None)
        rec = {
            "eval": index, "phase": phase, "round": rnd, "seed": seed,
            "ratio": dict(zip(prep.names, map(float, ratio), strict=True)),
            "counts": dict(zip(prep.names, map(int, counts), strict=True)),
            "feedbacks": values, "feedback": best_v, "best_of_k": best_j, "failed": best_v is None,
            "final_train_loss": [float(x) for x in np.asarray(res.losses)[:, -1]],
            "time_s": round(time.time() - t, 3),
        }
        return rec, res.lora

    # ------------------------------------------------------------------------------ the loop
    def run(self) -> dict:
        from duet_jax.bo.simplex_bo import SimplexBO

        cfg = self.config
        report.init_run_dir(self.dir, to_dict(cfg))
        history = report.read_history(self.dir)
        if history:
            self.log(f"resuming {self.dir}: {len(history)} evaluation(s) already done")
        prep = self.prepare()
        n = len(prep.names)
        bo = SimplexBO(n, maximize=True, seed=cfg.seed, kernel=cfg.bo.kernel,
                       acquisition=cfg.bo.acquisition, beta=cfg.bo.beta, min_share=cfg.bo.min_share,
                       n_init=max(cfg.warm_start, 1), on_nonfinite="record")
        rng = np.random.default_rng(cfg.seed)
        warm = [np.full(n, 1.0 / n)] + [rng.dirichlet(np.ones(n)) for _ in range(cfg.warm_start - 1)]
        plan = [("warm", 0, r) for r in warm] + [("bo", t + 1, None) for t in range(cfg.rounds)]
        best = report.best_of(history)
        bar = _Bar(self.progress, total=len(plan), desc="evaluations")
        bar.advance(len(history))
        for i, (phase, rnd, ratio) in enumerate(plan):
            if phase == "bo":
                ratio = bo.ask(1)[0]
            if i < len(history):  # replay a finished evaluation
                rec = history[i]
                done = np.asarray([rec["ratio"][nm] for nm in prep.names])
                if not np.allclose(done, ratio, atol=1e-6):
                    self.log(f"  note: evaluation {i} replays ratio {np.round(done, 4).tolist()} "
                             f"(the proposal now is {np.round(ratio, 4).tolist()})")
                bo.tell(done, np.nan if rec["feedback"] is None else rec["feedback"])
                continue
            rec, loras = self.evaluate(prep, ratio, i, phase, rnd)
            report.append_history(self.dir, rec)
            history.append(rec)
            bo.tell(ratio, np.nan if rec["feedback"] is None else rec["feedback"])
            if rec["feedback"] is not None and (best is None or rec["feedback"] > best["feedback"]):
                best = rec
                lo = jax.tree.map(lambda a, j=rec["best_of_k"]: a[j], loras)
                report.save_best_adapter(self.dir, lo, lambda d, lo=lo: self._export(prep, lo, d), rec)
            bar.advance(1, report.eval_line(rec, prep.names, best))
        bar.close()
        summary = report.summarize(self.dir, history, prep.names, time.time() - self.t0,
                                   extra={"influence": prep.influence, "metric": cfg.feedback.metric,
                                          "target": cfg.target, "mode": cfg.mode})
        report.plots(self.dir, history, prep.names)
        self.log(report.closing_table(summary, prep.names))
        return summary


class _Bar:
    """A tqdm progress bar when enabled (stderr), silent otherwise."""

    def __init__(self, enabled: bool, total: int | None = None, desc: str = "influence"):
        self.enabled = enabled
        self.bar = None
        self.total = total
        self.desc = desc

    def _ensure(self, total):
        if self.enabled and self.bar is None:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=self.desc, leave=False, dynamic_ncols=True)

    def update(self, name: str, done: int, total: int):
        self._ensure(total)
        if self.bar is not None:
            self.bar.total = total
            self.bar.n = done
            self.bar.set_description(f"influence {name}")
            self.bar.refresh()

    def advance(self, n: int, line: str | None = None):
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


def run(config: RunConfig, run_dir: str | Path | None = None, **kw) -> dict:
    """Run DUET with ``config`` in ``run_dir`` (default ``config.out_dir`` or ``runs/<time>``)."""
    run_dir = run_dir or config.out_dir or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
    return Duet(config, run_dir, **kw).run()
