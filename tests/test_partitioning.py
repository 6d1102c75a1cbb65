"""Sharded forward on 8 CPU devices equals the unsharded one; FSDP really splits weights."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from mtllama_jax import partitioning
from mtllama_jax.models.llama.config import LlamaConfig
from mtllama_jax.models.llama.model import LlamaForCausalLM

CONFIG = LlamaConfig.tiny()


def sharded_logits(mesh, rules, params, tokens):
    model = LlamaForCausalLM(CONFIG)
    shardings = partitioning.param_shardings(CONFIG, mesh, rules)
    batch_sharding = partitioning.batch_sharding(mesh, rules)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        placed = jax.device_put(params, shardings)
        apply = jax.jit(
            lambda p, t: model.apply({"params": p}, t), in_shardings=(shardings, batch_sharding)
        )
        return np.asarray(apply(placed, tokens))


@pytest.fixture(scope="module")
def reference():
    model = LlamaForCausalLM(CONFIG)
    tokens = np.random.default_rng(0).integers(0, CONFIG.vocab_size, size=(8, 16)).astype(np.int32)
    params = nn.unbox(model.init(jax.random.key(0), tokens)["params"])
    params = jax.tree.map(lambda x: x * 2, params)  # larger weights: logits far from zero
    logits = np.asarray(model.apply({"params": params}, tokens))
    assert np.abs(logits).max() > 0.5
    return params, tokens, logits


@pytest.mark.parametrize(
    "sizes,rules",
    [((1, 8, 1), "fsdp"), ((1, 4, 2), "fsdp_tp"), ((2, 2, 2), "fsdp_tp"), ((8, 1, 1), "data")],
)
def test_sharded_forward_equals_unsharded(reference, sizes, rules):
    params, tokens, expected = reference
    mesh = partitioning.make_mesh(*sizes)
    got = sharded_logits(mesh, partitioning.logical_axis_rules(rules), params, tokens)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


def test_fsdp8_splits_every_weight():
    mesh = partitioning.make_mesh(data=1, fsdp=8, tensor=1)
    params = partitioning.init_params(
        CONFIG, mesh, partitioning.logical_axis_rules("fsdp"), jax.random.key(0)
    )
    total = sum(x.nbytes for x in jax.tree.leaves(params))
    device = jax.devices()[0]
    on_device = sum(
        shard.data.nbytes
        for x in jax.tree.leaves(params)
        for shard in x.addressable_shards
        if shard.device == device
    )
    assert on_device <= total / 8 * 1.05, (on_device, total)


def test_mesh_sizes_are_checked():
    with pytest.raises(ValueError, match="multiply to 4, but there are 8 devices"):
        partitioning.make_mesh(data=2, fsdp=2, tensor=1)
    with pytest.raises(ValueError, match="do not divide the 8 devices"):
        partitioning.make_mesh(data=3, fsdp=-1)
    assert partitioning.make_mesh(data=2, fsdp=-1, tensor=2).shape["fsdp"] == 2
    with pytest.raises(ValueError, match="unknown logical axis rules 'zero'"):
        partitioning.logical_axis_rules("zero")


def test_state_shardings_follow_params():
    import optax

    mesh = partitioning.make_mesh(data=1, fsdp=4, tensor=2)
    rules = partitioning.logical_axis_rules("fsdp_tp")
    shardings = partitioning.param_shardings(CONFIG, mesh, rules)
    abstract = partitioning.abstract_params(CONFIG)
    opt_state = jax.eval_shape(optax.adamw(1e-3).init, nn.unbox(abstract))
    state_shardings = partitioning.tree_shardings_like_params(opt_state, shardings, abstract, mesh)
    mu = state_shardings[0].mu
    assert (
        mu["layers"]["mlp"]["up_proj"]["kernel"] == shardings["layers"]["mlp"]["up_proj"]["kernel"]
    )
    assert state_shardings[0].count.spec == jax.sharding.PartitionSpec()
