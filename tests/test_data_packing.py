"""Packing to the batch contract: segments, positions, loss weights, cuts, fill."""

import numpy as np
import pytest

from mtllama_jax import data

EOS, BOS = 2, 1


def example(n_in, n_out, token=7):
    return np.full(n_in, token, np.int32), np.r_[np.full(n_out - 1, 9), EOS].astype(np.int32)


def test_rows_follow_the_batch_contract():
    inputs = np.array([0, 5], np.int32)  # a real <unk> (id 0) inside the prompt
    targets = np.array([0, 8, EOS], np.int32)  # and one in the response
    b = data.rows_to_batch([[(inputs, targets), example(1, 2)], []], length=10, bos_id=BOS)
    assert b["input_tokens"][0].tolist() == [BOS, 0, 5, 0, 8, BOS, 7, 9, 0, 0]
    assert b["target_tokens"][0].tolist() == [0, 5, 0, 8, EOS, 7, 9, EOS, 0, 0]
    assert b["positions"][0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 0, 0]
    assert b["segment_ids"][0].tolist() == [1, 1, 1, 1, 1, 2, 2, 2, 0, 0]
    assert b["loss_weights"][0].tolist() == [0, 0, 1, 1, 1, 0, 1, 1, 0, 0]
    assert not b["segment_ids"][1].any() and not b["loss_weights"][1].any()
    assert {k: v.dtype.name for k, v in b.items()} == {
        "input_tokens": "int32",
        "target_tokens": "int32",
        "positions": "int32",
        "segment_ids": "int32",
        "loss_weights": "float32",
        "task_ids": "int32",
    }


def test_over_long_inputs_cut_from_the_left_or_dropped():
    stats = data.PackingStats(8)
    inputs, targets = np.arange(10, 20, dtype=np.int32), np.array([3, 4, EOS], np.int32)
    kept = data.fit_example(inputs, targets, 8, EOS, stats)
    assert kept[0].tolist() == [15, 16, 17, 18, 19] and kept[1] is targets
    assert data.fit_example(inputs, targets, 8, EOS, stats, truncate=False) is None
    assert data.fit_example(*example(0, 9), 8, EOS, stats) is None  # response alone too long
    assert data.fit_example(np.ones(3, np.int32), np.array([EOS], np.int32), 8, EOS, stats) is None
    assert (stats.truncated, stats.dropped_too_long, stats.dropped_empty_target) == (1, 2, 1)
    assert stats.examples == 4


def test_best_fit_decreasing_is_valid_and_deterministic():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 100, 500).tolist()
    bins = data.best_fit_decreasing(lengths, 100)
    assert sorted(i for b in bins for i in b) == list(range(500))
    assert all(sum(lengths[i] for i in b) <= 100 for b in bins)
    assert bins == data.best_fit_decreasing(lengths, 100)
    assert len(bins) <= np.ceil(sum(lengths) / 100) * 1.05 + 1


@pytest.mark.parametrize("length", [512, 2048])
def test_fill_on_a_p3_like_length_distribution(length):
    rng = np.random.default_rng(1)
    totals = np.clip(rng.lognormal(np.log(length) - 2.6, 1.0, 3000).astype(int), 3, length)
    stats = data.PackingStats(length)
    rows = list(
        data.counted(
            data.pack_rows(
                (example(t - 2, 2) for t in totals), length=length, eos_id=EOS, stats=stats
            ),
            stats,
        )
    )
    assert stats.segments == 3000 and stats.tokens == totals.sum()
    assert all(sum(len(i) + len(t) for i, t in r) <= length for r in rows)
    assert stats.non_padding_fraction >= 0.95, stats.report()
