"""Test-wide settings (CPU only, eight host devices for mesh tests) and shared helpers.

The settings are made before JAX is imported anywhere, so every test sees the
same backend. Helpers used by several test modules live here (`from conftest
import ...`) with the fixtures they need; torch and transformers are imported
inside the helpers that use them.
"""

import io
import json
import os
import random

import numpy as np
import pytest
import sentencepiece as spm

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")


# ---- LLaMA-style SentencePiece models (the vocabulary and data tests) -------------------

WORDS = (
    "the a question answer context premise hypothesis yes no maybe review product movie "
    "sentence because consequence option choice human assistant user response instruction "
    "chat curious artificial intelligence helpful detailed polite summary article title"
).split()


def train_llama_spm(path, *, ids=(0, 1, 2), vocab_size=512) -> str:
    """Train a small BPE model with byte fallback and LLaMA's unk/bos/eos ids."""
    rng = random.Random(0)
    lines = [
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 24)))
        + " ### Human: ### Assistant: ### USER: ### ASSISTANT: ### Response: 0123456789."
        for _ in range(400)
    ]
    out = io.BytesIO()
    unk, bos, eos = ids
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=out,
        vocab_size=vocab_size,
        model_type="bpe",
        unk_id=unk,
        bos_id=bos,
        eos_id=eos,
        pad_id=-1,
        byte_fallback=True,
        hard_vocab_limit=False,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        minloglevel=2,
    )
    path.write_bytes(out.getvalue())
    return str(path)


def session_spm(tmp_path_factory) -> str:
    """One tokenizer.model per test session, shared by the data test modules."""
    path = tmp_path_factory.getbasetemp() / "llama_tokenizer.model"
    return str(path) if path.exists() else train_llama_spm(path)


# ---- Hugging Face LLaMA folders (the converter and delta tests) ---------------------------

HF_CONFIG = dict(
    vocab_size=32000,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


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


def make_hf(folder, tokenizer_model, *, dtype=None, seed=0, shard=None, **overrides):
    """Saves a random HF LlamaForCausalLM (+ tokenizer files) to `folder` (fp32 by default)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**HF_CONFIG, **overrides}))
    model.to(dtype or torch.float32).save_pretrained(
        folder, **({"max_shard_size": shard} if shard else {})
    )
    with (
        open(tokenizer_model, "rb") as src,
        open(os.path.join(folder, "tokenizer.model"), "wb") as dst,
    ):
        dst.write(src.read())
    with open(os.path.join(folder, "special_tokens_map.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, f)
    return str(folder)


def read_all(folder):
    """Every tensor of an HF folder, by name."""
    from mtllama_jax.convert import hf_files

    weights = hf_files.HFWeights(folder)
    return {n: weights.get(n) for n in weights.names()}


def assert_bitwise(a, b):
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert a[name].tobytes() == b[name].tobytes(), name


def convert(*argv):
    """Runs `mtllama-convert` in this process."""
    from mtllama_jax.convert import cli

    cli.main([str(a) for a in argv])
