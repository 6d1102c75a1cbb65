"""LlamaVocabulary on a real SentencePiece model trained here with LLaMA's ids."""

import pickle

import numpy as np
import pytest
import tensorflow as tf
from helpers import session_spm, train_llama_spm

from mtllama_jax.vocab import LlamaVocabulary


@pytest.fixture(scope="module")
def spm_file(tmp_path_factory):
    return session_spm(tmp_path_factory)


def test_llama_ids_and_round_trip(spm_file):
    vocab = LlamaVocabulary(spm_file)
    size = vocab.tokenizer.GetPieceSize()
    assert (vocab.unk_id, vocab.bos_id, vocab.eos_id, vocab.pad_id) == (0, 1, 2, 0)
    assert vocab.vocab_size == size and vocab.pad_token_id is None
    text = "the premise é because yes"
    ids = vocab.encode(text)
    assert ids[0] not in (1, 2) and vocab.decode(ids) == text
    tf_ids = vocab.encode_tf(tf.constant(text)).numpy().tolist()
    assert tf_ids == list(ids)
    assert vocab.decode_tf(tf.constant(ids, tf.int32)).numpy().decode() == text


def test_mtllama_quirks(spm_file):
    vocab = LlamaVocabulary(spm_file, mtllama_quirks=True)
    size = vocab.tokenizer.GetPieceSize()
    assert vocab.pad_token_id == size and vocab.vocab_size == size + 1
    assert vocab.bos_id == vocab.eos_id == 2 and vocab.pad_id == 0
    ids = list(vocab.encode("yes no")) + [size]
    assert vocab.decode(ids) == "yes no"
    assert vocab.decode_tf(tf.constant(ids, tf.int32)).numpy().decode() == "yes no"
    assert vocab != LlamaVocabulary(spm_file)
    assert pickle.loads(pickle.dumps(vocab)) == vocab


def test_unk_is_a_real_token_not_padding(spm_file):
    vocab = LlamaVocabulary(spm_file)
    # The decoder maps <unk> (id 0) to " ⁇ ", so 0 is a token with a meaning.
    assert "⁇" in vocab.decode([0]) and np.int32(vocab.unk_id) == vocab.pad_id


def test_t5_style_model_is_rejected(tmp_path):
    t5_like = train_llama_spm(tmp_path / "t5.model", ids=(2, 3, 1))
    with pytest.raises(ValueError, match=r"t5.model is not a LLaMA tokenizer.model"):
        _ = LlamaVocabulary(t5_like).eos_id


def test_quirks_with_extra_ids_is_rejected(spm_file):
    with pytest.raises(ValueError, match="extra_ids must be 0"):
        LlamaVocabulary(spm_file, mtllama_quirks=True, extra_ids=4)


def test_tf_tokenisation_matches_python_in_any_shape(spm_file):
    vocab = LlamaVocabulary(spm_file, mtllama_quirks=True)
    texts = [["the premise é", ""], ["yes no 😀", "because"]]
    ragged = vocab.encode_tf(tf.constant(texts))
    assert ragged.shape[:2] == (2, 2)
    assert ragged.to_list() == [[list(vocab.encode(t)) for t in row] for row in texts]
    ids = [list(vocab.encode("yes no")) + [vocab.pad_token_id], list(vocab.encode("maybe a"))]
    width = max(map(len, ids))
    ids = [row + [vocab.eos_id] * (width - len(row)) for row in ids]  # decode_tf stops at EOS
    assert vocab.decode_tf(tf.constant(ids, tf.int32)).numpy().tolist() == [b"yes no", b"maybe a"]


def test_tf_tokenisation_in_a_dataset_logs_nothing(spm_file, capfd):
    # TF Text's copy of SentencePiece writes "precompiled_charsmap is empty" to fd 2
    # for an identity normaliser each time a pipeline builds its tokenizer.
    vocab = LlamaVocabulary(spm_file)
    data = tf.data.Dataset.from_tensor_slices(["yes no", "the premise"]).map(vocab.encode_tf)
    assert [list(x.numpy()) for x in data] == [
        list(vocab.encode(t)) for t in ("yes no", "the premise")
    ]
    assert "precompiled_charsmap" not in capfd.readouterr().err


def test_a_jobs_checkpoint_tokenizer_is_passed_not_set_in_the_environment(spm_file, monkeypatch):
    import os

    import gin

    from mtllama_jax import vocab

    monkeypatch.delenv(vocab.TOKENIZER_ENV, raising=False)
    v = vocab.ConfiguredLlamaVocabulary().use_checkpoint_tokenizer(spm_file)
    assert v.sentencepiece_model_file == spm_file and vocab.TOKENIZER_ENV not in os.environ
    with gin.unlock_config():
        gin.bind_parameter("tokenizer_settings.path", "/gin/wins/tokenizer.model")
    try:
        with pytest.raises(FileNotFoundError, match="/gin/wins/tokenizer.model"):
            vocab.ConfiguredLlamaVocabulary().use_checkpoint_tokenizer(spm_file).mtllama_quirks
    finally:
        gin.clear_config()
