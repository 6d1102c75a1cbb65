"""A seqio vocabulary for a LLaMA SentencePiece `tokenizer.model`.

LLaMA's ids are unk 0, bos 1, eos 2. seqio pads with id 0, which is LLaMA's
`<unk>`: a padded position and a real `<unk>` share an id, so this project never
derives masks from `token != 0`. Segment ids and loss weights come from example
lengths (`mtllama_jax.data`), and a real `<unk>` in a response keeps its loss.

MT-LLaMA's released code changed two things, offered here by `mtllama_quirks`:
it added a `[PAD]` token as id 32000 (vocabulary 32001, the size of its
checkpoints), and it set the tokenizer's BOS to `</s>`, so its sequences begin
with id 2 rather than 1.
"""

from __future__ import annotations

import functools
import itertools
import math
import os

import gin
import numpy as np
import seqio
import tensorflow as tf

from mtllama_jax.env import gin_or_env

LLAMA_IDS = {"unk": 0, "bos": 1, "eos": 2}
TOKENIZER_ENV = "MTLLAMA_TOKENIZER"
QUIRKS_ENV = "MTLLAMA_QUIRKS"


class LlamaVocabulary(seqio.SentencePieceVocabulary):
    """seqio vocabulary over a LLaMA `tokenizer.model` (unk 0, bos 1, eos 2).

    Args:
      sentencepiece_model_file: path of the LLaMA SentencePiece model.
      mtllama_quirks: reproduce MT-LLaMA's tokenizer: `[PAD]` as the id after the
        SentencePiece pieces (32000 for LLaMA, `vocab_size` 32001) and BOS written
        as `</s>` (`bos_id` == `eos_id` == 2).
      extra_ids: sentinel ids appended by seqio (not with `mtllama_quirks`, whose
        `[PAD]` must stay at the id right after the pieces).

    `pad_id` stays seqio's 0 (LLaMA's `<unk>`): batches pad with 0 whatever the
    option; `pad_token_id` is MT-LLaMA's `[PAD]` id (None without the quirks).
    Text never encodes to `[PAD]`; decoding drops it.
    """

    def __init__(
        self, sentencepiece_model_file: str, *, mtllama_quirks: bool = False, extra_ids: int = 0
    ):
        if mtllama_quirks and extra_ids:
            raise ValueError(
                f"LlamaVocabulary({sentencepiece_model_file!r}): mtllama_quirks=True puts "
                f"[PAD] right after the SentencePiece pieces, so extra_ids must be 0 "
                f"(got {extra_ids})"
            )
        self._mtllama_quirks = bool(mtllama_quirks)
        self._checked = False
        super().__init__(sentencepiece_model_file, extra_ids=extra_ids)

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_checked", None)  # a cache flag: equal vocabularies compare equal
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._checked = False

    def _model_context(self):
        context = super()._model_context()
        if not self._checked:
            self._check_ids(context.tokenizer)
            self._checked = True
        return context

    def _check_ids(self, tokenizer) -> None:
        got = {"unk": tokenizer.unk_id(), "bos": tokenizer.bos_id(), "eos": tokenizer.eos_id()}
        if got != LLAMA_IDS:
            raise ValueError(
                f"{self.sentencepiece_model_file} is not a LLaMA tokenizer.model: its "
                f"special ids are {got}, LLaMA's are {LLAMA_IDS}. A T5-style model "
                f"(pad 0, eos 1, unk 2) goes with seqio.SentencePieceVocabulary instead."
            )

    @property
    def mtllama_quirks(self) -> bool:
        return self._mtllama_quirks

    @property
    def bos_id(self) -> int:
        """Id that starts every sequence: 1, or 2 (`</s>`) with MT-LLaMA's quirks."""
        return self.eos_id if self.mtllama_quirks else self.tokenizer.bos_id()

    @property
    def pad_token_id(self) -> int | None:
        """MT-LLaMA's `[PAD]` id (32000 for LLaMA) with the quirks, else None."""
        return self.tokenizer.GetPieceSize() if self.mtllama_quirks else None

    @property
    def _base_vocab_size(self) -> int:
        return self.tokenizer.GetPieceSize() + int(self.mtllama_quirks)

    def _decode(self, ids):
        pad = self.pad_token_id
        return super()._decode([i for i in ids if int(i) != pad])

    # TF-side tokenisation goes through the Python SentencePiece that `encode` and
    # `decode` use, not through TF Text's own copy (seqio's default). That copy is
    # loaded anew for every tokenised feature and logs "precompiled_charsmap is
    # empty" each time for LLaMA's identity normaliser; one copy is also one behaviour.

    def _encode_tf(self, s):
        """Token ids of a string tensor: 1-D for a scalar, ragged on a new last axis else."""
        s = tf.convert_to_tensor(s, tf.string)

        def encode(texts):
            ids = [self._encode(t.decode("utf-8")) for t in np.asarray(texts, object).reshape(-1)]
            lengths = np.array([len(row) for row in ids], np.int64)
            return np.fromiter(itertools.chain.from_iterable(ids), np.int32), lengths

        values, lengths = tf.numpy_function(encode, [s], (tf.int32, tf.int64), stateful=False)
        values.set_shape([None])
        if s.shape.rank == 0:
            return values
        ids = tf.RaggedTensor.from_row_lengths(values, tf.reshape(lengths, [-1]))
        outer = tf.shape(s, out_type=tf.int64)
        for axis in range(s.shape.rank - 1, 0, -1):
            ids = tf.RaggedTensor.from_uniform_row_length(ids, outer[axis])
        return ids

    def _decode_tf(self, ids):
        """Text of a 1-D (scalar string) or N-D (one string per row) id tensor."""
        ids = tf.convert_to_tensor(ids)

        def decode(rows):
            flat = rows.reshape(math.prod(rows.shape[:-1]), rows.shape[-1])
            return np.array(
                [self._decode(row.tolist()).encode("utf-8") for row in flat], object
            ).reshape(rows.shape[:-1])

        text = tf.numpy_function(decode, [ids], tf.string, stateful=False)
        text.set_shape(ids.shape[:-1])
        return text

    def __str__(self) -> str:
        return (
            f"LlamaVocabulary(file={self.sentencepiece_model_file}, "
            f"mtllama_quirks={self._mtllama_quirks}, extra_ids={self._extra_ids})"
        )


@gin.configurable(denylist=["checkpoint_path"])
def tokenizer_settings(
    path: str | None = None,
    mtllama_quirks: bool | None = None,
    checkpoint_path: str | None = None,
):
    """(tokenizer.model path, mtllama_quirks) of the registered tasks.

    gin (`tokenizer_settings.path`, `tokenizer_settings.mtllama_quirks`) wins over
    the checkpoint's tokenizer a job gives (`checkpoint_path`), which wins over
    the environment (`MTLLAMA_TOKENIZER`, `MTLLAMA_QUIRKS=1`). Read when a task's
    data is first tokenised, never at import.
    """
    path = gin_or_env(path or checkpoint_path, TOKENIZER_ENV)
    if not path:
        raise ValueError(
            f"no LLaMA tokenizer configured for the registered tasks: set {TOKENIZER_ENV}="
            f"/path/to/tokenizer.model or bind tokenizer_settings.path in gin"
        )
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"tokenizer {path} (from gin tokenizer_settings.path or {TOKENIZER_ENV}) does "
            f"not exist; point it at the tokenizer.model of the LLaMA checkpoint"
        )
    mtllama_quirks = gin_or_env(mtllama_quirks, QUIRKS_ENV, "0")
    if isinstance(mtllama_quirks, str):
        mtllama_quirks = mtllama_quirks.lower() in ("1", "true", "yes")
    return path, bool(mtllama_quirks)


class ConfiguredLlamaVocabulary(LlamaVocabulary):
    """LlamaVocabulary whose file and quirks come from `tokenizer_settings` on first use.

    Tasks are registered at import time, before gin is parsed; this lets them
    carry a vocabulary whose location is decided later.
    """

    def __init__(self):
        super().__init__("")
        self._resolved = False
        self._checkpoint_path = None

    def use_checkpoint_tokenizer(self, path: str) -> ConfiguredLlamaVocabulary:
        """Reads `path` (a checkpoint's tokenizer.model) unless gin binds one; before first use."""
        self._checkpoint_path = path
        return self

    def _resolve(self) -> None:
        if not self._resolved:
            self._sentencepiece_model_file, self._mtllama_quirks = tokenizer_settings(
                checkpoint_path=self._checkpoint_path
            )
            self._resolved = True

    def _model_context(self):
        self._resolve()
        return super()._model_context()

    @property
    def sentencepiece_model_file(self) -> str:
        self._resolve()
        return self._sentencepiece_model_file

    @property
    def mtllama_quirks(self) -> bool:
        self._resolve()
        return self._mtllama_quirks

    def __getstate__(self):
        self._resolve()
        state = super().__getstate__()
        state.pop("_checkpoint_path", None)  # an input of the resolution, done by now
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._resolved = True


@functools.cache
def configured_vocabulary() -> ConfiguredLlamaVocabulary:
    """The one vocabulary every registered task shares (so mixtures are compatible)."""
    return ConfiguredLlamaVocabulary()
