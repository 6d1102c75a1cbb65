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
`LlamaConfig` (gin/models/*.gin). `run` is the same job with plain arguments
and any batch source; tests and scripts call it without gin.
"""

from __future__ import annotations

import argparse
import difflib
import inspect
import os
import re
import sys
from typing import Callable, Iterator, Mapping, Sequence

import gin
import jax
import numpy as np

from mtllama_jax import checkpoints, metrics, optim, partitioning, trainer
from mtllama_jax.config import LlamaConfig
from mtllama_jax.gin_configurables import GIN_DIR, model_config_from_gin

Batches = Callable[[int], Iterator[Mapping[str, np.ndarray]]]


@gin.configurable
def mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, rules: str = "fsdp"):
    """The device mesh and logical rules (gin/mesh/*.gin).

    Args:
      data: data-parallel size (weights replicated across it).
      fsdp: fully-sharded data-parallel size; -1 takes the devices left over.
      tensor: tensor-parallel size (heads, MLP, vocabulary split across it).
      rules: logical axis rule set of `partitioning.RULE_SETS`: data, fsdp, fsdp_tp.
    """
    return partitioning.make_mesh(data, fsdp, tensor), partitioning.logical_axis_rules(rules)


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
    config: LlamaConfig,
    mesh_and_rules,
    optimizer_and_schedule,
    model_dir: str,
    num_steps: int,
    batches: Batches,
    *,
    seed: int = 0,
    init_checkpoint: str | None = None,
    microbatches: int = 1,
    loss_normalization: str = "token",
    z_loss: float = 0.0,
    nonfinite: str = "skip",
    checkpoint_every_steps: int | None = 1000,
    checkpoint_every_minutes: float | None = None,
    keep_checkpoints: int | None = 3,
    log_every_steps: int = 10,
    eval_every_steps: int = 0,
    validation: Callable[[], Sequence[Mapping[str, np.ndarray]]] | None = None,
    eval_hook=None,
    sequence_length: int | None = None,
    tokenizer_files: Sequence[str] = (),
    gin_config: str | None = None,
    progress: bool = True,
):
    """Trains to `num_steps`, resuming from MODEL_DIR's latest checkpoint if any.

    `batches(start_step)` yields this process's rows for steps start_step, ...
    A fresh run starts from `init_checkpoint` (a params-only folder) or from
    random params drawn from `seed`. Returns (state, "done" | "preempted" |
    "nonfinite").
    """
    mesh_, rules = mesh_and_rules
    tx, schedule = optimizer_and_schedule
    checkpoints.check_model_dir(model_dir, config)
    step_fn = trainer.Trainer(
        config, mesh_, rules, tx, schedule=schedule, microbatches=microbatches,
        normalize=loss_normalization, z_loss=z_loss, nonfinite=nonfinite,
    )
    ckpt = checkpoints.TrainCheckpoints(
        model_dir, every_steps=checkpoint_every_steps, every_minutes=checkpoint_every_minutes,
        keep=keep_checkpoints,
    )
    latest = ckpt.latest_step()
    if latest is not None:
        state = ckpt.restore(latest, step_fn.abstract_restore_target())
    else:
        params = None
        if init_checkpoint:
            params = _load_init_params(init_checkpoint, config, step_fn.state_shardings.params)
        state = step_fn.init_state(jax.random.key(seed), params)
    start = int(jax.device_get(state.step))
    checkpoints.write_model_dir_files(model_dir, config, tokenizer_files, gin_config)
    writer = metrics.MetricsWriter(
        model_dir, total_steps=num_steps, start_step=start, config=config,
        length=sequence_length, progress=progress,
    )
    try:
        with checkpoints.PreemptionWatch() as watch:
            state, reason = trainer.train_loop(
                step_fn, state, batches(start), num_steps, checkpoints=ckpt, writer=writer,
                log_every=log_every_steps, eval_every=eval_every_steps, validation=validation,
                eval_hook=eval_hook, stop_requested=watch.requested,
            )
    finally:
        writer.close()
        ckpt.close()
    return state, reason


def _load_init_params(path: str, config: LlamaConfig, shardings):
    """Params of a converted (params-only) checkpoint folder, on this run's shardings."""
    from mtllama_jax import checkpoint_folder

    checkpoints.check_model_dir(path, config)
    return checkpoint_folder.load_params(path, shardings)
