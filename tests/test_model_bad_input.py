"""Bad configs and weights fail with the field or tensor named, and both values."""

import json

import numpy as np
import pytest

from mtllama_jax import models
from mtllama_jax.convert.hf_params import hf_to_params, param_shapes, params_to_hf, unflatten
from mtllama_jax.models.llama.config import LlamaConfig

HF = dict(
    vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
)


def test_missing_field_is_named(tmp_path):
    broken = dict(HF)
    del broken["intermediate_size"]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(broken))
    with pytest.raises(
        ValueError, match=r"config.json: missing field\(s\) \['intermediate_size'\]"
    ):
        LlamaConfig.from_hf(tmp_path)


def test_model_type_picks_the_family_and_an_unknown_one_is_named(tmp_path):
    assert models.config_from_hf({**HF, "model_type": "llama"}) == LlamaConfig.from_hf(HF)
    assert models.config_from_hf(HF, dtype="bfloat16").dtype == "bfloat16"  # no model_type: llama
    (tmp_path / "config.json").write_text(json.dumps({**HF, "model_type": "gpt2"}))
    with pytest.raises(
        ValueError, match=r"config.json: field 'model_type' is 'gpt2'; .* known are \['llama'\]"
    ):
        models.config_from_hf(tmp_path)


def test_unknown_rope_scaling_is_named():
    with pytest.raises(ValueError, match="rope scaling type 'yarn' is not supported"):
        LlamaConfig.from_hf({**HF, "rope_scaling": {"type": "yarn", "factor": 4.0}})
    with pytest.raises(ValueError, match=r"rope scaling 'llama3' needs field\(s\)"):
        LlamaConfig.from_hf({**HF, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}})


def test_inconsistent_heads_and_backend_are_named():
    with pytest.raises(ValueError, match="num_kv_heads=3.*multiple"):
        LlamaConfig.tiny(num_kv_heads=3)
    with pytest.raises(ValueError, match="attention='flash'.*choose one of"):
        LlamaConfig.tiny(attention="flash")


def test_weight_shape_mismatch_names_tensor_and_shapes():
    config = LlamaConfig.from_hf(HF)
    small = LlamaConfig.from_hf({**HF, "intermediate_size": 24})
    tensors = dict(params_to_hf(_zeros_tree(small), small))
    with pytest.raises(
        ValueError,
        match=r"model.layers.0.mlp.gate_proj.weight has shape \(24, 16\) "
        r"but config.json implies \(32, 16\)",
    ):
        hf_to_params(tensors, config)
    del tensors["model.norm.weight"]
    with pytest.raises(ValueError, match=r"missing tensor\(s\) \['model.norm.weight'\]"):
        hf_to_params(tensors, small)


def _zeros_tree(config):
    return unflatten(
        {path: np.zeros(shape, np.float32) for path, shape in param_shapes(config).items()}
    )
