"""The sharded train step: loss normalisation, microbatches, meshes, non-finite steps, bf16."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import synthetic_batches

from mtllama_jax import losses, optim, partitioning, trainer
from mtllama_jax.models.llama.config import LlamaConfig
from mtllama_jax.models.llama.model import LlamaForCausalLM

CONFIG = LlamaConfig.tiny()


def make_trainer(sizes=(1, 8, 1), rules="fsdp", config=CONFIG, **kw):
    schedule = optim.learning_rate_schedule(1e-2, 10, "linear", warmup_steps=0)
    return trainer.Trainer(
        LlamaForCausalLM(config),
        partitioning.Layout.create(*sizes, rules=rules),
        optim.make_optimizer(schedule, weight_decay=0.1),
        schedule=schedule,
        **kw,
    )


def first_batch(rows=16):
    return next(synthetic_batches(seed=0, rows=rows, length=32, vocab=CONFIG.vocab_size)(0))


def test_loss_normalisation_per_token_and_per_sequence():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 6, 5)).astype(np.float32)
    targets = rng.integers(0, 5, (2, 6)).astype(np.int32)
    segments = np.array([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 1, 1]], np.int32)
    weights = np.array([[0, 1, 1, 0, 1, 0], [0, 0, 1, 1, 1, 1]], np.float32)
    log_z = np.log(np.exp(logits).sum(-1))
    nll = log_z - np.take_along_axis(logits, targets[..., None], -1)[..., 0]

    token = losses.cross_entropy_sums(logits, targets, weights, segments, normalize="token")
    assert np.isclose(token["loss"] / token["denominator"], (weights * nll).sum() / 7)
    per_example = [nll[0, 1:3].mean(), nll[0, 4], nll[1, 2:].mean()]
    seq = losses.cross_entropy_sums(logits, targets, weights, segments, normalize="sequence")
    assert seq["denominator"] == 3
    assert np.isclose(seq["loss"] / seq["denominator"], np.mean(per_example), rtol=1e-6)
    z = losses.cross_entropy_sums(logits, targets, weights, segments, z_loss=1e-2)
    assert np.isclose(z["loss"] - token["loss"], 1e-2 * (weights * log_z**2).sum(), rtol=1e-5)
    with pytest.raises(ValueError, match="choose one of"):
        losses.token_weights(weights, segments, "example")


def test_schedules_and_decay_mask():
    cos = optim.learning_rate_schedule(1.0, 100, "cosine", warmup_fraction=0.03)
    assert float(cos(0)) == 0.0 and np.isclose(float(cos(3)), 1.0)
    assert np.isclose(float(cos(100)), 0.0, atol=1e-6)
    lin = optim.learning_rate_schedule(2.0, 10, "linear", warmup_steps=0, final_fraction=0.5)
    assert np.isclose(float(lin(10)), 1.0)
    assert float(optim.learning_rate_schedule(1.0, 10, "constant", 2)(9)) == 1.0
    with pytest.raises(ValueError, match="optimizer.schedule='step'"):
        optim.learning_rate_schedule(1.0, 10, "step")
    params = jax.tree.map(
        lambda _: 0,
        jax.tree.map(
            lambda x: x,
            partitioning.nn.unbox(partitioning.abstract_params(LlamaForCausalLM(CONFIG))),
        ),
    )
    mask = optim.decay_mask(params)
    assert mask["layers"]["mlp"]["up_proj"]["kernel"] and mask["embed"]["embedding"]
    assert not mask["layers"]["attention_norm"]["scale"] and not mask["final_norm"]["scale"]
    assert not optim.decay_mask(params, decay_embeddings=False)["embed"]["embedding"]


@pytest.fixture(scope="module")
def fsdp_step():
    t = make_trainer()
    state = t.init_state(jax.random.key(0))
    before = jax.device_get(state.params)
    state, m = t.train_step(state, t.global_batch(first_batch()))
    return t, before, jax.device_get(state), jax.device_get(m)


def test_step_is_sharded_and_accumulation_matches_on_another_mesh(fsdp_step):
    t, before, after, m = fsdp_step
    assert after.step == 1 and after.skipped == 0 and np.isfinite(m["loss"])
    assert 0 < m["nonpad_fraction"] < 1 and m["learning_rate"] == pytest.approx(1e-2)
    spec = t.state_shardings.params["layers"]["mlp"]["up_proj"]["kernel"].spec
    assert "fsdp" in jax.tree.leaves(tuple(spec))
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), before, after.params)
    assert all(jax.tree.leaves(changed))

    other = make_trainer((2, 2, 2), "fsdp_tp", microbatches=2)
    state = other.init_state(jax.random.key(0))
    state, m2 = other.train_step(state, other.global_batch(first_batch()))
    assert m2["loss"] == pytest.approx(m["loss"], rel=1e-5)
    assert m2["grad_norm"] == pytest.approx(m["grad_norm"], rel=1e-4)
    # Adam's first step is lr * g / |g|: rows with near-zero gradients (embeddings of
    # unseen tokens) may differ by reduction order, but by far less than one update (1e-2).
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=1e-3),
        jax.device_get(state.params),
        after.params,
    )


def test_batch_not_divisible_by_data_shards_names_the_numbers(fsdp_step):
    t = fsdp_step[0]
    with pytest.raises(ValueError, match=r"12 rows .* not divisible by 8 batch shards"):
        t.global_batch(first_batch(rows=12))
    with pytest.raises(ValueError, match=r"lacks feature\(s\) \['loss_weights'\]"):
        t.global_batch({k: v for k, v in first_batch().items() if k != "loss_weights"})


def nan_batch():
    batch = first_batch()
    batch["loss_weights"] = batch["loss_weights"].copy()
    batch["loss_weights"][0, 5] = np.nan
    return batch


def test_nonfinite_step_is_skipped_and_counted(fsdp_step):
    t, _, after, _ = fsdp_step
    state = jax.device_put(after, t.state_shardings)
    state, m = t.train_step(state, t.global_batch(nan_batch()))
    state = jax.device_get(state)
    assert m["nonfinite"] == 1 and state.skipped == 1 and state.step == 2
    same = jax.tree.map(np.array_equal, state.params, after.params)
    assert all(jax.tree.leaves(same))


def test_bf16_only_and_stop_on_nonfinite():
    config = CONFIG.replace(dtype="bfloat16", param_dtype="bfloat16")
    t = make_trainer(config=config, nonfinite="stop", microbatches=2)
    state = t.init_state(jax.random.key(0))
    assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype("bfloat16")}
    state, m = t.train_step(state, t.global_batch(first_batch()))
    assert np.isfinite(m["loss"]) and int(state.step) == 1
    good = jax.device_get(state.params)
    state, m = t.train_step(state, t.global_batch(nan_batch()))
    assert int(m["nonfinite"]) == 1 and int(state.step) == 1 and int(state.skipped) == 0
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, jax.device_get(state.params), good)))
    assert isinstance(t.tx, optax.GradientTransformation)
