"""Prompt wrappers: exact strings, and the seqio preprocessor touching only inputs."""

import pytest
import tensorflow as tf

from mtllama_jax import formats

SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. The "
    "assistant gives helpful, detailed, and polite answers to the human's questions."
)
USER_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. The "
    "assistant gives helpful, detailed, and polite answers to the user's questions."
)


def test_exact_strings():
    assert formats.get_wrapper("mtllama")("Q?") == SYSTEM + "### Human: Q?### Assistant:"
    assert formats.get_wrapper("mtllama_user")("Q?") == (
        USER_SYSTEM + "\n\n### USER: Q?\n### ASSISTANT:"
    )
    assert formats.get_wrapper("alpaca")("Q?") == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nQ?\n\n### Response:"
    )
    assert formats.get_wrapper("raw")("Q?") == "Q?"
    assert set(formats.WRAPPERS) == {"mtllama", "mtllama_user", "alpaca", "raw"}


def test_unknown_wrapper_names_the_choices():
    with pytest.raises(ValueError, match=r"unknown prompt wrapper 'vicuna'.*alpaca"):
        formats.get_wrapper("vicuna")


def test_preprocessor_wraps_inputs_only():
    ds = tf.data.Dataset.from_tensor_slices(
        {"inputs": ["Is it?", "Why?"], "targets": ["yes", "because"], "id": [1, 2]}
    )
    out = list(formats.wrap_preprocessor(ds, wrapper="alpaca").as_numpy_iterator())
    assert [o["inputs"].decode() for o in out] == [
        formats.get_wrapper("alpaca")("Is it?"),
        formats.get_wrapper("alpaca")("Why?"),
    ]
    assert [o["targets"] for o in out] == [b"yes", b"because"]
    assert [o["id"] for o in out] == [1, 2]
