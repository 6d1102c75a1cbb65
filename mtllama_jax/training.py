"""A training run with plain arguments: lock MODEL_DIR, resume or initialise, loop, checkpoint.

`mtllama-train` and `mtllama-demo` call `run` once gin has built the model, the
layout, the optimizer and the batches (`mtllama_jax.main.train_job`); tests and
scripts call it without gin.
"""

from __future__ import annotations

import logging
import sys
from typing import Callable, Iterator, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np

from mtllama_jax import (
    checkpoint_folder,
    checkpoints,
    metrics,
    partitioning,
    preemption,
    run_lock,
    trainer,
)
from mtllama_jax.models.llama.config import LlamaConfig
from mtllama_jax.train_options import CheckpointPolicy, LoopPeriods, LossOptions, NonfinitePolicy

Batches = Callable[[int], Iterator[Mapping[str, np.ndarray]]]


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
    checkpoints.check_model_dir(path, config, role="INIT_CHECKPOINT")
    return checkpoint_folder.load_params(path, shardings, dtype=config.param_dtype)
