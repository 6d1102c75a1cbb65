"""The LLaMA family's Hugging Face tensor names <-> this project's parameter tree.

Each HF tensor of a `LlamaForCausalLM` maps to one parameter path, plus a layer
index for the tensors that `nn.scan` stacks on a leading `layers` axis, and a
pair of layout transforms (HF stores `nn.Linear` weights as [out, in]; we store
kernels as [in..., out...] with heads split out). The mapping is listed one
tensor at a time so converters (`convert/hf_params.py`) can stream: read one HF
tensor, write one slice.

Rotary embeddings use HF's rotate-half layout in both, so q/k need no
permutation.
"""

from __future__ import annotations

import re

import numpy as np

from mtllama_jax.models.hf import TensorMapping
from mtllama_jax.models.llama.config import LlamaConfig

# Buffers some HF checkpoints carry that are not parameters (recomputed from the config).
IGNORED_HF_TENSORS = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


def _linear(in_shape, out_shape):
    """An HF [out, in] weight <-> a kernel of shape in_shape + out_shape."""
    n_in = int(np.prod(in_shape))
    n_out = int(np.prod(out_shape))
    return (
        (n_out, n_in),
        tuple(in_shape) + tuple(out_shape),
        lambda w: w.T.reshape(tuple(in_shape) + tuple(out_shape)),
        lambda k: k.reshape(n_in, n_out).T,
    )


def _identity(shape):
    return tuple(shape), tuple(shape), (lambda w: w), (lambda p: p)


def tensor_mappings(config: LlamaConfig) -> list[TensorMapping]:
    """Every tensor of an HF `LlamaForCausalLM` of this config, in HF order."""
    e, m, d = config.hidden_size, config.intermediate_size, config.head_dim
    h, kv = config.num_heads, config.num_kv_heads
    per_layer = {
        "input_layernorm.weight": (("attention_norm", "scale"), _identity((e,))),
        "self_attn.q_proj.weight": (("attention", "q_proj", "kernel"), _linear((e,), (h, d))),
        "self_attn.k_proj.weight": (("attention", "k_proj", "kernel"), _linear((e,), (kv, d))),
        "self_attn.v_proj.weight": (("attention", "v_proj", "kernel"), _linear((e,), (kv, d))),
        "self_attn.o_proj.weight": (("attention", "o_proj", "kernel"), _linear((h, d), (e,))),
        "post_attention_layernorm.weight": (("mlp_norm", "scale"), _identity((e,))),
        "mlp.gate_proj.weight": (("mlp", "gate_proj", "kernel"), _linear((e,), (m,))),
        "mlp.up_proj.weight": (("mlp", "up_proj", "kernel"), _linear((e,), (m,))),
        "mlp.down_proj.weight": (("mlp", "down_proj", "kernel"), _linear((m,), (e,))),
    }
    mappings = [
        TensorMapping(
            "model.embed_tokens.weight",
            ("embed", "embedding"),
            None,
            *_identity((config.vocab_size, e)),
        )
    ]
    for i in range(config.num_layers):
        for suffix, (path, layout) in per_layer.items():
            mappings.append(
                TensorMapping(f"model.layers.{i}.{suffix}", ("layers",) + path, i, *layout)
            )
    mappings.append(
        TensorMapping("model.norm.weight", ("final_norm", "scale"), None, *_identity((e,)))
    )
    if not config.tie_word_embeddings:
        mappings.append(
            TensorMapping(
                "lm_head.weight", ("lm_head", "kernel"), None, *_linear((e,), (config.vocab_size,))
            )
        )
    return mappings
