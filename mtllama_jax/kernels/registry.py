"""The attention backends by name (`LlamaConfig.attention`), all with one signature.

Each entry maps q [b, t, heads, d], k/v [b, t, kv_heads, d], segment_ids [b, t]
int (causal within each segment) and the softmax scale to the output
[b, t, heads, d]. A new backend is one function and one entry of `ATTENTION`;
`CPU_FORMS` holds the spellings the model traces when `LlamaConfig.cpu_forms`.
"""

from typing import Callable

import jax

from mtllama_jax.kernels.attention import flash_attention
from mtllama_jax.kernels.reference import attention_mask, dot_product_attention

AttentionFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array, float], jax.Array]


def xla_attention(q, k, v, segment_ids, sm_scale):
    """Plain JAX (`dot_product_attention`): the full score matrix, softmax in fp32."""
    return dot_product_attention(q, k, v, attention_mask(segment_ids, segment_ids), sm_scale)


def xla_attention_head_major(q, k, v, segment_ids, sm_scale):
    """`xla_attention` with query rows head-major: its CPU form, same values."""
    mask = attention_mask(segment_ids, segment_ids)
    return dot_product_attention(q, k, v, mask, sm_scale, head_major=True)


def cudnn_attention(q, k, v, segment_ids, sm_scale):
    """cuDNN's fused attention through `jax.nn.dot_product_attention` (GPU only)."""
    mask = attention_mask(segment_ids, segment_ids)[:, None]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=sm_scale, implementation="cudnn")


def pallas_attention(q, k, v, segment_ids, sm_scale):
    """This project's Pallas flash kernel (`kernels.flash_attention`), causal."""
    return flash_attention(q, k, v, segment_ids=segment_ids, causal=True, sm_scale=sm_scale)


ATTENTION: dict[str, AttentionFn] = {
    "xla": xla_attention,
    "cudnn": cudnn_attention,
    "pallas": pallas_attention,
}
CPU_FORMS: dict[str, AttentionFn] = {"xla": xla_attention_head_major}


def attention_fn(name: str, *, cpu_forms: bool = False) -> AttentionFn:
    """The backend `name`, in its CPU form when `cpu_forms` and it has one."""
    return (CPU_FORMS if cpu_forms else ATTENTION).get(name, ATTENTION[name])
