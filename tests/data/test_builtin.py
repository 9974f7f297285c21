"""The built-in offline suite: >= 12 domains, all splits non-empty and disjoint, valid gold indices."""

import json

import pytest

from duet_jax.cli import main as cli_main
from duet_jax.data import SPLITS, builtin_names, get_domain
from duet_jax.errors import UnknownDomainError

REQUIRED = {"sciq", "commonsense_qa", "trivia_qa", "hellaswag", "gsm8k", "arc_easy", "arc_challenge",
            "boolq", "piqa", "nq_open", "openbookqa", "social_i_qa", "winogrande", "mmlu"}


def test_required_domains_present():
    names = set(builtin_names())
    assert REQUIRED <= names
    assert names & {"medmcqa", "medqa_en"} and names & {"lambada", "coqa"}
    assert len(names) >= 12


@pytest.mark.parametrize("name", builtin_names())
def test_domain_splits(name):
    d = get_domain(name)
    s = d.splits()
    counts = s.counts()
    assert all(counts[k] > 0 for k in SPLITS), counts
    ids = {k: {e.id for e in s[k]} for k in SPLITS}
    keys = {k: {e.key for e in s[k]} for k in SPLITS}
    for a, b in [("train", "validation"), ("train", "evaluation"), ("validation", "evaluation")]:
        assert not ids[a] & ids[b]
        assert not keys[a] & keys[b]
    for e in s.train[:200]:
        assert e.kind == d.kind and e.prompt.strip() and e.answer.strip()
        if d.kind == "mc":
            assert e.choices and 0 <= e.gold < len(e.choices)
            assert e.answer.strip() == e.choices[e.gold]


def test_gsm8k_has_final_answer():
    ex = get_domain("gsm8k").examples()[0]
    assert ex.answer.rstrip().endswith(f"The answer is {ex.meta['short_answer']}.")
    assert "<<" not in ex.answer


def test_unknown_domain_lists_available():
    with pytest.raises(UnknownDomainError) as e:
        get_domain("not_a_domain")
    assert "sciq" in str(e.value) and "hellaswag" in str(e.value)


def test_domains_command_json(capsys):
    assert cli_main(["domains", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) >= 12
    for r in rows:
        assert {"name", "kind", "train", "validation", "evaluation"} <= set(r)
        assert r["train"] > 0 and r["validation"] > 0 and r["evaluation"] > 0


def test_domains_command_table(capsys):
    assert cli_main(["domains", "--name", "sciq", "--name", "gsm8k", "--validation", "20", "--evaluation", "30"]) == 0
    out = capsys.readouterr().out
    assert "sciq" in out and "gsm8k" in out and "The answer is" in out
    row = next(line for line in out.splitlines() if line.startswith("sciq"))
    assert row.split()[3:5] == ["20", "30"]
