"""Training checkpoints: Orbax CheckpointManager saves, exact restore, integrity, MODEL_DIR.

The MODEL_DIR layout is `checkpoint_folder`'s (its module doc lists the files).

Saves are asynchronous, every N steps and/or every M minutes (Orbax's
save-decision policies, which agree across hosts), keeping the last K and the
newest step whose last loss was finite (Orbax preservation policies).
Orbax writes a step into a temporary folder and renames it when every process
has finished, so a step killed half-way is never listed, never restored; a
committed step then gets its manifest, checked (with a finite check of the
params) before it is restored. Restoring reads onto the *current* mesh's
shardings, so a run saved on one mesh continues on another.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime
import os
import sys
import time
from typing import Callable, Sequence

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from mtllama_jax import atomic, checkpoint_folder
from mtllama_jax.models.hf import read_config_json
from mtllama_jax.models.llama.config import LlamaConfig
from mtllama_jax.train_options import CheckpointPolicy
from mtllama_jax.train_state import TrainState

_policies = ocp.checkpoint_managers
# HF fields that do not change the architecture (a resumed run may change them).
_NON_ARCHITECTURE = ("torch_dtype", checkpoint_folder.OWN_KEY)


class TrainCheckpoints:
    """Saves and restores `TrainState`s under `<model_dir>/checkpoints`.

    Each committed step gets `manifest.json` (sha256 and size of its files),
    checked before it is restored; restored params must be finite. Rotation
    keeps the last `keep` steps and, beyond them, the newest step whose last
    loss was finite, so a run gone bad never rotates its last good state away.
    """

    def __init__(self, model_dir: str, policy: CheckpointPolicy = CheckpointPolicy()):
        policies = []
        if policy.every_steps:
            policies.append(_policies.FixedIntervalPolicy(int(policy.every_steps)))
        if policy.every_minutes:
            policies.append(_EveryMinutes(policy.every_minutes))
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=policy.async_save,
            save_decision_policy=_policies.AnySavePolicy(policies)
            if policies
            else _policies.SpecificStepsPolicy(()),
            preservation_policy=_policies.AnyPreservationPolicy(
                [_policies.LatestN(policy.keep), _NewestFinite()]
            ),
            best_fn=_step_of,  # only so that Orbax records each step's metrics
            cleanup_tmp_directories=True,
        )
        self.model_dir = os.path.abspath(model_dir)
        self.directory = checkpoint_folder.checkpoints_dir(self.model_dir)
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("params", "state", "data")
        )
        self._data_args = None
        self._unhashed: list[int] = []  # saved, manifest not yet written
        self._hasher = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="manifest")
        self._hashing: list[concurrent.futures.Future] = []

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

    def restore_latest(self, target: TrainState) -> TrainState | None:
        """The newest intact step's state (None without any step).

        A step whose files differ from its manifest, whose params are not
        finite, or which has no manifest and Orbax cannot read (truncated,
        incomplete), is moved to `<model_dir>/corrupt_checkpoints/` (named on
        stderr) and the step before it is tried; with none left, the error names
        each step and the fix.
        """
        problems = []
        for step in sorted(self.all_steps(), reverse=True):
            where = os.path.join(self.directory, str(step))
            try:
                checkpoint_folder.verify_step(self.directory, step)
                try:
                    state = self.restore(step, target)
                except Exception as e:  # Orbax and TensorStore raise many kinds
                    if os.path.exists(os.path.join(where, checkpoint_folder.STEP_MANIFEST)):
                        raise _Intact(
                            f"{where} matches its manifest but does not restore onto this "
                            f"run's train state: {checkpoint_folder.first_line(e)}"
                        ) from None
                    raise ValueError(f"unreadable ({checkpoint_folder.first_line(e)})") from None
                checkpoint_folder.check_finite(state.params, f"{where}/params")
            except _Intact:
                raise
            except ValueError as e:
                problems.append(f"step {step}: {e}")
                self._set_aside(step, e)
                continue
            return state
        if problems:
            raise ValueError(
                f"no intact checkpoint in {self.directory}:\n  "
                + "\n  ".join(problems)
                + "\nThe damaged steps were moved to corrupt_checkpoints/; start a new "
                "MODEL_DIR (with INIT_CHECKPOINT), or copy intact steps back from a backup."
            )
        return None

    def _set_aside(self, step: int, error: Exception) -> None:
        """Moves a damaged step out of Orbax's folder, so the run can save that step again."""
        aside = os.path.join(self.model_dir, checkpoint_folder.SET_ASIDE)
        if jax.process_index() == 0:
            os.makedirs(aside, exist_ok=True)
            dst = os.path.join(aside, f"{step}.{time.strftime('%Y%m%d-%H%M%S')}")
            while os.path.exists(dst):
                dst += "+"
            os.rename(os.path.join(self.directory, str(step)), dst)
            print(
                f"checkpoint step {step} is damaged ({error}); moved to {dst}, trying the "
                "step before it",
                file=sys.stderr,
            )
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"set_aside:{step}")
        self.manager.reload()

    def maybe_save(self, step: int, state: TrainState, nonfinite=None) -> bool:
        """Saves if the step or time policy says so (asynchronously).

        `nonfinite`: the last step's flag (a device scalar), read only when saving.
        """
        self._hash_committed()
        if not self.manager.should_save(step):
            return False
        return self._save(step, state, nonfinite, force=False)

    def save(self, step: int, state: TrainState, nonfinite=None) -> bool:
        """Saves now unless `step` is already saved (end of run, preemption)."""
        self._hash_committed()
        if step in self.manager.all_steps():
            return False
        return self._save(step, state, nonfinite, force=True)

    def _save(self, step, state, nonfinite, force: bool) -> bool:
        finite = 1 if nonfinite is None else 1 - int(jax.device_get(nonfinite))
        saved = self.manager.save(
            step, args=self._args(state), metrics={"finite": finite}, force=force
        )
        if saved:
            self._unhashed.append(step)
        return saved

    def _hash_committed(self) -> None:
        """Starts writing the manifest of each step committed since the last call.

        Hashing runs on a background thread (sha256 releases the GIL), so a
        large checkpoint does not hold up training.
        """
        for step in list(self._unhashed):
            folder = os.path.join(self.directory, str(step))
            if os.path.isdir(folder):  # renamed into place: committed
                if jax.process_index() == 0:
                    self._hashing.append(
                        self._hasher.submit(checkpoint_folder.write_step_manifest, folder)
                    )
                self._unhashed.remove(step)

    def wait(self):
        """Blocks until pending saves are committed and their manifests written."""
        self.manager.wait_until_finished()
        self._hash_committed()
        for future in self._hashing:
            future.result()
        self._hashing.clear()

    def close(self):
        self.wait()
        self._hasher.shutdown()
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
                f"(the same global batch size), or train on in a new MODEL_DIR"
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


class _Intact(ValueError):
    """A step whose files match its manifest, yet it does not restore (not damage)."""


def _step_of(metrics) -> float:
    return 0.0


class _NewestFinite:
    """Preserves the newest step whose last loss was finite (steps without metrics count)."""

    def should_preserve(self, checkpoints, *, context) -> list[bool]:
        keep = [False] * len(checkpoints)
        for i in reversed(range(len(checkpoints))):
            metrics = checkpoints[i].metrics
            if metrics is None or metrics.get("finite", 1):
                keep[i] = True
                break
        return keep


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
        return self.inner.should_save(step, list(previous_steps) or [self.start], context=context)


def _rest(state: TrainState) -> dict:
    return {
        "step": state.step,
        "opt_state": state.opt_state,
        "rng": state.rng,
        "skipped": state.skipped,
    }


# ---- MODEL_DIR files ---------------------------------------------------------------------


def architecture(config: LlamaConfig) -> dict:
    """The Hugging Face fields that define the model's shape and function."""
    hf = config.to_hf()
    for key in _NON_ARCHITECTURE:
        hf.pop(key, None)
    return hf


def check_model_dir(model_dir: str, config: LlamaConfig, role: str = "MODEL_DIR") -> None:
    """Refuses a MODEL_DIR (or INIT_CHECKPOINT: `role`) whose config.json is another model's."""
    path = os.path.join(model_dir, checkpoint_folder.CONFIG)
    if not os.path.exists(path):
        return
    saved = read_config_json(path)
    mine = architecture(config)
    differ = {
        k: (saved.get(k), mine.get(k))
        for k in sorted(set(saved) | set(mine))
        if k not in _NON_ARCHITECTURE and saved.get(k) != mine.get(k)
    }
    if differ:
        lines = "\n".join(
            f"  {k}: {role} has {a!r}, this run has {b!r}" for k, (a, b) in differ.items()
        )
        fix = (
            "Point MODEL_DIR at a new folder, or use the gin model file it was trained with."
            if role == "MODEL_DIR"
            else f"Use the gin model file (gin/models/) that matches {role}, or another {role}."
        )
        raise ValueError(
            f"{path} describes another model than this run's LlamaConfig:\n{lines}\n{fix}"
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
    checkpoint_folder.write_config(model_dir, config)
    for src in tokenizer_files:
        name = checkpoint_folder.TOKENIZER if src.endswith(".model") else os.path.basename(src)
        dst = os.path.join(model_dir, name)
        if os.path.abspath(src) != os.path.abspath(dst):
            atomic.copy_file(src, dst)
    if gin_config is not None:
        atomic.write_text(os.path.join(model_dir, checkpoint_folder.GIN_CONFIG), gin_config)
