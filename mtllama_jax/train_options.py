"""The training run's option groups: frozen dataclasses that `training.run` takes.

Entry points build them (gin binds their fields: `CheckpointPolicy.keep = 3`);
each checks its own fields and names the one at fault.
"""

from __future__ import annotations

import dataclasses

from mtllama_jax.losses import NORMALIZATIONS

NONFINITE_ACTIONS = ("skip", "stop")


@dataclasses.dataclass(frozen=True)
class LossOptions:
    """What the train step minimises.

    `normalization`: "token" (every response token counts the same) or
    "sequence" (every example counts the same); `z_loss`: weight of the
    log(Z)^2 penalty (0 turns it off).
    """

    normalization: str = "token"
    z_loss: float = 0.0

    def __post_init__(self):
        _check_choice(self, "normalization", NORMALIZATIONS)


@dataclasses.dataclass(frozen=True)
class NonfinitePolicy:
    """What a step with a NaN/Inf loss or gradient norm does.

    `action`: "skip" the step (counted) or "stop" after saving the last good
    state. Under "skip", `max_consecutive_skips` skipped steps in a row, or more
    than `max_skipped_fraction` of the run's steps (judged from its 20th step),
    stop the run as "stop" does; None turns a bound off.
    """

    action: str = "skip"
    max_consecutive_skips: int | None = 10
    max_skipped_fraction: float | None = 0.1

    def __post_init__(self):
        _check_choice(self, "action", NONFINITE_ACTIONS)
        _check_at_least(self, "max_consecutive_skips", 0)
        _check_at_least(self, "max_skipped_fraction", 0)


@dataclasses.dataclass(frozen=True)
class CheckpointPolicy:
    """When a run saves and what it keeps (`checkpoints.TrainCheckpoints`).

    `every_steps` / `every_minutes`: save triggers, either one saves (None or 0:
    off); `keep`: the last this many steps (None: all), plus the newest finite
    one; `async_save`: write in the background while training goes on.
    """

    every_steps: int | None = 1000
    every_minutes: float | None = None
    keep: int | None = 3
    async_save: bool = True

    def __post_init__(self):
        _check_at_least(self, "every_steps", 0)
        _check_at_least(self, "every_minutes", 0)
        _check_at_least(self, "keep", 1)


@dataclasses.dataclass(frozen=True)
class LoopPeriods:
    """How often the loop reports.

    Train metrics every `log_every_steps`; validation loss and the zero-shot
    hook every `eval_every_steps` (0: never).
    """

    log_every_steps: int = 10
    eval_every_steps: int = 0

    def __post_init__(self):
        _check_at_least(self, "log_every_steps", 1, optional=False)
        _check_at_least(self, "eval_every_steps", 0, optional=False)


def _check_at_least(options, field: str, low, optional: bool = True) -> None:
    """Refuses `options.field` below `low` (or None unless `optional`), naming the field."""
    value = getattr(options, field)
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < low:
        raise ValueError(f"{type(options).__name__}.{field} must be >= {low}, got {value!r}")


def _check_choice(options, field: str, choices: tuple[str, ...]) -> None:
    value = getattr(options, field)
    if value not in choices:
        raise ValueError(f"{type(options).__name__}.{field}={value!r}: choose one of {choices}")
