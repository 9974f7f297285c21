"""The local step of Algorithm 1: ``(ratio, key) -> k adapters and k feedbacks``.

For a ratio ``r``: counts per domain (largest remainder; capped by each domain's size without
replacement), ``k`` mixtures drawn with the selector's weights inside each domain, ``k`` LoRA
fine-tunes at once (vmapped), and the feedback of each. With built-in task feedback the sampling,
the ``k`` fine-tunes and the scoring are ONE compiled program (:func:`local_program`): no host
round trip inside, and it compiles once per shape (a new ratio never recompiles).

A fine-tune that went wrong is a failed evaluation in the history, with its reason, never a crash
and never a number: a NaN or infinite loss, a loss that rose over training, or a loss at the
uniform-prediction value ``ln(vocab)`` (a collapse that produces no NaN).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from duet_jax.loop.feedback import EvalInfo, Outcome
from duet_jax.mixture import sample_mixtures
from duet_jax.sharding import gather
from duet_jax.train.trainer import _finetune_one, learning_rate_schedule, num_steps

__all__ = ["Evaluation", "LocalStep", "divergence", "eval_seed", "local_program"]

#: a fine-tune whose mean loss over its last quarter of steps exceeds the first quarter's by more
#: than this fraction is reported as diverged. Not smaller: the loss of one batch differs from the
#: next by 5% and more on short runs (seen on the smoke preset), and a false alarm would throw a
#: good evaluation away.
RISE_TOLERANCE = 0.25


@functools.partial(jax.jit, static_argnames=("graphdef", "train_config", "steps", "start", "k", "budget",
                                             "n_domains", "replace", "score", "batch_spec", "eval_spec",
                                             "spmd_axis", "index_spec"))
def local_program(graphdef, lora0, frozen, pool, weights, domain_of, counts, key, eval_inputs, *,
                  train_config, steps: int, start: int, k: int, budget: int, n_domains: int,
                  replace: bool, score: bool, batch_spec=None, eval_spec=None, spmd_axis=None,
                  index_spec=None):
    """Sample ``k`` mixtures of ``counts``, fine-tune ``k`` adapters, and (``score``) score them on
    ``eval_inputs = (pool, rows, slots, valid)``, in one program.

    On a mesh (:mod:`duet_jax.sharding`), ``spmd_axis="data"`` spreads the ``k`` fine-tunes over the
    data axis (``index_spec`` shards the mixtures so), ``batch_spec`` / ``eval_spec`` split each
    training / scoring batch; all ``None`` on one device.

    Returns:
      ``(indices [k, M], filled [k, M], TrainResult with [k] leaves, (nll, cnt, score) [k, N] or
      None)``.
    """
    from duet_jax.train.evaluate import _scores_jit

    k_mix, k_train = jax.random.split(key)
    idx, ok = sample_mixtures(k_mix, weights, domain_of, counts, k=k, budget=budget, n_domains=n_domains,
                              replace=replace)
    keys = jax.random.split(k_train, k)
    if index_spec is not None:
        idx = jax.lax.with_sharding_constraint(idx, index_spec)
    fn = functools.partial(_finetune_one, config=train_config, steps=steps, start=start,
                           batch_spec=batch_spec)
    res = jax.vmap(fn, in_axes=(None, None, None, None, 0, 0), spmd_axis_name=spmd_axis)(
        graphdef, lora0, frozen, pool, idx, keys)
    scores = None
    if score:
        epool, rows, slots, valid = eval_inputs
        scores = jax.lax.map(lambda lo: _scores_jit(graphdef, lo, frozen, epool, rows, slots, valid,
                                                    start=start, batch_size=16, batch_spec=eval_spec),
                             res.lora)
    return idx, ok, res, scores


def divergence(losses: np.ndarray, vocab_size: int, *, bad_step: int = -1, learning_rate=None) -> str | None:
    """Why a fine-tune's per-step losses say it went wrong, or ``None``.

    * a NaN or infinite loss or gradient (``bad_step`` >= 0: the trainer froze the adapter there);
    * a collapse: the last quarter's mean loss at or above 90% of ``ln(vocab_size)`` (the loss of a
      uniform prediction) while the first quarter's was below 80% of it;
    * a rise: with 4 or more steps, the last quarter's mean above the first quarter's by more than
      :data:`RISE_TOLERANCE`.
    """
    losses = np.asarray(losses, np.float64)
    if bad_step >= 0:
        lr = "" if learning_rate is None else f" (learning rate {learning_rate:.3g})"
        return f"the training loss became NaN or infinite at step {bad_step} of {losses.size}{lr}"
    if not np.isfinite(losses).all():
        return "the training loss is not finite"
    q = max(1, losses.size // 4)
    first, last = float(losses[:q].mean()), float(losses[-q:].mean())
    uniform = math.log(vocab_size)
    if last >= 0.9 * uniform and first < 0.8 * uniform:
        return (f"training collapsed: the final loss {last:.3f} is at the uniform-prediction loss "
                f"ln(vocab) = {uniform:.3f} (it started at {first:.3f}); lower the learning rate")
    if losses.size >= 4 and last > first * (1 + RISE_TOLERANCE):
        return (f"training diverged: the final loss {last:.3f} is above the initial loss {first:.3f}; "
                "lower the learning rate")
    return None


def eval_seed(run_seed: int, index: int) -> int:
    """The seed of evaluation ``index``: every key it uses comes from it."""
    return int(np.asarray(jax.random.randint(jax.random.fold_in(jax.random.key(run_seed), index),
                                             (), 0, 2**31 - 1)))


@dataclasses.dataclass
class Evaluation:
    """One evaluation: its history record and its ``k`` adapters (stacked)."""

    record: dict
    loras: object

    @property
    def feedback(self) -> float | None:
        return self.record["feedback"]


class LocalStep:
    """``step(ratio, index, round, phase) -> Evaluation`` for one run."""

    def __init__(self, setting, weights, feedback, *, divergence_check: bool = True):
        cfg = setting.config
        self.setting = setting
        self.weights = jnp.asarray(weights, jnp.float32)
        self.domain_of = setting.domain_of_device()
        self.feedback = feedback
        self.config = cfg
        self.check = divergence_check
        self.steps = num_steps(cfg.train, cfg.budget)
        self.specs = {}
        mesh = setting.mesh
        if mesh is not None:  # as finetune_many: k adapters over data when it divides k
            from jax.sharding import NamedSharding
            from jax.sharding import PartitionSpec as P

            from duet_jax.sharding import batch_sharding

            d = mesh.shape["data"]
            if d > 1 and cfg.k % d == 0:
                self.specs = dict(spmd_axis="data", index_spec=NamedSharding(mesh, P("data")),
                                  batch_spec=batch_sharding(mesh, cfg.train.batch_size, ("fsdp",)))
            else:
                self.specs = dict(batch_spec=batch_sharding(mesh, cfg.train.batch_size))
            self.specs["eval_spec"] = batch_sharding(mesh, 16)

    def program(self, counts, key):
        s, cfg = self.setting, self.config
        score = bool(getattr(self.feedback, "in_program", False))
        inputs = self.feedback.program_inputs() if score else None
        return local_program(s.graphdef, s.lora0, s.frozen, s.pool, self.weights, self.domain_of,
                             jnp.asarray(counts, jnp.int32), key, inputs, train_config=cfg.train,
                             steps=self.steps, start=int(s.start), k=cfg.k, budget=cfg.budget,
                             n_domains=s.n_domains, replace=cfg.replace, score=score, **self.specs)

    def __call__(self, ratio, index: int, rnd: int, phase: str) -> Evaluation:
        s, cfg = self.setting, self.config
        t = time.time()
        ratio, counts = s.counts(ratio)
        seed = eval_seed(cfg.seed, index)
        idx, ok, res, scores = self.program(counts, jax.random.key(seed))
        # gather: with several processes the k results can sit on other hosts' devices (a
        # collective: every process takes this path)
        if not bool(gather(ok).all()):
            raise RuntimeError("a mixture could not be filled although its counts fit the pool")
        losses = gather(res.losses)
        bad = np.atleast_1d(gather(res.bad_step))
        if scores is not None:
            scores = tuple(gather(x) for x in scores)
        sched = learning_rate_schedule(cfg.train, self.steps)
        reasons = [divergence(losses[j], s.vocab_size, bad_step=int(bad[j]),
                              learning_rate=float(sched(max(int(bad[j]), 0))))
                   if (self.check or bad[j] >= 0) else None for j in range(cfg.k)]
        ratio_d = dict(zip(s.names, map(float, ratio), strict=True))
        if all(r is not None for r in reasons):
            outcomes = [Outcome(None, r) for r in reasons]
        elif scores is not None:
            outcomes = self.feedback.finish(*scores)
        else:
            outcomes = self.feedback(res.lora, EvalInfo(index, rnd, seed, ratio_d))
        outcomes = [Outcome(None, r) if r is not None else o for o, r in zip(outcomes, reasons, strict=True)]
        values = [o.value for o in outcomes]
        finite = [(v, j) for j, v in enumerate(values) if v is not None]
        best_v, best_j = max(finite) if finite else (None, None)
        rec = {
            "eval": index, "phase": phase, "round": rnd, "seed": seed,
            "ratio": ratio_d, "counts": dict(zip(s.names, map(int, counts), strict=True)),
            "feedbacks": values, "errors": [o.error for o in outcomes],
            "feedback": best_v, "best_of_k": best_j, "failed": best_v is None,
            "initial_train_loss": [float(x) for x in losses[:, 0]],
            "final_train_loss": [float(x) for x in losses[:, -1]],
            "time_s": round(time.time() - t, 3),
        }
        return Evaluation(rec, res.lora)
