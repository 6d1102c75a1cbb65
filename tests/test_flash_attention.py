"""The Pallas flash-attention kernels (interpret mode on CPU) against the plain-JAX reference.

Outputs and q/k/v gradients for causal and full attention, packed segment ids,
grouped-query heads (4:1, 8:1), odd lengths (1, 17, 300), head_dim 64 and 128,
fp32 and bf16; block skipping; sharded runs on 8 host devices; bad input; and
the Mosaic TPU kernels in TPU interpret mode.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType

from mtllama_jax import partitioning
from mtllama_jax.kernels import BlockSizes, flash_attention, reference_attention


def make_inputs(batch, seq, heads, kv_heads, head_dim, dtype, segments, seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 5)
    q = jax.random.normal(keys[0], (batch, seq, heads, head_dim), dtype)
    k = jax.random.normal(keys[1], (batch, seq, kv_heads, head_dim), dtype)
    v = jax.random.normal(keys[2], (batch, seq, kv_heads, head_dim), dtype)
    do = jax.random.normal(keys[3], (batch, seq, heads, head_dim), dtype)
    seg = None
    if segments:  # 1, 2, 3 ... in packed runs, 0 (padding) at the end of some rows
        seg = jnp.sort(jax.random.randint(keys[4], (batch, seq), 1, 4), axis=1)
        seg = seg.at[0, -(seq // 5) :].set(0) if seq >= 5 else seg
    return q, k, v, do, seg


def value_and_grads(attn, q, k, v, do, seg, causal):
    """(out, dq, dk, dv) of sum(attn(q, k, v) * do), computed in one jitted call."""

    def loss(q, k, v):
        out = attn(q, k, v, segment_ids=seg, causal=causal)
        return jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32)), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return [out, *grads]


def assert_close(got, want, rel):
    """Norm-wise relative error per tensor, floored at norm 1 (exact gradients can be 0)."""
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.all(np.isfinite(a)), name
        err = np.linalg.norm(a - b) / max(np.linalg.norm(b), 1.0)
        assert err <= rel, f"{name}: relative error {err:.2e} > {rel:.0e}"


@pytest.mark.parametrize(
    "batch,seq,heads,kv_heads,head_dim,causal,segments",
    [
        (1, 300, 4, 1, 64, True, True),  # GQA 4:1, padded to the block, packed
        (2, 17, 8, 1, 128, True, False),  # GQA 8:1, shorter than one block
        (2, 1, 4, 1, 64, True, True),  # a single token
        (1, 300, 2, 2, 128, False, True),  # full attention with segments
        (2, 17, 4, 1, 64, False, False),  # full attention: only the padding is masked
        (1, 256, 2, 2, 64, True, False),  # several unmasked blocks below the diagonal
    ],
)
def test_fp32_matches_reference(batch, seq, heads, kv_heads, head_dim, causal, segments):
    q, k, v, do, seg = make_inputs(batch, seq, heads, kv_heads, head_dim, jnp.float32, segments)
    got = value_and_grads(flash_attention, q, k, v, do, seg, causal)
    want = value_and_grads(reference_attention, q, k, v, do, seg, causal)
    assert_close(got, want, 2e-5)


@pytest.mark.parametrize("seq,kv_heads,head_dim,causal", [(300, 1, 64, True), (17, 2, 128, False)])
def test_bf16_matches_fp32_reference(seq, kv_heads, head_dim, causal):
    q, k, v, do, seg = make_inputs(
        2, seq, 8 if kv_heads == 1 else 4, kv_heads, head_dim, jnp.bfloat16, True, seed=1
    )
    got = value_and_grads(flash_attention, q, k, v, do, seg, causal)
    assert all(x.dtype == jnp.bfloat16 for x in got)
    up = lambda x: x.astype(jnp.float32)
    want = value_and_grads(reference_attention, up(q), up(k), up(v), up(do), seg, causal)
    assert_close(got, want, 2e-2)


@pytest.mark.parametrize(
    "seq,heads,kv_heads,head_dim,causal", [(300, 4, 2, 64, True), (17, 2, 1, 128, False)]
)
def test_tpu_kernels_in_tpu_interpret_mode(seq, heads, kv_heads, head_dim, causal):
    """The Mosaic TPU kernels (untested on TPU hardware here) compute the same function."""
    q, k, v, do, seg = make_inputs(1, seq, heads, kv_heads, head_dim, jnp.float32, True, seed=5)
    attn = functools.partial(
        flash_attention, backend="tpu_interpret", block_sizes={"block_k": 256, "block_q_dkv": 256}
    )
    got = value_and_grads(attn, q, k, v, do, seg, causal)
    want = value_and_grads(reference_attention, q, k, v, do, seg, causal)
    assert_close(got, want, 2e-5)


def test_unequal_block_sizes():
    """q and kv blocks of different sizes exercise every loop bound of the three kernels."""
    blocks = BlockSizes(
        block_q=32, block_k=16, block_q_dq=16, block_k_dq=32, block_q_dkv=32, block_k_dkv=16
    )
    q, k, v, do, seg = make_inputs(1, 100, 4, 2, 64, jnp.float32, True, seed=2)
    for causal, segments in ((True, None), (True, seg)):
        attn = functools.partial(flash_attention, block_sizes=blocks)
        got = value_and_grads(attn, q, k, v, do, segments, causal)
        want = value_and_grads(reference_attention, q, k, v, do, segments, causal)
        assert_close(got, want, 2e-5)


def test_causal_kernel_never_reads_future_blocks():
    """NaN keys/values after row 32 must not reach rows < 32: those kv blocks are skipped."""
    q, k, v, do, _ = make_inputs(1, 64, 2, 1, 64, jnp.float32, False, seed=3)
    poisoned = lambda x: x.at[:, 32:].set(jnp.nan)
    blocks = {
        name: 16
        for name in ("block_q", "block_k", "block_q_dq", "block_k_dq", "block_q_dkv", "block_k_dkv")
    }
    out = flash_attention(q, poisoned(k), poisoned(v), block_sizes=blocks)
    want = reference_attention(q[:, :32], k[:, :32], v[:, :32])
    np.testing.assert_allclose(out[:, :32], want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_blocks_of_other_segments_are_skipped(causal):
    """Segment 2's rows never touch the kv blocks of segment 1 (NaN values there stay out).

    A masked block would still multiply its zero weights by the NaN values; only a skipped
    one keeps segment 2 finite. Gradients of segment 2's rows stay finite and correct too.
    """
    q, k, v, do, _ = make_inputs(1, 64, 2, 1, 64, jnp.float32, False, seed=4)
    seg = jnp.array([[1] * 32 + [2] * 32], jnp.int32)
    poisoned_v = v.at[:, :32].set(jnp.nan)
    blocks = {
        name: 16
        for name in ("block_q", "block_k", "block_q_dq", "block_k_dq", "block_q_dkv", "block_k_dkv")
    }
    attn = functools.partial(flash_attention, block_sizes=blocks)
    got = value_and_grads(attn, q, k, poisoned_v, do.at[:, :32].set(0), seg, causal)
    want = value_and_grads(
        reference_attention, q[:, 32:], k[:, 32:], v[:, 32:], do[:, 32:], None, causal
    )
    np.testing.assert_allclose(got[0][:, 32:], want[0], rtol=2e-5, atol=2e-5)  # out
    np.testing.assert_allclose(got[1][:, 32:], want[1], rtol=2e-5, atol=2e-5)  # dq
    np.testing.assert_allclose(got[2][:, 32:], want[2], rtol=2e-5, atol=2e-5)  # dk
    np.testing.assert_allclose(got[3][:, 32:], want[3], rtol=2e-5, atol=2e-5)  # dv


def test_sharded_over_batch_and_heads_on_eight_devices():
    """Under a (data, fsdp, tensor) = (2, 2, 2) mesh the kernel runs per shard via shard_map,
    split as the logical axis rules in effect say (batch over data+fsdp, heads over tensor)."""
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    q, k, v, do, seg = make_inputs(4, 40, 4, 2, 64, jnp.float32, True, seed=4)
    want = value_and_grads(reference_attention, q, k, v, do, seg, True)
    with jax.set_mesh(mesh), nn.logical_axis_rules(partitioning.logical_axis_rules("fsdp_tp")):
        jaxpr = jax.make_jaxpr(lambda q, k, v: flash_attention(q, k, v, segment_ids=seg))(q, k, v)
        assert "shard_map" in str(jaxpr)
        assert "in_specs=(P(('data', 'fsdp'), None, 'tensor', None)" in str(jaxpr)
        got = value_and_grads(flash_attention, q, k, v, do, seg, True)
    assert_close(got, want, 2e-5)


def test_shard_map_refuses_rules_that_split_the_sequence():
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    q, k, v, _, _ = make_inputs(4, 40, 4, 2, 64, jnp.float32, False, seed=4)
    with jax.set_mesh(mesh), nn.logical_axis_rules((("length", "tensor"),)):
        with pytest.raises(ValueError, match="needs whole 'length' per device.*'tensor'"):
            flash_attention(q, k, v)


@pytest.mark.parametrize(
    "q_shape,kv_shape,seg_shape,message",
    [
        ((1, 8, 6, 64), (1, 8, 4, 64), None, "multiple of kv_heads"),
        ((2, 8, 4, 64), (1, 8, 4, 64), None, "same batch size"),
        ((1, 8, 4, 64), (1, 9, 4, 64), None, "same sequence length"),
        ((1, 8, 4, 64), (1, 8, 4, 64), (1, 7), "segment_ids must be"),
        ((1, 8, 4, 48), (1, 8, 4, 48), None, "head_dim 48 is not supported"),
        ((8, 4, 64), (8, 4, 64), None, "expects q"),
    ],
)
def test_bad_shapes_name_the_shapes(q_shape, kv_shape, seg_shape, message):
    q, k = jnp.zeros(q_shape), jnp.zeros(kv_shape)
    seg = None if seg_shape is None else jnp.zeros(seg_shape, jnp.int32)
    with pytest.raises(ValueError, match=message) as err:
        flash_attention(q, k, k, segment_ids=seg)
    assert str(q_shape[-1]) in str(err.value)


def test_unavailable_backend_lists_available_ones():
    q = jnp.zeros((1, 8, 2, 64))
    available = r"\['interpret', 'tpu_interpret'\]"
    with pytest.raises(ValueError, match=r"'triton' cannot run on platform 'cpu'.*" + available):
        flash_attention(q, q, q, backend="triton")


def test_bad_block_sizes():
    q = jnp.zeros((1, 8, 2, 64))
    with pytest.raises(ValueError, match="power of two"):
        flash_attention(q, q, q, block_sizes={"block_q": 48})
    with pytest.raises(ValueError, match="unknown block_sizes keys"):
        flash_attention(q, q, q, block_sizes={"block_m": 64})
