"""The configuration of a run: one tree whose sections are the library's own configs.

::

    RunConfig
      method, model, domains, target, mode, budget, k, rounds, warm_start, ...   (the run's own)
      lora       duet_jax.models.LoRAConfig
      train      duet_jax.train.TrainConfig
      encode     duet_jax.data.EncodeConfig
      bo         duet_jax.bo.BOConfig            (``--bo.profile paper``: the paper's protocol)
      influence  duet_jax.influence.domains.InfluenceConfig
      feedback   duet_jax.feedback.config.FeedbackConfig
      selector   duet_jax.loop.selectors.SelectorConfig
      baselines  duet_jax.loop.proxies.BaselineConfig
      mesh       duet_jax.sharding.MeshConfig    (used when the process sees more than one device)

Each default lives in its library config, once; a preset (``demo``, ``smoke``, ``paper``) only lists
the values it changes. Values come, in order, from the preset, a YAML file (``--config``) and flags
(``--budget 64``, ``--train.learning_rate 1e-4``). Every value is converted to its field's type and
checked when the tree is built, before any model or data is loaded: a bad value names its option
(``train.learning_rate: expected a float, got 'fast'``).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import types
import typing
from pathlib import Path
from typing import Any

from duet_jax.bo.config import BOConfig, without_neutral
from duet_jax.data.encode import EncodeConfig
from duet_jax.errors import ConfigError, DuetError
from duet_jax.feedback.config import FeedbackConfig
from duet_jax.influence.domains import InfluenceConfig
from duet_jax.loop.methods import METHODS
from duet_jax.loop.proxies import BaselineConfig
from duet_jax.loop.selectors import SelectorConfig
from duet_jax.models.lora import LoRAConfig
from duet_jax.sharding import MeshConfig
from duet_jax.train.trainer import TrainConfig

__all__ = ["RunConfig", "SECTIONS", "PRESETS", "preset", "load_config", "add_config_flags",
           "config_from_args", "to_dict", "from_dict", "config_hash", "convert", "FlagText"]


def _f(default, help: str):
    if isinstance(default, list | dict):
        return dataclasses.field(default_factory=lambda d=default: json.loads(json.dumps(d)),
                                 metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


def _sec(cls, help: str):
    return dataclasses.field(default_factory=cls, metadata={"help": help, "section": True})


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunConfig:
    """One run: a method, its data, its budget, and the library configs it uses."""

    preset: str = _f("demo", "the preset the other values start from: demo, smoke, paper")
    method: str = _f("duet_if", "the mixture method (see --help's list): duet_if, duet_ur, duet_rh, "
                                "duet_less (oracle), uniform, random_search, doremi, regmix, aioli")
    model: str = _f("smollm2-135m-instruct", "model SPEC: built-in name, HF dir, .gguf path, hub name, "
                                             "or tiny-* for a random tiny model (tests)")
    domains: list = _f(["arc_easy", "commonsense_qa", "social_i_qa", "winogrande"],
                       "training domains (built-in names, local files, hf:owner/name); a flag takes "
                       "a comma-separated list")
    target: str = _f("arc_challenge", "the unseen task: a built-in domain (or file) evaluated on its "
                                      "evaluation split")
    mode: str = _f("ood", "ood: the target's domain is not in the pool; in_domain: only its train "
                          "split is, and it is scored on its disjoint evaluation split")
    budget: int = _f(64, "data budget M: examples per mixture")
    k: int = _f(1, "mixtures drawn (and fine-tuned together) per proposed ratio; best of k kept")
    rounds: int = _f(4, "rounds T after the warm start (feedback evaluations = warm_start + rounds)")
    warm_start: int = _f(3, "warm-start ratios: the uniform ratio plus random Dirichlet(1) draws")
    replace: bool = _f(True, "sample with replacement inside domains (false: ratios are capped by "
                             "each domain's size)")
    train_per_domain: int = _f(64, "cap on each domain's train examples in the pool (0: all)")
    validation: float = _f(0.1, "validation split size (fraction, or count if >= 1)")
    evaluation: float = _f(0.2, "evaluation split size (fraction, or count if >= 1)")
    seed: int = _f(0, "seed of everything (splits are content-hashed and do not depend on it)")
    out_dir: str | None = _f(None, "run directory (default runs/<time>)")
    influence_dir: str | None = _f(None, "where the influence stores live (default RUN_DIR/influence); "
                                         "runs of one setting and seed can share one to compute the "
                                         "scores once")
    trunk_dir: str | None = _f(None, "a directory of frozen-trunk hidden states shared by runs (keyed by "
                                     "the frozen weights and the token ids; default: none, each run "
                                     "computes its own)")
    dtype: str = _f("float32", "compute dtype: float32 or bfloat16")
    divergence_check: bool = _f(True, "record a fine-tune whose loss rose or reached the uniform-"
                                      "prediction loss as a failed evaluation")
    lora: LoRAConfig = _sec(LoRAConfig, "LoRA (duet_jax.models.LoRAConfig)")
    train: TrainConfig = _sec(TrainConfig, "fine-tuning (duet_jax.train.TrainConfig)")
    encode: EncodeConfig = _sec(EncodeConfig, "tokenization (duet_jax.data.EncodeConfig)")
    bo: BOConfig = _sec(BOConfig, "Bayesian optimisation (duet_jax.bo.BOConfig)")
    influence: InfluenceConfig = _sec(InfluenceConfig, "influence scores "
                                                       "(duet_jax.influence.domains.InfluenceConfig)")
    feedback: FeedbackConfig = _sec(FeedbackConfig, "feedback of the unseen task "
                                                    "(duet_jax.feedback.config.FeedbackConfig)")
    selector: SelectorConfig = _sec(SelectorConfig, "sampling inside each domain "
                                                    "(duet_jax.loop.selectors.SelectorConfig)")
    baselines: BaselineConfig = _sec(BaselineConfig, "proxy runs of doremi, regmix, aioli "
                                                     "(duet_jax.loop.proxies.BaselineConfig)")
    mesh: MeshConfig = _sec(MeshConfig, "device mesh (duet_jax.sharding.MeshConfig): frozen weights "
                                        "sharded on fsdp, adapters and batches on data")

    def __post_init__(self):
        def need(cond, msg):
            if not cond:
                raise ConfigError(msg)

        need(self.method in METHODS, f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        need(self.mode in ("ood", "in_domain"), f"mode must be ood or in_domain, got {self.mode!r}")
        need(self.budget >= 1, f"budget must be >= 1, got {self.budget}")
        need(self.k >= 1, f"k must be >= 1, got {self.k}")
        need(self.rounds >= 0, f"rounds must be >= 0, got {self.rounds}")
        need(self.warm_start >= 1, f"warm_start must be >= 1, got {self.warm_start}")
        need(self.train_per_domain >= 0, f"train_per_domain must be >= 0, got {self.train_per_domain}")
        need(len(self.domains) >= 1, "at least one training domain is needed")
        for d in self.domains:
            need(isinstance(d, str | dict), f"domains: each entry is a name or a mapping, got {d!r}")
        need(self.dtype in ("float32", "bfloat16"), f"dtype must be float32 or bfloat16, got {self.dtype!r}")
        for name in ("validation", "evaluation"):
            v = getattr(self, name)
            need(v > 0 and (v < 1 or float(v).is_integer()),
                 f"{name} must be a fraction in (0, 1) or a whole count >= 1, got {v}")
        need(self.budget >= self.train.batch_size,
             f"budget ({self.budget}) must be at least train.batch_size ({self.train.batch_size}): "
             "a mixture must fill one batch")
        from duet_jax.data.domain import domain_name

        names = [domain_name(d) for d in self.domains]  # the loader's names (a file's stem, ...)
        need(len(set(names)) == len(names), f"domains: a domain is listed twice: {names}")
        if self.mode == "ood" and domain_name(self.target) in names:
            raise ConfigError(
                f"the target {self.target!r} is also a training domain; in ood mode the unseen task's "
                "domain must be left out of the pool (or use mode: in_domain)")
        if self.mode == "in_domain" and domain_name(self.target) not in names:
            raise ConfigError(f"in_domain mode needs the target {self.target!r} among the domains")

    @property
    def evaluations(self) -> int:
        """Feedback evaluations on the unseen task, the same for every method."""
        return self.warm_start + self.rounds


SECTIONS: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(RunConfig)
                             if f.metadata.get("section")}

PRESETS: dict[str, dict] = {
    # The offline demo: SmolLM2-135M on CPU in minutes. Short-answer domains, plain prompts.
    "demo": {
        "lora": {"last_layers": 2},
        "train": {"epochs": 2.0, "learning_rate": 2e-3},
        "encode": {"max_length": 128, "buckets": [32, 64], "chat_template": "never"},
    },
    # A tiny random model, seconds: for tests and for checking a setup.
    "smoke": {
        "model": "tiny-llama", "domains": ["arc_easy", "sciq", "openbookqa"], "target": "arc_challenge",
        "budget": 16, "rounds": 2, "warm_start": 2, "k": 2, "train_per_domain": 24,
        "lora": {"rank": 4, "alpha": 8, "last_layers": 1},
        "train": {"epochs": 2.0, "batch_size": 4, "learning_rate": 1e-3},
        "encode": {"max_length": 64, "buckets": [32], "chat_template": "never"},
        "influence": {"proj_dim": 64, "proxy_examples": 16, "validation_examples": 8, "chunk_size": 16},
        "feedback": {"examples": 16},
        "baselines": {"proxy_runs": 3, "aioli_rounds": 1, "doremi_steps": 4},
    },
    # The paper's protocol (9 domains, M = 10,000, k = 1, T = 10, 50 warm-start mixtures), for a
    # TPU/GPU host with a real checkpoint: set --model to a Llama-3-8B-Instruct directory.
    "paper": {
        "model": "meta-llama/Meta-Llama-3-8B-Instruct",
        "domains": ["trivia_qa", "gsm8k", "medmcqa", "medqa_en", "sciq", "hellaswag", "commonsense_qa",
                    "nq_open", "lambada"],
        "target": "boolq", "budget": 10000, "k": 1, "rounds": 10, "warm_start": 50,
        "train_per_domain": 0, "dtype": "bfloat16",
        "lora": {"rank": 16, "alpha": 32},
        "train": {"epochs": 1.0, "batch_size": 8, "grad_accum": 4, "learning_rate": 1e-4, "remat": True},
        "encode": {"max_length": 512},
        "bo": {"profile": "paper"},
        "influence": {"proj_dim": 8192, "proxy_examples": 2000, "validation_examples": 256, "remat": True},
        "feedback": {"examples": 0, "metric": "acc_norm"},
    },
}


# ------------------------------------------------------------------------------ typed conversion
_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}
_NULL = {"null", "none", "~", ""}


class FlagText(str):
    """A value as typed on the command line (``--domains a,b``): text that may spell a list."""


def _tname(t) -> str:
    return getattr(t, "__name__", None) or str(t).replace("typing.", "")


def convert(value: Any, annotation, where: str) -> Any:
    """``value`` (from YAML, JSON or a flag's text) as the type ``annotation``; ConfigError naming
    ``where`` when it is not one.

    Flags give text (:class:`FlagText`): ``1e-4`` is a float, ``a,b`` or ``[a, b]`` a list, ``null``
    None. In a YAML file a list must be a list (``domains: arc_easy`` is an error), and ``1e-4``,
    which YAML reads as text, is still a float. Integers are never silently truncated (``2.5`` for
    an int is an error), booleans are never numbers.
    """
    bad = lambda what: ConfigError(f"{where}: expected {what}, got {value!r}")
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and (value is None or (isinstance(value, str) and value.strip().lower() in _NULL)):
            return None
        rest = [a for a in args if a is not type(None)]
        for a in rest:
            try:
                return convert(value, a, where)
            except ConfigError:
                pass
        raise bad(" or ".join(_tname(a) for a in rest) + (" or null" if type(None) in args else ""))
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise bad("true or false")
    if annotation is int:
        if isinstance(value, bool):
            raise bad("an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip().replace("_", ""))
            except ValueError:
                try:
                    f = float(value)
                except ValueError:
                    raise bad("an integer") from None
                if math.isfinite(f) and f.is_integer():
                    return int(f)
        raise bad("an integer")
    if annotation is float:
        if isinstance(value, bool):
            raise bad("a number")
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise bad("a number")
    if annotation is str:
        if isinstance(value, str):
            return str(value)
        raise bad("a string")
    if annotation in (list, tuple) or origin in (list, tuple):
        if isinstance(value, str) and not isinstance(value, FlagText):
            raise bad("a list (in YAML: [a, b] or one '- item' per line)")
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                import yaml

                try:
                    value = yaml.safe_load(text)
                except yaml.YAMLError:
                    raise bad("a list") from None
            else:
                value = [s.strip() for s in text.split(",") if s.strip()]
        if not isinstance(value, list | tuple):
            raise bad("a list")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise bad(f"a list of {len(args)}")
            return tuple(convert(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
        elem = args[0] if args else Any
        out = [convert(v, elem, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if (origin is tuple or annotation is tuple) else out
    if annotation is dict or origin is dict:
        if isinstance(value, dict):
            return value
        raise bad("a mapping")
    return value


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _build_section(cls, values: dict, where: str):
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping of options, got {values!r}")
    allowed = {f.name for f in dataclasses.fields(cls)}
    bad = sorted(set(values) - allowed)
    if bad:
        raise ConfigError(f"{where}: unknown option(s) {bad}; allowed: {sorted(allowed)}")
    hints = _hints(cls)
    kw = {k: convert(v, hints[k], f"{where}.{k}" if where else k) for k, v in values.items()}
    if cls is BOConfig:
        profile = kw.pop("profile", "default")
        try:
            return BOConfig.from_profile(profile, **kw)
        except (TypeError, ValueError) as e:
            raise _named(e, where) from e
    try:
        return cls(**kw)
    except (DuetError, TypeError, ValueError) as e:
        raise _named(e, where) from e


def _named(e: Exception, where: str) -> ConfigError:
    msg = str(e)
    return ConfigError(msg if not where or msg.startswith(where) else f"{where}: {msg}")


def _merge(base: dict, over: dict, where: str) -> dict:
    if not isinstance(over, dict):
        raise ConfigError(f"{where}: the config must be a mapping of options, got {over!r}")
    out = dict(base)
    for k, v in over.items():
        if k in SECTIONS:
            if not isinstance(v, dict):
                raise ConfigError(f"{where}: `{k}` must be a mapping, got {v!r}")
            allowed = {f.name for f in dataclasses.fields(SECTIONS[k])}
            bad = set(v) - allowed
            if bad:
                raise ConfigError(f"{where}: unknown option(s) {sorted(bad)} in `{k}`; allowed: {sorted(allowed)}")
            out[k] = {**out.get(k, {}), **v}
        else:
            out[k] = v
    return out


def _build(values: dict) -> RunConfig:
    """A validated RunConfig from plain values (a preset merged with a file and flags, or a
    saved config.json)."""
    allowed = {f.name for f in dataclasses.fields(RunConfig)}
    bad = sorted(set(values) - allowed)
    if bad:
        raise ConfigError(f"unknown option(s) {bad}; allowed: {sorted(allowed)}")
    hints = _hints(RunConfig)
    kw = {}
    for k, v in values.items():
        kw[k] = _build_section(SECTIONS[k], v, k) if k in SECTIONS else convert(v, hints[k], k)
    try:
        return RunConfig(**kw)
    except (TypeError, ValueError) as e:
        raise _named(e, "") from e


def preset(name: str, **overrides) -> RunConfig:
    """The preset ``name`` with ``overrides`` (sections as mappings)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; available: {', '.join(PRESETS)}")
    return _build(_merge({"preset": name, **PRESETS[name]}, overrides, f"preset {name}"))


def to_dict(config: RunConfig) -> dict:
    """JSON-able values of the whole tree (tuples as lists); :func:`from_dict` reads them back."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def from_dict(values: dict) -> RunConfig:
    return _build(values)


#: where a run writes and reads its files: not part of its hash, and may change on resume
LOCATION_FIELDS = ("out_dir", "influence_dir", "trunk_dir")


def _decisive(config: RunConfig | dict) -> dict:
    """The config as a plain dict of what decides a run's results: not where it is written, and
    without the options added later that hold the value at which they behave as before."""
    d = to_dict(config) if isinstance(config, RunConfig) else json.loads(json.dumps(config))
    for k in LOCATION_FIELDS:
        d.pop(k, None)
    if isinstance(d.get("bo"), dict):  # options added later, at their old behaviour: not hashed
        d["bo"] = without_neutral(d["bo"])
    return d


def config_hash(config: RunConfig | dict) -> str:
    """A hash of everything that decides a run's results (not where it is written)."""
    return hashlib.sha256(json.dumps(_decisive(config), sort_keys=True).encode()).hexdigest()[:16]


def config_diff(old: RunConfig | dict, new: RunConfig | dict) -> list[str]:
    """The top-level sections where two configs differ in what decides the results (empty exactly
    when their :func:`config_hash` agree): an older run's ``config.json`` that lacks an option
    added since, at its neutral value, is the same run."""
    a, b = _decisive(old), _decisive(new)
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


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
def _default(cls, f):
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None


def _doc_of(cls) -> dict[str, str]:
    """``name: text`` from a dataclass docstring's ``Attributes:`` entries (first sentence)."""
    out: dict[str, str] = {}
    doc = cls.__doc__ or ""
    cur = None
    for line in doc.splitlines():
        s = line.strip()
        head, sep, rest = s.partition(":")
        if sep and head.replace("_", "").isalnum() and " " not in head and line.startswith(" " * 6) \
                and not line.startswith(" " * 8):
            cur = head
            out[cur] = rest.strip()
        elif cur and s and line.startswith(" " * 8):
            out[cur] += " " + s
        elif not s:
            cur = None
    return out


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per option (``--name`` and ``--section.name``), documented from the configs."""
    g = parser.add_argument_group("run options (override the preset and --config)")
    demo = PRESETS["demo"]
    for f in dataclasses.fields(RunConfig):
        if f.name in SECTIONS or f.name == "preset":  # --preset is the run command's own flag
            continue
        g.add_argument(f"--{f.name}", dest=f"opt:{f.name}", default=None, metavar="V",
                       help=f"{f.metadata.get('help', '')} (default: {_default(RunConfig, f)})")
    for sec, cls in SECTIONS.items():
        fields = dataclasses.fields(cls)
        docs = _doc_of(cls)
        sg = parser.add_argument_group(f"{sec} options ({cls.__module__}.{cls.__name__})")
        for f in fields:
            d = _default(cls, f)
            shown = f"default: {d}"
            if f.name in demo.get(sec, {}):
                shown += f"; demo: {demo[sec][f.name]}"
            text = (f.metadata.get("help") or docs.get(f.name) or "").replace("%", "%%")
            sg.add_argument(f"--{sec}.{f.name}", dest=f"opt:{sec}.{f.name}", default=None, metavar="V",
                            help=f"{text} ({shown})")


def config_from_args(args: argparse.Namespace, *, preset_name: str | None = None,
                     config_file: str | None = None) -> RunConfig:
    """Preset -> YAML file -> flags, converted and checked."""
    flags: dict = {}
    for key, raw in vars(args).items():
        if not key.startswith("opt:") or raw is None:
            continue
        name = key[4:]
        if "." in name:
            sec, field = name.split(".", 1)
            flags.setdefault(sec, {})[field] = FlagText(raw)
        else:
            flags[name] = FlagText(raw)
    file_values = load_config(config_file) if config_file else {}
    name = preset_name or file_values.get("preset") or "demo"
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; available: {', '.join(PRESETS)}")
    values = _merge({"preset": name, **PRESETS[name]}, file_values, config_file or "config")
    values = _merge(values, flags, "flags")
    values["preset"] = name
    return _build(values)
