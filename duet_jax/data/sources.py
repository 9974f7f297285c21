"""User data sources: local jsonl / json / parquet / csv files and Hugging Face hub datasets, turned
into :class:`~duet_jax.data.example.Example` by a :class:`FieldMapping`.

A field is a column name (``"question"``) or a template over columns
(``"Question: {question}\\nAnswer:"``). ``gold`` may hold an index, a letter (``"B"``) or the text of
the correct choice. When ``answer`` is not mapped but ``choices`` and ``gold`` are, the answer is the
gold choice's text.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import string
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from duet_jax.data.example import KINDS, Example, stable_id
from duet_jax.errors import ConfigError, DataFormatError, FieldMappingError, OfflineError

__all__ = ["FieldMapping", "read_local_rows", "rows_to_examples", "load_hub_rows", "LOCAL_SUFFIXES",
           "datasets_offline"]

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


@dataclasses.dataclass(frozen=True, kw_only=True)
class FieldMapping:
    """Which columns (or templates over columns) give an example's parts."""

    prompt: str = "prompt"
    answer: str | None = "answer"
    choices: str | None = None
    gold: str | None = None
    id: str | None = None
    answer_prefix: str = " "  # put between prompt and answer when the answer has no leading space

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> FieldMapping:
        d = dict(d or {})
        allowed = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - allowed
        if unknown:
            raise ConfigError(f"unknown field mapping keys {sorted(unknown)}; allowed: {sorted(allowed)}")
        return cls(**d)

    def columns(self) -> set[str]:
        cols = set()
        for f in (self.prompt, self.answer, self.choices, self.gold, self.id):
            if f is not None:
                cols |= _template_columns(f)
        return cols


def _template_columns(field: str) -> set[str]:
    if "{" not in field:
        return {field}
    return {name for _, name, _, _ in string.Formatter().parse(field) if name}


def _get(row: dict, field: str, where: str) -> Any:
    if "{" in field:
        try:
            return field.format(**row)
        except KeyError as e:
            raise FieldMappingError(f"{where}: template {field!r} names a missing column {e}") from e
    if field not in row:
        raise FieldMappingError(
            f"{where}: field mapping names the column {field!r}, which the data does not have; "
            f"columns: {sorted(row)}"
        )
    return row[field]


def _gold_index(value: Any, choices: list[str], where: str) -> int:
    if isinstance(value, bool):
        value = int(value)
    stripped = [c.strip() for c in choices]
    if isinstance(value, str) and value.strip() in stripped:  # the text of a choice wins
        return stripped.index(value.strip())
    if isinstance(value, int):
        idx = value
    elif isinstance(value, str) and value.strip().lstrip("-").isdigit():
        idx = int(value.strip())
    elif isinstance(value, str) and len(value.strip()) == 1 and value.strip().isalpha():
        idx = ord(value.strip().upper()) - ord("A")
    else:
        raise DataFormatError(f"{where}: cannot read the gold choice from {value!r}")
    if not 0 <= idx < len(choices):
        raise DataFormatError(f"{where}: gold index {idx} is outside the {len(choices)} choices")
    return idx


def rows_to_examples(
    rows: Iterable[tuple[str, dict]], domain: str, kind: str, fields: FieldMapping
) -> tuple[list[Example], int]:
    """Convert ``(where, row)`` pairs to examples. Rows with an empty prompt or answer are skipped
    and counted (returned), never silently dropped.

    Raises:
      FieldMappingError: a mapped column is missing (checked on the first row and every row).
      DataFormatError: a value cannot be read (the message says where).
    """
    if kind not in KINDS:
        raise ConfigError(f"domain {domain!r}: kind must be one of {KINDS}, got {kind!r}")
    if fields.answer is None and (fields.choices is None or fields.gold is None):
        raise ConfigError(f"domain {domain!r}: map `answer`, or both `choices` and `gold`")
    out: list[Example] = []
    skipped = 0
    for where, row in rows:
        prompt = _get(row, fields.prompt, where)
        choices = gold = None
        if fields.choices is not None:
            raw = _get(row, fields.choices, where)
            if isinstance(raw, str):
                try:
                    raw = json.loads(raw)
                except json.JSONDecodeError as e:
                    raise DataFormatError(f"{where}: choices must be a list, got {raw!r}") from e
            if not isinstance(raw, list | tuple) or not raw:
                raise DataFormatError(f"{where}: choices must be a non-empty list, got {raw!r}")
            choices = tuple(str(c).strip() for c in raw)
            if fields.gold is None:
                raise ConfigError(f"domain {domain!r}: `choices` is mapped but `gold` is not")
            gold = _gold_index(_get(row, fields.gold, where), list(choices), where)
        answer = _get(row, fields.answer, where) if fields.answer is not None else choices[gold]
        if prompt is None or answer is None or not str(prompt).strip() or not str(answer).strip():
            skipped += 1
            continue
        prompt, answer = str(prompt), str(answer)
        if answer[:1] not in (" ", "\n") and not prompt.endswith((" ", "\n")):
            answer = fields.answer_prefix + answer
        ex_id = str(_get(row, fields.id, where)) if fields.id else stable_id(domain, prompt, answer, choices)
        out.append(Example(ex_id, prompt, answer, kind, choices, gold))
    return out, skipped


def read_local_rows(path: str | Path) -> Iterator[tuple[str, dict]]:
    """Rows of a local .jsonl / .json / .parquet / .csv file as ``("file:line", dict)`` pairs.

    Raises:
      DataFormatError: unreadable or malformed file; the message names the file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"data file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from _jsonl(path)
    elif suffix == ".json":
        yield from _json(path)
    elif suffix == ".csv":
        yield from _csv(path)
    elif suffix == ".parquet":
        yield from _parquet(path)
    else:
        raise DataFormatError(f"{path}: unsupported file type {suffix!r}; expected one of {LOCAL_SUFFIXES}")


def _jsonl(path: Path):
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataFormatError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from e
            if not isinstance(row, dict):
                raise DataFormatError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            yield f"{path}:{lineno}", row


def _json(path: Path):
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataFormatError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from e
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataFormatError(f"{path}: expected a list of objects (or {{\"data\": [...]}})")
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise DataFormatError(f"{path}: item {i} is not an object")
        yield f"{path}[{i}]", row


def _csv(path: Path):
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames:
            raise DataFormatError(f"{path}:1: missing header row")
        n = len(reader.fieldnames)
        try:
            for row in reader:
                lineno = reader.line_num
                if None in row or any(v is None for v in row.values()):
                    raise DataFormatError(
                        f"{path}:{lineno}: expected {n} fields like the header, got a different number"
                    )
                yield f"{path}:{lineno}", row
        except csv.Error as e:
            raise DataFormatError(f"{path}:{reader.line_num}: {e}") from e


def _parquet(path: Path):
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:
        raise DataFormatError(f"{path}: not a readable parquet file: {e}") from e
    for i, row in enumerate(table.to_pylist()):
        yield f"{path}[row {i}]", row


def datasets_offline() -> bool:
    import os

    return any(
        os.environ.get(k, "").strip().lower() in {"1", "true", "yes", "on"}
        for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
    )


def load_hub_rows(name: str, config: str | None = None, split: str = "train"):
    """Rows of a hub dataset via ``datasets.load_dataset``.

    Raises:
      OfflineError: at once, when HF_DATASETS_OFFLINE or HF_HUB_OFFLINE is set.
    """
    if datasets_offline():
        raise OfflineError(
            f"the hub dataset {name!r} cannot be loaded: the process is offline "
            "(HF_DATASETS_OFFLINE / HF_HUB_OFFLINE is set). Use a built-in domain or a local "
            "jsonl/json/parquet/csv file instead, or unset the offline switch on a machine with a network."
        )
    import datasets

    try:
        ds = datasets.load_dataset(name, config, split=split)
    except ConnectionError as e:
        raise OfflineError(f"cannot reach the hub for dataset {name!r}: {e}") from e
    for i, row in enumerate(ds):
        yield f"{name}[{split}][{i}]", row
