"""What every model family shares about Hugging Face files.

Reading a `config.json` (a path, its folder, or the dict) and `TensorMapping`,
the record each family's `hf_names.tensor_mappings` lists one HF tensor with.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Mapping

import numpy as np

ParamPath = tuple[str, ...]


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


def read_config_json(path: str) -> dict:
    """A config.json as a dict; invalid JSON, or JSON that is not an object, names the file."""
    with open(path) as f:
        text = f.read()
    try:
        hf = json.loads(text)
    except ValueError as e:
        raise ValueError(
            f"{path} is not valid JSON ({e}); copy it again from the model's files"
        ) from None
    if not isinstance(hf, dict):
        raise ValueError(f"{path} holds {type(hf).__name__}, not a JSON object of config fields")
    return hf


def read_hf_config(
    path_or_dict: str | os.PathLike | Mapping[str, Any],
) -> tuple[dict[str, Any], str]:
    """The config dict and where it came from (the file, for error messages)."""
    if isinstance(path_or_dict, Mapping):
        return dict(path_or_dict), "config dict"
    source = os.fspath(path_or_dict)
    if os.path.isdir(source):
        source = os.path.join(source, "config.json")
    return read_config_json(source), source
