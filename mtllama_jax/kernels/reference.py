"""Plain-JAX attention with the kernel's signature: the ground truth for tests and benchmarks.

It materialises the full [q_len, kv_len] score matrix (memory quadratic in the
sequence), computes the softmax in fp32 and handles grouped-query heads by
reshaping q into [kv_heads, group] rather than repeating k and v.
"""

import math

import jax
import jax.numpy as jnp

from mtllama_jax.kernels.validation import check_inputs


def attention_mask(segment_ids, seq_len, causal):
    """[batch or 1, seq, seq] bool: which key each query may see, or None for all."""
    mask = None
    if causal:
        pos = jnp.arange(seq_len)
        mask = (pos[None, :] <= pos[:, None])[None]
    if segment_ids is not None:
        same = segment_ids[:, :, None] == segment_ids[:, None, :]
        mask = same if mask is None else mask & same
    return mask


def reference_attention(
    q, k, v, *, segment_ids=None, causal=True, sm_scale=None, block_sizes=None, backend=None
):
    """softmax(q k^T * sm_scale + mask) v for q [b, s, h, d] and k/v [b, s, kv_h, d].

    `block_sizes` and `backend` are accepted (and ignored) so that the two
    functions are interchangeable.
    """
    del block_sizes, backend
    check_inputs(q, k, v, segment_ids)
    b, s, h, d = q.shape
    kv_heads = k.shape[2]
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(d)
    qg = q.reshape(b, s, kv_heads, h // kv_heads, d)
    precision = jax.lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
    logits = (
        jnp.einsum(
            "bqkgd,bskd->bkgqs", qg, k, preferred_element_type=jnp.float32, precision=precision
        )
        * sm_scale
    )
    mask = attention_mask(segment_ids, s, causal)
    if mask is not None:
        logits = jnp.where(mask[:, None, None], logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum(
        "bkgqs,bskd->bqkgd",
        weights.astype(v.dtype),
        v,
        preferred_element_type=jnp.float32,
        precision=precision,
    )
    return out.reshape(b, s, h, d).astype(q.dtype)
