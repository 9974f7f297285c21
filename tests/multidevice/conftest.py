"""Multi-device tests: they need 8 devices, i.e. their own process with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (``make test`` runs them so); in a
one-device process they are skipped."""

import jax
import pytest
from flax import nnx

from duet_jax.data import EncodeConfig, Example, encode_examples
from duet_jax.models import LlamaModel, LoRAConfig, ModelConfig, add_lora
from duet_jax.testing import tiny_tokenizer
from duet_jax.train import build_pool, split_model, trunk_start

#: (data, fsdp) meshes on 2, 4 and 8 devices
MESHES = [(1, 2), (2, 2), (2, 4)]


def pytest_collection_modifyitems(config, items):
    if jax.device_count() >= 8:
        return
    skip = pytest.mark.skip(reason="needs 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8")
    for item in items:
        if "multidevice" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def setup(tok):
    cfg = ModelConfig.preset("tiny-llama", vocab_size=len(tok), num_layers=3)
    model = LlamaModel(cfg, rngs=nnx.Rngs(0))
    add_lora(model, LoRAConfig(rank=4, alpha=8, targets=("q", "v"), last_layers=2), rngs=nnx.Rngs(1))
    exs = [Example(f"e{i}", f"Question: what is {i} plus {i}?\nAnswer:", f" {2 * i}", "qa")
           for i in range(32)]
    t = encode_examples(exs, tok, EncodeConfig(max_length=48, buckets=(32,)))
    pool, _ = build_pool(t)
    g, lora, frozen = split_model(model)
    return dict(model=model, g=g, lora=lora, frozen=frozen, pool=pool, start=trunk_start(model))
