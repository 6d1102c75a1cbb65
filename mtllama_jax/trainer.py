"""The sharded train step, the validation step, and the loop that drives them.

`Trainer` compiles one `jax.jit` per step kind with `NamedSharding`s in and out:
the state is sharded by the logical rules and donated, the batch is split over
(`data`, `fsdp`). A step accumulates gradients over microbatches (a `lax.scan`,
so memory stays that of one microbatch), clips and applies AdamW, and, on a
non-finite loss or gradient norm, keeps the previous params (skipping the step,
counted) or flags the run to stop after saving.

`train_loop` feeds host batches through `make_array_from_process_local_data`
(each process feeds its own rows), saves checkpoints through
`mtllama_jax.checkpoints`, writes metrics through `mtllama_jax.metrics`, and
calls the validation and zero-shot hooks at their periods.
"""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Any, Callable, Iterable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from mtllama_jax import losses, partitioning, train_state
from mtllama_jax.preemption import Preempted
from mtllama_jax.train_options import NONFINITE_ACTIONS, LoopPeriods

BATCH_FEATURES = ("input_tokens", "target_tokens", "positions", "segment_ids", "loss_weights")


class Trainer:
    """Compiled, sharded train and validation steps for one model on one mesh."""

    def __init__(
        self,
        model: nn.Module,
        layout: partitioning.Layout,
        tx: optax.GradientTransformation,
        *,
        schedule: optax.Schedule | None = None,
        microbatches: int = 1,
        normalize: str = "token",
        z_loss: float = 0.0,
        nonfinite: str = "skip",
        num_tasks: int = 0,
    ):
        """`model`: the flax language model (carries `.config`); `num_tasks` > 0: batches
        carry `task_ids` and steps report loss per task."""
        if nonfinite not in NONFINITE_ACTIONS:
            raise ValueError(f"Trainer nonfinite={nonfinite!r}: choose one of {NONFINITE_ACTIONS}")
        if normalize not in losses.NORMALIZATIONS:
            raise ValueError(
                f"Trainer normalize={normalize!r}: choose one of {losses.NORMALIZATIONS}"
            )
        if microbatches < 1:
            raise ValueError(f"Trainer microbatches={microbatches}: must be >= 1")
        self.model, self.config, self.layout, self.tx = model, model.config, layout, tx
        self.schedule = schedule
        self.microbatches = microbatches
        self.normalize, self.z_loss, self.nonfinite = normalize, z_loss, nonfinite
        self.num_tasks = num_tasks
        self.features = BATCH_FEATURES + (("task_ids",) if num_tasks else ())
        self.abstract_state, self.state_shardings = train_state.state_shardings(
            partitioning.abstract_params(model), layout, tx
        )
        self.batch_sharding = layout.batch_sharding()
        self._micro_sharding = NamedSharding(
            layout.mesh, PartitionSpec(None, *self.batch_sharding.spec)
        )
        replicated = layout.replicated()
        batch_shardings = {k: self.batch_sharding for k in self.features}
        self._train_step = jax.jit(
            self._step,
            in_shardings=(self.state_shardings, batch_shardings),
            out_shardings=(self.state_shardings, replicated),
            donate_argnums=0,
        )
        self._eval_step = jax.jit(
            self._eval,
            in_shardings=(self.state_shardings.params, batch_shardings),
            out_shardings=replicated,
        )
        self._init = jax.jit(
            lambda params, key: train_state.create(params, tx, key),
            in_shardings=(self.state_shardings.params, None),
            out_shardings=self.state_shardings,
        )

    # ---- state -------------------------------------------------------------------------

    def init_state(self, key: jax.Array, params=None) -> train_state.TrainState:
        """A step-0 state: random params from `key`, or the given (converted) params."""
        if params is None:
            params = partitioning.init_params(self.model, self.layout, key)
        with self.layout.context():
            return self._init(params, key)

    def abstract_restore_target(self):
        """The state's ShapeDtypeStructs with this mesh's shardings (restore target)."""
        return train_state.with_shardings(self.abstract_state, self.state_shardings)

    # ---- steps -------------------------------------------------------------------------

    def train_step(self, state, batch):
        """One optimizer step on a global batch (see `global_batch`); returns (state, metrics)."""
        with self.layout.context():
            return self._train_step(state, batch)

    def eval_step(self, params, batch):
        """Summed validation terms of one global batch (`losses.cross_entropy_sums`)."""
        with self.layout.context():
            return self._eval_step(params, batch)

    def global_batch(self, local: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        """This process's rows of a batch, assembled into sharded global arrays."""
        missing = [k for k in self.features if k not in local]
        if missing:
            raise ValueError(f"batch lacks feature(s) {missing}; a batch holds {self.features}")
        rows, length = np.shape(local["input_tokens"])
        global_rows = rows * jax.process_count()
        shards = self.layout.batch_shards * self.microbatches
        if global_rows % shards:
            raise ValueError(
                f"global batch of {global_rows} rows ({rows} per process x "
                f"{jax.process_count()} processes) is not divisible by "
                f"{self.layout.batch_shards} batch shards (mesh data x fsdp) x {self.microbatches} "
                f"microbatches = {shards}; make the global batch a multiple of {shards} rows"
            )
        return {
            k: jax.make_array_from_process_local_data(
                self.batch_sharding, np.asarray(local[k]), (global_rows, length)
            )
            for k in self.features
        }

    # ---- traced bodies -----------------------------------------------------------------

    def _sums(self, params, batch):
        logits = self.model.apply(
            {"params": params},
            batch["input_tokens"],
            positions=batch["positions"],
            segment_ids=batch["segment_ids"],
        )
        return losses.cross_entropy_sums(
            logits,
            batch["target_tokens"],
            batch["loss_weights"],
            batch["segment_ids"],
            normalize=self.normalize,
            z_loss=self.z_loss,
            task_ids=batch.get("task_ids"),
            num_tasks=self.num_tasks,
        )

    def _grads(self, params, batch):
        """Gradient of the summed loss and the summed terms, over all microbatches."""

        def loss_fn(p, mb):
            sums = self._sums(p, mb)
            return sums["loss"], sums

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        n = self.microbatches
        if n == 1:
            (_, sums), grads = grad_fn(params, batch)
            return grads, sums

        def split(x):  # microbatch i takes rows i, i+n, ...: each spans every device
            rows = x.shape[0] // n
            x = x.reshape(rows, n, *x.shape[1:]).swapaxes(0, 1)
            return jax.lax.with_sharding_constraint(x, self._micro_sharding)

        micro = jax.tree.map(split, batch)

        def body(carry, mb):
            (_, sums), g = grad_fn(params, mb)
            acc_g, acc_s = carry
            acc_g = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), acc_g, g)
            return (acc_g, jax.tree.map(jnp.add, acc_s, sums)), None

        zeros_g = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        zeros_s = jax.tree.map(
            lambda s: jnp.zeros(s.shape, s.dtype),
            jax.eval_shape(self._sums, params, jax.tree.map(lambda x: x[0], micro)),
        )
        (grads, sums), _ = jax.lax.scan(body, (zeros_g, zeros_s), micro)
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
        return grads, sums

    def _step(self, state: train_state.TrainState, batch):
        grads, sums = self._grads(state.params, batch)
        denominator = jnp.maximum(sums["denominator"], 1.0)
        grads = jax.tree.map(lambda g: g / denominator.astype(g.dtype), grads)
        loss = sums["loss"] / denominator
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)

        def keep(new, old):
            return jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)

        skip = self.nonfinite == "skip"
        bad = (~finite).astype(jnp.int32)
        new_state = state.replace(
            step=state.step + (1 if skip else 1 - bad),
            params=keep(params, state.params),
            opt_state=keep(opt_state, state.opt_state),
            skipped=state.skipped + (bad if skip else 0),
        )
        tokens = jnp.maximum(sums["tokens"], 1.0)
        metrics = {
            "loss": loss,
            "nll": sums["nll"] / tokens,
            "z_loss": sums["z_loss"] / tokens,
            "accuracy": sums["correct"] / tokens,
            "grad_norm": grad_norm,
            "loss_tokens": sums["tokens"],
            "nonpad_fraction": sums["nonpad"] / batch["segment_ids"].size,
            "nonfinite": bad,
            "skipped_steps": new_state.skipped,
        }
        if self.num_tasks:  # summed over the step; train_loop adds them up between logs
            metrics["task_nll"], metrics["task_tokens"] = sums["task_nll"], sums["task_tokens"]
        if self.schedule is not None:
            metrics["learning_rate"] = jnp.asarray(self.schedule(state.step), jnp.float32)
        return new_state, metrics

    def _eval(self, params, batch):
        return self._sums(params, batch)


def validation_metrics(trainer: Trainer, params, batches: Iterable[Mapping[str, np.ndarray]]):
    """Teacher-forced loss (per token), accuracy and perplexity over validation batches."""
    total: dict[str, float] | None = None
    for local in batches:
        local = dict(local)
        local.setdefault("task_ids", np.zeros_like(local["segment_ids"]))
        sums = jax.device_get(trainer.eval_step(params, trainer.global_batch(local)))
        total = sums if total is None else {k: total[k] + sums[k] for k in total}
    if total is None or total["tokens"] == 0:
        raise ValueError("validation data yielded no weighted tokens; check the eval split")
    nll = float(total["nll"] / total["tokens"])
    return {
        "loss": nll,
        "accuracy": float(total["correct"] / total["tokens"]),
        "perplexity": float(np.exp(min(nll, 50.0))),
    }


def train_loop(
    trainer: Trainer,
    state: train_state.TrainState,
    batches: Iterable[Mapping[str, np.ndarray]],
    num_steps: int,
    *,
    checkpoints=None,
    writer=None,
    periods: LoopPeriods = LoopPeriods(),
    validation: Callable[[], Iterable[Mapping[str, np.ndarray]]] | None = None,
    eval_hook: Callable[[Any, int], Mapping[str, float]] | None = None,
    stop_requested: Callable[[], bool] = lambda: False,
    waiting: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    max_consecutive_skips: int | None = None,
    max_skipped_fraction: float | None = None,
) -> tuple[train_state.TrainState, str]:
    """Runs steps from `state.step` to `num_steps`; returns (state, why it ended).

    `batches` yields this process's rows for steps state.step, state.step + 1, ...
    `checkpoints` (a `checkpoints.TrainCheckpoints`) saves on its schedule, on
    `stop_requested()` (preemption) and at the end. `writer` (a
    `metrics.MetricsWriter`) gets train metrics every `periods.log_every_steps`
    steps and validation (`validation()` batches) / `eval_hook(params, step)`
    results every `periods.eval_every_steps` steps. `waiting()` wraps each wait
    for data (a signal there raises `preemption.Preempted`: the run saves and
    ends at once).
    Under nonfinite="skip", `max_consecutive_skips` skipped steps in a row, or
    more than a `max_skipped_fraction` of this run's steps (judged from its
    20th), end it as "stop" would. Ends with "done", "preempted" or "nonfinite".
    """
    log_every, eval_every = periods.log_every_steps, periods.eval_every_steps
    step = int(jax.device_get(state.step))
    stop_each_step = trainer.nonfinite == "stop"
    batches = iter(batches)
    window_start, window_steps, window_tokens = time.perf_counter(), 0, 0
    task_sums = None  # per-task (nll, tokens) since the last log, on the devices
    reason = "done"
    limit = None
    if trainer.nonfinite == "skip":
        limit = SkipLimit(max_consecutive_skips, max_skipped_fraction)
    metrics = previous = None
    while step < num_steps:
        try:
            with waiting():
                local = next(batches, None)
        except Preempted:
            reason = "preempted"
            break
        if local is None:
            raise ValueError(f"the training data ran out at step {step} of {num_steps}")
        state, metrics = trainer.train_step(state, trainer.global_batch(local))
        if trainer.num_tasks:
            sums = (metrics.pop("task_nll"), metrics.pop("task_tokens"))
            task_sums = sums if task_sums is None else jax.tree.map(jnp.add, task_sums, sums)
        window_steps += 1
        window_tokens += np.size(local["input_tokens"]) * jax.process_count()
        if stop_each_step and int(jax.device_get(metrics["nonfinite"])):
            reason = "nonfinite"
            break
        step += 1
        # The previous step's flag: read one step late, so the host runs ahead.
        if limit is not None and previous is not None and limit.exceeded(previous):
            reason = "nonfinite"
            break
        previous = metrics["nonfinite"]
        if writer is not None and (step % log_every == 0 or step == num_steps):
            values = {k: float(v) for k, v in jax.device_get(metrics).items()}
            elapsed = time.perf_counter() - window_start
            values["step_time_s"] = elapsed / window_steps
            values["tokens_per_s"] = window_tokens / elapsed
            writer.write_train(step, values)
            if task_sums is not None:
                writer.write_tasks(step, *jax.device_get(task_sums))
                task_sums = None
            window_start, window_steps, window_tokens = time.perf_counter(), 0, 0
        if eval_every and step % eval_every == 0 and writer is not None:
            if validation is not None:
                writer.write(step, validation_metrics(trainer, state.params, validation()), "eval")
            if eval_hook is not None:
                writer.write(step, eval_hook(state.params, step), "zero_shot")
        if stop_requested():
            reason = "preempted"
            break
        if checkpoints is not None:
            checkpoints.maybe_save(step, state, nonfinite=metrics["nonfinite"])
    if reason == "done" and limit is not None and previous is not None:
        if limit.exceeded(previous):
            reason = "nonfinite"
    if checkpoints is not None:
        checkpoints.save(
            int(jax.device_get(state.step)),
            state,
            nonfinite=None if metrics is None else metrics["nonfinite"],
        )
        checkpoints.wait()
    return state, reason


class SkipLimit:
    """Counts skipped (non-finite) steps of a nonfinite="skip" run against its bounds."""

    MIN_STEPS = 20  # the fraction is judged from this many steps of the run on

    def __init__(self, max_consecutive: int | None, max_fraction: float | None):
        self.max_consecutive, self.max_fraction = max_consecutive, max_fraction
        self.steps = self.skipped = self.consecutive = 0

    def exceeded(self, nonfinite) -> bool:
        """Adds one step's `nonfinite` flag; True (and says why) once a bound is passed."""
        bad = int(jax.device_get(nonfinite))
        self.steps += 1
        self.skipped += bad
        self.consecutive = self.consecutive + 1 if bad else 0
        why = None
        if self.max_consecutive and self.consecutive >= self.max_consecutive:
            why = (
                f"{self.consecutive} steps in a row had a non-finite loss or gradient "
                f"(NonfinitePolicy.max_consecutive_skips={self.max_consecutive})"
            )
        elif (
            self.max_fraction is not None
            and self.steps >= self.MIN_STEPS
            and self.skipped > self.max_fraction * self.steps
        ):
            why = (
                f"{self.skipped} of {self.steps} steps had a non-finite loss or gradient "
                f"(NonfinitePolicy.max_skipped_fraction={self.max_fraction})"
            )
        if why and jax.process_index() == 0:
            print(
                f"stopping: {why}; lower the learning rate or resume from an earlier checkpoint",
                file=sys.stderr,
            )
        return why is not None
