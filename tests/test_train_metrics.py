"""Metrics: MFU's FLOPs count and peak table, JSONL + TensorBoard files, resume truncation."""

import os

import jax
import numpy as np
import pytest

from mtllama_jax import metrics, models
from mtllama_jax.models.llama.config import LlamaConfig


def test_flops_per_token_and_peak_table():
    config = LlamaConfig()  # LLaMA-7B
    e = config.hidden_size
    matmul_params = config.num_params - config.vocab_size * e - (2 * config.num_layers + 1) * e
    attention = 6 * config.num_layers * config.num_heads * config.head_dim * 2048
    assert metrics.flops_per_token(config, 2048) == 6 * matmul_params + attention
    assert metrics.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert metrics.peak_flops("NVIDIA H100 PCIe") == 756e12
    assert metrics.peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert metrics.peak_flops("TPU v5 lite") == 197e12
    assert metrics.peak_flops("cpu") is None


@pytest.mark.parametrize("tied", [False, True])
def test_parameter_counts_equal_an_initialised_model(tied):
    config = LlamaConfig.tiny(tie_word_embeddings=tied)
    tokens = np.zeros((1, 8), np.int32)
    shapes = jax.eval_shape(models.build_module(config).init, jax.random.key(0), tokens)
    leaves = jax.tree_util.tree_leaves_with_path(shapes["params"])
    sizes = {jax.tree_util.keystr(path): leaf.size for path, leaf in leaves}
    assert config.num_params == sum(sizes.values())
    products = sum(n for name, n in sizes.items() if "kernel" in name)
    table = config.vocab_size * config.hidden_size  # the LM head when tied
    assert config.matmul_params == products + (table if tied else 0)


class FakeDevice:
    device_kind = "NVIDIA H100 80GB HBM3"


def test_mfu_of_a_known_throughput():
    config = LlamaConfig()
    tokens_per_s = 0.5 * 989e12 / metrics.flops_per_token(config, 2048)
    assert metrics.mfu(config, 2048, tokens_per_s, [FakeDevice()]) == pytest.approx(0.5)
    assert metrics.mfu(config, 2048, tokens_per_s, [FakeDevice()] * 2) == pytest.approx(0.25)


def test_writer_jsonl_tensorboard_and_resume_truncation(tmp_path):
    writer = metrics.MetricsWriter(str(tmp_path), total_steps=4, progress=False)
    for step in (1, 2, 3):
        writer.write_train(step, {"loss": 1.0 / step, "tokens_per_s": 10.0})
    writer.write(2, {"loss": 0.7}, "eval")
    writer.close()
    assert [r["loss"] for r in metrics.read_jsonl(tmp_path / "metrics.jsonl")] == [1, 0.5, 1 / 3]
    assert os.listdir(tmp_path / "tensorboard" / "train")[0].startswith("events.out.tfevents")
    assert os.listdir(tmp_path / "tensorboard" / "eval")

    resumed = metrics.MetricsWriter(str(tmp_path), total_steps=4, start_step=2, progress=False)
    resumed.write_train(3, {"loss": 0.25})
    resumed.close()
    assert [(r["step"], r["loss"]) for r in metrics.read_jsonl(tmp_path / "metrics.jsonl")] == [
        (1, 1.0),
        (2, 0.5),
        (3, 0.25),
    ]
    assert len(metrics.read_jsonl(tmp_path / "metrics.jsonl", "eval")) == 1
