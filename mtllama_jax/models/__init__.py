"""Model families by Hugging Face `model_type`: config class, flax module, HF tensor names.

A family is one folder here (`llama/`: `config.py`, `model.py`, `hf_names.py`)
and one row of `FAMILIES`. `config_from_hf` reads a `config.json` into its
family's config; `build_module` and `family_of` find the rest from a config.
"""

from __future__ import annotations

import dataclasses
import os
import types
from typing import Any, Mapping

import flax.linen as nn

from mtllama_jax.models import hf
from mtllama_jax.models.llama import config as llama_config
from mtllama_jax.models.llama import hf_names as llama_hf_names
from mtllama_jax.models.llama import model as llama_model


@dataclasses.dataclass(frozen=True)
class Family:
    """What a model family provides.

    config: a frozen dataclass with `from_hf(dict, source=..., **overrides)` and `to_hf()`;
    module: the flax module class, `module(config)(tokens, positions, segment_ids, decode)`;
    hf_names: a module with `tensor_mappings(config)` and `IGNORED_HF_TENSORS`.
    """

    config: type
    module: type[nn.Module]
    hf_names: types.ModuleType


FAMILIES: dict[str, Family] = {
    "llama": Family(llama_config.LlamaConfig, llama_model.LlamaForCausalLM, llama_hf_names),
}
# config.json files written before `model_type` was common are LLaMA's.
DEFAULT_MODEL_TYPE = "llama"


def config_from_hf(path_or_dict: str | os.PathLike | Mapping[str, Any], **overrides):
    """The config of a Hugging Face `config.json` (a path, its folder, or the dict).

    Its `model_type` picks the family; `overrides` set this project's own fields.
    """
    config, source = hf.read_hf_config(path_or_dict)
    model_type = config.get("model_type", DEFAULT_MODEL_TYPE)
    if model_type not in FAMILIES:
        raise ValueError(
            f"{source}: field 'model_type' is {model_type!r}; the model families known are "
            f"{sorted(FAMILIES)}"
        )
    return FAMILIES[model_type].config.from_hf(config, source=source, **overrides)


def family_of(config) -> Family:
    """The family whose config class `config` is."""
    for family in FAMILIES.values():
        if type(config) is family.config:
            return family
    raise TypeError(
        f"{type(config).__name__} is not the config of a known model family ({sorted(FAMILIES)})"
    )


def build_module(config) -> nn.Module:
    """The flax module of `config`'s family, for this config."""
    return family_of(config).module(config)
