"""The run's config tree: library configs embedded (one place per default), every flag typed and
checked up front, bad values named, presets, profiles, YAML."""

import argparse
import dataclasses
import json
import types
import typing

import pytest
from hypothesis import given
from hypothesis import strategies as st

from duet_jax.bo.config import BOConfig
from duet_jax.config import (
    PRESETS,
    SECTIONS,
    FlagText,
    RunConfig,
    add_config_flags,
    config_from_args,
    config_hash,
    convert,
    from_dict,
    preset,
    to_dict,
)
from duet_jax.data.encode import EncodeConfig
from duet_jax.errors import ConfigError
from duet_jax.models.lora import LoRAConfig
from duet_jax.train.trainer import TrainConfig


def parse(*argv, config_file=None):
    p = argparse.ArgumentParser()
    add_config_flags(p)
    return config_from_args(p.parse_args(list(argv)), config_file=config_file)


def test_sections_are_the_library_configs_with_their_defaults():
    cfg = RunConfig()
    assert type(cfg.lora) is LoRAConfig and cfg.lora == LoRAConfig()
    assert type(cfg.train) is TrainConfig and cfg.train == TrainConfig()
    assert type(cfg.encode) is EncodeConfig and cfg.encode == EncodeConfig()
    assert type(cfg.bo) is BOConfig and cfg.bo == BOConfig()
    for name, cls in SECTIONS.items():
        assert getattr(cfg, name) == cls()
    # a preset lists only what it changes, and only real options
    for name, values in PRESETS.items():
        for sec, v in values.items():
            if sec in SECTIONS:
                assert set(v) <= {f.name for f in dataclasses.fields(SECTIONS[sec])}, (name, sec)
            else:
                assert sec in {f.name for f in dataclasses.fields(RunConfig)}, (name, sec)


def test_scientific_notation_and_lists_from_flags():
    cfg = parse("--train.learning_rate", "1e-4", "--influence.damping", "1e-3", "--bo.beta", "2e0",
                "--domains", "arc_easy,sciq", "--encode.buckets", "[16, 32]", "--lora.last_layers", "null")
    assert cfg.train.learning_rate == 1e-4 and cfg.influence.damping == 1e-3 and cfg.bo.beta == 2.0
    assert cfg.domains == ["arc_easy", "sciq"] and cfg.encode.buckets == (16, 32)
    assert cfg.lora.last_layers is None


@pytest.mark.parametrize("argv, match", [
    (["--budget", "lots"], "budget: expected an integer, got 'lots'"),
    (["--rounds", "2.5"], "rounds: expected an integer"),
    (["--train.learning_rate", "fast"], "train.learning_rate: expected a number"),
    (["--train.remat", "maybe"], "train.remat: expected true or false"),
    (["--k", "0"], "k must be >= 1"),
    (["--method", "magic"], "method must be one of"),
    (["--bo.profile", "nope"], "profile"),
    (["--lora.rank", "-1"], "lora: LoRA rank must be positive"),
    (["--feedback.metric", "bleu"], "feedback.metric"),
    (["--influence.curvature", "ihvp"], "influence.curvature"),
    (["--budget", "2", "--train.batch_size", "4"], "at least train.batch_size"),
])
def test_bad_values_name_their_option(argv, match):
    with pytest.raises(ConfigError, match=match):
        parse(*argv)


def test_yaml_values_are_typed_and_a_string_is_not_a_list(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  learning_rate: 1e-4\nbudget: 32\n")
    cfg = parse(config_file=str(f))
    assert cfg.train.learning_rate == 1e-4 and cfg.budget == 32
    f.write_text("domains: arc_easy\n")
    with pytest.raises(ConfigError, match="domains: expected a list"):
        parse(config_file=str(f))
    f.write_text("budget: lots\n")
    with pytest.raises(ConfigError, match="budget: expected an integer"):
        parse(config_file=str(f))


def test_bo_profile_then_overrides():
    cfg = parse("--bo.profile", "paper", "--bo.beta", "2")
    paper = BOConfig.from_profile("paper")
    assert cfg.bo.profile == "paper" and cfg.bo.beta == 2.0
    assert cfg.bo.kernel == paper.kernel and cfg.bo.acquisition == paper.acquisition
    assert preset("paper").bo.profile == "paper"


def test_round_trip_through_config_json_and_hash():
    cfg = preset("smoke", method="regmix", lora={"targets": ["q", "v"]})
    again = from_dict(json.loads(json.dumps(to_dict(cfg))))
    assert again == cfg and config_hash(again) == config_hash(cfg)
    assert config_hash(dataclasses.replace(cfg, out_dir="elsewhere")) == config_hash(cfg)
    assert config_hash(preset("smoke", seed=1)) != config_hash(cfg)


# ------------------------------------------------------------------ property: every option type
def _strategy(ann):
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin in (typing.Union, types.UnionType):
        return st.one_of(*[st.none() if a is type(None) else _strategy(a) for a in args])
    if ann is bool:
        return st.booleans()
    if ann is int:
        return st.integers(-10**9, 10**9)
    if ann is float:
        return st.floats(allow_nan=False, allow_infinity=False, width=64)
    if ann is str:
        return st.text(st.characters(whitelist_categories=("L", "N"), whitelist_characters="_-./:{}"),
                       min_size=1, max_size=12).filter(lambda s: s.lower() not in ("null", "none", "~"))
    if origin is tuple and args and args[-1] is Ellipsis:
        return st.lists(_strategy(args[0]), max_size=4).map(tuple)
    if origin is tuple:
        return st.tuples(*[_strategy(a) for a in args])
    if ann is list or origin is list:
        return st.lists(_strategy(str), min_size=1, max_size=4)
    return None


def _render(v, ann) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v)  # e.g. 1e-05, 1.5e+300
    if isinstance(v, list | tuple):
        return json.dumps([list(x) if isinstance(x, tuple) else x for x in v])
    return str(v)


def _options():
    hints = typing.get_type_hints(RunConfig)
    out = [(f.name, hints[f.name]) for f in dataclasses.fields(RunConfig) if f.name not in SECTIONS]
    for sec, cls in SECTIONS.items():
        h = typing.get_type_hints(cls)
        out += [(f"{sec}.{f.name}", h[f.name]) for f in dataclasses.fields(cls)]
    return [(n, a) for n, a in out if _strategy(a) is not None]


OPTIONS = _options()


def test_every_option_has_a_strategy():
    names = {n for n, _ in OPTIONS}
    total = sum(1 for f in dataclasses.fields(RunConfig) if f.name not in SECTIONS) + sum(
        len(dataclasses.fields(c)) for c in SECTIONS.values())
    assert len(names) == total  # no option of an unknown type


@given(st.data())
def test_flag_text_converts_to_the_typed_value_for_every_option(data):
    name, ann = data.draw(st.sampled_from(OPTIONS))
    value = data.draw(_strategy(ann))
    got = convert(FlagText(_render(value, ann)), ann, name)
    norm = lambda x: json.loads(json.dumps(x))
    assert norm(got) == norm(value), (name, value, got)
    if ann is int or ann is bool:
        assert type(got) is type(value)


@given(st.sampled_from([(n, a) for n, a in OPTIONS if a in (int, float)]),
       st.sampled_from(["lots", "", "1,2", "true", "nan?"]))
def test_non_numbers_are_refused_with_the_option_name(option, text):
    name, ann = option
    with pytest.raises(ConfigError, match=name.replace(".", r"\.")):
        convert(FlagText(text), ann, name)


def test_an_option_added_at_its_neutral_value_does_not_change_config_hashes():
    """BO options added after results were recorded (``ADDED_FIELDS``) are left out of the hash at
    the value that behaves as before, so finished runs and run directories stay valid."""
    from duet_jax.bo.config import ADDED_FIELDS

    cfg = RunConfig()
    d = to_dict(cfg)
    old = {**d, "bo": {k: v for k, v in d["bo"].items() if k not in ADDED_FIELDS}}  # before they existed
    assert config_hash(old) == config_hash(cfg) == config_hash(d)
    for k in ADDED_FIELDS:
        assert k not in BOConfig().fingerprint_dict()
    changed = dataclasses.replace(cfg, bo=cfg.bo.replace(portfolio=("logei", "ucb", "thompson")))
    assert config_hash(changed) != config_hash(cfg)
    assert BOConfig(portfolio=("ucb",)).fingerprint_dict()["portfolio"] == ["ucb"]


def test_domains_and_target_are_matched_by_the_loaders_names():
    """A file is the domain named by its stem, as the loader names it: the config's checks of the
    pool against the target (and against itself) use those names, not the spec strings."""
    mine = {"name": "mine", "source": "data/mine.jsonl"}
    cfg = preset("smoke", mode="in_domain", target="data/mine.jsonl", domains=["sciq", mine])
    assert cfg.target == "data/mine.jsonl"
    with pytest.raises(ConfigError, match="also a training domain"):
        preset("smoke", mode="ood", target="other/sciq.jsonl", domains=["sciq", "arc_easy"])
    with pytest.raises(ConfigError, match="listed twice"):
        preset("smoke", domains=["sciq", "elsewhere/sciq.jsonl"])
    with pytest.raises(ConfigError, match="needs the target"):
        preset("smoke", mode="in_domain", target="data/mine.jsonl", domains=["sciq", "arc_easy"])
