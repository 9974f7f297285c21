"""A :class:`Domain`: a named set of examples that DUET mixes, and the registry that finds one.

A domain is given by a spec:

* a built-in name (``"sciq"``; :func:`builtin_names` lists them);
* a local file path (``"data/chats.jsonl"``; .jsonl/.json/.parquet/.csv, columns ``prompt`` and
  ``answer`` unless mapped otherwise);
* ``"hf:owner/name[:config][@split]"`` for a Hugging Face hub dataset (needs a network);
* a dict ``{"name": ..., "source": <path or hf:...>, "kind": "qa", "fields": {...}}`` for full
  control (see :class:`duet_jax.data.sources.FieldMapping`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

from duet_jax.data import builtin, sources
from duet_jax.data.example import Example
from duet_jax.data.splits import Splits, SplitSpec, split_examples
from duet_jax.errors import ConfigError, EmptySplitError, UnknownDomainError

__all__ = ["Domain", "domain_name", "get_domain", "get_domains", "builtin_names"]


def builtin_names() -> list[str]:
    return list(builtin.BUILTIN)


@dataclasses.dataclass(frozen=True, eq=False)
class Domain:
    """A named source of examples.

    Attributes:
      name: unique name (used in ratios, reports and example ids).
      kind: "qa", "mc", "math" or "text".
      description: one line for listings.
      source: where the rows come from (built-in name, file path or hub name).
    """

    name: str
    kind: str
    description: str
    source: str
    _load: Callable[[], tuple[list[Example], int]] = dataclasses.field(repr=False)

    @functools.cached_property
    def _loaded(self) -> tuple[list[Example], int]:
        return self._load()

    def examples(self) -> list[Example]:
        """Every example (all splits together), in source order.

        Raises:
          EmptySplitError: the source yields no usable example.
        """
        ex, skipped = self._loaded
        if not ex:
            raise EmptySplitError(
                f"domain {self.name!r} ({self.source}) has no usable example"
                + (f" ({skipped} rows skipped for an empty prompt or answer)" if skipped else "")
            )
        return list(ex)

    @property
    def skipped_rows(self) -> int:
        """Source rows that could not become an example (empty prompt or answer)."""
        return self._loaded[1]

    def splits(self, spec: SplitSpec | None = None) -> Splits:
        """Disjoint train / validation / evaluation splits (see duet_jax.data.splits)."""
        return split_examples(self.name, self.examples(), spec)


def _builtin_domain(name: str) -> Domain:
    spec = builtin.BUILTIN[name]
    return Domain(name, spec.kind, spec.description, f"builtin:{name}",
                  functools.partial(builtin.load_builtin, name))


def _file_domain(name: str, path: str, kind: str, fields: sources.FieldMapping, desc: str) -> Domain:
    def load():
        return sources.rows_to_examples(sources.read_local_rows(path), name, kind, fields)

    return Domain(name, kind, desc or f"local file {path}", path, load)


def _hub_domain(name: str, hub: str, kind: str, fields: sources.FieldMapping, desc: str) -> Domain:
    ref, _, split = hub.partition("@")
    repo, _, config = ref.partition(":")

    def load():
        rows = sources.load_hub_rows(repo, config or None, split or "train")
        return sources.rows_to_examples(rows, name, kind, fields)

    if sources.datasets_offline():
        load()  # fail fast with OfflineError, before any work is queued on this domain
    return Domain(name, kind, desc or f"hub dataset {hub}", f"hf:{hub}", load)


def domain_name(spec: str | dict[str, Any]) -> str:
    """The name a spec's domain gets (in ratios, histories and reports), without loading it:
    a built-in's name, a local file's stem, ``owner__name`` for a hub dataset, or a dict's
    ``name`` (else its source's). The one rule that :func:`get_domain` follows."""
    if isinstance(spec, dict):
        source = spec.get("source") or spec.get("name") or ""
        if spec.get("name"):
            return spec["name"]
        if source in builtin.BUILTIN:
            return source
    else:
        source = spec
    if source in builtin.BUILTIN:
        return source
    if source.startswith("hf:"):
        return source[3:].replace("/", "__")
    return Path(source).expanduser().stem


def get_domain(spec: str | dict[str, Any]) -> Domain:
    """Build a domain from a spec (see the module docstring).

    Raises:
      UnknownDomainError: an unknown name (the message lists the built-in ones).
      OfflineError: a hub dataset while offline.
      ConfigError: a malformed dict spec.
    """
    if isinstance(spec, str):
        if spec in builtin.BUILTIN:
            return _builtin_domain(spec)
        if spec.startswith("hf:"):
            return _hub_domain(domain_name(spec), spec[3:], "qa", sources.FieldMapping(), "")
        p = Path(spec).expanduser()
        if p.suffix.lower() in sources.LOCAL_SUFFIXES:
            return _file_domain(domain_name(spec), str(p), "qa", sources.FieldMapping(), "")
        raise UnknownDomainError(
            f"unknown domain {spec!r}. Built-in domains: {', '.join(builtin_names())}. "
            "Or give a local .jsonl/.json/.parquet/.csv path, or hf:owner/name for a hub dataset."
        )
    if not isinstance(spec, dict):
        raise ConfigError(f"a domain spec is a string or a dict, got {type(spec).__name__}")
    spec = dict(spec)
    allowed = {"name", "source", "kind", "fields", "description"}
    unknown = set(spec) - allowed
    if unknown:
        raise ConfigError(f"unknown domain keys {sorted(unknown)}; allowed: {sorted(allowed)}")
    source = spec.get("source") or spec.get("name")
    if not source:
        raise ConfigError(f"domain spec needs `source` (or a built-in `name`): {spec}")
    if source in builtin.BUILTIN and "fields" not in spec:
        d = _builtin_domain(source)
        return dataclasses.replace(d, name=domain_name(spec)) if "name" in spec else d
    fields = sources.FieldMapping.from_dict(spec.get("fields"))
    kind = spec.get("kind", "mc" if fields.choices else "qa")
    desc = spec.get("description", "")
    if source.startswith("hf:"):
        return _hub_domain(domain_name(spec), source[3:], kind, fields, desc)
    p = Path(source).expanduser()
    if p.suffix.lower() not in sources.LOCAL_SUFFIXES:
        raise UnknownDomainError(
            f"unknown domain source {source!r}: not a built-in name ({', '.join(builtin_names())}), "
            f"not a local file with one of {sources.LOCAL_SUFFIXES}, not hf:owner/name"
        )
    return _file_domain(domain_name(spec), str(p), kind, fields, desc)


def get_domains(specs: list[str | dict[str, Any]]) -> list[Domain]:
    """Build several domains; names must be unique."""
    out = [get_domain(s) for s in specs]
    names = [d.name for d in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"domain names must be unique; repeated: {dup}")
    return out
