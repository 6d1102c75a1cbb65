"""Packing examples into the batch contract: segments, positions, loss weights, task ids.

TensorFlow-free: the cached pipeline's worker processes import it, and so does
the seqio stream (`mtllama_jax.data.stream`).

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

log = logging.getLogger(__name__)

FEATURES = ("input_tokens", "target_tokens", "positions", "segment_ids", "loss_weights", "task_ids")
# Examples read without a single one fitting before the stream is declared empty.
NO_ROW_LIMIT = 4096


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
        return (
            f"{self.examples} examples read, {self.segments} packed into {self.rows} "
            f"rows ({self.non_padding_fraction:.3f} non-padding); dropped "
            f"{self.dropped_empty_target} with an empty target, "
            f"{self.dropped_too_long} too long; {self.truncated} inputs cut from the left"
        )


def fit_example(
    inputs: np.ndarray,
    targets: np.ndarray,
    length: int,
    eos_id: int,
    stats: PackingStats,
    truncate: bool = True,
):
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
            _note(
                stats,
                f"dropped an example of {len(inputs) + len(targets)} tokens "
                f"(sequence_length {length}, truncate={truncate})",
            )
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


def pack_rows(
    examples: Iterable[tuple],
    *,
    length: int,
    eos_id: int,
    stats: PackingStats,
    buffer_size: int = 1024,
    truncate: bool = True,
    seed: int = 0,
    name: str = "the data",
) -> Iterator[list]:
    """Rows (lists of (inputs, targets[, task index]) segments) packed buffer by buffer.

    Each buffer of `buffer_size` fitting examples is packed with best-fit-
    decreasing; its rows come out in an order shuffled by (seed, buffer number)
    so long and short rows mix within a batch. Raises `NoFittingExamples` when
    the first `NO_ROW_LIMIT` examples of `name` all were dropped.
    """
    buffer, number, any_fit = [], 0, False
    for inputs, targets, *task in examples:
        fitted = fit_example(inputs, targets, length, eos_id, stats, truncate)
        if fitted is not None:
            buffer.append((*fitted, *task))
            any_fit = True
        elif not any_fit:
            check_some_fit(name, stats, truncate)
        if len(buffer) == buffer_size:
            yield from _pack_buffer(buffer, length, seed, number)
            buffer, number = [], number + 1
    if buffer:
        yield from _pack_buffer(buffer, length, seed, number)


class NoFittingExamples(ValueError):
    """Every example read so far was dropped: the stream would never yield a row."""


def check_some_fit(
    name: str, stats: PackingStats, truncate: bool, limit: int = NO_ROW_LIMIT
) -> None:
    """Raises once `limit` examples were read and every one was dropped (counted by reason)."""
    if stats.examples < limit:
        return
    raise NoFittingExamples(
        f"{name}: none of the first {stats.examples} examples fits a row of "
        f"{stats.length} tokens: {stats.dropped_empty_target} have an empty response, "
        f"{stats.dropped_too_long} are too long (truncate={truncate}); training would wait "
        f"forever. Check the task's response field (empty targets) or raise "
        f"the sequence length / keep truncation on (too long)."
    )


def _pack_buffer(buffer, length, seed, number):
    bins = best_fit_decreasing([len(seg[0]) + len(seg[1]) for seg in buffer], length)
    rng = np.random.default_rng([seed, number])
    for b in rng.permutation(len(bins)):
        yield [buffer[i] for i in bins[b]]


def rows_to_batch(rows: list, length: int, bos_id: int) -> dict[str, np.ndarray]:
    """The batch contract: `[len(rows), length]` arrays, padding id 0 and segment 0.

    A segment is (inputs, targets) or (inputs, targets, task index); `task_ids`
    holds the index on the segment's positions (0 without one, and on padding).
    """
    shape = (len(rows), length)
    batch = {k: np.zeros(shape, np.int32) for k in FEATURES if k != "loss_weights"}
    batch["loss_weights"] = np.zeros(shape, np.float32)
    for r, row in enumerate(rows):
        at = 0
        for s, (inputs, targets, *task) in enumerate(row, start=1):
            n_in, n = len(inputs), len(inputs) + len(targets)
            end = at + n
            full = np.concatenate([[bos_id], inputs, targets])
            batch["input_tokens"][r, at:end] = full[:-1]
            batch["target_tokens"][r, at:end] = full[1:]
            batch["positions"][r, at:end] = np.arange(n)
            batch["segment_ids"][r, at:end] = s
            batch["loss_weights"][r, at + n_in : end] = 1.0
            if task:
                batch["task_ids"][r, at:end] = task[0]
            at = end
    return {k: batch[k] for k in FEATURES}


def single_rows(source, length, eos_id, stats, truncate, name="the data"):
    """One example per row (`pack=False`), with the same drop accounting as `pack_rows`."""
    any_fit = False
    for inputs, targets, *task in source:
        fitted = fit_example(inputs, targets, length, eos_id, stats, truncate)
        if fitted is not None:
            any_fit = True
            yield [(*fitted, *task)]
        elif not any_fit:
            check_some_fit(name, stats, truncate)


def counted(rows, stats):
    """Counts the rows, segments and tokens passing by into `stats`."""
    for row in rows:
        stats.rows += 1
        stats.segments += len(row)
        stats.tokens += sum(len(seg[0]) + len(seg[1]) for seg in row)
        yield row
