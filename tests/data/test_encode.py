"""Tokenization: answer-only loss mask, left truncation of the prompt, skipping, buckets, shapes."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from duet_jax.data import EncodeConfig, Example, encode_examples
from duet_jax.errors import ConfigError, TokenizerError
from duet_jax.testing import tiny_tokenizer

CHAT = tiny_tokenizer(chat=True)
PLAIN = tiny_tokenizer(chat=False)


def ex(prompt, answer, i=0):
    return Example(f"t-{i}", prompt, answer, "qa")


@pytest.mark.parametrize("tok", [CHAT, PLAIN], ids=["chat", "plain"])
def test_loss_mask_is_exactly_the_answer(tok):
    exs = [ex("Question: What is the capital of France?\nAnswer:", " Paris"), ex("2 + 2 =", " 4", 1)]
    t = encode_examples(exs, tok, EncodeConfig(max_length=64, buckets=(16, 32)))
    assert t.input_ids.shape == (2, 64) and t.input_ids.dtype == np.int32
    for i, e in enumerate(exs):
        n = t.lengths[i]
        answer_ids = t.input_ids[i, :n][t.loss_mask[i, :n] == 1]
        text = tok.decode(answer_ids)
        assert text.strip().startswith(e.answer.strip())
        assert text.rstrip().endswith(tok.eos_token)  # the model learns to stop
        p0, na = t.prompt_lengths[i], t.answer_lengths[i]
        assert tok.decode(t.input_ids[i, p0:p0 + na]).strip() == e.answer.strip()
        assert t.loss_mask[i, : t.prompt_lengths[i]].sum() == 0
        assert (t.input_ids[i, n:] == t.pad_id).all() and t.loss_mask[i, n:].sum() == 0
        prompt_text = tok.decode(t.input_ids[i, : t.prompt_lengths[i]])
        assert e.prompt.strip() in prompt_text


def test_chat_template_is_used_when_present():
    t = encode_examples([ex("hi", " there")], CHAT, EncodeConfig(max_length=32, buckets=()))
    assert tokens_text(t, CHAT).startswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nthere<|im_end|>")
    t2 = encode_examples([ex("hi", " there")], CHAT, EncodeConfig(max_length=32, buckets=(), chat_template="never"))
    assert tokens_text(t2, CHAT) == "hi there<|im_end|>"
    with pytest.raises(TokenizerError):
        encode_examples([ex("hi", " there")], PLAIN, EncodeConfig(chat_template="always"))


def tokens_text(t, tok, i=0):
    return tok.decode(t.input_ids[i, : t.lengths[i]])


def test_prompt_cut_from_left_answer_kept():
    long_prompt = " ".join(f"w{i}" for i in range(200)) + " END"
    t = encode_examples([ex(long_prompt, " the answer")], PLAIN, EncodeConfig(max_length=32, buckets=(16,)))
    assert t.truncated == 1 and len(t) == 1 and t.lengths[0] == 32
    text = tokens_text(t, PLAIN)
    assert text.endswith(" END the answer<|endoftext|>") and "w0 " not in text


def test_answer_too_long_is_skipped_and_reported():
    exs = [ex("q", " short", 0), ex("q", " " + "x " * 100, 1), ex("q2", " fine", 2)]
    t = encode_examples(exs, PLAIN, EncodeConfig(max_length=16, buckets=()))
    assert t.ids == ("t-0", "t-2")
    assert [s[0] for s in t.skipped] == ["t-1"] and t.skipped[0][1] > 16
    assert t.summary()["skipped"] == 1


@given(st.lists(st.text(min_size=1, max_size=40), min_size=1, max_size=12),
       st.lists(st.text(min_size=1, max_size=20).filter(str.strip), min_size=1, max_size=12))
def test_shapes_and_buckets_property(prompts, answers):
    exs = [ex(p, " " + a, i) for i, (p, a) in enumerate(zip(prompts, answers, strict=False))]
    cfg = EncodeConfig(max_length=48, buckets=(8, 16, 32))
    t = encode_examples(exs, CHAT, cfg)
    assert t.input_ids.shape == (len(t), 48) and t.loss_mask.shape == (len(t), 48)
    assert len(t) + len(t.skipped) == len(exs)
    assert (t.lengths <= 48).all()
    total = 0
    for b in t.buckets():
        assert b.length in (8, 16, 32, 48) and b.input_ids.shape == (len(b.rows), b.length)
        assert (t.lengths[b.rows] <= b.length).all()
        smaller = [L for L in cfg.bucket_lengths if L < b.length]
        if smaller:
            assert (t.lengths[b.rows] > max(smaller)).all()  # smallest bucket that fits
        assert b.loss_mask.sum() == t.loss_mask[b.rows].sum()
        total += len(b.rows)
    assert total == len(t)
    assert (t.loss_mask.sum(1) >= 1).all()


def test_bad_config():
    with pytest.raises(ConfigError):
        EncodeConfig(max_length=4)
    with pytest.raises(ConfigError):
        EncodeConfig(chat_template="sometimes")
