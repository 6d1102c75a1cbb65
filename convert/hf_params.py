"""Hugging Face LLaMA tensor names <-> this project's parameter tree.

Each HF tensor maps to one parameter path, plus a layer index for the tensors
that `nn.scan` stacks on a leading `layers` axis, and a pair of layout
transforms (HF stores `nn.Linear` weights as [out, in]; we store kernels as
[in..., out...] with heads split out). The mapping is listed one tensor at a
time so converters can stream: read one HF tensor, write one slice.

Rotary embeddings use HF's rotate-half layout in both, so q/k need no
permutation.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Iterator, Mapping

import numpy as np

from mtllama_jax.model import LlamaConfig

ParamPath = tuple[str, ...]

# Buffers some HF checkpoints carry that are not parameters (recomputed from the config).
IGNORED_HF_TENSORS = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


@dataclasses.dataclass(frozen=True)
class TensorMapping:
    """Where one HF tensor lives in the param tree, and how its layout changes."""

    hf_name: str
    param_path: ParamPath
    layer: int | None  # index on the stacked `layers` axis, or None
    hf_shape: tuple[int, ...]
    param_shape: tuple[int, ...]  # shape of this tensor's slice in the param tree
    to_param: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]


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


def param_shapes(config: LlamaConfig) -> dict[ParamPath, tuple[int, ...]]:
    """Full shape of every parameter (stacked ones with their leading layers axis)."""
    shapes = {}
    for t in tensor_mappings(config):
        shape = ((config.num_layers,) if t.layer is not None else ()) + t.param_shape
        shapes[t.param_path] = shape
    return shapes


def check_hf_names(names, config: LlamaConfig, source: str = "checkpoint") -> None:
    """Raises naming the missing or unexpected tensors of an HF checkpoint."""
    expected = {t.hf_name for t in tensor_mappings(config)}
    present = {n for n in names if not IGNORED_HF_TENSORS.fullmatch(n)}
    missing = sorted(expected - present, key=_natural_key)
    unexpected = sorted(present - expected, key=_natural_key)
    if config.tie_word_embeddings and "lm_head.weight" in unexpected:
        unexpected.remove("lm_head.weight")  # tied models may still store the head
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(
                f"unexpected tensor(s) {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
            )
        raise ValueError(
            f"{source}: {'; '.join(parts)} for a LLaMA of {config.num_layers} layers "
            f"(tie_word_embeddings={config.tie_word_embeddings}); check that config.json "
            "matches the weights"
        )


def check_hf_shape(mapping: TensorMapping, shape, source: str = "checkpoint") -> None:
    if tuple(shape) != mapping.hf_shape:
        raise ValueError(
            f"{source}: tensor {mapping.hf_name} has shape {tuple(shape)} but "
            f"config.json implies {mapping.hf_shape}"
        )


def hf_to_params(
    tensors: Mapping[str, np.ndarray], config: LlamaConfig, source: str = "checkpoint"
) -> dict:
    """Builds the nested param tree (numpy) from a mapping of HF tensors."""
    check_hf_names(tensors.keys(), config, source)
    flat: dict[ParamPath, np.ndarray] = {}
    for t in tensor_mappings(config):
        w = np.asarray(tensors[t.hf_name])
        check_hf_shape(t, w.shape, source)
        value = t.to_param(w)
        if t.layer is None:
            flat[t.param_path] = value
        else:
            if t.param_path not in flat:
                flat[t.param_path] = np.empty((config.num_layers,) + t.param_shape, value.dtype)
            flat[t.param_path][t.layer] = value
    return unflatten(flat)


def params_to_hf(params, config: LlamaConfig) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (HF name, HF-layout numpy array) one tensor at a time."""
    flat = flatten(params)
    for t in tensor_mappings(config):
        value = np.asarray(flat[t.param_path])
        if t.layer is not None:
            value = value[t.layer]
        yield t.hf_name, np.ascontiguousarray(t.to_hf(value))


def flatten(tree, prefix: ParamPath = ()) -> dict[ParamPath, object]:
    """{'a': {'b': x}} -> {('a', 'b'): x}."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, prefix + (key,)))
        else:
            flat[prefix + (key,)] = value
    return flat


def unflatten(flat: Mapping[ParamPath, object]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def _natural_key(name: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]
