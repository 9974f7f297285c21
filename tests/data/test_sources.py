"""Local files (jsonl, json, csv, parquet), field mappings, hub names offline, and their errors."""

import csv
import json

import pytest

from duet_jax.data import get_domain
from duet_jax.data.domain import domain_name
from duet_jax.errors import (
    ConfigError,
    DataFormatError,
    EmptySplitError,
    FieldMappingError,
    OfflineError,
    UnknownDomainError,
)

ROWS = [{"q": f"What is {i} plus {i}?", "a": str(2 * i), "opts": [str(2 * i), str(2 * i + 1)], "g": 0}
        for i in range(40)]


def write(tmp_path, suffix, rows=ROWS):
    p = tmp_path / f"mine{suffix}"
    if suffix == ".jsonl":
        p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    elif suffix == ".json":
        p.write_text(json.dumps(rows))
    elif suffix == ".csv":
        with open(p, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["q", "a", "opts", "g"])
            w.writeheader()
            for r in rows:
                w.writerow({**r, "opts": json.dumps(r["opts"])})
    elif suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), p)
    return p


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_local_formats_with_mapping(tmp_path, suffix):
    p = write(tmp_path, suffix)
    d = get_domain({"name": "adds", "source": str(p), "kind": "mc",
                    "fields": {"prompt": "Question: {q}\nAnswer:", "answer": None, "choices": "opts", "gold": "g"}})
    ex = d.examples()
    assert len(ex) == 40 and d.name == "adds" and d.kind == "mc"
    assert ex[3].prompt == "Question: What is 3 plus 3?\nAnswer:"
    assert ex[3].answer == " 6" and ex[3].choices == ("6", "7") and ex[3].gold == 0
    s = d.splits()
    assert sum(s.counts().values()) == 40


def test_plain_path_defaults_to_prompt_answer_columns(tmp_path):
    p = tmp_path / "qa.jsonl"
    p.write_text("\n".join(json.dumps({"prompt": f"p{i}", "answer": f"a{i}"}) for i in range(30)))
    d = get_domain(str(p))
    assert d.name == "qa" and d.kind == "qa" and d.examples()[0].answer == " a0"


def test_domain_name_is_the_name_get_domain_gives(tmp_path):
    """Histories and resumes name domains by domain_name(spec), without loading them: it must be
    the name the loaded domain carries, for every kind of spec."""
    p = write(tmp_path, ".jsonl")
    mapped = {"fields": {"prompt": "q", "answer": "a"}}
    specs = ["sciq", str(p), {"source": str(p), **mapped}, {"name": "adds", "source": str(p), **mapped},
             {"name": "sciq"}, {"name": "mine_sciq", "source": "sciq"}]
    for spec in specs:
        assert domain_name(spec) == get_domain(spec).name, spec
    assert [domain_name(s) for s in specs] == ["sciq", "mine", "mine", "adds", "sciq", "mine_sciq"]
    assert domain_name("hf:owner/name") == "owner__name"  # loading it needs a network


def test_gold_as_letter_and_as_text(tmp_path):
    rows = [{"q": "x?", "opts": ["u", "v", "w"], "g": "C"}, {"q": "y?", "opts": ["u", "v", "w"], "g": "v"}]
    p = write(tmp_path, ".json", rows)
    d = get_domain({"source": str(p), "fields": {"prompt": "q", "answer": None, "choices": "opts", "gold": "g"}})
    assert [e.gold for e in d.examples()] == [2, 1]


def test_malformed_jsonl_names_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"prompt": "a", "answer": "b"}\n{"prompt": "c", "answer": \n')
    with pytest.raises(DataFormatError, match=r"bad\.jsonl:2"):
        get_domain(str(p)).examples()


def test_malformed_json_and_csv(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text('[{"prompt": "a",\n "answer": }]')
    with pytest.raises(DataFormatError, match=r"bad\.json:2"):
        get_domain(str(p)).examples()
    c = tmp_path / "bad.csv"
    c.write_text("prompt,answer\nq1,a1\nq2\n")
    with pytest.raises(DataFormatError, match=r"bad\.csv:3"):
        get_domain(str(c)).examples()


def test_missing_column_is_named(tmp_path):
    p = write(tmp_path, ".jsonl")
    with pytest.raises(FieldMappingError, match="'question'.*columns"):
        get_domain({"source": str(p), "fields": {"prompt": "question", "answer": "a"}}).examples()
    with pytest.raises(FieldMappingError, match="missing column 'nope'"):
        get_domain({"source": str(p), "fields": {"prompt": "{nope}:", "answer": "a"}}).examples()


def test_empty_rows_counted_not_silent(tmp_path):
    p = tmp_path / "e.jsonl"
    p.write_text("\n".join(json.dumps({"prompt": f"p{i}", "answer": "" if i % 2 else "x"}) for i in range(40)))
    d = get_domain(str(p))
    assert len(d.examples()) == 20 and d.skipped_rows == 20
    q = tmp_path / "allempty.jsonl"
    q.write_text(json.dumps({"prompt": "p", "answer": ""}))
    with pytest.raises(EmptySplitError, match="1 rows skipped"):
        get_domain(str(q)).examples()


def test_hub_name_offline_fails_at_once(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(OfflineError, match="offline"):
        get_domain("hf:openai/gsm8k:main@train")


def test_bad_specs(tmp_path):
    with pytest.raises(UnknownDomainError):
        get_domain("foo.txt")
    with pytest.raises(ConfigError, match="unknown domain keys"):
        get_domain({"source": "sciq", "colour": "red"})
    with pytest.raises(DataFormatError, match="not found"):
        get_domain(str(tmp_path / "missing.jsonl")).examples()
