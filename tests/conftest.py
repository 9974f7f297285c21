"""Test setup: CPU backend, no network, x64 off globally (the GP turns it on locally)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "ci", deadline=None, max_examples=40, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("ci")


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    """A private duet-jax cache directory for one test."""
    monkeypatch.setenv("DUET_JAX_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"
