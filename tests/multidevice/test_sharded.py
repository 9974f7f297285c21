"""Sharded on 2, 4 and 8 CPU devices == one device: trunk cache (embedding and frozen layers
sharded), fine-tune, k adapters spread over the data axis, evaluation, influence featurize; no host
transfer inside the jitted fine-tune."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from duet_jax.influence import InfluenceScorer
from duet_jax.influence.domains import example_loss_fn
from duet_jax.sharding import MeshConfig, make_mesh, place_pool, replicate, shard_frozen
from duet_jax.train import TrainConfig, answer_loss, finetune, finetune_many, trunk_hidden
from duet_jax.train import trainer as trainer_module
from tests.multidevice.conftest import MESHES

pytestmark = pytest.mark.multidevice

CFG = TrainConfig(steps=2, batch_size=8, learning_rate=1e-2, warmup_ratio=0.0)
ATOL = 2e-5


def _close(a, b, atol=ATOL):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=1e-4)


@pytest.fixture(scope="module")
def reference(setup):
    s = setup
    hidden = trunk_hidden(s["g"], s["lora"], s["frozen"], s["pool"], start=s["start"], batch_size=8)
    cached = s["pool"].with_hidden(hidden)
    idx = jnp.arange(32)
    res = finetune(s["g"], s["lora"], s["frozen"], cached, idx, jax.random.key(0), CFG, start=s["start"])
    ev = answer_loss(s["g"], res.lora, s["frozen"], cached, start=s["start"], batch_size=8)
    return dict(hidden=np.asarray(hidden), cached=cached, res=res, ev=ev, idx=idx)


@pytest.mark.parametrize("shape", MESHES, ids=[f"{d}x{f}" for d, f in MESHES])
def test_finetune_matches_one_device(setup, reference, shape):
    s, ref = setup, reference
    mesh = make_mesh(MeshConfig(data=shape[0], fsdp=shape[1]), jax.devices()[: shape[0] * shape[1]])
    res = finetune(s["g"], s["lora"], s["frozen"], ref["cached"], ref["idx"], jax.random.key(0), CFG,
                   start=s["start"], mesh=mesh)
    _close(res.losses, ref["res"].losses)
    _close(res.lora, ref["res"].lora)


def test_trunk_cache_and_evaluation_on_8_devices(setup, reference):
    s, ref = setup, reference
    mesh = make_mesh(MeshConfig(data=2, fsdp=4))
    hidden = trunk_hidden(s["g"], s["lora"], s["frozen"], s["pool"], start=s["start"], batch_size=8,
                          mesh=mesh)
    np.testing.assert_allclose(np.asarray(hidden), ref["hidden"], atol=ATOL)
    cached = s["pool"].with_hidden(hidden)
    ev = answer_loss(s["g"], ref["res"].lora, s["frozen"], cached, start=s["start"], batch_size=8,
                     mesh=mesh)
    np.testing.assert_allclose(ev["loss"], ref["ev"]["loss"], atol=ATOL)
    np.testing.assert_allclose(ev["per_example"], ref["ev"]["per_example"], atol=1e-4)


def test_k_adapters_spread_over_data_on_8_devices(setup, reference):
    """k=2 adapters on data=2 (adapter i on device group i, its batch over fsdp=4)."""
    s, ref = setup, reference
    mesh = make_mesh(MeshConfig(data=2, fsdp=4))
    cfg = TrainConfig(steps=1, batch_size=8, learning_rate=1e-2, warmup_ratio=0.0)
    idx = jnp.stack([jnp.arange(16), jnp.arange(16, 32)])
    keys = jax.random.split(jax.random.key(1), 2)
    kw = dict(start=s["start"])
    one = finetune_many(s["g"], s["lora"], s["frozen"], ref["cached"], idx, keys, cfg, **kw)
    many = finetune_many(s["g"], s["lora"], s["frozen"], ref["cached"], idx, keys, cfg, mesh=mesh, **kw)
    _close(many.losses, one.losses)
    _close(many.lora, one.lora)
    leaf = jax.tree.leaves(many.lora)[0]
    assert leaf.sharding.spec[0] == "data"  # adapter i lives on device group i
    assert not np.array_equal(np.asarray(one.losses[0]), np.asarray(one.losses[1]))


def test_featurize_matches_one_device(setup, reference):
    s, ref = setup, reference
    loss = example_loss_fn(s["g"], s["start"])
    kw = dict(proj_dim=16, projector="dense", batch_size=8, seed=3)
    pool = ref["cached"]
    one = InfluenceScorer(loss, **kw).featurize(s["lora"], pool, context=s["frozen"])
    mesh = make_mesh(MeshConfig(data=2, fsdp=4))
    sharded = InfluenceScorer(loss, mesh=mesh, **kw)
    f, ok = sharded.featurize(s["lora"], pool, context=s["frozen"], return_flags=True)
    assert bool(np.all(np.asarray(ok)))
    np.testing.assert_allclose(np.asarray(f), np.asarray(one), atol=1e-4, rtol=1e-4)
    assert len(f.sharding.device_set) == 8


def test_no_host_transfer_inside_the_fine_tune(setup, reference):
    s, ref = setup, reference
    mesh = make_mesh(MeshConfig(data=2, fsdp=4))
    lora, frozen = replicate(s["lora"], mesh), shard_frozen(s["frozen"], mesh)
    pool = place_pool(ref["cached"], mesh)
    idx, key = replicate((ref["idx"], jax.random.key(0)), mesh)
    from duet_jax.sharding import batch_sharding

    kw = dict(config=CFG, steps=2, start=s["start"], batch_spec=batch_sharding(mesh, 8))
    trainer_module._finetune_jit(s["g"], lora, frozen, pool, idx, key, **kw)  # compile outside
    with jax.transfer_guard("disallow"):
        res = trainer_module._finetune_jit(s["g"], lora, frozen, pool, idx, key, **kw)
        jax.block_until_ready(res)
    _close(res.lora, ref["res"].lora)


def test_process_local_rows_build_the_global_array():
    """One process holds every row; the global array built from them equals shard_rows'."""
    from duet_jax.sharding import from_process_local, process_rows, shard_rows

    mesh = make_mesh(MeshConfig(data=2, fsdp=4))
    x = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
    lo, hi = process_rows(16, mesh)
    assert (lo, hi) == (0, 16)
    g = from_process_local(x[lo:hi], 16, mesh)
    assert g.sharding == shard_rows(x, mesh).sharding and len(g.addressable_shards) == 8
    np.testing.assert_array_equal(np.asarray(g), x)
