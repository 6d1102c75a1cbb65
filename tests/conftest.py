"""Test-wide settings (CPU only, eight host devices for mesh tests) and shared fixtures.

The settings are made before JAX is imported anywhere, so every test sees the
same backend. Plain helpers shared by test modules are in helpers.py.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import helpers
import numpy as np
import pytest


@pytest.fixture(scope="session")
def tokenizer_model(tmp_path_factory):
    """A real SentencePiece model trained on a few sentences (vocab 64)."""
    folder = tmp_path_factory.mktemp("spm")
    words = "the cat sat on a mat while dogs ran far away from home in rain".split()
    rng = np.random.default_rng(0)
    lines = [" ".join(rng.choice(words, 8)) for _ in range(300)]
    return helpers.train_bpe_spm(lines, folder / "tokenizer", 64)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A training MODEL_DIR: config.json, tokenizer.model and an Orbax checkpoint at step 3."""
    return helpers.write_chat_model_dir(tmp_path_factory.mktemp("run"))
