"""Packed tokens/s on one host: the t0_train mixture over fixture P3 data.

Writes 313 parquet task folders (P3's hub layout) of synthetic P3-like text
(log-normal lengths), trains a small SentencePiece model with LLaMA's ids, then
times `mtllama_jax.data.batches` against seqio's own pipeline on the same
mixture (`seqio.get_dataset` with `PrefixLMFeatureConverter(pack=True)`), both
reading, tokenising and packing at sequence length 2048.

    python benchmarks/bench_data_throughput.py [--batches 20] [--rows 200]
"""

import argparse
import io
import os
import random
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import sentencepiece as spm

WORDS = (
    "the a question answer context premise hypothesis yes no maybe review product "
    "movie sentence because consequence option choice summary article title"
).split()


def write_fixture(root, rows_per_task, seed=0):
    from mtllama_jax.tasks import p3

    rng = np.random.default_rng(seed)
    for row in p3.t0_train_table():
        n_words = np.clip(rng.lognormal(4.3, 1.0, rows_per_task).astype(int), 3, 3000)
        records = [
            {
                "inputs_pretokenized": " ".join(rng.choice(WORDS, n)),
                "targets_pretokenized": " ".join(rng.choice(WORDS, rng.integers(1, 20))),
            }
            for n in n_words
        ]
        folder = os.path.join(root, row["task"])
        os.makedirs(folder)
        pq.write_table(
            pa.Table.from_pylist(records), os.path.join(folder, "train-00000-of-00001.parquet")
        )


def write_tokenizer(path):
    rng = random.Random(0)
    lines = [
        " ".join(rng.choice(WORDS) for _ in range(20)) + " ### USER: ### ASSISTANT:"
        for _ in range(300)
    ]
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=out,
        vocab_size=400,
        model_type="bpe",
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        byte_fallback=True,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    with open(path, "wb") as f:
        f.write(out.getvalue())


def time_ours(batches, batch_size, length):
    from mtllama_jax import data

    start = time.perf_counter()
    it = data.batches("t0_train", sequence_length=length, batch_size=batch_size, seed=0)
    build = time.perf_counter() - start
    next(it)  # fills the first packing buffer
    start, tokens = time.perf_counter(), 0
    for _ in range(batches):
        tokens += int(np.count_nonzero(next(it)["segment_ids"]))
    elapsed = time.perf_counter() - start
    return tokens / elapsed, tokens / (batches * batch_size * length), build


def time_seqio(batches, batch_size, length):
    import seqio

    start = time.perf_counter()
    ds = seqio.get_dataset(
        "t0_train",
        task_feature_lengths={"inputs": length // 2, "targets": length // 2},
        dataset_split="train",
        shuffle=True,
        seed=0,
        use_cached=False,
        feature_converter=seqio.PrefixLMFeatureConverter(pack=True),
    ).batch(batch_size)
    it = ds.as_numpy_iterator()
    build = time.perf_counter() - start
    next(it)
    start, tokens = time.perf_counter(), 0
    for _ in range(batches):
        tokens += int(np.count_nonzero(next(it)["decoder_segment_ids"]))
    elapsed = time.perf_counter() - start
    return tokens / elapsed, tokens / (batches * batch_size * length), build


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--rows", type=int, default=200, help="examples per fixture task")
    a = p.parse_args()
    from mtllama_jax.main import launch

    launch.hide_gpus_from_tensorflow()  # TF reads the data; JAX keeps the accelerators
    with tempfile.TemporaryDirectory() as root:
        write_tokenizer(os.path.join(root, "tokenizer.model"))
        os.environ["MTLLAMA_TOKENIZER"] = os.path.join(root, "tokenizer.model")
        os.environ["MTLLAMA_P3_DIR"] = os.path.join(root, "p3")
        import mtllama_jax.tasks  # noqa: F401

        write_fixture(os.environ["MTLLAMA_P3_DIR"], a.rows)
        ours = time_ours(a.batches, a.batch_size, a.length)
        ref = time_seqio(a.batches, a.batch_size, a.length)
    print(f"t0_train (313 fixture tasks), {a.batches} batches of {a.batch_size} x {a.length}")
    for name, (rate, fill, build) in (
        ("mtllama_jax.data.batches", ours),
        ("seqio PrefixLM pack=True", ref),
    ):
        print(
            f"{name:26s}: {rate:10.0f} packed tokens/s  non-padding {fill:.3f}  "
            f"pipeline built in {build:.1f}s"
        )
    print(f"ratio ours/seqio tokens/s: {ours[0] / ref[0]:.2f}")


if __name__ == "__main__":
    main()
