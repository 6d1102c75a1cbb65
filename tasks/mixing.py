"""Mixing-rate functions for seqio mixtures, and a gin-callable mixture maker.

Each rate function takes a seqio Task and returns its relative rate, so it can
be given to `seqio.Mixture` directly, or from gin as `@examples_proportional`
with its cap bound (`examples_proportional.cap = 3000`). Example counts of P3
tasks come from `t0_train_tasks.tsv` (the dataset's train size, shared by its
templates); any other task must report `num_input_examples("train")`.

* `t0_rate`: T0's rule: the train size, or 500,000 / templates for datasets above 500,000.
* `examples_proportional`: min(examples, cap); FLAN used cap 3,000, T5 2^16 to 2^21.
* `temperature_scaled`: min(examples, cap) ** (1 / temperature).
* `equal`: 1 for every task.
"""

from __future__ import annotations

from typing import Callable, Sequence

import gin
import seqio

from mtllama_jax.tasks import p3

T0_CAP = 500_000


def num_train_examples(task: seqio.Task) -> int:
    """Train examples of a task: the T0 table for P3 tasks, else the task's own count."""
    row = _table().get(task.name)
    if row is not None:
        return row["train_size"]
    n = task.num_input_examples("train")
    if n is None:
        raise ValueError(
            f"task {task.name!r} does not report its number of train examples, so an "
            f"examples-based rate cannot be computed; give it a number or use `equal`"
        )
    return int(n)


def _table() -> dict[str, dict]:
    return {r["task"]: r for r in p3.t0_train_table()}


@gin.configurable
def t0_rate(task: seqio.Task, cap: int = T0_CAP) -> float:
    """T0's rate: examples, or cap // templates when the dataset exceeds cap."""
    n = num_train_examples(task)
    row = _table().get(task.name)
    templates = row["num_templates"] if row else 1
    return float(n if n <= cap else cap // templates)


@gin.configurable
def examples_proportional(task: seqio.Task, cap: int = 3000) -> float:
    """min(examples, cap): FLAN's rule with cap 3,000, T5's with 2^16 to 2^21."""
    return float(min(num_train_examples(task), cap))


@gin.configurable
def temperature_scaled(task: seqio.Task, temperature: float = 2.0, cap: int | None = None) -> float:
    """min(examples, cap) ** (1 / temperature); temperature 1 is examples-proportional."""
    n = num_train_examples(task)
    return float(min(n, cap) if cap else n) ** (1.0 / temperature)


@gin.configurable
def equal(task: seqio.Task) -> float:
    """The same rate for every task."""
    del task
    return 1.0


@gin.configurable
def register_mixture(
    name: str, tasks: Sequence[str], rate: Callable[[seqio.Task], float] | float = t0_rate
) -> str:
    """Register mixture `name` of `tasks` (tasks or mixtures) at `rate`; returns `name`.

    For gin: `train.mixture_or_task_name = @register_mixture()` with
    `register_mixture.tasks = [...]` and `register_mixture.rate = @equal`. A task
    that is itself a mixture contributes its tasks, each at `rate`. Rates are
    computed here (a user task's file is counted here, not at import).
    """
    if name in seqio.MixtureRegistry.names():
        return name
    flat: list[str] = []
    for t in tasks:
        provider = seqio.get_mixture_or_task(t)
        names = [s.name for s in provider.tasks] if isinstance(provider, seqio.Mixture) else [t]
        flat.extend(n for n in names if n not in flat)
    # Rates are computed now, while gin's bindings of `rate` are in force.
    rates = [rate(seqio.get_mixture_or_task(t)) if callable(rate) else rate for t in flat]
    seqio.MixtureRegistry.add(name, list(zip(flat, rates)))
    return name
