"""The tokenized cache and its Grain pipeline: parity with seqio, rates, exact resume, bad input.

The cache is built by `mtllama-cache` itself (spawned tokenising workers) from
fixture P3 folders of three real T0 task names; the pipeline packs in Grain
worker processes. A kill -9 during a build is this file run as a script.
"""

import collections
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import seqio
from helpers import free_port, session_spm

import mtllama_jax.tasks  # noqa: F401  (registers the P3 tasks)
from mtllama_jax import data, training, vocab
from mtllama_jax.data import build, cache, pipeline
from mtllama_jax.main import cache as cache_job
from mtllama_jax.tasks import p3

TASKS = {"glue_mrpc_equivalent": 3.0, "glue_mrpc_paraphrase": 1.0, "glue_qqp_duplicate": 2.0}
MIXTURE = "cache_test_mix"
WORDS = "the a question answer premise because yes no maybe review movie".split()
if MIXTURE not in seqio.MixtureRegistry.names():
    seqio.MixtureRegistry.add(MIXTURE, list(TASKS.items()))


def _write_task(root, task, n, seed):
    rng = np.random.default_rng(seed)
    records = [
        {
            "inputs_pretokenized": " ".join(rng.choice(WORDS, rng.integers(3, 60))),
            "targets_pretokenized": " ".join(rng.choice(WORDS, rng.integers(1, 6))),
        }
        for _ in range(n)
    ]
    folder = os.path.join(root, task)
    os.makedirs(folder, exist_ok=True)
    for s in range(2):
        pq.write_table(
            pa.Table.from_pylist(records[s::2]),
            os.path.join(folder, f"train-{s:05d}-of-00002.parquet"),
        )


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    os.environ[vocab.TOKENIZER_ENV] = session_spm(tmp_path_factory)
    root = tmp_path_factory.mktemp("p3cache")
    for i, task in enumerate(TASKS):
        _write_task(str(root / "p3"), task, 120 + 40 * i, i)
    os.environ[p3.P3_DIR_ENV] = str(root / "p3")
    out = str(root / "cache")
    assert (
        cache_job.main(
            [
                f"--mixture_or_task_name={MIXTURE}",
                f"--out={out}",
                "--gin.cache.workers=2",
                "--gin.cache.progress=False",
                "--gin.cache.verify=True",
            ]
        )
        == 0
    )
    yield {"root": root, "cache": out}
    del os.environ[p3.P3_DIR_ENV]


def spec(cache_dir, **kw):
    v = vocab.configured_vocabulary()
    tasks = build.check_cache(cache_dir, MIXTURE, "train")
    args = dict(
        cache_dir=cache_dir,
        split="train",
        tasks=tuple(t for t, _ in tasks),
        rates=tuple(r for _, r in tasks),
        sequence_length=128,
        rows=4,
        bos_id=v.bos_id,
        eos_id=v.eos_id,
        seed=5,
        buffer_size=64,
        workers=0,
    )
    args.update(kw)
    return pipeline.PipelineSpec(**args)


def test_cached_examples_equal_the_uncached_stream(env):
    manifest = json.load(open(os.path.join(env["cache"], cache.MANIFEST)))
    assert sorted(manifest["tasks"]) == sorted(TASKS) and not manifest["missing"]
    for task in TASKS:
        cached = cache.CachedTask(env["cache"], task, "train")
        streamed = list(data.examples(task, split="train", seed=0, num_epochs=1))
        assert len(cached) == len(streamed) == manifest["tasks"][task]["examples"]
        key = lambda ex: (tuple(ex[0].tolist()), tuple(ex[1].tolist()))  # noqa: E731
        assert sorted(map(key, cached)) == sorted(map(key, streamed))
        assert manifest["tasks"][task]["tokens"] == sum(len(i) + len(t) for i, t in streamed)


def test_sampled_task_frequencies_match_the_rates(env):
    s = spec(env["cache"])
    mix = pipeline.mixture(s)
    n = 6000
    counts = collections.Counter(mix[i][2] for i in range(n))
    total = sum(s.rates)
    for j, rate in enumerate(s.rates):
        p = rate / total
        assert abs(counts[j] / n - p) < 4 * np.sqrt(p * (1 - p) / n) + 1e-3, (j, counts)
    # Each task is read as whole shuffled epochs: no example twice before all were seen.
    first = [mix[i] for i in range(n) if mix[i][2] == 0][:120]
    assert len({tuple(np.r_[a, b]) for a, b, _ in first}) == 120


def test_batches_follow_the_contract_and_pack_tightly(env):
    it = pipeline.CacheBatches(spec(env["cache"], rows=8, sequence_length=256, buffer_size=512))
    batches = [next(it) for _ in range(6)]
    for b in batches:
        assert set(b) == set(data.FEATURES) and b["input_tokens"].shape == (8, 256)
        assert b["task_ids"].max() < len(TASKS)
    assert it.stats.non_padding_fraction > 0.85, it.stats.report()  # short fixture rows


def _run(s, start_state=None, steps=5):
    it = pipeline.CacheBatches(s)
    if start_state is not None:
        it.set_state(start_state)
    out = [next(it) for _ in range(steps)]
    state = it.get_state()
    it.close()
    return out, state


def test_resume_at_random_steps_is_bitwise(env):
    s = spec(env["cache"])  # packing in this process; the runs resumed from used 2 workers
    reference, _ = _run(s, steps=24)
    for k in sorted(np.random.default_rng().choice(np.arange(1, 20), 2, replace=False)):
        head, state = _run(spec(env["cache"], workers=2), steps=int(k))
        tail, _ = _run(s, start_state=state, steps=4)
        for a, b in zip(head + tail, reference[: k + 4]):
            assert all(np.array_equal(a[f], b[f]) for f in data.FEATURES), k
    # A checkpoint without data state: seeking lands on the same batch.
    seeking = pipeline.CacheBatches(s, start_step=7)
    got = next(seeking)
    assert all(np.array_equal(got[f], reference[7][f]) for f in data.FEATURES)


def test_resume_with_other_settings_is_refused(env):
    _, state = _run(spec(env["cache"]), steps=2)
    other = pipeline.CacheBatches(spec(env["cache"], rows=8))
    with pytest.raises(ValueError, match="rows: saved 4, now 8"):
        other.set_state(state)


def test_stale_cache_is_refused_naming_what_differs(env, tmp_path):
    task = "glue_mrpc_paraphrase"
    parquet = os.path.join(env["root"], "p3", task, "train-00000-of-00002.parquet")
    os.utime(parquet, ns=(time.time_ns(), time.time_ns() + 10**9))
    try:
        with pytest.raises(
            cache.CacheError,
            match=f"(?s){task} was built differently: sources.*mtllama-cache --mixture_or_task",
        ):
            build.check_cache(env["cache"], MIXTURE, "train")
    finally:
        os.utime(parquet, ns=(time.time_ns(), time.time_ns()))
        info = cache.read_task_info(env["cache"], task)
        for f in info["fingerprint"]["sources"]:
            st = os.stat(f["path"])
            os.utime(f["path"], ns=(st.st_atime_ns, f["mtime_ns"]))
    other = tmp_path / "other.model"
    other.write_bytes(open(os.environ[vocab.TOKENIZER_ENV], "rb").read() + b"\0")
    fp = build.fingerprint(task, "train")
    fp["vocabularies"]["targets"]["sha256"] = cache.sha256_file(str(other))
    lines = cache.fingerprint_differences(fp, build.fingerprint(task, "train"))
    assert lines and lines[0].startswith("vocabularies: cache has")
    seqio.MixtureRegistry.add("cache_test_missing", [(task, 1.0), ("glue_qqp_same_thing", 1.0)])
    with pytest.raises(cache.CacheError, match="not in the cache: glue_qqp_same_thing"):
        build.check_cache(env["cache"], "cache_test_missing", "train")


def test_truncated_cache_file_is_named(env, tmp_path):
    import shutil

    copy = str(tmp_path / "cache")
    shutil.copytree(env["cache"], copy)
    tokens = os.path.join(cache.task_folder(copy, "glue_qqp_duplicate"), "tokens.int32")
    with open(tokens, "r+b") as f:
        f.truncate(os.path.getsize(tokens) - 4)
    with pytest.raises(cache.CacheError, match="tokens.int32: .* truncated or corrupt"):
        pipeline.CacheBatches(spec(copy)).__next__()


def test_kill_during_build_then_rebuild_equals_uninterrupted(env, tmp_path):
    out = str(tmp_path / "killed")
    proc = subprocess.Popen(
        [sys.executable, __file__, out], env=dict(os.environ), start_new_session=True
    )
    first = cache.task_folder(out, sorted(TASKS)[0])
    deadline = time.time() + 240
    while not os.path.exists(os.path.join(first, cache.TASK_JSON)) and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 30  # its tokenising worker exits too (and lets go of its lock)
    while time.time() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    assert os.path.exists(first), "the build never finished a task"
    assert (
        cache_job.main(
            [
                f"--mixture_or_task_name={MIXTURE}",
                f"--out={out}",
                "--gin.cache.workers=1",
                "--gin.cache.progress=False",
            ]
        )
        == 0
    )
    assert not [e for e in os.listdir(os.path.join(out, cache.TASKS)) if e.startswith(".")]
    for task in TASKS:
        for name, _ in cache.FILES.values():
            a = open(os.path.join(cache.task_folder(out, task), name), "rb").read()
            b = open(os.path.join(cache.task_folder(env["cache"], task), name), "rb").read()
            assert a == b, (task, name)


def test_a_dead_worker_ends_the_stream_with_an_error(env):
    import psutil

    it = pipeline.CacheBatches(spec(env["cache"], workers=1))
    next(it)
    for child in psutil.Process().children(recursive=True):  # Grain's spawned worker
        if "spawn_main" in " ".join(child.cmdline()):
            child.kill()
    with pytest.raises(RuntimeError, match="terminated unexpectedly"):
        for _ in range(10_000):
            next(it)
    it.close()


def test_every_example_dropped_fails_naming_the_counts(env):
    with pytest.raises(
        data.NoFittingExamples, match="none of its .* cached examples fits a row of 4 tokens"
    ):
        next(pipeline.CacheBatches(spec(env["cache"], sequence_length=4, truncate=False)))
    it = data.batches(
        "glue_mrpc_equivalent", sequence_length=3, batch_size=1, seed=0, truncate=False
    )
    with pytest.raises(
        data.NoFittingExamples,
        match=r"'glue_mrpc_equivalent' \(train\): none "
        r"of the first 4096 examples .* 4096 are "
        r"too long",
    ):
        next(it)


# ---- training from the cache: data state in the Orbax checkpoint ---------------------------

STEPS = 4


def train_cached(model_dir, cache_dir, num_steps, workers=0):
    """The tiny LLaMA trained from the cache (16 rows of 32 over the processes)."""
    import jax

    from mtllama_jax import optim, partitioning
    from mtllama_jax.models.llama.config import LlamaConfig
    from mtllama_jax.models.llama.model import LlamaForCausalLM
    from mtllama_jax.train_options import CheckpointPolicy, LoopPeriods

    s = spec(
        cache_dir,
        rows=16 // jax.process_count(),
        sequence_length=32,
        shard_index=jax.process_index(),
        num_shards=jax.process_count(),
        workers=workers,
    )
    schedule = optim.learning_rate_schedule(3e-3, STEPS, "cosine", warmup_steps=2)
    return training.run(
        LlamaForCausalLM(LlamaConfig.tiny()),
        partitioning.Layout.create(1, -1, 1, "fsdp"),
        (optim.make_optimizer(schedule, weight_decay=0.1), schedule),
        model_dir,
        num_steps,
        lambda start: pipeline.CacheBatches(s, start),
        seed=3,
        checkpointing=CheckpointPolicy(every_steps=None),
        periods=LoopPeriods(log_every_steps=1),
        progress=False,
        task_names=s.tasks,
        task_groups={t: "paraphrase" for t in s.tasks},
    )


def _curve(model_dir):
    from mtllama_jax import metrics

    return [
        (r["step"], r["loss"], r["grad_norm"])
        for r in metrics.read_jsonl(os.path.join(model_dir, "metrics.jsonl"))
    ]


def test_training_resumes_bitwise_from_the_checkpointed_data_state(env, tmp_path):
    import jax

    from mtllama_jax import checkpoints, metrics

    reference, _ = train_cached(str(tmp_path / "ref"), env["cache"], STEPS)
    stop = int(np.random.default_rng().integers(1, STEPS))
    resumed_dir = str(tmp_path / "resumed")
    train_cached(resumed_dir, env["cache"], stop)
    data_dir = os.path.join(resumed_dir, "checkpoints", str(stop), "data")
    assert "process_0-of-1.json" in os.listdir(data_dir), os.listdir(data_dir)
    resumed, _ = train_cached(resumed_dir, env["cache"], STEPS)
    assert _curve(resumed_dir) == _curve(str(tmp_path / "ref")), stop
    same = jax.tree.map(
        lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)), resumed, reference
    )
    assert all(jax.tree.leaves(same)), stop
    # Per-task losses add up to the step's loss; the cluster sums them again.
    train = metrics.read_jsonl(os.path.join(resumed_dir, "metrics.jsonl"))
    tasks = metrics.read_jsonl(os.path.join(resumed_dir, "metrics.jsonl"), "task")
    clusters = metrics.read_jsonl(os.path.join(resumed_dir, "metrics.jsonl"), "task_cluster")
    assert [r["step"] for r in tasks] == list(range(1, STEPS + 1))
    for t, c, r in zip(tasks, clusters, train):
        tokens = sum(v for k, v in t.items() if k.endswith("/tokens"))
        summed = sum(t[f"{n}/loss"] * t[f"{n}/tokens"] for n in TASKS if f"{n}/tokens" in t)
        assert tokens == r["loss_tokens"] == c["paraphrase/tokens"]
        np.testing.assert_allclose(summed / tokens, r["loss"], rtol=1e-5)
        np.testing.assert_allclose(c["paraphrase/loss"], r["loss"], rtol=1e-5)
    # A checkpoint of two processes' positions is refused by one process.
    os.rename(
        os.path.join(data_dir, "process_0-of-1.json"), os.path.join(data_dir, "process_0-of-2.json")
    )
    ckpt = checkpoints.TrainCheckpoints(resumed_dir)
    with pytest.raises(ValueError, match="position of 2 processes; this run has 1"):
        ckpt.restore_data(stop, pipeline.CacheBatches(spec(env["cache"])).orbax_restore_args())
    ckpt.close()


def test_two_processes_resume_bitwise(env, tmp_path):
    port = free_port()
    stop = int(np.random.default_rng().integers(1, STEPS))
    child_env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS="--xla_force_host_platform_device_count=4",
        # the three runs of each process compile the same step once
        JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        PYTHONPATH=os.pathsep.join(
            [os.path.dirname(__file__), os.path.dirname(os.path.dirname(__file__))]
        ),
    )
    workers = [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                "train",
                env["cache"],
                str(tmp_path),
                str(port),
                str(i),
                str(stop),
            ],
            env=child_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [w.communicate(timeout=400)[0] for w in workers]
    for w, out in zip(workers, outputs):
        assert w.returncode == 0, out[-3000:]
    assert _curve(str(tmp_path / "resumed")) == _curve(str(tmp_path / "ref")), stop
    for i in range(2):
        assert os.path.exists(
            os.path.join(
                tmp_path, "resumed", "checkpoints", str(stop), "data", f"process_{i}-of-2.json"
            )
        )


def _two_process_main(cache_dir, root, port, process_id, stop):
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
    train_cached(os.path.join(root, "ref"), cache_dir, STEPS)
    train_cached(os.path.join(root, "resumed"), cache_dir, stop)
    train_cached(os.path.join(root, "resumed"), cache_dir, STEPS)


if __name__ == "__main__":
    if sys.argv[1] == "train":  # one process of test_two_processes_resume_bitwise
        _two_process_main(
            sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
        )
    else:  # the build killed by test_kill_during_build_...
        sys.exit(
            cache_job.main(
                [
                    f"--mixture_or_task_name={MIXTURE}",
                    f"--out={sys.argv[1]}",
                    "--gin.cache.workers=1",
                    "--gin.cache.progress=False",
                ]
            )
        )
