"""The model with attention='pallas' (interpret mode on CPU) equals attention='xla'.

Loss and every parameter gradient on a packed batch (several segments and
padding per row), and the logits under an 8-device (data, fsdp, tensor) mesh.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtllama_jax import partitioning
from mtllama_jax.losses import cross_entropy_sums
from mtllama_jax.models.llama.config import LlamaConfig
from mtllama_jax.models.llama.model import LlamaForCausalLM

XLA = LlamaConfig.tiny(attention="xla")
PALLAS = dataclasses.replace(XLA, attention="pallas")


@pytest.fixture(scope="module")
def packed_batch():
    """Two rows of 40 tokens: segments 1..3 with positions restarting, then padding (segment 0)."""
    rng = np.random.default_rng(0)
    segment_ids = np.array([[1] * 12 + [2] * 20 + [0] * 8, [1] * 5 + [2] * 9 + [3] * 26], np.int32)
    positions = np.zeros_like(segment_ids)
    for row in range(2):
        for seg in np.unique(segment_ids[row]):
            idx = np.flatnonzero(segment_ids[row] == seg)
            positions[row, idx] = np.arange(len(idx))
    tokens = rng.integers(1, XLA.vocab_size, size=segment_ids.shape).astype(np.int32)
    targets = rng.integers(1, XLA.vocab_size, size=segment_ids.shape).astype(np.int32)
    weights = (segment_ids > 0).astype(np.float32)
    params = nn.unbox(LlamaForCausalLM(XLA).init(jax.random.key(0), tokens)["params"])
    params = jax.tree.map(lambda x: x * 2, params)  # larger weights: attention far from uniform
    return params, tokens, positions, segment_ids, targets, weights


def loss_and_grads(config, params, tokens, positions, segment_ids, targets, weights):
    model = LlamaForCausalLM(config)

    def loss(p):
        logits = model.apply({"params": p}, tokens, positions=positions, segment_ids=segment_ids)
        sums = cross_entropy_sums(logits, targets, weights, segment_ids)
        return sums["loss"] / sums["denominator"]

    return jax.jit(jax.value_and_grad(loss))(params)


def test_loss_and_gradients_equal_xla(packed_batch):
    want_loss, want_grads = loss_and_grads(XLA, *packed_batch)
    got_loss, got_grads = loss_and_grads(PALLAS, *packed_batch)
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
    flat_want = dict(jax.tree_util.tree_leaves_with_path(want_grads))
    for path, got in jax.tree_util.tree_leaves_with_path(got_grads):
        want = np.asarray(flat_want[path])
        err = np.linalg.norm(np.asarray(got) - want) / max(np.linalg.norm(want), 1e-6)
        assert err < 2e-5, f"{jax.tree_util.keystr(path)}: relative error {err:.2e}"


def test_sharded_pallas_logits_equal_unsharded_xla(packed_batch):
    params, tokens, positions, segment_ids, _, _ = packed_batch
    expected = LlamaForCausalLM(XLA).apply(
        {"params": params}, tokens, positions=positions, segment_ids=segment_ids
    )
    layout = partitioning.Layout.create(2, 2, 2, "fsdp_tp")
    model = LlamaForCausalLM(PALLAS)
    shardings = layout.param_shardings(partitioning.abstract_params(model))
    with layout.context():
        apply = jax.jit(
            lambda p, t, pos, seg: model.apply({"params": p}, t, positions=pos, segment_ids=seg)
        )
        got = apply(jax.device_put(params, shardings), tokens, positions, segment_ids)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-5, rtol=0)
    assert jnp.abs(expected).max() > 0.5


def _forward_kernel_runs(remat):
    """How many flash forward kernels the compiled gradient of the model runs (interpret mode)."""
    config = dataclasses.replace(PALLAS, remat=remat)
    model = LlamaForCausalLM(config)
    tokens = jnp.zeros((2, 32), jnp.int32)
    params = nn.unbox(model.init(jax.random.key(0), tokens)["params"])

    def loss(p):
        return jnp.sum(model.apply({"params": p}, tokens))

    hlo = jax.jit(jax.grad(loss)).lower(params).compile().as_text()
    # In interpret mode each kernel launch is a while loop named after the kernel.
    return sum(1 for line in hlo.splitlines() if " while(" in line and "flash_fwd" in line)


def test_dots_attention_remat_keeps_the_kernel_residuals():
    """'dots' reruns the attention forward kernel in the backward; 'dots_attention' does not."""
    without_remat = _forward_kernel_runs("none")
    assert _forward_kernel_runs("dots") > without_remat
    assert _forward_kernel_runs("dots_attention") == without_remat
