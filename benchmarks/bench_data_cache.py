"""The tokenized cache and its pipeline against seqio, side by side on one host.

On the fixture of `bench_data_throughput.py` (313 parquet task folders of the
t0_train mixture, P3-like log-normal lengths, a small LLaMA-id SentencePiece):

1. cache build (`mtllama-cache`, its worker processes) against seqio's own
   tokenisation of the same tasks (one pipeline per task, in this process);
2. packed tokens/s, batches of 16 x 2048: the cache's Grain pipeline against
   seqio's pipeline (`PrefixLMFeatureConverter(pack=True)`) and `data.batches`;
   non-padding fraction of each;
3. time to the first batch at step 0 and at step 100,000 (a restored position);
4. peak memory of the pipeline (this process and its workers) while streaming;
5. the train loop (tiny LLaMA, CPU) fed by the pipeline against the same loop
   fed one constant in-memory batch.

    python benchmarks/bench_data_cache.py [--rows 200] [--repeats 3] [--workers 1] [--root DIR]
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import psutil

sys.path.insert(0, os.path.dirname(__file__))
from bench_data_throughput import write_fixture, write_tokenizer  # noqa: E402


def seqio_tokenise(tasks):
    """Tokens/s of seqio reading and tokenising `tasks` (unshuffled, one epoch)."""
    import seqio

    start, tokens = time.perf_counter(), 0
    for name in tasks:
        ds = seqio.get_mixture_or_task(name).get_dataset(
            sequence_length=None, split="train", use_cached=False, shuffle=False, num_epochs=1
        )
        for ex in ds.as_numpy_iterator():
            tokens += len(ex["inputs"]) + len(ex["targets"])
    return tokens / (time.perf_counter() - start)


def build_cache(out, workers):
    from mtllama_jax.main import cache

    start = time.perf_counter()
    assert (
        cache.main(
            [
                "--mixture_or_task_name=t0_train",
                f"--out={out}",
                f"--gin.cache.workers={workers}",
                "--gin.cache.progress=False",
            ]
        )
        == 0
    )
    elapsed = time.perf_counter() - start
    with open(os.path.join(out, "manifest.json")) as f:
        tokens = sum(t["tokens"] for t in json.load(f)["tasks"].values())
    return tokens / elapsed, tokens


def spec(cache_dir, workers, batch_size, length):
    import seqio

    from mtllama_jax.data import build, pipeline

    tasks = build.check_cache(cache_dir, "t0_train", "train")
    v = seqio.get_mixture_or_task("t0_train").output_features["targets"].vocabulary
    return pipeline.PipelineSpec(
        cache_dir=cache_dir,
        split="train",
        tasks=tuple(t for t, _ in tasks),
        rates=tuple(r for _, r in tasks),
        sequence_length=length,
        rows=batch_size,
        bos_id=v.bos_id,
        eos_id=v.eos_id,
        seed=0,
        workers=workers,
    )


def time_seqio(batches, batch_size, length, warmup=10):
    """seqio's packed pipeline, timed after `warmup` batches (its prefetch buffers drained)."""
    import seqio

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
    for _ in range(warmup):
        next(it)
    start, tokens = time.perf_counter(), 0
    for _ in range(batches):
        tokens += int(np.count_nonzero(next(it)["decoder_segment_ids"]))
    elapsed = time.perf_counter() - start
    return tokens / elapsed, tokens / (batches * batch_size * length)


def time_uncached(batches, batch_size, length):
    """`data.batches` (seqio on the fly, packed in this process), timed from its start.

    Its first batches come out of one packed buffer of 1,024 examples, so timing
    after the first batch would time slicing, not reading and packing: the clock
    runs from the iterator's construction over `batches` batches, several buffers.
    """
    from mtllama_jax import data

    start, tokens = time.perf_counter(), 0
    it = data.batches("t0_train", sequence_length=length, batch_size=batch_size, seed=0)
    for _ in range(batches):
        tokens += int(np.count_nonzero(next(it)["segment_ids"]))
    elapsed = time.perf_counter() - start
    return tokens / elapsed, tokens / (batches * batch_size * length)


def time_cache(cache_dir, workers, batches, batch_size, length):
    """(tokens/s, non-padding, peak RSS anon MiB, RSS file MiB) of the cache's pipeline."""
    from mtllama_jax.data import pipeline

    it = pipeline.CacheBatches(spec(cache_dir, workers, batch_size, length))
    for _ in range(25):  # past its prefetched buffers, as for seqio
        next(it)
    start, tokens, peak = time.perf_counter(), 0, (0, 0)
    for i in range(batches):
        tokens += int(np.count_nonzero(next(it)["segment_ids"]))
        if i % 10 == 0:
            peak = max(peak, memory())
    elapsed = time.perf_counter() - start
    peak = max(peak, memory())
    it.close()
    return tokens / elapsed, tokens / (batches * batch_size * length), *peak


def memory():
    """(anonymous, file-backed) resident MiB of this process and its children."""
    procs = [psutil.Process()] + psutil.Process().children(recursive=True)
    anon = file = 0
    for p in procs:
        try:
            with open(f"/proc/{p.pid}/status") as f:
                fields = dict(line.split(":", 1) for line in f)
        except OSError:
            continue
        anon += int(fields["RssAnon"].split()[0]) + int(fields["RssShmem"].split()[0])
        file += int(fields["RssFile"].split()[0])
    return anon / 1024, file / 1024


def first_batch(cache_dir, workers, batch_size, length, step):
    """Seconds from nothing (cache checked, workers started) to the batch of `step`."""
    from mtllama_jax.data import pipeline

    start = time.perf_counter()
    s = spec(cache_dir, workers, batch_size, length)
    it = pipeline.CacheBatches(s, step)
    if step:  # the position a checkpoint of `step` holds: (buffer, row)
        rows_per_buffer = 150  # about a 1,024-example buffer of this fixture at 2048
        buffer, row = divmod(step * batch_size, rows_per_buffer)
        it.set_state(
            json.dumps(
                {
                    "format": pipeline.STATE_FORMAT,
                    "step": step,
                    "buffer": buffer,
                    "row": row,
                    "order": s.order(),
                }
            ).encode()
        )
    next(it)
    elapsed = time.perf_counter() - start
    it.close()
    return elapsed


def train_loop_ratio(cache_dir, workers, steps=24, rows=16, length=512):
    """Median step time: the loop fed by the pipeline / fed one constant batch."""
    import itertools

    import jax

    from mtllama_jax import optim, partitioning, trainer
    from mtllama_jax.data import pipeline
    from mtllama_jax.models.llama.config import LlamaConfig
    from mtllama_jax.models.llama.model import LlamaForCausalLM

    tx = optim.make_optimizer(optim.learning_rate_schedule(1e-3, 100, "constant"), 0.0)
    s = spec(cache_dir, workers, rows, length)
    step_fn = trainer.Trainer(
        LlamaForCausalLM(LlamaConfig.tiny()),
        partitioning.Layout.create(1, -1, 1, "fsdp"),
        tx,
        num_tasks=len(s.tasks),
    )
    state = step_fn.init_state(jax.random.key(0))
    source = pipeline.CacheBatches(s)
    constant = next(source)
    feeds = {"pipeline": lambda: source, "constant": lambda: itertools.repeat(constant)}
    times = {k: [] for k in feeds}
    for _ in range(2):  # interleaved rounds, compiled first
        for name, feed in feeds.items():
            it = feed()
            state, m = step_fn.train_step(state, step_fn.global_batch(next(it)))
            jax.block_until_ready(m)
            for _ in range(steps):
                t = time.perf_counter()
                state, m = step_fn.train_step(state, step_fn.global_batch(next(it)))
                jax.block_until_ready(m)
                times[name].append(time.perf_counter() - t)
    source.close()
    return statistics.median(times["pipeline"]), statistics.median(times["constant"])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=200, help="examples per fixture task")
    p.add_argument("--workers", type=int, default=1, help="pipeline worker processes")
    p.add_argument("--build_workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batches", type=int, default=100, help="cache pipeline batches timed")
    p.add_argument("--seqio_batches", type=int, default=30)
    p.add_argument(
        "--uncached_batches",
        type=int,
        default=40,
        help="data.batches batches timed (about 8 fill one packing buffer)",
    )
    p.add_argument("--skip_first_batch", action="store_true")
    p.add_argument("--seqio_tasks", type=int, default=40, help="tasks tokenised by seqio")
    p.add_argument("--root", help="keep the fixture and cache here (reused when present)")
    a = p.parse_args()
    from mtllama_jax.main import launch

    launch.hide_gpus_from_tensorflow()  # TF reads the data; JAX keeps the accelerators
    if a.root:
        os.makedirs(a.root, exist_ok=True)
        run(a, a.root)
    else:
        with tempfile.TemporaryDirectory() as root:
            run(a, root)


def run(a, root):
    bs, length = 16, 2048
    os.environ["MTLLAMA_TOKENIZER"] = os.path.join(root, "tokenizer.model")
    os.environ["MTLLAMA_P3_DIR"] = os.path.join(root, "p3")
    cache_dir = os.path.join(root, "cache")
    fresh = not os.path.exists(os.path.join(cache_dir, "manifest.json"))
    if fresh:
        write_tokenizer(os.environ["MTLLAMA_TOKENIZER"])
    import mtllama_jax.tasks  # noqa: F401
    from mtllama_jax.tasks import p3

    if fresh:
        write_fixture(os.environ["MTLLAMA_P3_DIR"], a.rows)
        build_rate, cache_tokens = build_cache(cache_dir, a.build_workers)
        tasks = [r["task"] for r in p3.t0_train_table()]
        seqio_rate = seqio_tokenise(tasks[: a.seqio_tasks])
        print(
            f"cache build ({a.build_workers} workers): {build_rate:.0f} tokens/s; seqio "
            f"tokenisation (1 process, {a.seqio_tasks} tasks): {seqio_rate:.0f} tokens/s; "
            f"ratio {build_rate / seqio_rate:.2f}x ({cache_tokens} tokens cached)",
            flush=True,
        )
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(cache_dir) for f in fs)

    firsts = []
    for _ in range(0 if a.skip_first_batch else a.repeats):
        firsts.append(
            (
                first_batch(cache_dir, a.workers, bs, length, 0),
                first_batch(cache_dir, a.workers, bs, length, 100_000),
            )
        )
        print(
            f"first batch: step 0 {firsts[-1][0]:.2f} s, step 100,000 {firsts[-1][1]:.2f} s",
            flush=True,
        )
    if firsts:
        print(
            f"time to first batch, median of {len(firsts)}: step 0 "
            f"{statistics.median(f[0] for f in firsts):.2f} s, step 100,000 "
            f"{statistics.median(f[1] for f in firsts):.2f} s, ratio "
            f"{statistics.median(f[1] / f[0] for f in firsts):.2f}x",
            flush=True,
        )

    rounds = []
    for r in range(a.repeats):
        cache_rate = time_cache(cache_dir, a.workers, a.batches, bs, length)
        seqio = time_seqio(a.seqio_batches, bs, length)
        rounds.append((cache_rate, seqio))
        print(
            f"round {r}: cache {cache_rate[0]:.0f} tokens/s (non-padding "
            f"{cache_rate[1]:.4f}, {cache_rate[2]:.0f} MiB anonymous, {cache_rate[3]:.0f} "
            f"MiB file-backed), seqio {seqio[0]:.0f} tokens/s (non-padding {seqio[1]:.4f}); "
            f"cache/seqio {cache_rate[0] / seqio[0]:.1f}x",
            flush=True,
        )
    ours = time_uncached(a.uncached_batches, bs, length)
    cache_med = statistics.median(r[0][0] for r in rounds)
    print(
        f"packed tokens/s, t0_train, {bs} x {length}, median of {a.repeats}: cache pipeline "
        f"({a.workers} worker(s)) {cache_med:.0f}; seqio PrefixLM pack=True "
        f"{statistics.median(r[1][0] for r in rounds):.0f}; data.batches {ours[0]:.0f} "
        f"(non-padding {ours[1]:.4f})"
    )
    print(
        f"ratio cache/seqio: {statistics.median(r[0][0] / r[1][0] for r in rounds):.1f}x; "
        f"cache/data.batches {cache_med / ours[0]:.1f}x"
    )
    print(
        f"peak RSS while streaming {a.batches} batches (this process and its workers): "
        f"{max(r[0][2] for r in rounds):.0f} MiB anonymous, {max(r[0][3] for r in rounds):.0f}"
        f" MiB file-backed; cache on disk {size / 2**20:.1f} MiB",
        flush=True,
    )

    fed, constant = train_loop_ratio(cache_dir, a.workers)
    print(
        f"train loop (tiny LLaMA, CPU, 16 x 512): step {fed * 1e3:.1f} ms fed by the "
        f"pipeline, {constant * 1e3:.1f} ms fed a constant batch: ratio {fed / constant:.3f}x"
    )


if __name__ == "__main__":
    main()
