import pytest
from flax import nnx

from duet_jax.data import EncodeConfig, Example, encode_examples
from duet_jax.models import LlamaModel, LoRAConfig, ModelConfig, add_lora
from duet_jax.testing import tiny_tokenizer
from duet_jax.train import build_pool, split_model, trunk_hidden, trunk_start


@pytest.fixture(scope="session")
def tok():
    return tiny_tokenizer()


def make_model(tok, last_layers=1, seed=0, targets=("q", "v")):
    cfg = ModelConfig.preset("tiny-llama", vocab_size=len(tok))
    model = LlamaModel(cfg, rngs=nnx.Rngs(seed))
    add_lora(model, LoRAConfig(rank=4, alpha=8, targets=targets, last_layers=last_layers),
             rngs=nnx.Rngs(seed + 1))
    return model


def qa_examples(n=48, offset=0):
    return [Example(f"e{i}", f"Question: what is {i} plus {i}?\nAnswer:", f" {2 * i}", "qa")
            for i in range(offset, offset + n)]


@pytest.fixture(scope="session")
def setup(tok):
    model = make_model(tok)
    t = encode_examples(qa_examples(), tok, EncodeConfig(max_length=64, buckets=(32,)))
    pool, _ = build_pool(t)
    g, lora, frozen = split_model(model)
    start = trunk_start(model)
    cached = pool.with_hidden(trunk_hidden(g, lora, frozen, pool, start=start))
    return dict(model=model, g=g, lora=lora, frozen=frozen, pool=pool, cached=cached, start=start)
