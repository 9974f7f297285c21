"""Tokenizer loading: GGUF metadata (tiny file and the real SmolLM2 file), HF dirs, errors."""

import pytest

from duet_jax.data import load_tokenizer, tokenizer_from_gguf
from duet_jax.errors import OfflineError, TokenizerError
from duet_jax.testing import tiny_tokenizer, write_gguf_tokenizer

TEXTS = ["Question: What is the capital of France?\nAnswer: Paris", "I have 12345 apples  and héllo wörld",
         "<|im_start|>user\nhi<|im_end|>"]


def test_gguf_tokenizer_matches_the_original(tmp_path, tmp_cache):
    ref = tiny_tokenizer(chat=True)
    tok = tokenizer_from_gguf(write_gguf_tokenizer(tmp_path / "t.gguf"))
    for s in TEXTS:
        assert tok.encode(s) == ref.encode(s)
        assert tok.decode(tok.encode(s)) == s
    assert tok.eos_token == "<|im_end|>" and tok.chat_template
    assert list((tmp_cache / "tokenizers").glob("*/tokenizer.json"))  # cached for the next load
    again = load_tokenizer(str(tmp_path / "t.gguf"))
    assert again.encode(TEXTS[0]) == tok.encode(TEXTS[0])


def test_hf_directory(tmp_path):
    tiny_tokenizer(chat=False).save_pretrained(tmp_path / "tok")
    tok = load_tokenizer(tmp_path / "tok")
    assert tok.encode(TEXTS[0]) == tiny_tokenizer(chat=False).encode(TEXTS[0])


def test_smollm2_builtin_tokenizer():
    tok = load_tokenizer("smollm2-135m-instruct")
    assert len(tok) == 49152 and tok.eos_token == "<|im_end|>"
    ids = tok.encode("The capital of France is Paris.")
    assert ids == [504, 3575, 282, 4649, 314, 7042, 30]
    assert tok.encode("2024") == [34, 32, 34, 36]  # digits split individually
    for s in TEXTS:
        assert tok.decode(tok.encode(s)) == s
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert chat.startswith("<|im_start|>system\n") and "<|im_start|>user\nhi<|im_end|>" in chat


def test_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OfflineError, match="offline"):
        load_tokenizer("HuggingFaceTB/SmolLM2-135M-Instruct")
    with pytest.raises(TokenizerError, match="not found"):
        load_tokenizer(tmp_path / "nope.gguf")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenizerError, match="has no config.json and no .gguf file"):
        load_tokenizer(tmp_path / "empty")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(TokenizerError, match="cannot read GGUF"):
        load_tokenizer(bad)
    with pytest.raises(TokenizerError, match="no such file"):
        load_tokenizer("./missing/dir")


def test_model_directory_without_config_json_says_so(tmp_path):
    """Issue 11: not transformers' hint about sentencepiece."""
    d = tmp_path / "weights_only"
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"")
    with pytest.raises(TokenizerError) as e:
        load_tokenizer(d)
    assert f"directory {d} has no config.json and no .gguf file" in str(e.value)
    assert "sentencepiece" not in str(e.value)
    write_gguf_tokenizer(d / "a.gguf")
    write_gguf_tokenizer(d / "b.gguf")
    with pytest.raises(TokenizerError, match="no config.json and 2 .gguf files"):
        load_tokenizer(d)


def test_directory_with_config_json_but_no_tokenizer(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(TokenizerError, match="has config.json but no tokenizer file"):
        load_tokenizer(tmp_path)


def test_directory_with_a_single_gguf_uses_it(tmp_path, tmp_cache):
    write_gguf_tokenizer(tmp_path / "model.gguf")
    tok = load_tokenizer(tmp_path)
    assert tok.encode(TEXTS[0]) == tiny_tokenizer(chat=True).encode(TEXTS[0])


def test_truncated_gguf_tokenizer_says_truncated(tmp_path, tmp_cache):
    data = write_gguf_tokenizer(tmp_path / "t.gguf").read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(TokenizerError, match=rf"truncated \(expected at least \d+ bytes, found {len(data) // 2}\)"):
        load_tokenizer(cut)
