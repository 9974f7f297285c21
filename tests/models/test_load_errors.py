"""Issue 11: a model directory without config.json says exactly that; a GGUF file cut short says
"truncated (expected N bytes, found M)" (for the model and for its tokenizer)."""

from __future__ import annotations

import re

import gguf
import pytest

from duet_jax.errors import ModelError
from duet_jax.models import ModelConfig, load_config, load_model
from duet_jax.models.gguf import gguf_truncation
from tests.models.reference import random_weights, write_gguf


@pytest.fixture(scope="module")
def full_gguf(tmp_path_factory):
    cfg = ModelConfig.preset("tiny-llama")
    path = write_gguf(tmp_path_factory.mktemp("gguf") / "m.gguf", cfg, random_weights(cfg))
    reader = gguf.GGUFReader(str(path))
    end = max(int(t.data_offset) + int(t.n_bytes) for t in reader.tensors)  # gguf-py's own count
    return path, path.read_bytes(), end


def test_directory_without_config_json(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    for load in (load_model, load_config):
        with pytest.raises(ModelError, match=re.escape(f"directory {tmp_path} has no config.json and no .gguf file")):
            load(tmp_path)


def test_a_complete_gguf_is_not_truncated(full_gguf):
    path, data, end = full_gguf
    assert gguf_truncation(path) is None
    assert end <= len(data)


@pytest.mark.parametrize("where", ["last tensor", "middle", "first bytes of data"])
def test_truncated_gguf_data(tmp_path, tmp_cache, full_gguf, where):
    _, data, end = full_gguf
    first = min(int(t.data_offset) for t in gguf.GGUFReader(str(full_gguf[0])).tensors)
    keep = {"last tensor": end - 10, "middle": len(data) // 2, "first bytes of data": first + 3}[where]
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:keep])
    assert gguf_truncation(cut) == (end, keep, True)
    with pytest.raises(ModelError, match=re.escape(f"truncated (expected {end} bytes, found {keep})")):
        load_model(cut)


@pytest.mark.parametrize("keep", [0, 3, 10, 24, 200])
def test_truncated_gguf_header(tmp_path, tmp_cache, full_gguf, keep):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(full_gguf[1][:keep])
    expected, found, exact = gguf_truncation(cut)
    assert found == keep and expected > keep and not exact
    with pytest.raises(ModelError, match=rf"truncated \(expected at least {expected} bytes, found {keep}\)"):
        load_model(cut)


def test_not_a_gguf_is_not_called_truncated(tmp_path, tmp_cache):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"definitely not a gguf file")
    assert gguf_truncation(bad) is None
    with pytest.raises(ModelError, match="not a readable GGUF file"):
        load_model(bad)
