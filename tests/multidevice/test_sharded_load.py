"""A Hugging Face checkpoint in the sharded safetensors layout (index + shards) loads straight onto
the mesh, shard by shard from the memory map: the same weights as the plain load, FSDP-sharded."""

import json

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from duet_jax.models import ModelConfig, load_model
from duet_jax.models.loaders import hf_state_dict
from duet_jax.sharding import MeshConfig, make_mesh
from tests.models.reference import random_weights

pytestmark = pytest.mark.multidevice


def test_sharded_safetensors_load_onto_mesh(tmp_path):
    cfg = ModelConfig.preset("tiny-llama", num_layers=3, vocab_size=64)
    W = random_weights(cfg, 0)
    keys = sorted(W)
    half = len(keys) // 2
    shards = {"model-00001-of-00002.safetensors": keys[:half],
              "model-00002-of-00002.safetensors": keys[half:]}
    for name, ks in shards.items():
        save_file({k: np.ascontiguousarray(W[k]) for k in ks}, str(tmp_path / name),
                  metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: n for n, ks in shards.items() for k in ks}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf()))

    plain = load_model(tmp_path)
    mesh = make_mesh(MeshConfig(data=2, fsdp=4))
    sharded = load_model(tmp_path, mesh=mesh)
    a, b = hf_state_dict(plain), hf_state_dict(sharded)
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)
    q = sharded.stacks[0].layer.self_attn.q_proj.kernel[...]
    assert q.shape[0] == 3 and q.sharding.spec[0] is None and "fsdp" in tuple(q.sharding.spec)
    assert len(q.addressable_shards) == 8 and q.addressable_shards[0].data.size * 4 == q.size
    emb = sharded.embed_tokens.embedding[...]
    assert tuple(emb.sharding.spec) == ("fsdp", None)
    toks = jax.numpy.asarray(np.arange(16).reshape(2, 8) % 64)
    fwd = nnx.jit(lambda m, t: m(t))
    np.testing.assert_allclose(np.asarray(fwd(sharded, toks)), np.asarray(fwd(plain, toks)), atol=1e-5)
