"""`duet-jax generate` and `duet-jax perplexity` on a tiny random model with a tiny tokenizer."""

from __future__ import annotations

import json
import math

import pytest

from duet_jax.cli import build_parser, main
from duet_jax.models import ModelConfig
from duet_jax.testing import tiny_tokenizer
from tests.models.reference import random_weights, write_hf_dir


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    tok = tiny_tokenizer(chat=True)
    cfg = ModelConfig.preset("tiny-llama", vocab_size=len(tok), eos_token_ids=(tok.eos_token_id,),
                             bos_token_id=None, pad_token_id=tok.pad_token_id)
    d = write_hf_dir(tmp_path_factory.mktemp("m") / "tiny", cfg, random_weights(cfg, 0, std=0.05))
    tok.save_pretrained(d)
    return d


def test_commands_are_listed():
    text = build_parser().format_help()
    assert "generate" in text and "perplexity" in text


def test_generate_json(tiny_dir, capsys):
    rc = main(["generate", "--model", str(tiny_dir), "--prompt", "The quick brown fox",
               "--max-new-tokens", "5", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["new_tokens"] <= 5 and out["finish_reason"] in ("stop", "length")
    assert isinstance(out["completion"], str) and out["prompt_tokens"] > 0
    rc = main(["generate", "--model", str(tiny_dir), "--prompt", "Hi", "--chat",
               "--max-new-tokens", "3", "--temperature", "0.8", "--seed", "3"])
    assert rc == 0


def test_perplexity_json(tiny_dir, tmp_path, capsys):
    f = tmp_path / "t.txt"
    f.write_text("The quick brown fox jumps over the lazy dog. " * 3)
    assert main(["perplexity", "--model", str(tiny_dir), "--text-file", str(f), "--json",
                 "--window", "16"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["scored_tokens"] == out["tokens"] - 1
    assert math.isfinite(out["perplexity"]) and out["perplexity"] > 1
    assert out["perplexity"] == pytest.approx(math.exp(out["mean_nll"]))


def test_command_errors(tiny_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["perplexity", "--model", str(tiny_dir), "--text-file", str(tmp_path / "no.txt")]) == 1
    assert "not found" in capsys.readouterr().err
    assert main(["generate", "--model", "someone/uncached-model", "--prompt", "x"]) == 1
    assert "offline" in capsys.readouterr().err
    assert main(["generate", "--model", str(tiny_dir), "--prompt", "x", "--max-new-tokens", "0"]) == 1
    (tmp_path / "one.txt").write_text("a")
    assert main(["perplexity", "--model", str(tiny_dir), "--text-file", str(tmp_path / "one.txt")]) == 1
    assert "at least 2" in capsys.readouterr().err


@pytest.mark.bench_peer
def test_bench_model_runs_against_the_peer(tiny_dir, capsys):
    pytest.importorskip("torch")
    from duet_jax.bench.model import run

    r = run(str(tiny_dir), batch=2, seq_len=8, repeats=1)
    assert r["ours_tokens_per_s"] > 0 and r["peer_tokens_per_s"] > 0 and r["ratio"] > 0
    assert r["max_abs_logit_diff"] < 1e-4
    assert main(["bench", "model", "--model", str(tiny_dir), "--seq-len", "8", "--repeats", "1",
                 "--no-peer", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ours_tokens_per_s"] > 0
