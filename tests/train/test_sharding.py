"""Mesh config and the FSDP spec rules (no devices needed; the multidevice tests run them)."""

from types import SimpleNamespace

import pytest
from jax.sharding import PartitionSpec as P

from duet_jax.errors import ConfigError
from duet_jax.sharding import MeshConfig, param_spec


def test_mesh_config_shapes():
    assert MeshConfig().shape(8) == (1, 8)
    assert MeshConfig(data=2).shape(8) == (2, 4)
    assert MeshConfig(fsdp=2).shape(8) == (4, 2)
    assert MeshConfig(data=2, fsdp=4).shape(8) == (2, 4)
    with pytest.raises(ConfigError, match="does not divide"):
        MeshConfig(data=3).shape(8)
    with pytest.raises(ConfigError, match="2 x 2 = 4"):
        MeshConfig(data=2, fsdp=2).shape(8)
    with pytest.raises(ConfigError, match="positive"):
        MeshConfig(fsdp=0)


def test_param_spec_rules():
    mesh = SimpleNamespace(shape={"data": 2, "fsdp": 4})
    # stacked [L, in, out]: never the layer axis; the largest divisible dimension
    assert param_spec((30, 576, 1536), mesh, stacked=True) == P(None, None, "fsdp")
    assert param_spec((30, 576, 192), mesh, stacked=True) == P(None, "fsdp", None)
    assert param_spec((32, 576), mesh, stacked=True) == P()  # stacked vectors (norms) replicated
    assert param_spec((49152, 576), mesh, stacked=False) == P("fsdp", None)  # embedding: vocab
    assert param_spec((576,), mesh, stacked=False) == P()
    assert param_spec((30, 5, 7), mesh, stacked=True) == P()  # nothing divisible
    assert param_spec((49152, 576), SimpleNamespace(shape={"data": 8, "fsdp": 1}), stacked=False) == P()
