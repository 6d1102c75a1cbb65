"""Decoder-only training batches from seqio tasks: packing, segments, loss weights.

The trainer calls `batches(...)`; everything else here is its machinery.

A task gives tokenised `inputs` (the wrapped prompt, no EOS) and `targets` (the
response, EOS appended). One example becomes one segment `[BOS] + inputs +
targets` of `len(inputs) + len(targets)` positions after the one-token shift.
Segments are packed into rows of `sequence_length` by best-fit-decreasing over a
buffer of examples (seqio's packer is greedy first-fit in arrival order), so rows
carry little padding. Loss weights are 1 on the response and its EOS only.

Masks come from lengths, never from `token != 0`: seqio pads with 0, which is
LLaMA's `<unk>`.
"""

from __future__ import annotations

import bisect
import dataclasses
import logging
from typing import Iterable, Iterator

import numpy as np
import seqio
import tensorflow as tf

try:  # TF reads data on the host; JAX owns the accelerators.
    tf.config.set_visible_devices([], "GPU")
except RuntimeError:  # TF already initialised its devices; leave them be.
    pass

log = logging.getLogger(__name__)

FEATURES = ("input_tokens", "target_tokens", "positions", "segment_ids", "loss_weights")


@dataclasses.dataclass
class PackingStats:
    """What the packer saw: every dropped or shortened example is counted here."""

    length: int  # sequence_length of the rows
    examples: int = 0
    dropped_empty_target: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    segments: int = 0
    rows: int = 0
    tokens: int = 0  # non-padding positions emitted

    @property
    def non_padding_fraction(self) -> float:
        return self.tokens / max(1, self.rows * self.length)

    def report(self) -> str:
        return (f"{self.examples} examples read, {self.segments} packed into {self.rows} "
                f"rows ({self.non_padding_fraction:.3f} non-padding); dropped "
                f"{self.dropped_empty_target} with an empty target, "
                f"{self.dropped_too_long} too long; {self.truncated} inputs cut from the left")


def fit_example(inputs: np.ndarray, targets: np.ndarray, length: int, eos_id: int,
                stats: PackingStats, truncate: bool = True):
    """(inputs, targets) that fit `length` positions, or None when dropped (counted).

    Over-long examples lose the start of their inputs so the response survives;
    with `truncate=False`, or a response longer than `length`, they are dropped.
    """
    stats.examples += 1
    if not np.any(targets != eos_id):
        stats.dropped_empty_target += 1
        _note(stats, "dropped an example with an empty target")
        return None
    excess = len(inputs) + len(targets) - length
    if excess > 0:
        if not truncate or len(targets) > length:
            stats.dropped_too_long += 1
            _note(stats, f"dropped an example of {len(inputs) + len(targets)} tokens "
                         f"(sequence_length {length}, truncate={truncate})")
            return None
        stats.truncated += 1
        _note(stats, f"cut {excess} tokens from the left of an example's inputs")
        inputs = inputs[excess:]
    return inputs, targets


def _note(stats: PackingStats, what: str) -> None:
    events = stats.dropped_empty_target + stats.dropped_too_long + stats.truncated
    if events & (events - 1) == 0:  # 1st, 2nd, 4th, 8th ... event: log, not flood
        log.warning("%s; so far: %s", what, stats.report())


def best_fit_decreasing(lengths: Iterable[int], capacity: int) -> list[list[int]]:
    """Bins (lists of indices into `lengths`) of total length <= `capacity`.

    Longest first, each into the fullest bin it fits; deterministic (ties keep
    the input order). Every length must be <= capacity.
    """
    lengths = list(lengths)
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (room left, bin index)
    for i in order:
        n = lengths[i]
        at = bisect.bisect_left(free, (n, -1))
        if at < len(free):
            room, b = free.pop(at)
        else:
            room, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        if room - n > 0:
            bisect.insort(free, (room - n, b))
    return bins


def pack_rows(examples: Iterable[tuple[np.ndarray, np.ndarray]], *, length: int,
              eos_id: int, stats: PackingStats, buffer_size: int = 1024,
              truncate: bool = True, seed: int = 0) -> Iterator[list]:
    """Rows (lists of (inputs, targets) segments) packed buffer by buffer.

    Each buffer of `buffer_size` fitting examples is packed with best-fit-
    decreasing; its rows come out in an order shuffled by (seed, buffer number)
    so long and short rows mix within a batch.
    """
    buffer, number = [], 0
    for inputs, targets in examples:
        fitted = fit_example(inputs, targets, length, eos_id, stats, truncate)
        if fitted is not None:
            buffer.append(fitted)
        if len(buffer) == buffer_size:
            yield from _pack_buffer(buffer, length, seed, number)
            buffer, number = [], number + 1
    if buffer:
        yield from _pack_buffer(buffer, length, seed, number)


def _pack_buffer(buffer, length, seed, number):
    bins = best_fit_decreasing([len(i) + len(t) for i, t in buffer], length)
    rng = np.random.default_rng([seed, number])
    for b in rng.permutation(len(bins)):
        yield [buffer[i] for i in bins[b]]


def rows_to_batch(rows: list, length: int, bos_id: int) -> dict[str, np.ndarray]:
    """The batch contract: `[len(rows), length]` arrays, padding id 0 and segment 0."""
    shape = (len(rows), length)
    batch = {k: np.zeros(shape, np.int32) for k in FEATURES[:4]}
    batch["loss_weights"] = np.zeros(shape, np.float32)
    for r, row in enumerate(rows):
        at = 0
        for s, (inputs, targets) in enumerate(row, start=1):
            n_in, n = len(inputs), len(inputs) + len(targets)
            end = at + n
            full = np.concatenate([[bos_id], inputs, targets])
            batch["input_tokens"][r, at:end] = full[:-1]
            batch["target_tokens"][r, at:end] = full[1:]
            batch["positions"][r, at:end] = np.arange(n)
            batch["segment_ids"][r, at:end] = s
            batch["loss_weights"][r, at + n_in:end] = 1.0
            at = end
    return batch


def examples(mixture_or_task_name: str, *, split: str, seed: int, shard_index: int = 0,
             num_shards: int = 1, num_epochs: int | None = None):
    """(inputs, targets) int32 arrays of a task or mixture, this host's shard.

    The order is a function of (seed, shard_index, num_shards): seqio shuffles,
    samples mixtures and shards (by file when a task has enough files, else by
    example) with that seed. `num_epochs=None` repeats forever.
    """
    provider = seqio.get_mixture_or_task(mixture_or_task_name)
    kwargs = dict(sequence_length=None, split=split, use_cached=False, shuffle=True,
                  seed=seed, shard_info=seqio.ShardInfo(shard_index, num_shards),
                  num_epochs=num_epochs)
    if isinstance(provider, seqio.Mixture):
        kwargs["copy_pretokenized"] = False
    return _pairs(provider.get_dataset(**kwargs))  # built now: bad data fails here


def _pairs(ds: tf.data.Dataset):
    empty = np.zeros([0], np.int32)
    for ex in ds.as_numpy_iterator():
        yield ex.get("inputs", empty).astype(np.int32), ex["targets"].astype(np.int32)


class BatchIterator:
    """Iterator of batch dicts; `.stats` counts what was read, packed, cut, dropped."""

    def __init__(self, rows: Iterator[list], *, batch_size: int, length: int, bos_id: int,
                 stats: PackingStats, start_step: int):
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


def batches(mixture_or_task_name: str, *, split: str = "train", sequence_length: int,
            batch_size: int, seed: int = 0, start_step: int = 0, shard_index: int = 0,
            num_shards: int = 1, pack: bool = True, truncate: bool = True,
            buffer_size: int = 1024, num_epochs: int | None = None) -> BatchIterator:
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
      loss_weights float32: 1 on response tokens and their EOS, else 0.
    Padding is token 0 with segment 0. A finite split's last batch is filled with
    empty rows (all segment 0). Examples whose target is empty are dropped; the
    returned iterator's `.stats` counts every drop and cut, and they are logged.
    """
    provider = seqio.get_mixture_or_task(mixture_or_task_name)
    vocab = provider.output_features["targets"].vocabulary
    bos_id = getattr(vocab, "bos_id", None)
    if bos_id is None:
        raise ValueError(f"{mixture_or_task_name}: the targets vocabulary {vocab} has no BOS "
                         f"id; use mtllama_jax.vocab.LlamaVocabulary")
    stats = PackingStats(sequence_length)
    source = examples(mixture_or_task_name, split=split, seed=seed, shard_index=shard_index,
                      num_shards=num_shards, num_epochs=num_epochs)
    if pack:
        rows = pack_rows(source, length=sequence_length, eos_id=vocab.eos_id, stats=stats,
                         buffer_size=buffer_size, truncate=truncate, seed=seed)
    else:
        rows = _single_rows(source, sequence_length, vocab.eos_id, stats, truncate)
    return BatchIterator(_counted(rows, stats), batch_size=batch_size,
                         length=sequence_length, bos_id=bos_id, stats=stats,
                         start_step=start_step)


def _single_rows(source, length, eos_id, stats, truncate):
    for inputs, targets in source:
        fitted = fit_example(inputs, targets, length, eos_id, stats, truncate)
        if fitted is not None:
            yield [fitted]


def _counted(rows, stats):
    for row in rows:
        stats.rows += 1
        stats.segments += len(row)
        stats.tokens += sum(len(i) + len(t) for i, t in row)
        yield row
