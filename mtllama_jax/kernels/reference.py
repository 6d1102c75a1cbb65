"""The one plain-JAX attention and its mask: the model's `xla` backend, the kernel tests' truth.

It materialises the full [q_len, kv_len] score matrix (memory quadratic in the
sequence), computes the softmax in fp32 and handles grouped-query heads by
reshaping q into [kv_heads, group] rather than repeating k and v.
`reference_attention` wraps it in the flash kernel's signature for tests and
benchmarks.
"""

import math

import jax
import jax.numpy as jnp

from mtllama_jax.kernels.validation import check_inputs


def attention_mask(q_segment_ids, kv_segment_ids, q_offset=0, causal=True):
    """[batch, q_len, kv_len] bool: same segment and, if causal, not in the future (by slot)."""
    same = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    if not causal:
        return same
    q_index = q_offset + jnp.arange(q_segment_ids.shape[1])
    kv_index = jnp.arange(kv_segment_ids.shape[1])
    return (kv_index[None, :] <= q_index[:, None])[None] & same


def dot_product_attention(q, k, v, mask, sm_scale, *, head_major=False, precision=None):
    """softmax(q k^T * sm_scale where mask) v with grouped KV heads; softmax in fp32.

    q [b, t, heads, d], k/v [b, s, kv_heads, d], mask [b, t, s] bool or None (all
    visible). `head_major` is the model's CPU form: query rows head-major
    ([b, kv, group, t, d]), so each product is a batched matmul already in
    [..., t, s] order and XLA:CPU moves the small q and out tensors instead of
    the [t, s] scores (5-7% of the tiny CPU train step); the values are the same.
    """
    b, t, h, d = q.shape
    kv = k.shape[2]
    q = q.reshape(b, t, kv, h // kv, d)
    scores, mix = "btkgd,bskd->bkgts", "bkgts,bskd->btkgd"
    if head_major:
        q = q.transpose(0, 2, 3, 1, 4)
        scores, mix = "bkgtd,bskd->bkgts", "bkgts,bskd->bkgtd"
    logits = jnp.einsum(scores, q, k, preferred_element_type=jnp.float32, precision=precision)
    logits = logits * sm_scale
    if mask is not None:
        logits = jnp.where(mask[:, None, None], logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum(mix, weights, v, precision=precision)
    if head_major:
        out = out.transpose(0, 3, 1, 2, 4)
    return out.reshape(b, t, h, d)


def reference_attention(
    q, k, v, *, segment_ids=None, causal=True, sm_scale=None, block_sizes=None, backend=None
):
    """softmax(q k^T * sm_scale + mask) v for q [b, s, h, d] and k/v [b, s, kv_h, d].

    Full fp32 precision for fp32 inputs. `block_sizes` and `backend` are accepted
    (and ignored) so that it and `flash_attention` are interchangeable.
    """
    del block_sizes, backend
    check_inputs(q, k, v, segment_ids)
    b, s, _, d = q.shape
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(d)
    mask = None
    if segment_ids is not None or causal:
        seg = jnp.ones((b, s), jnp.int32) if segment_ids is None else segment_ids
        mask = attention_mask(seg, seg, causal=causal)
    precision = jax.lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
    return dot_product_attention(q, k, v, mask, sm_scale, precision=precision).astype(q.dtype)
