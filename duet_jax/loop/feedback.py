"""Feedback: one protocol for every source of the unseen task's number.

Every source is made from the config before any model is loaded (a bad command or callable fails
then, not after training), prepared once with the run's :class:`~duet_jax.loop.setting.Setting`,
and called the same way: ``k`` stacked adapters in, one :class:`Outcome` (a value, or a recorded
failure with its reason) per adapter out. No source ever makes a value up.

* :class:`TaskFeedback` (``acc``, ``acc_norm``, ``neg_loss``): the built-in evaluator on the unseen
  task's evaluation split. It also exposes ``program_inputs`` / ``finish`` so the local step can
  score inside its one compiled program.
* :class:`GenerationFeedback` (``exact_match``): generation, adapter by adapter.
* :class:`ExternalFeedback`: an external command or a Python callable, given each adapter exported
  in PEFT format (``RUN_DIR/adapters/evalNNNN_j``).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import jax
import numpy as np

from duet_jax.errors import ConfigError, FeedbackError

__all__ = ["EvalInfo", "ExternalFeedback", "Feedback", "GenerationFeedback", "Outcome", "TaskFeedback",
           "make_feedback"]


@dataclasses.dataclass(frozen=True)
class Outcome:
    """One adapter's feedback: ``value`` (finite) or ``None`` with the ``error`` that says why."""

    value: float | None
    error: str | None = None

    @classmethod
    def of(cls, v) -> Outcome:
        v = float(v)
        return cls(v) if math.isfinite(v) else cls(None, f"the feedback is not finite ({v})")


@dataclasses.dataclass(frozen=True)
class EvalInfo:
    """What a source is told about the evaluation whose adapters it scores."""

    index: int
    round: int
    seed: int
    ratio: dict[str, float]


@runtime_checkable
class Feedback(Protocol):
    name: str
    in_program: bool

    def prepare(self, setting) -> None: ...

    def __call__(self, loras, info: EvalInfo) -> list[Outcome]: ...


def _unstack(loras, j):
    return jax.tree.map(lambda a: a[j], loras)


def _k(loras) -> int:
    return int(jax.tree.leaves(loras)[0].shape[0])


class TaskFeedback:
    """The built-in evaluator: ``neg_loss`` (minus the mean answer-token loss), ``acc`` or
    ``acc_norm`` (multiple choice by log-likelihood), on the unseen task's evaluation examples."""

    in_program = True

    def __init__(self, metric: str):
        self.name = metric
        self.metric = metric
        self.mc = None
        self.pool = None

    def prepare(self, setting) -> None:
        from duet_jax.train import build_mc_set, build_pool
        from duet_jax.train.evaluate import _flat_slots

        self.setting = setting
        exs = setting.plan.target_examples
        if self.metric in ("acc", "acc_norm"):
            mc = build_mc_set(exs, setting.tokenizer, setting.encode)
            if mc.skipped:
                setting.log(f"  unseen task: {len(mc.skipped)} example(s) skipped (too long)")
            self.mc = dataclasses.replace(mc, pool=setting.with_trunk(mc.pool))
            self.pool = self.mc.pool
            setting.log(f"unseen task: {len(mc.gold)} multiple-choice examples ({len(mc.pool)} choice rows)")
        else:
            from duet_jax.data import encode_examples

            t = encode_examples(exs, setting.tokenizer, setting.encode)
            if len(t) == 0:
                raise ConfigError("no example of the unseen task fits max_length")
            pool, _ = build_pool(t)
            self.pool = setting.with_trunk(pool)
            setting.log(f"unseen task: {len(pool)} examples scored by answer loss")
        self.flat = _flat_slots(self.pool, 256)
        if float(np.asarray(self.pool.loss_mask).sum()) == 0:
            raise ConfigError("the unseen task's evaluation set has no scorable (answer) token")

    def program_inputs(self):
        """The device inputs the compiled local step scores with: ``(pool, rows, slots, valid)``."""
        return (self.pool,) + tuple(self.flat)

    def finish(self, nll, cnt, score) -> list[Outcome]:
        """Values from the per-row sums ``[k, N]`` the scoring pass returns."""
        from duet_jax.feedback.metrics import mc_accuracy

        nll, cnt, score = (np.asarray(x, np.float64) for x in (nll, cnt, score))
        if self.metric == "neg_loss":
            return [Outcome.of(-n.sum() / max(c.sum(), 1.0)) for n, c in zip(nll, cnt, strict=True)]
        out = []
        for ll in score:
            table = np.full(self.mc.valid.shape, -np.inf)
            table[self.mc.row_example, self.mc.row_choice] = ll
            if not np.isfinite(ll).all():
                out.append(Outcome(None, "non-finite choice log-likelihood"))
                continue
            m = mc_accuracy(table, self.mc.gold, self.mc.byte_lengths, self.mc.valid)
            out.append(Outcome.of(m[self.metric].mean()))
        return out

    def __call__(self, loras, info: EvalInfo) -> list[Outcome]:
        from duet_jax.train.evaluate import row_scores

        s = self.setting
        nll, cnt, score = row_scores(s.graphdef, loras, s.frozen, self.pool, start=s.start)
        return self.finish(nll, cnt, score)


class GenerationFeedback:
    """``exact_match`` of generated answers (greedy, or sampled at ``temperature`` as the paper's
    noisy feedback), adapter by adapter."""

    in_program = False

    def __init__(self, config):
        self.name = "exact_match"
        self.config = config

    def prepare(self, setting) -> None:
        self.setting = setting
        setting.log(f"unseen task: {len(setting.plan.target_examples)} examples scored by generation")

    def __call__(self, loras, info: EvalInfo) -> list[Outcome]:
        from duet_jax.train import generation_match

        s, fb = self.setting, self.config
        out = []
        for j in range(_k(loras)):
            key = jax.random.fold_in(jax.random.key(info.seed), 7) if fb.temperature > 0 else None
            res = generation_match(s.graphdef, _unstack(loras, j), s.frozen, s.plan.target_examples,
                                   s.tokenizer, max_new_tokens=fb.max_new_tokens,
                                   temperature=fb.temperature, key=key, config=s.encode)
            out.append(Outcome.of(res["exact_match"]))
        return out


class ExternalFeedback:
    """An external command or Python callable, called once per adapter with the adapter exported
    in PEFT format. Its failures (exit status, time-out, no well-formed answer, an exception) are
    recorded with their reason; ``on_failure: stop`` raises instead."""

    in_program = False

    def __init__(self, config):
        from duet_jax.feedback import check_feedback_config

        self.config = config
        # placeholders, the program on PATH, the callable's import: checked before any training
        self.source = check_feedback_config(command=config.command, callable=config.callable,
                                            timeout_s=config.timeout_s, retries=config.retries)
        self.name = self.source.name

    def prepare(self, setting) -> None:
        self.setting = setting

    def adapter_dir(self, info: EvalInfo, j: int) -> Path:
        return self.setting.run_dir / "adapters" / f"eval{info.index:04d}_{j}"

    def __call__(self, loras, info: EvalInfo) -> list[Outcome]:
        from duet_jax.sharding import broadcast_json, gather_tree, is_primary

        loras = gather_tree(loras)  # multi-host: every process, then process 0 asks the source alone
        out = self._ask(loras, info) if is_primary() else None
        got = broadcast_json(None if out is None else [[o.value, o.error] for o in out])
        return out if out is not None else [Outcome(v, e) for v, e in got]

    def _ask(self, loras, info: EvalInfo) -> list[Outcome]:
        from duet_jax.feedback import FeedbackRequest

        out = []
        for j in range(_k(loras)):
            adir = export_adapter(self.setting, _unstack(loras, j), self.adapter_dir(info, j))
            req = FeedbackRequest(adir, info.ratio, info.round, info.seed)
            try:
                out.append(Outcome.of(self.source(req)))
            except FeedbackError as e:
                if self.config.on_failure == "stop":
                    raise
                out.append(Outcome(None, str(e)))
        return out


def export_adapter(setting, lora, directory: Path) -> Path:
    """One adapter of the run in PEFT format (``adapter_config.json`` + safetensors)."""
    from flax import nnx

    from duet_jax.models import save_peft

    model = nnx.merge(setting.graphdef, lora, setting.frozen)
    return save_peft(model, directory, base_model_name_or_path=setting.config.model)


def make_feedback(config) -> Any:
    """The feedback source of a run's config, checked (a command's placeholders and program, a
    callable's import) before anything is trained."""
    fb = config.feedback
    if fb.external:
        return ExternalFeedback(fb)
    if fb.metric == "exact_match":
        return GenerationFeedback(fb)
    return TaskFeedback(fb.metric)
