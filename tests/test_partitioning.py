"""Sharded forward on 8 CPU devices equals the unsharded one; FSDP really splits weights."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from mtllama_jax import partitioning
from mtllama_jax.models.llama.config import LlamaConfig
from mtllama_jax.models.llama.model import LlamaForCausalLM

CONFIG = LlamaConfig.tiny()


def sharded_logits(layout, params, tokens):
    model = LlamaForCausalLM(CONFIG)
    shardings = layout.param_shardings(partitioning.abstract_params(model))
    batch_sharding = layout.batch_sharding()
    with layout.context():
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
    got = sharded_logits(partitioning.Layout.create(*sizes, rules), params, tokens)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


def test_fsdp8_splits_every_weight():
    params = partitioning.init_params(
        LlamaForCausalLM(CONFIG), partitioning.Layout.create(1, 8, 1, "fsdp"), jax.random.key(0)
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

    tp = partitioning.Layout.create(1, 4, 2, "fsdp_tp")
    abstract = partitioning.abstract_params(LlamaForCausalLM(CONFIG))
    shardings = tp.param_shardings(abstract)
    opt_state = jax.eval_shape(optax.adamw(1e-3).init, nn.unbox(abstract))
    state_shardings = tp.shardings_like_params(opt_state, abstract)
    mu = state_shardings[0].mu
    assert (
        mu["layers"]["mlp"]["up_proj"]["kernel"] == shardings["layers"]["mlp"]["up_proj"]["kernel"]
    )
    assert state_shardings[0].count.spec == jax.sharding.PartitionSpec()


@pytest.mark.parametrize("sizes,shards", [((2, 2, 2), 4), ((1, 1, 8), 1), ((8, 1, 1), 8)])
def test_layout_batch_shards_and_context(sizes, shards):
    tp = partitioning.Layout.create(*sizes, "fsdp_tp")
    assert tp.batch_axes == ("data", "fsdp") and tp.batch_shards == shards
    assert tp.batch_sharding().spec == jax.sharding.PartitionSpec(("data", "fsdp"), None)
    with tp.context():  # the mesh and the rules are in force
        assert jax.sharding.get_abstract_mesh().shape == tp.mesh.shape
        assert nn.logical_to_mesh_axes(("mlp",)) == jax.sharding.PartitionSpec("tensor")
    assert partitioning.Layout(tp.mesh, partitioning.logical_axis_rules("data")).batch_shards == (
        sizes[0] * sizes[1]
    )
