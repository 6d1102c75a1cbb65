"""Non-padding fraction of packed rows: best-fit-decreasing (ours) vs seqio's packer.

Both pack the same examples, lengths drawn from a log-normal like P3's (most
examples short, a long tail of summarisation/QA contexts), at sequence length
2048. Prints each packer's non-padding fraction, rows used, and their ratio.

    python benchmarks/bench_packing.py [--examples 20000] [--length 2048]
"""

import argparse
import time

import numpy as np
import seqio
import tensorflow as tf

from mtllama_jax import data


def lognormal_examples(n, length, mu, sigma, seed=0):
    """(inputs, targets) with total length ~ lognormal, targets 1-32 tokens + EOS."""
    rng = np.random.default_rng(seed)
    totals = np.clip(rng.lognormal(mu, sigma, n).astype(int), 4, length)
    out = []
    for total in totals:
        t = int(min(total - 1, rng.integers(2, 34)))
        out.append((np.full(total - t, 5, np.int32), np.r_[np.full(t - 1, 6), 2].astype(np.int32)))
    return out


def seqio_fraction(examples, length):
    """seqio's DecoderFeatureConverter packing (inputs+targets as one sequence)."""

    def gen():
        for i, t in examples:
            yield {"targets": np.concatenate([i, t])}

    ds = tf.data.Dataset.from_generator(
        gen, output_signature={"targets": tf.TensorSpec([None], tf.int32)}
    )
    packed = seqio.utils.trim_and_pack_dataset(ds, {"targets": length})
    rows = tokens = 0
    for ex in packed.as_numpy_iterator():
        rows += 1
        tokens += int(np.count_nonzero(ex["targets_segment_ids"]))
    return tokens / (rows * length), rows


def ours_fraction(examples, length, buffer_size):
    stats = data.PackingStats(length)
    rows = sum(
        1
        for _ in data._counted(
            data.pack_rows(
                iter(examples), length=length, eos_id=2, stats=stats, buffer_size=buffer_size
            ),
            stats,
        )
    )
    return stats.non_padding_fraction, rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--examples", type=int, default=20000)
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--mu", type=float, default=5.0, help="log-normal mean of log length")
    p.add_argument("--sigma", type=float, default=1.0)
    p.add_argument("--buffer_size", type=int, default=1024)
    a = p.parse_args()
    examples = lognormal_examples(a.examples, a.length, a.mu, a.sigma)
    mean = np.mean([len(i) + len(t) for i, t in examples])
    print(f"{a.examples} examples, mean length {mean:.0f}, sequence length {a.length}")
    t0 = time.perf_counter()
    s_frac, s_rows = seqio_fraction(examples, a.length)
    t1 = time.perf_counter()
    o_frac, o_rows = ours_fraction(examples, a.length, a.buffer_size)
    t2 = time.perf_counter()
    print(f"seqio trim_and_pack_dataset : non-padding {s_frac:.4f}  rows {s_rows}  {t1 - t0:.1f}s")
    print(f"best-fit-decreasing (ours)  : non-padding {o_frac:.4f}  rows {o_rows}  {t2 - t1:.1f}s")
    print(f"ratio ours/seqio non-padding: {o_frac / s_frac:.3f}  rows {o_rows / s_rows:.3f}")


if __name__ == "__main__":
    main()
