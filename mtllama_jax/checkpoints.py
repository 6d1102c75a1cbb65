"""Training checkpoints: Orbax CheckpointManager saves, exact restore, preemption, MODEL_DIR.

A MODEL_DIR holds:

    config.json               the model (Hugging Face fields), checked on every start
    tokenizer.model ...       the tokenizer files the run was given (copied)
    config.gin                the operative gin config of the latest start
    checkpoints/<step>/params the params pytree (Orbax), restorable on its own
    checkpoints/<step>/state  step, optimizer state, PRNG key, skipped-step count
    checkpoints/<step>/data   the data iterator's position, one file per process (when
                              the data source has one: the tokenized cache's pipeline)

Saves are asynchronous, every N steps and/or every M minutes (Orbax's
save-decision policies, which agree across hosts), keeping the last K.
Orbax writes a step into a temporary folder and renames it when every process
has finished, so a step killed half-way is never listed, never restored.
Restoring reads onto the *current* mesh's shardings, so a run saved on one mesh
continues on another.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import shutil
import signal
from typing import Callable, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from mtllama_jax import atomic
from mtllama_jax.config import LlamaConfig
from mtllama_jax.train_state import TrainState

TOKENIZER_MODEL = "tokenizer.model"
_policies = ocp.checkpoint_managers
# HF fields that do not change the architecture (a resumed run may change them).
_NON_ARCHITECTURE = ("torch_dtype", "mtllama_jax")


class TrainCheckpoints:
    """Saves and restores `TrainState`s under `<model_dir>/checkpoints`."""

    def __init__(
        self,
        model_dir: str,
        *,
        every_steps: int | None = 1000,
        every_minutes: float | None = None,
        keep: int | None = 3,
        async_save: bool = True,
    ):
        policies = []
        if every_steps:
            policies.append(_policies.FixedIntervalPolicy(int(every_steps)))
        if every_minutes:
            policies.append(_EveryMinutes(every_minutes))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            save_decision_policy=_policies.AnySavePolicy(policies) if policies else
            _policies.SpecificStepsPolicy(()),
            cleanup_tmp_directories=True,
        )
        self.directory = os.path.join(os.path.abspath(model_dir), "checkpoints")
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("params", "state", "data")
        )
        self._data_args = None

    def latest_step(self) -> int | None:
        """The newest fully written step, or None."""
        return self.manager.latest_step()

    def all_steps(self) -> Sequence[int]:
        return self.manager.all_steps()

    def restore(self, step: int, target: TrainState) -> TrainState:
        """The state saved at `step`, placed on `target`'s shardings (ShapeDtypeStructs)."""
        rest = _rest(target)
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardRestore(target.params),
                state=ocp.args.StandardRestore(rest),
            ),
        )
        return TrainState(params=restored.params, **restored.state)

    def maybe_save(self, step: int, state: TrainState) -> bool:
        """Saves if the step or time policy says so (asynchronously)."""
        return self.manager.save(step, args=self._args(state))

    def save(self, step: int, state: TrainState) -> bool:
        """Saves now unless `step` is already saved (end of run, preemption)."""
        if step in self.manager.all_steps():
            return False
        return self.manager.save(step, args=self._args(state), force=True)

    def wait(self):
        """Blocks until pending asynchronous saves are committed."""
        self.manager.wait_until_finished()

    def close(self):
        self.manager.close()

    def attach_data(self, save_args: Callable[[], ocp.args.CheckpointArgs]) -> None:
        """Saves `save_args()` (the data iterator's state, as Orbax args) with every step."""
        self._data_args = save_args

    def restore_data(self, step: int, restore_args: ocp.args.CheckpointArgs) -> bool:
        """Restores item `data` of `step`; False when the step has none (written before).

        A step saved by another number of processes is refused with the reason.
        """
        folder = os.path.join(self.directory, str(step), "data")
        if not os.path.isdir(folder):
            return False
        saved = sorted(f for f in os.listdir(folder) if f.startswith("process_"))
        mine = f"-of-{jax.process_count()}.json"
        if saved and not all(f.endswith(mine) for f in saved):
            raise ValueError(
                f"{folder} holds the data position of {saved[0].split('-of-')[-1][:-5]} "
                f"processes; this run has {jax.process_count()}, and each process's rows "
                f"depend on the count. Resume with {saved[0].split('-of-')[-1][:-5]} processes "
                f"(the same train.batch_size), or train on in a new MODEL_DIR"
            )
        self.manager.restore(step, args=ocp.args.Composite(data=restore_args))
        return True

    def _args(self, state: TrainState):
        data = {} if self._data_args is None else {"data": self._data_args()}
        return ocp.args.Composite(
            params=ocp.args.StandardSave(state.params),
            state=ocp.args.StandardSave(_rest(state)),
            **data,
        )


@dataclasses.dataclass
class _StartTime:
    step: int
    time: datetime.datetime
    metrics: dict | None = None


class _EveryMinutes:
    """Saves when `minutes` have passed since the last save or, before any, since start.

    Orbax's continuous policy alone would save at the first step of every run; the
    primary host decides and broadcasts, so all hosts agree.
    """

    def __init__(self, minutes: float):
        self.inner = _policies.ContinuousCheckpointingPolicy(
            minimum_interval_secs=max(1, int(minutes * 60))
        )
        self.start = _StartTime(-1, datetime.datetime.now(tz=datetime.timezone.utc))

    def should_save(self, step, previous_steps, *, context) -> bool:
        return self.inner.should_save(step, list(previous_steps) or [self.start],
                                      context=context)


def _rest(state: TrainState) -> dict:
    return {"step": state.step, "opt_state": state.opt_state, "rng": state.rng,
            "skipped": state.skipped}


def restore_params(model_dir: str, step: int, target):
    """Only the params of a training checkpoint, onto `target`'s shardings."""
    manager = ocp.CheckpointManager(
        os.path.join(os.path.abspath(model_dir), "checkpoints"),
        options=ocp.CheckpointManagerOptions(read_only=True),
        item_names=("params", "state"),
    )
    try:
        restored = manager.restore(
            step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target))
        )
        return restored.params
    finally:
        manager.close()


# ---- MODEL_DIR files ---------------------------------------------------------------------


def architecture(config: LlamaConfig) -> dict:
    """The Hugging Face fields that define the model's shape and function."""
    hf = config.to_hf()
    for key in _NON_ARCHITECTURE:
        hf.pop(key, None)
    return hf


def check_model_dir(model_dir: str, config: LlamaConfig) -> None:
    """Refuses a MODEL_DIR whose config.json describes another model (shows both)."""
    path = os.path.join(model_dir, "config.json")
    if not os.path.exists(path):
        return
    with open(path) as f:
        saved = json.load(f)
    mine = architecture(config)
    differ = {
        k: (saved.get(k), mine.get(k))
        for k in sorted(set(saved) | set(mine))
        if k not in _NON_ARCHITECTURE and saved.get(k) != mine.get(k)
    }
    if differ:
        lines = "\n".join(f"  {k}: MODEL_DIR has {a!r}, this run has {b!r}" for k, (a, b) in
                          differ.items())
        raise ValueError(
            f"{path} describes another model than this run's LlamaConfig:\n{lines}\n"
            "Point MODEL_DIR at a new folder, or use the gin model file it was trained with."
        )


def write_model_dir_files(
    model_dir: str,
    config: LlamaConfig,
    tokenizer_files: Sequence[str] = (),
    gin_config: str | None = None,
) -> None:
    """Writes config.json, the tokenizer files and config.gin (process 0 only; atomic).

    A SentencePiece model (`*.model`) is written as `tokenizer.model`, the name
    every tool that opens a MODEL_DIR (eval, chat, convert) looks for.
    """
    if jax.process_index() != 0:
        return
    os.makedirs(model_dir, exist_ok=True)
    hf = dict(config.to_hf(), mtllama_jax={
        k: v for k, v in dataclasses.asdict(config).items()
        if k in ("dtype", "param_dtype", "attention", "remat")
    })
    atomic.write_text(os.path.join(model_dir, "config.json"), json.dumps(hf, indent=2) + "\n")
    for src in tokenizer_files:
        name = TOKENIZER_MODEL if src.endswith(".model") else os.path.basename(src)
        dst = os.path.join(model_dir, name)
        if os.path.abspath(src) != os.path.abspath(dst):
            atomic.copy_file(src, dst)
    if gin_config is not None:
        atomic.write_text(os.path.join(model_dir, "config.gin"), gin_config)


# ---- preemption --------------------------------------------------------------------------


class PreemptionWatch:
    """Turns SIGTERM/SIGINT into a request to save and exit, agreed by every process.

    `requested()` is True on every process once any process got a signal (a
    tiny all-gather when there are several processes), so all of them save the
    same step. Use as a context manager to restore the previous handlers.
    """

    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
        self.signals = signals
        self._flag = False
        self._previous = {}

    def __enter__(self):
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        self._flag = True

    def requested(self) -> bool:
        if jax.process_count() == 1:
            return self._flag
        flags = multihost_utils.process_allgather(np.int32(self._flag))
        return bool(np.any(flags))
