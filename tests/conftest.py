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
import sentencepiece as spm


@pytest.fixture(scope="session")
def tokenizer_model(tmp_path_factory):
    """A real SentencePiece model trained on a few sentences (vocab 64)."""
    folder = tmp_path_factory.mktemp("spm")
    text = folder / "text.txt"
    words = "the cat sat on a mat while dogs ran far away from home in rain".split()
    rng = np.random.default_rng(0)
    text.write_text("\n".join(" ".join(rng.choice(words, 8)) for _ in range(300)))
    spm.SentencePieceTrainer.train(
        input=str(text),
        model_prefix=str(folder / "tokenizer"),
        vocab_size=64,
        model_type="bpe",
        bos_id=1,
        eos_id=2,
        unk_id=0,
        minloglevel=2,
    )
    return str(folder / "tokenizer.model")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A training MODEL_DIR: config.json, tokenizer.model and an Orbax checkpoint at step 3."""
    return helpers.write_chat_model_dir(tmp_path_factory.mktemp("run"))
