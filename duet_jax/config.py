"""Typed configuration of a DUET run, its presets, YAML files and command-line overrides.

A run is configured by :class:`RunConfig` (nested frozen dataclasses). Values come, in order, from
a preset (``demo``, ``smoke``, ``paper``), a YAML file (``--config``), and flags: every field is a
flag, top-level ones as ``--budget 64``, nested ones as ``--train.learning_rate 1e-4``. ``--help``
lists them all with their help text and defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any

from duet_jax.errors import ConfigError

__all__ = ["RunConfig", "LoRASection", "TrainSection", "EncodeSection", "BOSection",
           "InfluenceSection", "FeedbackSection", "PRESETS", "preset", "load_config",
           "add_config_flags", "config_from_args", "to_dict"]


def _f(default, help: str, **kw):
    if isinstance(default, list | dict):
        return dataclasses.field(default_factory=lambda d=default: json.loads(json.dumps(d)),
                                 metadata={"help": help, **kw})
    return dataclasses.field(default=default, metadata={"help": help, **kw})


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoRASection:
    rank: int = _f(8, "LoRA rank r")
    alpha: float = _f(16.0, "LoRA alpha (update scaled by alpha/r)")
    dropout: float = _f(0.0, "LoRA dropout on the adapter input during training")
    targets: list = _f(["q", "k", "v", "o", "gate", "up", "down"],
                       "projections with adapters: any of q,k,v,o,gate,up,down")
    last_layers: int | None = _f(2, "adapters on the last L layers only (the rest is a frozen trunk, "
                                    "computed once); null for all layers")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainSection:
    epochs: float = _f(2.0, "passes over each mixture")
    batch_size: int = _f(8, "examples per micro-batch")
    grad_accum: int = _f(1, "micro-batches per optimizer step")
    learning_rate: float = _f(2e-3, "peak AdamW learning rate")
    warmup_ratio: float = _f(0.1, "fraction of steps of linear warm-up")
    schedule: str = _f("cosine", "cosine, linear or constant after warm-up")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    max_grad_norm: float = _f(1.0, "gradient clipping by global norm (0: off)")
    remat: bool = _f(False, "recompute each layer in the backward pass instead of storing its "
                            "activations: far less memory (8 x 256 on SmolLM2: 3.3 GiB peak "
                            "instead of 6.2), about 20% slower on CPU")


@dataclasses.dataclass(frozen=True, kw_only=True)
class EncodeSection:
    max_length: int = _f(128, "longest tokenized example (prompt cut from the left)")
    chat_template: str = _f("never", "auto (the model's chat template if any), always, never")
    system_prompt: str | None = _f(None, "system turn for chat templates (null: template default)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class BOSection:
    kernel: str = _f("matern52", "GP kernel: matern52 (ARD, BoTorch's default) or rbf (the paper's)")
    acquisition: str = _f("ucb", "ucb, ei, logei or thompson")
    beta: float = _f(1.0, "UCB: mu + sqrt(beta) sigma")
    min_share: float = _f(0.0, "shares below this are set to 0 and the rest renormalised")


@dataclasses.dataclass(frozen=True, kw_only=True)
class InfluenceSection:
    proj_dim: int = _f(2048, "projected gradient dimension k")
    projector: str = _f("sjlt", "identity, dense, dense_gaussian, sjlt, chunked, pallas")
    curvature: str = _f("fisher", "identity, cosine, adam, fisher (TRAK), ihvp (small models)")
    damping: float = _f(1e-3, "damping lambda of the curvature")
    proxy_examples: int = _f(64, "examples (with repeats) in each domain's proxy fine-tune")
    proxy_epochs: float = _f(1.0, "epochs of the proxy fine-tune")
    validation_examples: int = _f(16, "validation examples per domain for the query gradient")
    chunk_size: int = _f(64, "examples per featurize chunk (the resumable unit)")
    seed: int = _f(0, "projection seed")


@dataclasses.dataclass(frozen=True, kw_only=True)
class FeedbackSection:
    metric: str = _f("neg_loss", "built-in task metric: acc, acc_norm, exact_match, neg_loss (minus "
                               "the mean answer-token loss: smooth, sensitive to small fine-tunes)")
    examples: int = _f(48, "evaluation examples of the unseen task used for feedback (0: all)")
    temperature: float = _f(0.0, "exact_match: sampling temperature (>0: noisy feedback, as the paper)")
    max_new_tokens: int = _f(32, "exact_match: generated tokens")
    command: str | None = _f(None, "external feedback command, e.g. 'my_eval.sh {adapter_dir}'; it "
                                   "prints a number (placeholders: adapter_dir, ratio_json, round, seed)")
    callable: str | None = _f(None, "Python feedback function 'package.module:function'")
    timeout_s: float = _f(3600.0, "external command time-out per attempt")
    retries: int = _f(1, "external command retries after a failure")
    on_failure: str = _f("record", "record (log the failure, leave it out of the GP) or stop")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunConfig:
    """One DUET run."""

    preset: str = _f("demo", "the preset the other values start from: demo, smoke, paper")
    model: str = _f("smollm2-135m-instruct", "model SPEC: built-in name, HF dir, .gguf path, hub name, "
                                             "or tiny-* for a random tiny model (tests)")
    domains: list = _f(["arc_easy", "commonsense_qa", "social_i_qa", "winogrande"],
                       "training domains (built-in names, local files, hf:owner/name)")
    target: str = _f("arc_challenge", "the unseen task: a built-in domain (or file) evaluated on its "
                                      "evaluation split")
    mode: str = _f("ood", "ood: the target's domain is not in the pool; in_domain: only its train "
                          "split is, and it is scored on its disjoint evaluation split")
    budget: int = _f(64, "data budget M: examples per mixture")
    k: int = _f(1, "mixtures drawn (and fine-tuned together) per proposed ratio; best of k kept")
    rounds: int = _f(4, "BO rounds T after the warm start")
    warm_start: int = _f(3, "warm-start ratios: the uniform ratio plus random Dirichlet(1) draws")
    sampler: str = _f("if", "inside each domain: if (influence-weighted), uniform (DUET-UR), "
                            "remove_harmful (DUET-RH)")
    if_temperature: float = _f(1.0, "IF sampling temperature (<1 sharpens the weights)")
    harmful_fraction: float = _f(0.2, "remove_harmful: lowest-IF fraction dropped per domain")
    replace: bool = _f(True, "sample with replacement inside domains")
    train_per_domain: int = _f(64, "cap on each domain's train examples in the pool (0: all)")
    validation: float = _f(0.1, "validation split size (fraction, or count if >= 1)")
    evaluation: float = _f(0.2, "evaluation split size (fraction, or count if >= 1)")
    seed: int = _f(0, "seed of everything (splits are content-hashed and do not depend on it)")
    out_dir: str | None = _f(None, "run directory (default runs/<time>)")
    dtype: str = _f("float32", "compute dtype: float32 or bfloat16")
    lora: LoRASection = dataclasses.field(default_factory=LoRASection, metadata={"help": "LoRA"})
    train: TrainSection = dataclasses.field(default_factory=TrainSection, metadata={"help": "fine-tuning"})
    encode: EncodeSection = dataclasses.field(default_factory=EncodeSection, metadata={"help": "tokenization"})
    bo: BOSection = dataclasses.field(default_factory=BOSection, metadata={"help": "Bayesian optimisation"})
    influence: InfluenceSection = dataclasses.field(default_factory=InfluenceSection,
                                                    metadata={"help": "influence scores"})
    feedback: FeedbackSection = dataclasses.field(default_factory=FeedbackSection,
                                                  metadata={"help": "feedback of the unseen task"})

    def __post_init__(self):
        def need(cond, msg):
            if not cond:
                raise ConfigError(msg)

        need(self.mode in ("ood", "in_domain"), f"mode must be ood or in_domain, got {self.mode!r}")
        need(self.sampler in ("if", "uniform", "remove_harmful"),
             f"sampler must be if, uniform or remove_harmful, got {self.sampler!r}")
        need(self.budget >= 1, f"budget must be >= 1, got {self.budget}")
        need(self.k >= 1 and self.rounds >= 0 and self.warm_start >= 1,
             "k and warm_start must be >= 1 and rounds >= 0")
        need(len(self.domains) >= 1, "at least one training domain is needed")
        need(self.feedback.metric in ("acc", "acc_norm", "exact_match", "neg_loss"),
             f"feedback.metric must be acc, acc_norm, exact_match or neg_loss, got {self.feedback.metric!r}")
        need(self.feedback.on_failure in ("record", "stop"), "feedback.on_failure must be record or stop")
        need(not (self.feedback.command and self.feedback.callable),
             "give feedback.command or feedback.callable, not both")
        need(self.if_temperature > 0, "if_temperature must be > 0")
        need(0 <= self.harmful_fraction < 1, "harmful_fraction must be in [0, 1)")
        need(self.dtype in ("float32", "bfloat16"), f"dtype must be float32 or bfloat16, got {self.dtype!r}")
        names = [d if isinstance(d, str) else d.get("name", d.get("source")) for d in self.domains]
        target = self.target if isinstance(self.target, str) else self.target.get("name")
        if self.mode == "ood" and target in names:
            raise ConfigError(
                f"the target {target!r} is also a training domain; in ood mode the unseen task's "
                "domain must be left out of the pool (or use mode: in_domain)")


_SECTIONS = {"lora": LoRASection, "train": TrainSection, "encode": EncodeSection, "bo": BOSection,
             "influence": InfluenceSection, "feedback": FeedbackSection}

PRESETS: dict[str, dict] = {
    # The offline demo: SmolLM2-135M on CPU in minutes. Short-answer domains, plain prompts.
    "demo": {},
    # A tiny random model, seconds: for tests and for checking a setup.
    "smoke": {
        "model": "tiny-llama", "domains": ["arc_easy", "sciq", "openbookqa"], "target": "arc_challenge",
        "budget": 16, "rounds": 2, "warm_start": 2, "k": 2, "train_per_domain": 24,
        "lora": {"rank": 4, "alpha": 8, "last_layers": 1},
        "train": {"batch_size": 4, "learning_rate": 1e-3},
        "encode": {"max_length": 64},
        "influence": {"proj_dim": 64, "proxy_examples": 16, "validation_examples": 8, "chunk_size": 16},
        "feedback": {"examples": 16},
    },
    # The paper's protocol (9 domains, M = 10,000, k = 1, T = 10, 50 warm-start mixtures), for a
    # TPU/GPU host with a real checkpoint: set --model to a Llama-3-8B-Instruct directory.
    "paper": {
        "model": "meta-llama/Meta-Llama-3-8B-Instruct",
        "domains": ["trivia_qa", "gsm8k", "medmcqa", "medqa_en", "sciq", "hellaswag", "commonsense_qa",
                    "nq_open", "lambada"],
        "target": "boolq", "budget": 10000, "k": 1, "rounds": 10, "warm_start": 50,
        "train_per_domain": 0, "dtype": "bfloat16",
        "lora": {"rank": 16, "alpha": 32, "targets": ["q", "k", "v", "o", "gate", "up", "down"],
                 "last_layers": None},
        "train": {"epochs": 1.0, "batch_size": 8, "grad_accum": 4, "learning_rate": 1e-4},
        "encode": {"max_length": 512, "chat_template": "auto"},
        "influence": {"proj_dim": 8192, "proxy_examples": 2000, "validation_examples": 256},
        "feedback": {"examples": 0, "metric": "acc_norm"},
    },
}


def _merge(base: dict, over: dict, where: str) -> dict:
    out = dict(base)
    for k, v in over.items():
        if k in _SECTIONS:
            if not isinstance(v, dict):
                raise ConfigError(f"{where}: `{k}` must be a mapping, got {v!r}")
            allowed = {f.name for f in dataclasses.fields(_SECTIONS[k])}
            bad = set(v) - allowed
            if bad:
                raise ConfigError(f"{where}: unknown option(s) {sorted(bad)} in `{k}`; allowed: {sorted(allowed)}")
            out[k] = {**out.get(k, {}), **v}
        else:
            out[k] = v
    return out


def _build(values: dict) -> RunConfig:
    allowed = {f.name for f in dataclasses.fields(RunConfig)}
    bad = set(values) - allowed
    if bad:
        raise ConfigError(f"unknown option(s) {sorted(bad)}; allowed: {sorted(allowed)}")
    kw = {k: (_SECTIONS[k](**v) if k in _SECTIONS else v) for k, v in values.items()}
    try:
        return RunConfig(**kw)
    except TypeError as e:
        raise ConfigError(str(e)) from e


def preset(name: str, **overrides) -> RunConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; available: {', '.join(PRESETS)}")
    return _build(_merge({"preset": name, **PRESETS[name]}, overrides, f"preset {name}"))


def to_dict(config: RunConfig) -> dict:
    return dataclasses.asdict(config)


def load_config(path: str | Path, base: dict | None = None) -> dict:
    """Values from a YAML (or JSON) file, merged over ``base``.

    Raises:
      ConfigError: unreadable file, a parse error (with line), not a mapping.
    """
    import yaml

    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from e
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ConfigError(f"{where}: the config does not parse: {getattr(e, 'problem', e)}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the config must be a mapping of options, got {type(data).__name__}")
    return _merge(base or {}, data, str(path))


# ------------------------------------------------------------------------------------------- flags
def _parse_value(text: str, annotation) -> Any:
    import yaml

    try:
        v = yaml.safe_load(text)
    except yaml.YAMLError:
        v = text
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is str or (origin in (typing.Union, types.UnionType) and str in args):
        return None if v is None and type(None) in args else (text if v is not None else None)
    if annotation is list or origin is list:
        if isinstance(v, str):
            v = [s.strip() for s in v.split(",") if s.strip()]
        return v
    if annotation is float and isinstance(v, int):
        return float(v)
    return v


def _annotation(cls, name):
    hints = typing.get_type_hints(cls)
    return hints[name]


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per option (``--name`` and ``--section.name``), documented from the dataclasses."""
    g = parser.add_argument_group("run options (override the preset and --config)")
    for f in dataclasses.fields(RunConfig):
        if f.name in _SECTIONS or f.name == "preset":  # --preset is the run command's own flag
            continue
        g.add_argument(f"--{f.name}", dest=f"opt:{f.name}", default=None, metavar="V",
                       help=f"{f.metadata.get('help', '')} (demo: {_default(RunConfig, f)})")
    for sec, cls in _SECTIONS.items():
        sg = parser.add_argument_group(f"{sec} options")
        for f in dataclasses.fields(cls):
            sg.add_argument(f"--{sec}.{f.name}", dest=f"opt:{sec}.{f.name}", default=None, metavar="V",
                            help=f"{f.metadata.get('help', '')} (default: {_default(cls, f)})")


def _default(cls, f):
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None


def config_from_args(args: argparse.Namespace, *, preset_name: str | None = None,
                     config_file: str | None = None) -> RunConfig:
    """Preset -> YAML file -> flags."""
    values: dict = {}
    flags: dict = {}
    for key, raw in vars(args).items():
        if not key.startswith("opt:") or raw is None:
            continue
        name = key[4:]
        if "." in name:
            sec, field = name.split(".", 1)
            flags.setdefault(sec, {})[field] = _parse_value(raw, _annotation(_SECTIONS[sec], field))
        else:
            flags[name] = _parse_value(raw, _annotation(RunConfig, name))
    file_values = load_config(config_file) if config_file else {}
    name = preset_name or flags.get("preset") or file_values.get("preset") or "demo"
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; available: {', '.join(PRESETS)}")
    values = _merge({"preset": name, **PRESETS[name]}, file_values, config_file or "config")
    values = _merge(values, flags, "flags")
    values["preset"] = name
    return _build(values)
