"""Hugging Face tensors <-> this project's parameter tree, for any model family.

The tensor-name map of each family lives beside its model
(`mtllama_jax/models/<family>/hf_names.py`) and is found through
`mtllama_jax.models.family_of`; this module checks a checkpoint's names and
shapes against it and converts whole trees or one tensor at a time.
"""

from __future__ import annotations

import re
from typing import Iterator, Mapping

import numpy as np

from mtllama_jax import models
from mtllama_jax.models.hf import ParamPath, TensorMapping


def tensor_mappings(config) -> list[TensorMapping]:
    """Every HF tensor of a model of this config, in HF order (from its family's map)."""
    return models.family_of(config).hf_names.tensor_mappings(config)


def param_shapes(config) -> dict[ParamPath, tuple[int, ...]]:
    """Full shape of every parameter (stacked ones with their leading layers axis)."""
    shapes = {}
    for t in tensor_mappings(config):
        shape = ((config.num_layers,) if t.layer is not None else ()) + t.param_shape
        shapes[t.param_path] = shape
    return shapes


def check_hf_names(names, config, source: str = "checkpoint") -> None:
    """Raises naming the missing or unexpected tensors of an HF checkpoint."""
    expected = {t.hf_name for t in tensor_mappings(config)}
    ignored = models.family_of(config).hf_names.IGNORED_HF_TENSORS
    present = {n for n in names if not ignored.fullmatch(n)}
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


def hf_to_params(tensors: Mapping[str, np.ndarray], config, source: str = "checkpoint") -> dict:
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


def params_to_hf(params, config) -> Iterator[tuple[str, np.ndarray]]:
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
