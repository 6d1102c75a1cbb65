"""The Flax LLaMA against transformers' LlamaForCausalLM on the same weights."""

import jax
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

from mtllama_jax.convert.hf_params import hf_to_params, params_to_hf
from mtllama_jax.models.llama.config import LlamaConfig
from mtllama_jax.models.llama.model import LlamaForCausalLM

BASE = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=80,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
)
FAMILIES = {
    "llama1": dict(num_key_value_heads=4),
    "llama2_gqa": dict(num_key_value_heads=2),
    "llama3_rope_scaling": dict(
        num_key_value_heads=1,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8,
        },
    ),
    "linear_rope": dict(num_key_value_heads=2, rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "tied_embeddings": dict(num_key_value_heads=2, tie_word_embeddings=True),
}


def make_hf_folder(tmp_path, overrides, seed=0):
    """A random HF LLaMA saved as safetensors; weights scaled up so logits are O(1)."""
    torch.manual_seed(seed)
    hf_config = transformers.LlamaConfig(**BASE, **overrides)
    model = transformers.LlamaForCausalLM(hf_config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.2)
    model.save_pretrained(tmp_path)
    return model


def load_ours(folder):
    config = LlamaConfig.from_hf(folder, dtype="float32")
    tensors = safetensors.numpy.load_file(folder / "model.safetensors")
    return config, hf_to_params(tensors, config)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_logits_match_transformers(tmp_path, family):
    hf_model = make_hf_folder(tmp_path, FAMILIES[family])
    config, params = load_ours(tmp_path)
    tokens = np.random.default_rng(1).integers(0, BASE["vocab_size"], size=(2, 24))
    with torch.no_grad():
        expected = hf_model(torch.tensor(tokens)).logits.numpy()
    got = np.asarray(LlamaForCausalLM(config).apply({"params": params}, tokens))
    assert np.abs(expected).max() > 0.5  # the comparison is not between near-zero logits
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_params_round_trip_to_hf_names(tmp_path):
    make_hf_folder(tmp_path, FAMILIES["llama2_gqa"])
    config, params = load_ours(tmp_path)
    original = safetensors.numpy.load_file(tmp_path / "model.safetensors")
    back = dict(params_to_hf(params, config))
    assert back.keys() == original.keys()
    for name, value in original.items():
        np.testing.assert_array_equal(back[name], value, err_msg=name)


def test_packed_rows_equal_separate_runs(tmp_path):
    make_hf_folder(tmp_path, FAMILIES["llama2_gqa"])
    config, params = load_ours(tmp_path)
    model = LlamaForCausalLM(config)
    rng = np.random.default_rng(2)
    a, b = rng.integers(3, 128, size=(1, 9)), rng.integers(3, 128, size=(1, 6))
    packed = np.zeros((1, 20), np.int64)
    packed[0, :9], packed[0, 9:15] = a[0], b[0]
    segments = np.array([[1] * 9 + [2] * 6 + [0] * 5])
    positions = np.array([list(range(9)) + list(range(6)) + [0] * 5])
    logits = np.asarray(
        model.apply({"params": params}, packed, positions=positions, segment_ids=segments)
    )
    alone_a = np.asarray(model.apply({"params": params}, a))
    alone_b = np.asarray(model.apply({"params": params}, b))
    np.testing.assert_allclose(logits[:, :9], alone_a, atol=1e-5)
    np.testing.assert_allclose(logits[:, 9:15], alone_b, atol=1e-5)


def test_config_round_trips_through_hf_json(tmp_path):
    hf_model = make_hf_folder(tmp_path, FAMILIES["llama3_rope_scaling"])
    config = LlamaConfig.from_hf(tmp_path)
    assert config.num_kv_heads == 1 and config.rope_theta == 500000.0
    again = LlamaConfig.from_hf(config.to_hf())
    assert again == config
    reread = transformers.LlamaConfig.from_dict(config.to_hf())
    assert reread.rope_parameters["rope_type"] == "llama3"
    assert reread.rope_parameters["rope_theta"] == hf_model.config.rope_parameters["rope_theta"]


def test_jit_and_bf16_run():
    config = LlamaConfig.tiny(dtype="bfloat16", remat="full")
    model = LlamaForCausalLM(config)
    tokens = np.ones((2, 16), np.int32)
    params = jax.jit(model.init)(jax.random.key(0), tokens)["params"]
    logits = jax.jit(model.apply)({"params": params}, tokens)
    assert logits.dtype == np.float32 and logits.shape == (2, 16, config.vocab_size)
    assert np.isfinite(np.asarray(logits)).all()
