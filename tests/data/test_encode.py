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


def _answer_filling(tok, chat, extra):
    """An answer and a max_length leaving exactly ``extra`` tokens for the prompt."""
    from duet_jax.data.encode import template_parts

    cfg = EncodeConfig(max_length=64, buckets=(), chat_template="auto" if chat else "never")
    prefix, mid, suffix, _ = template_parts(tok, cfg)
    answer = " " + " ".join(f"step {i} gives {i * 7}" for i in range(6)) + " #### 42"
    a = tok(answer.strip() if chat else answer, add_special_tokens=False)["input_ids"]
    return answer, len(prefix) + len(mid) + len(suffix) + len(a) + extra, len(prefix)


@pytest.mark.parametrize("tok", [CHAT, PLAIN], ids=["chat", "plain"])
@pytest.mark.parametrize("extra", [-5, 0, 1, 3])
def test_answer_that_fills_the_window_is_skipped_never_a_stop(tok, extra):
    """Issue 11 (gsm8k at max_length 128): an answer longer than, or exactly filling, the window is
    skipped and counted; with room for one prompt token the example is kept, something precedes
    its first loss token, and the pool accepts it."""
    from duet_jax.train.pool import build_pool

    chat = tok is CHAT
    answer, max_length, n_prefix = _answer_filling(tok, chat, extra)
    prompt = "Natalia sold clips to 48 of her friends in April. How many?"
    exs = [ex(prompt, answer, 0), ex("q", " 1", 1)]
    t = encode_examples(exs, tok, EncodeConfig(max_length=max_length, buckets=(),
                                               chat_template="auto" if chat else "never"))
    if extra <= 0:
        assert t.ids == ("t-1",) and [s[0] for s in t.skipped] == ["t-0"]
        assert t.skipped[0][1] > max_length and t.summary()["skipped"] == 1
    else:
        assert t.ids == ("t-0", "t-1") and t.skipped == ()
        assert t.lengths[0] == max_length and t.truncated == 1
        n = t.lengths[0]
        p0, na = t.prompt_lengths[0], t.answer_lengths[0]
        assert tok.decode(t.input_ids[0, p0:p0 + na]).strip() == answer.strip()  # the answer is whole
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        kept = t.input_ids[0, n_prefix:n_prefix + extra].tolist()
        assert kept == p_ids[-extra:]  # the prompt's end is kept, as many tokens as there is room for
        assert t.loss_mask[0, :n].sum() == n - p0
    assert (t.loss_mask[:, 0] == 0).all() and (t.prompt_lengths >= 1).all()
    build_pool(t)  # raised "an example's first token carries loss" for the plain template


def test_nothing_before_the_answer_is_skipped():
    """Plain template without BOS and an empty prompt: nothing would predict the first token."""
    t = encode_examples([ex("", " 4", 0), ex("2 + 2 =", " 4", 1)], PLAIN,
                        EncodeConfig(max_length=16, buckets=(), chat_template="never"))
    assert t.ids == ("t-1",) and [s[0] for s in t.skipped] == ["t-0"]


@given(st.integers(0, 30), st.integers(1, 30), st.integers(8, 40), st.booleans())
def test_every_kept_example_has_a_token_before_its_loss_property(n_prompt, n_answer, max_length, chat):
    from duet_jax.data.encode import template_parts

    tok = CHAT if chat else PLAIN
    e = ex(" ".join(["w"] * n_prompt), " " + " ".join(["a"] * n_answer))
    cfg = EncodeConfig(max_length=max_length, buckets=(), chat_template="auto" if chat else "never")
    t = encode_examples([e], tok, cfg)
    assert len(t) + len(t.skipped) == 1
    if len(t):
        first_loss = int(np.flatnonzero(t.loss_mask[0])[0])
        assert first_loss >= 1 and first_loss == t.prompt_lengths[0]
        prefix, mid, _, _ = template_parts(tok, cfg)
        assert t.prompt_lengths[0] - len(prefix) - len(mid) >= min(1, n_prompt)  # a prompt token kept
