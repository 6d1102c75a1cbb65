"""What evaluation knows about a task, recorded by `tasks/` where it registers the task.

`tasks/zeroshot.py` records each `zeroshot_<set>` task's model-card set and
matcher, `tasks/t0_eval.py` each held-out prompt's T0 dataset (from
`tasks/t0_eval_tasks.tsv`); evaluation reads them with `task_info` instead of
parsing task names. A task recorded by no one (a user's own seqio task, the
synthetic and P3 tasks) is a plain task, `TaskInfo()`: no model-card set, no
T0 dataset, its own answer choices as the matcher's keywords.

It lives in the library, not in `tasks/`, because importing any module of
`mtllama_jax.tasks` registers every task (TensorFlow, seqio); this one imports
neither, so evaluation and reports stay importable without them.
"""

from __future__ import annotations

import dataclasses

from mtllama_jax import answer_matching


@dataclasses.dataclass(frozen=True)
class TaskInfo:
    """A task's evaluation facts; the defaults are a plain task's.

    zero_shot_set: the model card's set it evaluates (a column of the report).
    t0_dataset: the T0 held-out dataset whose median over prompts it belongs to.
    matcher: `answer_matching.match_original`'s rule (`answer_matching.MATCHERS`);
      None: the example's own choices as keywords.
    """

    zero_shot_set: str | None = None
    t0_dataset: str | None = None
    matcher: str | None = None

    def __post_init__(self):
        if self.matcher is not None and self.matcher not in answer_matching.MATCHERS:
            raise ValueError(
                f"TaskInfo.matcher={self.matcher!r}: choose from {answer_matching.MATCHERS} "
                "or None (the choices as keywords)"
            )


_RECORDED: dict[str, TaskInfo] = {}


def record(task_name: str, info: TaskInfo) -> None:
    """Records `info` for `task_name` (again with the same info: no-op; different: ValueError)."""
    known = _RECORDED.setdefault(task_name, info)
    if known != info:
        raise ValueError(f"task {task_name!r}: already recorded as {known}, not {info}")


def task_info(task_name: str) -> TaskInfo:
    """The recorded facts of `task_name`; `TaskInfo()` (a plain task) when none were recorded."""
    return _RECORDED.get(task_name, TaskInfo())
