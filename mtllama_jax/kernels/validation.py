"""Shape and dtype checks shared by the kernel and the reference.

Every error names the shapes it saw and what would fit, so that a caller with
a misconfigured model (say num_heads not a multiple of num_kv_heads) can tell
which field to change.
"""

import jax.numpy as jnp


def check_inputs(q, k, v, segment_ids):
    """Raises ValueError unless q [b, s, h, d], k/v [b, s, kv_h, d], segment_ids [b, s] fit."""
    shapes = f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            f"flash_attention expects q [batch, seq, q_heads, head_dim] and k/v "
            f"[batch, seq, kv_heads, head_dim]; got {shapes}"
        )
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape; got {shapes}")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"q and k/v must have the same batch size; got {shapes}")
    if q.shape[1] != k.shape[1]:
        raise ValueError(
            f"q and k/v must have the same sequence length (self-attention); got {shapes}"
        )
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"q and k/v must have the same head_dim; got {shapes}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(
            f"q_heads ({q.shape[2]}) must be a multiple of kv_heads ({k.shape[2]}); got {shapes}"
        )
    if not (q.dtype == k.dtype == v.dtype) or not jnp.issubdtype(q.dtype, jnp.floating):
        raise ValueError(
            f"q, k and v must share one floating dtype; got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    if segment_ids is not None:
        if tuple(segment_ids.shape) != tuple(q.shape[:2]):
            raise ValueError(
                f"segment_ids must be [batch, seq] = {tuple(q.shape[:2])}; got "
                f"{tuple(segment_ids.shape)} with {shapes}"
            )
        if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
            raise ValueError(f"segment_ids must be integers; got {segment_ids.dtype}")


def check_head_dim(head_dim, backend, supported):
    """Raises ValueError unless `head_dim` is one the chosen backend compiles."""
    if head_dim not in supported:
        raise ValueError(
            f"head_dim {head_dim} is not supported by the {backend!r} flash-attention "
            f"backend (supported: {sorted(supported)}); use attention='xla' for it"
        )
