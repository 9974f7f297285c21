"""What every method of a run shares: the data plan, the model, the tokenized pool with its
frozen-trunk cache, the domains' validation sets, and (computed once, on demand) the influence
scores.

Two stages, so that everything that can be checked without a model is checked before anything is
written or loaded:

1. :func:`plan_data` (no model): resolves the domains and the unseen task, draws the disjoint
   splits, picks the examples, and runs :func:`check_no_leak` on them.
2. :meth:`Setting.build`: the tokenizer and model, the encoded pool and its trunk cache.

The unseen task never leaks into training: in ``ood`` mode its domain is not in the pool; in
``in_domain`` mode only its train split is, and it is scored on its disjoint evaluation split.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

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
from duet_jax.errors import ConfigError, DuetError
from duet_jax.train import TrainConfig, build_pool, split_model, trunk_hidden, trunk_start

__all__ = ["DataPlan", "LeakError", "Setting", "check_no_leak", "plan_data", "select_examples"]


class LeakError(DuetError):
    """The unseen task's evaluation data would enter the training pool or the influence step."""


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


def select_examples(examples: list[Example], n: int, salt: str) -> list[Example]:
    """A deterministic subset of ``n`` examples (by a hash of their ids, not by row order)."""
    if n <= 0 or n >= len(examples):
        return list(examples)
    key = lambda e: hashlib.sha256(f"{salt}|{e.id}".encode()).hexdigest()
    return sorted(examples, key=key)[:n]


def _size(v):
    return int(v) if float(v) >= 1 else float(v)


@dataclasses.dataclass
class DataPlan:
    """The examples of a run, chosen and leak-checked before any model is loaded."""

    names: list[str]
    train: dict[str, list[Example]]
    validation: dict[str, list[Example]]
    target_name: str
    target_examples: list[Example]  # the unseen task's evaluation examples (feedback only)
    target_query: list[Example]  # a few target examples from its validation split (oracle LESS)

    def available(self) -> np.ndarray:
        return np.asarray([len(self.train[n]) for n in self.names])


def plan_data(config, log: Callable[[str], None] = print) -> DataPlan:
    """Resolve domains and splits and pick the examples (no model, no tokenizer).

    Raises:
      UnknownDomainError, ConfigError, LeakError.
    """
    cfg = config
    spec = SplitSpec(validation=_size(cfg.validation), evaluation=_size(cfg.evaluation))
    domains: list[Domain] = get_domains(list(cfg.domains))
    target = get_domain(cfg.target)
    names = [d.name for d in domains]
    if cfg.mode == "ood" and target.name in names:
        raise ConfigError(f"the target {target.name!r} is also in the pool; ood mode leaves it out")
    if cfg.mode == "in_domain" and target.name not in names:
        raise ConfigError(f"in_domain mode needs the target {target.name!r} among the domains")
    splits = {d.name: d.splits(spec) for d in domains}
    tsplits = splits.get(target.name) or target.splits(spec)
    target_examples = select_examples(list(tsplits.evaluation), cfg.feedback.examples, f"{cfg.seed}|eval")
    query = select_examples(list(tsplits.validation), cfg.selector.less_examples, f"{cfg.seed}|query")
    train = {n: select_examples(list(s.train), cfg.train_per_domain, f"{cfg.seed}|train|{n}")
             for n, s in splits.items()}
    val = {n: select_examples(list(s.validation), cfg.influence.validation_examples, f"{cfg.seed}|val|{n}")
           for n, s in splits.items()}
    pool_examples = [e for n in names for e in train[n]]
    check_no_leak(pool_examples, [e for n in names for e in val[n]] + query, target_examples)
    for n in names:
        if not train[n]:
            raise ConfigError(f"domain {n!r} has no training example")
    if not target_examples:
        raise ConfigError(f"the unseen task {target.name!r} has no evaluation example")
    plan = DataPlan(names, train, val, target.name, target_examples, query)
    if not cfg.replace and cfg.budget > int(plan.available().sum()):
        raise ConfigError(
            f"budget {cfg.budget} asks for more examples than the pool holds ({int(plan.available().sum())} "
            f"in {len(names)} domains) without replacement; lower the budget or set replace: true")
    log(f"domains: {', '.join(names)} | unseen task: {target.name} ({cfg.mode}, "
        f"metric {cfg.feedback.metric if not cfg.feedback.external else 'external'})")
    return plan


#: bumped when what the influence scores depend on changes in a way the fingerprint cannot see
SCORES_CACHE_VERSION = 1


def _save_scores(root: Path, res, fingerprint: str | None) -> None:
    """``scores.npy``, ``valid.npy``, ``summary.json``, then ``scores_key.json`` last (its
    fingerprint is what lets a later run reuse the scores, so it is removed first and written
    only once the arrays are on disk: a kill in between leaves no reusable half)."""
    from duet_jax.report import write_json

    root.mkdir(parents=True, exist_ok=True)
    (root / "scores_key.json").unlink(missing_ok=True)
    np.save(root / "scores.npy", res.scores)
    np.save(root / "valid.npy", res.valid)
    write_json(root / "summary.json", res.per_domain)
    if fingerprint is not None:
        write_json(root / "scores_key.json", {"fingerprint": fingerprint, "rows": int(len(res.scores))})


def _load_scores(root: Path, fingerprint: str | None, rows: int):
    """The saved scores when they were computed from the same inputs, else None."""
    from duet_jax.influence.domains import DomainScores

    key = root / "scores_key.json"
    if fingerprint is None or not key.exists():
        return None
    try:
        saved = json.loads(key.read_text())
        if saved.get("fingerprint") != fingerprint or saved.get("rows") != rows:
            return None
        scores, valid = np.load(root / "scores.npy"), np.load(root / "valid.npy")
        per = json.loads((root / "summary.json").read_text())
    except (OSError, ValueError):
        return None  # unreadable: recomputed (the feature stores still spare most of the work)
    if scores.shape != (rows,) or valid.shape != (rows,):
        return None
    return DomainScores(scores.astype(np.float32), valid.astype(bool), per)


@dataclasses.dataclass
class Setting:
    """The prepared run: shared by the selector, the proposer, the local step and the feedback."""

    config: Any
    plan: DataPlan
    run_dir: Path
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
    vocab_size: int
    log: Callable[[str], None] = print
    progress: Callable | None = None
    mesh: Any = None
    _cache: dict = dataclasses.field(default_factory=dict)

    @property
    def available(self) -> np.ndarray:
        return np.bincount(self.domain_of, minlength=len(self.names))

    @property
    def caps(self) -> np.ndarray | None:
        """Largest share of each domain (``None``: sampling with replacement, no cap)."""
        from duet_jax.mixture import share_caps

        return share_caps(self.config.budget, self.available, self.config.replace)

    def counts(self, ratio) -> tuple[np.ndarray, np.ndarray]:
        """The ratio actually trained (capped by the domains' sizes without replacement, rounding-
        safe) and its per-domain counts."""
        from duet_jax.mixture import cap_ratio, ratio_to_counts

        cfg = self.config
        r = cap_ratio(np.asarray(ratio, np.float64), self.caps, cfg.budget, self.available)
        return r, ratio_to_counts(r, cfg.budget, self.available, replace=cfg.replace)

    @property
    def n_domains(self) -> int:
        return len(self.names)

    @property
    def train_config(self) -> TrainConfig:
        return self.config.train

    # ------------------------------------------------------------------------ building
    @classmethod
    def build(cls, config, plan: DataPlan, run_dir: str | Path, *, log: Callable[[str], None] = print,
              progress: Callable | None = None) -> Setting:
        tok, model = load_run_model(config, log)
        enc = config.encode
        names = plan.names
        toks = [encode_examples(plan.train[n], tok, enc) for n in names]
        for n, t in zip(names, toks, strict=True):
            if len(t) == 0:
                raise ConfigError(f"domain {n!r}: no training example fits max_length={enc.max_length}")
            if t.skipped:
                log(f"  {n}: {len(t.skipped)} example(s) skipped (answer longer than max_length)")
        kept = {n: set(t.ids) for n, t in zip(names, toks, strict=True)}
        pool_examples = [e for n in names for e in plan.train[n] if e.id in kept[n]]
        pool, domain_of = build_pool(toks)
        graphdef, lora0, frozen = split_model(model)
        start = trunk_start(model)
        log(f"pool: {len(pool)} examples x {pool.length} tokens; LoRA from layer {start} of "
            f"{model.num_layers} ({'frozen trunk cached' if start else 'full model'})")
        mesh = None
        if jax.device_count() > 1:  # the frozen weights FSDP-sharded, adapters and batches on data
            from duet_jax.sharding import make_mesh

            d, f = config.mesh.data, config.mesh.fsdp
            mesh = make_mesh(config.mesh, jax.devices()[: d * f] if d and f else None)
            log(f"mesh: {dict(mesh.shape)} over {jax.device_count()} devices")
        s = cls(config, plan, Path(run_dir), names, pool, np.asarray(domain_of), pool_examples, graphdef,
                lora0, frozen, start, tok, enc, int(model.config.vocab_size), log, progress, mesh)
        t = time.time()
        s.pool = s.with_trunk(pool)
        if start:
            log(f"  frozen trunk of the pool computed in {time.time() - t:.1f} s")
        if mesh is not None:
            from duet_jax.sharding import replicate, shard_frozen

            s.frozen, s.lora0 = shard_frozen(frozen, mesh), replicate(lora0, mesh)
        return s

    def with_trunk(self, pool):
        """``pool`` with the frozen trunk's hidden states (unchanged when there is no trunk), placed
        on the mesh when there is one. With ``config.trunk_dir`` the states are read from (or, the
        first time, written to) that shared directory."""
        if self.start:
            pool = pool.with_hidden(self._trunk_states(pool))
        if self.mesh is not None:
            from duet_jax.sharding import place_pool

            pool = place_pool(pool, self.mesh)
        return pool

    def _trunk_states(self, pool):
        compute = lambda: trunk_hidden(self.graphdef, self.lora0, self.frozen, pool, start=self.start,
                                       mesh=self.mesh)
        if not self.config.trunk_dir:
            return compute()
        from duet_jax.report import write_npy
        from duet_jax.sharding import (
            all_processes,
            from_process_local,
            local_rows,
            process_block,
            process_dir,
        )

        # several processes: each caches (and reads back) only its own block of rows
        block = process_block(len(pool), self.mesh)
        span = "" if block is None else "-rows{1}-{2}of{0}".format(*block)
        path = process_dir(self.config.trunk_dir) / f"{self._trunk_key(pool)}{span}.npy"
        cached = None
        if path.exists():
            try:
                cached = np.load(path)
            except (OSError, ValueError) as e:  # a torn or foreign file: recompute and replace it
                self.log(f"  trunk cache {path} unreadable ({e}); recomputing")
        if all_processes(cached is not None):  # the pass is a collective: every process or none
            return jnp.asarray(cached) if block is None else from_process_local(cached, block[0], self.mesh)
        hidden = compute()
        write_npy(path, local_rows(hidden))
        return hidden

    def _weights_digest(self) -> str:
        """A digest of the frozen weights' values (computed once, on device, so sharded weights
        need no host copy): a changed checkpoint at the same path gives another digest."""
        if "weights_digest" not in self._cache:
            leaves = jax.tree_util.tree_leaves_with_path(self.frozen)
            sums = [jnp.sum(jnp.abs(x.astype(jnp.float32))) for _, x in leaves]
            parts = [f"{jax.tree_util.keystr(k)}:{x.shape}:{x.dtype}:{float(v):.9e}"
                     for (k, x), v in zip(leaves, sums, strict=True)]
            self._cache["weights_digest"] = hashlib.sha256("|".join(parts).encode()).hexdigest()
        return self._cache["weights_digest"]

    def _trunk_key(self, pool) -> str:
        """What the trunk's states depend on: the frozen weights below ``start`` (a digest of their
        values, so a changed checkpoint at the same path misses), the compute dtype, the layer, the
        backend and the token ids and masks."""
        h = hashlib.sha256()
        h.update(f"{self._weights_digest()}|{self.config.dtype}|{self.start}|{jax.default_backend()}|"
                 f"{jax.__version__}".encode())
        for a in (pool.input_ids, pool.attention_mask):
            a = np.ascontiguousarray(np.asarray(a))
            h.update(f"{a.shape}{a.dtype}".encode())
            h.update(a.tobytes())
        return h.hexdigest()[:24]

    def encode_pool(self, examples: list[Example], *, answer_slots: int | None = None):
        """Examples as a pool (with the trunk cache) and the ids kept."""
        t = encode_examples(examples, self.tokenizer, self.encode)
        if len(t) == 0:
            raise ConfigError("no example fits max_length")
        pool, dom = build_pool(t, answer_slots=answer_slots)
        return self.with_trunk(pool), list(t.ids)

    # ------------------------------------------------------------------------ shared, on demand
    def validation_pool(self):
        """The domains' own validation rows: ``(pool, domain_of)`` (influence queries and the
        task-agnostic baselines' proxy scores). Never the unseen task."""
        if "val" not in self._cache:
            vtoks = [encode_examples(self.plan.validation[n], self.tokenizer, self.encode) for n in self.names]
            for n, t in zip(self.names, vtoks, strict=True):
                if len(t) == 0:
                    raise ConfigError(f"domain {n!r} has no validation example that fits max_length")
            vpool, vdom = build_pool(vtoks)
            self._cache["val"] = (self.with_trunk(vpool), np.asarray(vdom))
        return self._cache["val"]

    def influence(self, *, query: str = "domains"):
        """DUET's per-domain IF scores (:func:`duet_jax.influence.domains.domain_influence`),
        computed once into the run directory's resumable stores and reused.

        ``query="target"``: DUET-LESS's oracle scores, against a few examples of the unseen task's
        validation split (never its evaluation split).
        """
        if query in self._cache:
            return self._cache[query]
        from duet_jax.influence.domains import domain_influence

        cfg = self.config
        vpool, vdom = self.validation_pool()
        qpool = None
        from duet_jax.sharding import process_dir

        # several processes: each keeps its own copy of the stores (they featurize in lockstep)
        root = process_dir(Path(cfg.influence_dir) if cfg.influence_dir else self.run_dir / "influence")
        if query == "target":
            if not self.plan.target_query:
                raise ConfigError("duet_less needs target examples (selector.less_examples > 0)")
            qpool, _ = self.encode_pool(self.plan.target_query)
            root = root / "less"
        t = time.time()
        what = "oracle: target query" if query == "target" else "domain validation"
        base_model_id = f"{cfg.model}|{cfg.seed}|{json.dumps(dataclasses.asdict(cfg.lora), sort_keys=True)}"
        fp = self._influence_fingerprint(base_model_id, vpool, vdom, qpool)
        if (res := _load_scores(root, fp, len(self.domain_of))) is not None:
            self.log(f"influence scores ({what}) for {len(self.names)} domains: reused from {root} (same "
                     f"inputs, {time.time() - t:.1f} s)")
            self._cache[query] = res
            return res
        res = domain_influence(
            graphdef=self.graphdef, lora0=self.lora0, frozen=self.frozen, start=self.start,
            pool=self.pool, domain_of=self.domain_of, val_pool=vpool, val_domain_of=vdom,
            names=self.names, example_ids=[e.id for e in self.pool_examples],
            base_model_id=base_model_id,
            train_config=cfg.train, config=cfg.influence, query_pool=qpool,
            buckets=self.encode.bucket_lengths, store_root=root,
            key=jax.random.fold_in(jax.random.key(cfg.seed), 10**6),
            progress=self.progress)
        _save_scores(root, res, fp)
        self.log(f"influence scores ({what}) for {len(self.names)} domains in {time.time() - t:.1f} s")
        self._cache[query] = res
        return res

    def _influence_fingerprint(self, base_model_id: str, vpool, vdom, qpool) -> str | None:
        """A hash of everything the influence scores are computed from (weights, pools without
        their trunk states, which follow from the weights and tokens, domains, example ids, configs,
        key): equal fingerprints give equal scores, so a later run of the same setting and seed
        (another method, a resumed or re-evaluated run) reads them instead of re-training the
        proxies. None (no reuse) with several processes, whose arrays are not all addressable."""
        if jax.process_count() > 1:
            return None
        from duet_jax.influence.domains import FEATURE_LAYOUT
        from duet_jax.influence.store import params_fingerprint

        cfg = self.config
        strip = lambda p: None if p is None else dataclasses.replace(p, hidden=None)  # noqa: E731
        parts = {
            "version": SCORES_CACHE_VERSION, "layout": FEATURE_LAYOUT, "base_model_id": base_model_id,
            "train": dataclasses.asdict(cfg.train), "influence": dataclasses.asdict(cfg.influence),
            "seed": cfg.seed, "start": self.start, "names": list(self.names),
            "example_ids": [e.id for e in self.pool_examples], "buckets": list(self.encode.bucket_lengths),
            "weights": [self._weights_digest(), params_fingerprint(self.lora0)],
            "pools": params_fingerprint((strip(self.pool), np.asarray(self.domain_of), strip(vpool),
                                         np.asarray(vdom), strip(qpool))),
        }
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]

    def domain_of_device(self):
        return jnp.asarray(self.domain_of)


def load_run_model(config, log: Callable[[str], None] = print):
    """The tokenizer and the model with LoRA attached, as the config says."""
    from flax import nnx

    from duet_jax.models import LlamaModel, ModelConfig, add_lora, load_model
    from duet_jax.models.config import PRESETS as MODEL_PRESETS

    t = time.time()
    if config.model in MODEL_PRESETS:  # a random tiny model: tests and smoke runs
        from duet_jax.testing import tiny_tokenizer

        tok = tiny_tokenizer(chat=True)
        mcfg = ModelConfig.preset(config.model, vocab_size=len(tok))
        model = LlamaModel(mcfg, rngs=nnx.Rngs(config.seed))
    else:
        tok = load_tokenizer(config.model)
        model = load_model(config.model, dtype=config.dtype)
    add_lora(model, config.lora, rngs=nnx.Rngs(config.seed + 1))
    log(f"model {config.model}: {model.num_layers} layers, loaded in {time.time() - t:.1f} s")
    return tok, model
