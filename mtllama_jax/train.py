"""`mtllama-train`: the gin-configured training job (T5X-style flags).

    mtllama-train --gin_file=models/tiny.gin --gin_file=mesh/single.gin \\
        --gin_file=runs/finetune.gin --gin.MODEL_DIR="'/tmp/run'" --gin.train.num_steps=100

Flags: `--gin_file` (repeatable; looked up in `--gin_search_paths`, then in
the package's `gin/` folder), `--gin.NAME=VALUE` (repeatable gin bindings),
`--gin_search_paths` (comma-separated), and for several hosts either nothing
(on a cluster `jax.distributed.initialize()` reads the environment:
`--multihost`) or `--coordinator_address`, `--num_processes`, `--process_id`.

Gin binds three configurables here, documented in their docstrings: `train`
(what to run), `mesh` (device mesh and sharding rules) and `optimizer`; plus
`LlamaConfig` (gin/models/*.gin) and the option groups of `train_options`
(`LossOptions`, `NonfinitePolicy`, `CheckpointPolicy`, `LoopPeriods`). `run` is
the same job with plain arguments and any batch source; tests and scripts call
it without gin.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Callable, Iterator, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np

import gin
from mtllama_jax import (
    checkpoints,
    exits,
    launch,
    metrics,
    models,
    optim,
    partitioning,
    preemption,
    run_lock,
    trainer,
)
from mtllama_jax.env import gin_or_env
from mtllama_jax.gin_configurables import (
    check_argument_types,
    mesh,
    model_config_from_gin,
    options_from_gin,
)
from mtllama_jax.launch import parse_gin
from mtllama_jax.models.llama.config import LlamaConfig
from mtllama_jax.train_options import CheckpointPolicy, LoopPeriods, LossOptions, NonfinitePolicy

Batches = Callable[[int], Iterator[Mapping[str, np.ndarray]]]
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


def run(
    model: nn.Module,
    layout: partitioning.Layout,
    optimizer_and_schedule,
    model_dir: str,
    num_steps: int,
    batches: Batches,
    **kwargs,
):
    """Trains `model` (the flax module; its `.config` is the run's) to `num_steps` on
    `layout`, resuming from MODEL_DIR's latest checkpoint if any.

    `batches(start_step)` yields this process's rows for steps start_step, ...
    When it returns an iterator with `orbax_save_args` (the cache's pipeline),
    its position is saved with every checkpoint and restored on resume.
    `task_names` (the batches' `task_ids` index them) turn on per-task loss,
    summed per `task_groups` cluster as well.
    A fresh run starts from `init_checkpoint` (a params-only folder) or from
    random params drawn from `seed`. MODEL_DIR is locked for the run's life
    (`run_lock`): a second run on it is refused. Keyword arguments as
    `_run_locked`'s; the option groups are `train_options`'. Returns
    (state, "done" | "preempted" | "nonfinite").
    """
    with run_lock.ModelDirLock(model_dir):
        return _run_locked(
            model, layout, optimizer_and_schedule, model_dir, num_steps, batches, **kwargs
        )


def _run_locked(
    model: nn.Module,
    layout: partitioning.Layout,
    optimizer_and_schedule,
    model_dir: str,
    num_steps: int,
    batches: Batches,
    *,
    seed: int = 0,
    init_checkpoint: str | None = None,
    microbatches: int = 1,
    loss: LossOptions = LossOptions(),
    nonfinite: NonfinitePolicy = NonfinitePolicy(),
    checkpointing: CheckpointPolicy = CheckpointPolicy(),
    periods: LoopPeriods = LoopPeriods(),
    validation: Callable[[], Sequence[Mapping[str, np.ndarray]]] | None = None,
    eval_hook=None,
    sequence_length: int | None = None,
    tokenizer_files: Sequence[str] = (),
    gin_config: str | None = None,
    progress: bool = True,
    task_names: Sequence[str] = (),
    task_groups: Mapping[str, str] | None = None,
):
    """`run` once MODEL_DIR is locked."""
    config = model.config
    tx, schedule = optimizer_and_schedule
    checkpoints.check_model_dir(model_dir, config)
    step_fn = trainer.Trainer(
        model,
        layout,
        tx,
        schedule=schedule,
        microbatches=microbatches,
        normalize=loss.normalization,
        z_loss=loss.z_loss,
        nonfinite=nonfinite.action,
        num_tasks=len(task_names),
    )
    ckpt = checkpoints.TrainCheckpoints(model_dir, checkpointing)
    state = ckpt.restore_latest(step_fn.abstract_restore_target())
    latest = None if state is None else int(jax.device_get(state.step))
    if state is None:
        params = None
        if init_checkpoint:
            params = _load_init_params(init_checkpoint, config, step_fn.state_shardings.params)
        state = step_fn.init_state(jax.random.key(seed), params)
    _check_dtypes(state, step_fn.abstract_state)
    start = int(jax.device_get(state.step))
    checkpoints.write_model_dir_files(model_dir, config, tokenizer_files, gin_config)
    source = batches(start)
    if hasattr(source, "orbax_save_args"):
        _attach_data_state(ckpt, latest, source)
    writer = metrics.MetricsWriter(
        model_dir,
        total_steps=num_steps,
        start_step=start,
        config=config,
        length=sequence_length,
        progress=progress,
        task_names=task_names,
        task_groups=task_groups,
    )
    try:
        with preemption.PreemptionWatch() as watch:
            state, reason = trainer.train_loop(
                step_fn,
                state,
                source,
                num_steps,
                checkpoints=ckpt,
                writer=writer,
                periods=periods,
                validation=validation,
                eval_hook=eval_hook,
                stop_requested=watch.requested,
                waiting=watch.waiting,
                max_consecutive_skips=nonfinite.max_consecutive_skips,
                max_skipped_fraction=nonfinite.max_skipped_fraction,
            )
    finally:
        writer.close()
        ckpt.close()
        if hasattr(source, "close"):
            source.close()
    skipped = int(jax.device_get(state.skipped))
    if skipped and jax.process_index() == 0:
        print(
            f"mtllama-train: {skipped} of {int(jax.device_get(state.step))} steps were "
            "skipped for a non-finite loss or gradient",
            file=sys.stderr,
        )
    return state, reason


def _check_dtypes(state, abstract) -> None:
    """Refuses a train state whose dtypes differ from the config's (exact resume needs them)."""
    wrong = [
        f"{jax.tree_util.keystr(p)}: {a.dtype}, expected {b.dtype}"
        for (p, a), b in zip(jax.tree_util.tree_leaves_with_path(state), jax.tree.leaves(abstract))
        if a.dtype != b.dtype
    ]
    if wrong:
        raise ValueError(
            f"the train state's dtypes differ from LlamaConfig's: {wrong[:3]}; set "
            "LlamaConfig.param_dtype to the checkpoint's, or convert it again"
        )


def _attach_data_state(ckpt, latest: int | None, source) -> None:
    """Saves the data position with each step; restores it from the step resumed, if saved."""
    ckpt.attach_data(source.orbax_save_args)
    if latest is not None and not ckpt.restore_data(latest, source.orbax_restore_args()):
        logging.getLogger(__name__).warning(
            "checkpoint %d has no data state (written before it was saved): the data "
            "pipeline seeks to step %d by packing every batch before it",
            latest,
            latest,
        )


def _load_init_params(path: str, config: LlamaConfig, shardings):
    """Params of a converted (params-only) checkpoint folder, on this run's shardings."""
    from mtllama_jax import checkpoint_folder

    checkpoints.check_model_dir(path, config, role="INIT_CHECKPOINT")
    return checkpoint_folder.load_params(path, shardings, dtype=config.param_dtype)


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

    _, reason = run(
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


def parse_flags(argv: Sequence[str]) -> argparse.Namespace:
    """The jobs' T5X-style flags (`launch.job_parser`) plus the multi-host ones."""
    parser = launch.job_parser("mtllama-train", __doc__.split("\n")[0])
    parser.add_argument(
        "--multihost",
        action="store_true",
        help="jax.distributed.initialize() from the cluster environment",
    )
    parser.add_argument("--coordinator_address", help="host:port of process 0")
    parser.add_argument("--num_processes", type=int)
    parser.add_argument("--process_id", type=int)
    return launch.parse_job_flags(parser, argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_flags(sys.argv[1:] if argv is None else argv)
    if args.coordinator_address or args.multihost:
        jax.distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
    import mtllama_jax.tasks  # noqa: F401  registers the tasks and their gin configurables

    def job():
        parse_gin(args.gin_file, args.gin_bindings, args.search_paths)
        reason = train()
        print(f"mtllama-train: {_ENDINGS[reason][1]}", file=sys.stderr)
        return _ENDINGS[reason][0]

    return exits.run_main("mtllama-train", job)


# How a run ended: (exit code, message).
_ENDINGS = {
    "done": (exits.OK, "finished"),
    "preempted": (
        exits.PREEMPTED,
        "stopped by a signal; the current step is saved, rerun to continue",
    ),
    "nonfinite": (
        exits.NONFINITE,
        "stopped on non-finite losses or gradients; the last good state is saved",
    ),
}


if __name__ == "__main__":
    sys.exit(main())
