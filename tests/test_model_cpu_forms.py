"""The model's CPU forms (`LlamaConfig.cpu_forms`) against the forms accelerators trace."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mtllama_jax.models.llama import model as model_lib
from mtllama_jax.models.llama.config import LlamaConfig
from mtllama_jax.models.llama.model import LlamaForCausalLM

CPU = LlamaConfig.tiny(num_layers=3, cpu_forms=True)
ACCELERATOR = CPU.replace(cpu_forms=False)


def _batch():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, CPU.vocab_size, (2, 16)).astype(np.int32)
    segments = np.array([[1] * 10 + [2] * 6, [1] * 12 + [0] * 4], np.int32)
    positions = np.array([list(range(10)) + list(range(6)), list(range(12)) + [0] * 4], np.int32)
    return tokens, positions, segments


def _loss_and_grads(config, params):
    tokens, positions, segments = _batch()
    model = LlamaForCausalLM(config)

    def loss(p):
        logits = model.apply({"params": p}, tokens, positions=positions, segment_ids=segments)
        return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - logits[..., 0]), logits

    (value, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    hlo = jax.jit(loss).lower(params).as_text()
    return value, logits, grads, hlo


def _decode_logits(config, params):
    tokens, _, _ = _batch()
    model = LlamaForCausalLM(config)
    # The empty cache as decoding.Decoder makes it: the cache collection of init(decode=True).
    cache = nn.unbox(model.init(jax.random.key(0), np.zeros((2, 16), np.int32), decode=True))
    cache = cache["cache"]
    out = []
    for start, stop in ((0, 10), (10, 15), (15, 16)):  # a prompt, then shorter steps
        logits, variables = model.apply(
            {"params": params, "cache": cache},
            tokens[:, start:stop],
            positions=np.broadcast_to(np.arange(start, stop), (2, stop - start)),
            decode=True,
            mutable=["cache"],
        )
        cache = variables["cache"]
        out.append(np.asarray(logits))
    return np.concatenate(out, axis=1)


def test_cpu_forms_unroll_a_shallow_stack_only():
    assert jax.default_backend() == "cpu" and LlamaConfig.tiny().cpu_forms  # tests' default
    assert model_lib.layer_unroll(CPU) == CPU.num_layers
    deep = CPU.replace(num_layers=model_lib.MAX_UNROLLED_CPU_LAYERS + 1)
    assert model_lib.layer_unroll(deep) == 1
    assert model_lib.layer_unroll(ACCELERATOR) == 1


def test_cpu_forms_equal_accelerator_forms():
    params = LlamaForCausalLM(CPU).init(jax.random.key(1), np.zeros((1, 8), np.int32))["params"]
    cpu = _loss_and_grads(CPU, params)
    cpu_decoded = _decode_logits(CPU, params)
    accel = _loss_and_grads(ACCELERATOR, params)
    accel_decoded = _decode_logits(ACCELERATOR, params)
    assert "while" not in cpu[3] and "while" in accel[3]  # two different programs
    np.testing.assert_allclose(cpu[0], accel[0], rtol=1e-6)
    np.testing.assert_allclose(cpu[1], accel[1], atol=1e-5)
    for a, b in zip(jax.tree.leaves(cpu[2]), jax.tree.leaves(accel[2])):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4)
    np.testing.assert_allclose(cpu_decoded, accel_decoded, atol=1e-5)
