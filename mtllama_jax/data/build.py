"""Builds the tokenized cache of a seqio task or mixture, task by task, in worker processes.

Each worker (spawned, so TensorFlow starts clean in it) takes the job's gin
configuration (`configure_worker`), runs one task's seqio pipeline unshuffled for one epoch (its own
source, wrapper and vocabulary, exactly what the uncached stream tokenises)
and streams the tokens into the task's staging folder (`cache.TaskWriter`).
A task already in the cache with the current fingerprint is skipped, so a
killed build resumes task by task; a task whose fingerprint changed is rebuilt.
Several hosts build disjoint shares (`shard_index` of `num_shards`).
"""

from __future__ import annotations

import errno
import functools
import logging
import multiprocessing
import os
import queue
import time
import traceback
from typing import Callable

import numpy as np
import seqio

from mtllama_jax.data import cache

log = logging.getLogger(__name__)
PROGRESS_EVERY = 2000  # examples between a worker's progress reports


def mixture_tasks(name: str) -> list[tuple[str, float]]:
    """(task, rate) of a mixture (its leaf tasks), or [(task, 1.0)] for a task."""
    provider = seqio.get_mixture_or_task(name)
    if isinstance(provider, seqio.Mixture):
        return [(t.name, float(provider.get_rate(t))) for t in provider.tasks]
    return [(provider.name, 1.0)]


def fingerprint(task_name: str, split: str) -> dict:
    """What the cached tokens depend on: tokenizer, prompt wrapper, source files."""
    task = seqio.get_mixture_or_task(task_name)
    vocabularies = {}
    for feature, spec in sorted(task.output_features.items()):
        v = spec.vocabulary
        path = getattr(v, "sentencepiece_model_file", None)
        vocabularies[feature] = {
            "class": type(v).__name__,
            "sha256": _sha256_cached(path) if path else None,
            "mtllama_quirks": getattr(v, "mtllama_quirks", None),
            "extra_ids": getattr(v, "extra_ids", None),
            "add_eos": spec.add_eos,
        }
    return {
        "vocabularies": vocabularies,
        "wrapper": prompt_wrapper(task),
        "sources": source_files(task, split),
    }


@functools.lru_cache(maxsize=None)
def _sha256_cached(path: str) -> str:
    return cache.sha256_file(path)


def prompt_wrapper(task: seqio.Task) -> str | None:
    """The name of the task's prompt wrapper, where its source or preprocessors declare one."""
    for part in [task.source, *task.preprocessors]:
        wrapper = getattr(part, "prompt_wrapper", None)
        if wrapper is not None:
            return wrapper() if callable(wrapper) else str(wrapper)
    return None


def source_files(task: seqio.Task, split: str) -> list[dict]:
    """The task's files for `split` with sizes and mtimes (sources that are files)."""
    out = []
    for shard in task.source.list_shards(split):
        if isinstance(shard, str) and os.path.isfile(shard):
            st = os.stat(shard)
            out.append(
                {"path": os.path.abspath(shard), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}
            )
    return out


def stale_reason(cache_dir: str, task: str, split: str) -> str | None:
    """Why the cached task cannot be used ("not in the cache", the differences), or None."""
    info = cache.read_task_info(cache_dir, task)
    if info is None:
        return "not in the cache"
    if info.get("split") != split:
        return f"split: cache has {info.get('split')!r}, this run reads {split!r}"
    differences = cache.fingerprint_differences(info["fingerprint"], fingerprint(task, split))
    return "; ".join(differences) or None


def check_cache(cache_dir: str, name: str, split: str) -> list[tuple[str, float]]:
    """The mixture's (task, rate) when every task is cached and fresh; else a CacheError."""
    if not os.path.isdir(cache_dir):
        raise cache.CacheError(
            f"no tokenized cache at {cache_dir}; build it with "
            f"{cache.rebuild_command(cache_dir, name, split)}"
        )
    tasks = mixture_tasks(name)
    problems = {t: r for t, _ in tasks if (r := stale_reason(cache_dir, t, split))}
    if problems:
        missing = [t for t, r in problems.items() if r == "not in the cache"]
        stale = {t: r for t, r in problems.items() if t not in missing}
        lines = []
        if missing:
            lines.append(
                f"{len(missing)} task(s) of {name!r} are not in the cache: "
                f"{', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}"
            )
        lines += [f"{t} was built differently: {r}" for t, r in list(stale.items())[:10]]
        raise cache.CacheError(
            f"tokenized cache {cache_dir} does not match {name!r} ({split}):\n  "
            + "\n  ".join(lines)
            + f"\nRebuild (only these tasks are redone): "
            f"{cache.rebuild_command(cache_dir, name, split)}"
        )
    return tasks


# ---- building ----------------------------------------------------------------------------


def build(
    name: str,
    split: str,
    out: str,
    *,
    configure_worker: Callable[[], None] | None = None,
    workers: int | None = None,
    shard_index: int = 0,
    num_shards: int = 1,
    progress: bool = True,
) -> dict:
    """Caches every task of `name` (this host's share) not already cached and fresh.

    Each spawned worker first calls `configure_worker` (picklable: the job's own
    gin configuration and task registrations), so each task is tokenised as the
    training job would. Returns the manifest.
    """
    tasks = [t for t, _ in mixture_tasks(name)]
    mine = sorted(tasks)[shard_index::num_shards]
    os.makedirs(os.path.join(out, cache.TASKS), exist_ok=True)
    cache.remove_dead_staging(out)
    todo = [t for t in mine if stale_reason(out, t, split) is not None]
    log.info("%s: %d of this host's %d tasks to build into %s", name, len(todo), len(mine), out)
    if todo:
        _run_workers(
            todo,
            split,
            out,
            configure_worker,
            workers or os.cpu_count() or 1,
            progress,
        )
    return cache.write_manifest(out, name, split, tasks)


def _run_workers(todo, split, out, configure_worker, workers, progress):
    from tqdm import tqdm

    totals = {t: _expected_examples(t, split) for t in todo}
    bar = tqdm(
        total=sum(n or 0 for n in totals.values()) or None,
        unit="ex",
        disable=not progress,
        dynamic_ncols=True,
        desc="caching",
    )
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager:
        reports = manager.Queue()
        initargs = (configure_worker, reports)
        with ctx.Pool(min(workers, len(todo)), _init_worker, initargs) as pool:
            _wait(pool, todo, split, out, reports, bar)


def _wait(pool, todo, split, out, reports, bar):
    """Starts every task on the pool; raises the first worker error; updates the bar."""
    pending = [pool.apply_async(_build_task, (t, split, out)) for t in todo]
    try:
        while pending:
            _drain(reports, bar)
            for job in [j for j in pending if j.ready()]:
                pending.remove(job)
                task, examples, tokens = job.get()  # a worker's error is raised here
                log.info("cached %s: %d examples, %d tokens", task, examples, tokens)
            time.sleep(0.05)
    finally:
        _drain(reports, bar)
        bar.close()


def _drain(reports, bar):
    while True:
        try:
            bar.update(reports.get_nowait())
        except queue.Empty:
            return


def _expected_examples(task: str, split: str) -> int | None:
    try:
        return seqio.get_mixture_or_task(task).num_input_examples(split)
    except Exception:  # a count is only for the progress bar; the build reads the data
        return None


_REPORTS = None


def _init_worker(configure_worker, reports):
    """Spawned worker: no GPU, the task registrations, then the job's configuration."""
    global _REPORTS
    _REPORTS = reports
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    import mtllama_jax.tasks  # noqa: F401  registers the tasks

    if configure_worker is not None:
        configure_worker()


def _build_task(task_name: str, split: str, out: str) -> tuple[str, int, int]:
    """Writes one task into its staging folder and renames it (in a worker)."""
    task = seqio.get_mixture_or_task(task_name)
    info = {"task": task_name, "split": split, "fingerprint": fingerprint(task_name, split)}
    eos = task.output_features["targets"].vocabulary.eos_id
    writer = cache.TaskWriter(out, task_name)
    try:
        ds = task.get_dataset(
            sequence_length=None, split=split, use_cached=False, shuffle=False, num_epochs=1
        )
        empty, unreported = _empty(), 0
        for ex in ds.as_numpy_iterator():
            writer.add(ex.get("inputs", empty), ex["targets"], eos)
            unreported += 1
            if unreported == PROGRESS_EVERY:
                _REPORTS.put(unreported)
                unreported = 0
        _REPORTS.put(unreported)
        info = writer.commit(info)
    except OSError as e:
        writer.abort()
        if e.errno == errno.ENOSPC:
            raise OSError(
                e.errno,
                f"disk full while caching task {task_name!r} into {out}; "
                f"its staging folder was removed, finished tasks are kept. Free "
                f"space and rerun mtllama-cache to continue",
            ) from None
        raise
    except Exception:  # TF's errors may not pickle: send the text of the traceback
        writer.abort()
        raise RuntimeError(
            f"caching task {task_name!r} failed:\n{traceback.format_exc()}"
        ) from None
    except BaseException:
        writer.abort()
        raise
    return task_name, info["examples"], info["tokens"]


def _empty():
    return np.zeros([0], np.int32)
