"""The training job as gin configures it: `train`, `optimizer`, `zero_shot_hook`.

`train()` builds the model (`LlamaConfig`), the layout (`mesh`), the option
groups of `train_options`, the optimizer and the batches (seqio on the fly, or
the tokenized cache named by `train.data_cache`), then calls
`mtllama_jax.training.run`. `mtllama-train` runs it; `mtllama-demo` runs it
between its two evaluations.
"""

from __future__ import annotations

import os
from typing import Callable, Sequence

import gin
import jax
import numpy as np

from mtllama_jax import models, optim, partitioning, training
from mtllama_jax.env import gin_or_env
from mtllama_jax.main.gin_configurables import (
    check_argument_types,
    mesh,
    model_config_from_gin,
    options_from_gin,
)
from mtllama_jax.train_options import CheckpointPolicy, LoopPeriods, LossOptions, NonfinitePolicy

DATA_CACHE_ENV = "MTLLAMA_DATA_CACHE"


@gin.configurable(denylist=["num_steps"])
def optimizer(
    num_steps: int,
    learning_rate: float = 2e-5,
    schedule: str = "cosine",
    warmup_steps: int = 0,
    warmup_fraction: float = 0.0,
    final_fraction: float = 0.0,
    weight_decay: float = 0.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    clip_norm: float | None = 1.0,
    decay_embeddings: bool = True,
):
    """AdamW and its learning-rate schedule; returns (optax transform, schedule).

    Args:
      learning_rate: peak learning rate.
      schedule: constant, cosine or linear decay after warmup.
      warmup_steps / warmup_fraction: linear warmup length (the larger wins).
      final_fraction: the decayed learning rate at the last step, as a fraction of peak.
      weight_decay: AdamW decay on kernels (and embeddings, `decay_embeddings`).
      b1, b2, eps: Adam moments.
      clip_norm: global gradient-norm clip; None for none.
    """
    sched = optim.learning_rate_schedule(
        learning_rate, num_steps, schedule, warmup_steps, warmup_fraction, final_fraction
    )
    tx = optim.make_optimizer(
        sched, weight_decay, b1, b2, eps, clip_norm, decay_embeddings=decay_embeddings
    )
    return tx, sched


@gin.configurable(denylist=["model", "layout"])
def zero_shot_hook(model, layout, evaluate: Callable | None = None):
    """Binds the periodic zero-shot evaluation into the loop (`LoopPeriods.eval_every_steps`).

    Args:
      evaluate: a plain function `evaluate(params, step, model, layout) ->
        {name: value}` (e.g. from `mtllama_jax.evaluation`); None for no zero-shot eval.
    """
    if evaluate is None:
        return None
    return lambda params, step: evaluate(params, step, model, layout)


@gin.configurable
def train(
    model_dir: str = gin.REQUIRED,
    mixture_or_task_name: str = gin.REQUIRED,
    num_steps: int = gin.REQUIRED,
    batch_size: int = 16,
    sequence_length: int = 2048,
    seed: int = 0,
    init_checkpoint: str | None = None,
    microbatches: int = 1,
    validation_split: str | None = "validation",
    validation_batches: int = 10,
    tokenizer_files: Sequence[str] = (),
    data_cache: str | None = None,
    data_workers: int | None = None,
):
    """The training job (gin/runs/*.gin). Returns why it ended: done, preempted, nonfinite.

    The option groups of `mtllama_jax/train_options.py` are bound by their own
    names: `LossOptions.*`, `NonfinitePolicy.*`, `CheckpointPolicy.*`, `LoopPeriods.*`.

    Args:
      model_dir: where checkpoints, config.json, tokenizer, config.gin and metrics go;
        a run restarts from its latest checkpoint.
      mixture_or_task_name: the seqio mixture or task to train on (`mtllama_jax.tasks`).
      num_steps: optimizer steps in all (the schedule's length).
      batch_size: global batch (rows of `sequence_length` packed tokens), all hosts together.
      sequence_length: packed row length.
      seed: seed of the params' init and of the data order.
      init_checkpoint: a params-only folder (`mtllama-convert hf-to-jax`) to start from;
        None for random init. Ignored once MODEL_DIR has a checkpoint.
      microbatches: gradient accumulation: the batch is split into this many.
      validation_split: split of the mixture for teacher-forced validation loss every
        `LoopPeriods.eval_every_steps` (None: off).
      validation_batches: batches per validation.
      tokenizer_files: files copied into MODEL_DIR; by default the SentencePiece model
        of the mixture's vocabulary.
      data_cache: a tokenized cache of the mixture's train split (`mtllama-cache`; else
        $MTLLAMA_DATA_CACHE): batches come from it through worker processes, with the
        data position saved in each checkpoint and loss reported per task. None: read
        and tokenise on the fly with seqio.
      data_workers: packing processes of the cached pipeline (None: half the cores, at
        most 8; 0: pack in the training process).
    """
    from mtllama_jax import data  # seqio and TF: only the entry point needs them

    check_argument_types("train", train, locals())
    loss, nonfinite, checkpointing, periods = (
        options_from_gin(c) for c in (LossOptions, NonfinitePolicy, CheckpointPolicy, LoopPeriods)
    )
    model = models.build_module(model_config_from_gin())
    layout = mesh()
    processes = jax.process_count()
    _check_batch_size(batch_size, microbatches, processes, layout)
    rows = batch_size // processes

    def stream(split, start):
        return data.batches(
            mixture_or_task_name,
            split=split,
            sequence_length=sequence_length,
            batch_size=rows,
            seed=seed,
            start_step=start,
            shard_index=jax.process_index(),
            num_shards=processes,
        )

    def batches(start):
        it = iter(stream("train", start))
        first = next(it, None)
        if first is None:
            raise ValueError(_no_data_message(mixture_or_task_name, "train"))
        yield first
        yield from it

    task_names, task_groups = (), None
    data_cache = gin_or_env(data_cache, DATA_CACHE_ENV)
    if data_cache:
        batches, task_names, task_groups = _cached_batches(
            data_cache, mixture_or_task_name, sequence_length, rows, seed, data_workers
        )

    validation = None
    if periods.eval_every_steps and validation_split:

        def validation():
            return list(_take(stream(validation_split, 0), validation_batches))

    _, reason = training.run(
        model,
        layout,
        optimizer(num_steps),
        model_dir,
        num_steps,
        batches,
        seed=seed,
        init_checkpoint=init_checkpoint,
        microbatches=microbatches,
        loss=loss,
        nonfinite=nonfinite,
        checkpointing=checkpointing,
        periods=periods,
        validation=validation,
        eval_hook=zero_shot_hook(model, layout),
        sequence_length=sequence_length,
        tokenizer_files=tokenizer_files or _vocabulary_files(mixture_or_task_name),
        gin_config=gin.config_str(),
        task_names=task_names,
        task_groups=task_groups,
    )
    return reason


def _cached_batches(cache_dir, name, sequence_length, rows, seed, workers):
    """(batches(start), task names, task -> T0 cluster) of the tokenized cache's pipeline."""
    import seqio

    from mtllama_jax.data import build, pipeline
    from mtllama_jax.tasks import p3

    tasks = build.check_cache(cache_dir, name, "train")
    vocabulary = seqio.get_mixture_or_task(name).output_features["targets"].vocabulary
    if workers is None:
        workers = max(1, min(8, (os.cpu_count() or 2) // 2))
    spec = pipeline.PipelineSpec(
        cache_dir=cache_dir,
        split="train",
        tasks=tuple(t for t, _ in tasks),
        rates=tuple(r for _, r in tasks),
        sequence_length=sequence_length,
        rows=rows,
        bos_id=vocabulary.bos_id,
        eos_id=vocabulary.eos_id,
        seed=seed,
        shard_index=jax.process_index(),
        num_shards=jax.process_count(),
        workers=workers,
    )
    clusters = {r["task"]: r["task_cluster"] for r in p3.t0_train_table()}
    groups = {t: clusters[t] for t in spec.tasks if t in clusters}
    return (lambda start: pipeline.CacheBatches(spec, start)), spec.tasks, groups


def _check_batch_size(
    batch_size: int, microbatches: int, processes: int, layout: partitioning.Layout
):
    """Refuses a batch the mesh cannot split, before anything is built or written."""
    shards = layout.batch_shards * max(microbatches, 1)
    need = int(np.lcm(shards, processes))
    if batch_size <= 0 or batch_size % need:
        raise ValueError(
            f"train.batch_size={batch_size} does not split over {processes} process(es) and "
            f"{shards // max(microbatches, 1)} batch shard(s) (mesh data x fsdp) x "
            f"{microbatches} microbatch(es); use a multiple of {need}"
        )


def _take(iterable, n):
    for _, item in zip(range(n), iterable):
        yield item


def _vocabulary_files(name: str) -> list[str]:
    """The SentencePiece model file(s) behind the mixture's output features."""
    import seqio

    files = []
    for feature in seqio.get_mixture_or_task(name).output_features.values():
        path = getattr(feature.vocabulary, "sentencepiece_model_file", None)
        if path and path not in files:
            files.append(path)
    return files


def _no_data_message(name: str, split: str) -> str:
    import seqio

    found = seqio.get_mixture_or_task(name)
    tasks = [t.name for t in getattr(found, "tasks", [found])]  # a Task has no .tasks
    return (
        f"{name!r} yielded no {split} examples; none of its tasks found data: "
        f"{tasks}. Check their data locations (gin bindings or environment variables) "
        "and that their files hold examples."
    )


# ---- flags -------------------------------------------------------------------------------
