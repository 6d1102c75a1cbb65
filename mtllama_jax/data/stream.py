"""Decoder-only training batches read on the fly from seqio tasks (the uncached path).

The trainer calls `batches(...)` when no tokenized cache is given
(`mtllama_jax.data.pipeline` reads one). A task gives tokenised `inputs` (the
wrapped prompt, no EOS) and `targets` (the response, EOS appended). One example
becomes one segment `[BOS] + inputs + targets` of `len(inputs) + len(targets)`
positions after the one-token shift.
Segments are packed into rows of `sequence_length` by best-fit-decreasing over a
buffer of examples (seqio's packer is greedy first-fit in arrival order), so rows
carry little padding. Loss weights are 1 on the response and its EOS only.

Masks come from lengths, never from `token != 0`: seqio pads with 0, which is
LLaMA's `<unk>`.
"""

from __future__ import annotations

import logging
from typing import Iterator

import numpy as np
import seqio
import tensorflow as tf

from mtllama_jax.data.packing import (
    PackingStats,
    counted,
    pack_rows,
    rows_to_batch,
    single_rows,
)

log = logging.getLogger(__name__)


def examples(
    mixture_or_task_name: str,
    *,
    split: str,
    seed: int,
    shard_index: int = 0,
    num_shards: int = 1,
    num_epochs: int | None = None,
):
    """(inputs, targets) int32 arrays of a task or mixture, this host's shard.

    The order is a function of (seed, shard_index, num_shards): seqio shuffles,
    samples mixtures and shards (by file when a task has enough files, else by
    example) with that seed. `num_epochs=None` repeats forever.
    """
    provider = seqio.get_mixture_or_task(mixture_or_task_name)
    kwargs = dict(
        sequence_length=None,
        split=split,
        use_cached=False,
        shuffle=True,
        seed=seed,
        shard_info=seqio.ShardInfo(shard_index, num_shards),
        num_epochs=num_epochs,
    )
    if isinstance(provider, seqio.Mixture):
        kwargs["copy_pretokenized"] = False
    return _pairs(provider.get_dataset(**kwargs))  # built now: bad data fails here


def _pairs(ds: tf.data.Dataset):
    empty = np.zeros([0], np.int32)
    for ex in ds.as_numpy_iterator():
        yield ex.get("inputs", empty).astype(np.int32), ex["targets"].astype(np.int32)


class BatchIterator:
    """Iterator of batch dicts; `.stats` counts what was read, packed, cut, dropped."""

    def __init__(
        self,
        rows: Iterator[list],
        *,
        batch_size: int,
        length: int,
        bos_id: int,
        stats: PackingStats,
        start_step: int,
    ):
        self._rows, self._batch, self._length, self._bos = rows, batch_size, length, bos_id
        self.stats = stats
        self.step = start_step
        for _ in range(start_step * batch_size):  # seek: count rows, build nothing
            if next(self._rows, None) is None:
                break

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        rows = [row for _, row in zip(range(self._batch), self._rows)]
        if not rows:
            log.info("data exhausted at step %d: %s", self.step, self.stats.report())
            raise StopIteration
        rows += [[]] * (self._batch - len(rows))  # a finite split's last batch
        self.step += 1
        return rows_to_batch(rows, self._length, self._bos)


def batches(
    mixture_or_task_name: str,
    *,
    split: str = "train",
    sequence_length: int,
    batch_size: int,
    seed: int = 0,
    start_step: int = 0,
    shard_index: int = 0,
    num_shards: int = 1,
    pack: bool = True,
    truncate: bool = True,
    buffer_size: int = 1024,
    num_epochs: int | None = None,
) -> BatchIterator:
    """Packed decoder-only batches of a registered seqio task or mixture, for one host.

    Args:
      mixture_or_task_name: a task/mixture with `targets` (and usually `inputs`)
        token features, e.g. "t0_train" (`import mtllama_jax.tasks`).
      split: the split to read.
      sequence_length: row length L.
      batch_size: rows per batch on this host (the global batch / process count).
      seed: data-order seed (shuffle, mixture sampling, row order).
      start_step: first step to produce. Batch k is the same whether the stream
        started at 0 or at k, so a resumed run neither repeats nor skips data.
        Seeking reads (and tokenises) the examples of the skipped steps but builds
        no arrays for them.
      shard_index / num_shards: this host's seqio `ShardInfo` (jax.process_index(),
        jax.process_count()); each host reads a disjoint shard.
      pack: False puts one example per row.
      truncate: over-long examples lose the start of their inputs (counted, logged);
        False drops them (counted, logged). A response alone longer than L is dropped.
      buffer_size: examples per best-fit-decreasing buffer (larger packs tighter).
      num_epochs: passes over the data; None repeats forever.

    Yields dicts of numpy arrays `[batch_size, sequence_length]`:
      input_tokens int32: BOS + tokens of each segment, what the model reads;
      target_tokens int32: the next token at each position;
      positions int32: 0, 1, ... restarting at each segment;
      segment_ids int32: 1, 2, ... per packed example, 0 on padding;
      loss_weights float32: 1 on response tokens and their EOS, else 0;
      task_ids int32: 0 (this path does not tell a mixture's tasks apart).
    Padding is token 0 with segment 0. A finite split's last batch is filled with
    empty rows (all segment 0). Examples whose target is empty are dropped; the
    returned iterator's `.stats` counts every drop and cut, and they are logged;
    when none of the first `packing.NO_ROW_LIMIT` examples fits, it raises
    `packing.NoFittingExamples` with the counts per reason instead of waiting.
    """
    provider = seqio.get_mixture_or_task(mixture_or_task_name)
    vocab = provider.output_features["targets"].vocabulary
    bos_id = getattr(vocab, "bos_id", None)
    if bos_id is None:
        raise ValueError(
            f"{mixture_or_task_name}: the targets vocabulary {vocab} has no BOS "
            f"id; use mtllama_jax.vocab.LlamaVocabulary"
        )
    stats = PackingStats(sequence_length)
    source = examples(
        mixture_or_task_name,
        split=split,
        seed=seed,
        shard_index=shard_index,
        num_shards=num_shards,
        num_epochs=num_epochs,
    )
    name = f"{mixture_or_task_name!r} ({split})"
    if pack:
        rows = pack_rows(
            source,
            length=sequence_length,
            eos_id=vocab.eos_id,
            stats=stats,
            buffer_size=buffer_size,
            truncate=truncate,
            seed=seed,
            name=name,
        )
    else:
        rows = single_rows(source, sequence_length, vocab.eos_id, stats, truncate, name)
    return BatchIterator(
        counted(rows, stats),
        batch_size=batch_size,
        length=sequence_length,
        bos_id=bos_id,
        stats=stats,
        start_step=start_step,
    )
