"""Result tables in the model card's layout, and a bar chart, from evaluation results.

`markdown_report` prints the two tables of the MT-LLaMA model card (unseen
datasets; unseen tasks) with the published LLaMA-7b and MT-LLaMA-7b rows and
one row per (run, protocol) of ours, then a table of every other task (the
synthetic held-out sets, T0 prompts) and T0's per-dataset medians. Published
numbers come from the `generate` protocol with the original matcher; compare
those rows like for like. `bar_chart` draws the same figures as a PNG.
Both take several runs ({label: results}), e.g. before and after training.
"""

from __future__ import annotations

import os
from typing import Mapping

from mtllama_jax import answer_matching, atomic

# Columns of the model card's tables: (header, zero-shot set), the set a task's results
# record (`TaskInfo.zero_shot_set`, from `tasks/zeroshot.py`'s registration).
UNSEEN_DATASETS = [
    ("XQuAD-en", "xquad_en"),
    ("TyDiQA-en", "tydiqa_en"),
    ("MLQA-en", "mlqa_en"),
    ("SQuAD", "squad"),
    ("SST-2", "sst2"),
    ("OpenbookQA", "openbookqa"),
]
UNSEEN_TASKS = [
    ("COPA", "copa"),
    ("Winogrande", "winogrande"),
    ("WiC", "wic"),
    ("MNLI", "mnli"),
    ("RTE", "rte"),
]
# The model card's numbers (https://github.com/DAMO-NLP-SG/MT-LLaMA): QA sets are (F1, EM).
PUBLISHED = {
    "LLaMA-7b": {
        "xquad_en": (9.5, 2.0),
        "tydiqa_en": (14.3, 2.6),
        "mlqa_en": (13.4, 3.3),
        "squad": (29.4, 11.5),
        "sst2": 50.5,
        "openbookqa": 32.4,
        "copa": 56.0,
        "winogrande": 49.3,
        "wic": 51.7,
        "mnli": 30.2,
        "rte": 52.7,
    },
    "MT-LLaMA-7b": {
        "xquad_en": (42.3, 31.1),
        "tydiqa_en": (38.9, 26.9),
        "mlqa_en": (45.4, 31.5),
        "squad": (85.9, 77.6),
        "sst2": 92.6,
        "openbookqa": 38.2,
        "copa": 88.0,
        "winogrande": 54.9,
        "wic": 52.2,
        "mnli": 49.6,
        "rte": 79.1,
    },
}
# Our rows: (row suffix, protocol, metric of choice tasks); QA sets use generate F1/EM.
PROTOCOL_ROWS = [
    ("generate, original matcher", "generate", "accuracy_original"),
    ("generate, strict matcher", "generate", "accuracy_strict"),
    ("rank", "rank", "accuracy"),
    ("rank, length-normalised", "rank", "accuracy_norm"),
]


def _by_set(results: Mapping) -> dict[str, Mapping]:
    return {r["set"]: r for r in results["tasks"].values() if r.get("set")}


def _cell(result: Mapping | None, protocol: str, metric: str) -> str:
    if result is None or protocol not in result:
        return "–"
    scores = result[protocol]
    if "f1" in scores:
        return f"{scores['f1']:.1f} / {scores['em']:.1f}" if protocol == "generate" else "–"
    return f"{scores[metric]:.1f}" if metric in scores else "–"


def _published_cell(value) -> str:
    return f"{value[0]:.1f} / {value[1]:.1f}" if isinstance(value, tuple) else f"{value:.1f}"


def _card_table(columns, runs: Mapping[str, Mapping]) -> list[str]:
    qa = {s for _, s in columns if s in answer_matching.QA_SETS}
    heads = [f"{h} F1/EM" if s in qa else h for h, s in columns]
    lines = ["| model | " + " | ".join(heads) + " |", "|---" * (len(columns) + 1) + "|"]
    for model, values in PUBLISHED.items():
        cells = [_published_cell(values[s]) for _, s in columns]
        lines.append(f"| {model} (published) | " + " | ".join(cells) + " |")
    for label, results in runs.items():
        sets = _by_set(results)
        if not any(s in sets for _, s in columns):
            continue
        for suffix, protocol, metric in PROTOCOL_ROWS:
            cells = [_cell(sets.get(s), protocol, metric) for _, s in columns]
            lines.append(f"| {label} ({suffix}) | " + " | ".join(cells) + " |")
    return lines


def _other_tasks_table(runs: Mapping[str, Mapping]) -> list[str]:
    heads = [suffix for suffix, _, _ in PROTOCOL_ROWS]
    lines = []
    for label, results in runs.items():
        for name, result in results["tasks"].items():
            if result.get("set"):
                continue
            cells = [_cell(result, p, m) for _, p, m in PROTOCOL_ROWS]
            lines.append(f"| {label} | {name} | {result['examples']} | " + " | ".join(cells) + " |")
    if not lines:
        return []
    return [
        "| run | task | examples | " + " | ".join(heads) + " |",
        "|---" * (len(heads) + 3) + "|",
        *lines,
    ]


def _t0_table(runs: Mapping[str, Mapping]) -> list[str]:
    lines = []
    for label, results in runs.items():
        for dataset, medians in results.get("t0_median", {}).items():
            cells = [
                f"{medians[f'{p}/{m}']:.1f}" if f"{p}/{m}" in medians else "–"
                for _, p, m in PROTOCOL_ROWS
            ]
            lines.append(
                f"| {label} | {dataset} | {medians['prompts']} | " + " | ".join(cells) + " |"
            )
    if not lines:
        return []
    heads = [suffix for suffix, _, _ in PROTOCOL_ROWS]
    return [
        "| run | dataset | prompts | " + " | ".join(heads) + " |",
        "|---" * (len(heads) + 3) + "|",
        *lines,
    ]


def markdown_report(runs: Mapping[str, Mapping]) -> str:
    """The tables of several runs ({label: evaluation results}) as markdown."""
    out = []
    if any(_by_set(r) for r in runs.values()):
        out += [
            "### Unseen datasets",
            "",
            *_card_table(UNSEEN_DATASETS, runs),
            "",
            "### Unseen tasks",
            "",
            *_card_table(UNSEEN_TASKS, runs),
            "",
            "Published rows: greedy generation, 64 new tokens, stopped at a newline, "
            "scored by the released code's matcher (our `generate, original matcher` rows).",
            "",
        ]
    other = _other_tasks_table(runs)
    if other:
        out += ["### Other tasks (accuracy, %)", "", *other, ""]
    t0 = _t0_table(runs)
    if t0:
        out += ["### T0 held-out datasets (median over prompts, %)", "", *t0, ""]
    skipped = [
        (label, name, why)
        for label, r in runs.items()
        for name, why in r.get("skipped", {}).items()
    ]
    if skipped:
        out += [
            "### Skipped",
            "",
            *[f"- {label}: `{name}`: {why}" for label, name, why in skipped],
            "",
        ]
    return "\n".join(out)


def _bars(runs: Mapping[str, Mapping]) -> tuple[list[str], dict[str, list[float | None]]]:
    """Task labels and, per series, one headline value per task (None: not measured)."""
    columns = [
        (h, s)
        for h, s in UNSEEN_DATASETS + UNSEEN_TASKS
        if any(s in _by_set(r) for r in runs.values())
    ]
    names = [n for r in runs.values() for n, t in r["tasks"].items() if not t.get("set")]
    names = list(dict.fromkeys(names))
    labels = [h for h, _ in columns] + names
    series: dict[str, list[float | None]] = {}
    if columns:
        for model, values in PUBLISHED.items():
            series[f"{model} (published)"] = [
                values[s][0] if isinstance(values[s], tuple) else values[s] for _, s in columns
            ] + [None] * len(names)
    for label, results in runs.items():
        sets = _by_set(results)
        for suffix, protocol, metric in (PROTOCOL_ROWS[0], PROTOCOL_ROWS[2]):
            values = []
            for result in [sets.get(s) for _, s in columns] + [
                results["tasks"].get(n) for n in names
            ]:
                scores = (result or {}).get(protocol, {})
                values.append(scores.get("f1", scores.get(metric)))
            if any(v is not None for v in values):
                series[f"{label} ({suffix})"] = values
    return labels, series


def bar_chart(runs: Mapping[str, Mapping], path: str, title: str = "Zero-shot results") -> None:
    """A grouped bar chart (PNG) of the headline metric per task and series (atomic write)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, series = _bars(runs)
    if not labels:
        raise ValueError("no evaluated task in the results: nothing to chart")
    width = 0.8 / max(len(series), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(labels) * max(1, len(series))) + 3, 4.5))
    for k, (name, values) in enumerate(series.items()):
        xs = [i + k * width for i, v in enumerate(values) if v is not None]
        ax.bar(xs, [v for v in values if v is not None], width, label=name)
    ax.set_xticks([i + width * (len(series) - 1) / 2 for i in range(len(labels))])
    ax.set_xticklabels(labels, rotation=30, ha="right")
    ax.set_ylabel("accuracy or F1 (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    save_figure(fig, path)


def save_figure(fig, path: str) -> None:
    """Saves a matplotlib figure as PNG atomically (`mtllama_jax.atomic`) and closes it."""
    import matplotlib.pyplot as plt

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        with atomic.replacing(path) as tmp:
            fig.savefig(tmp, dpi=120, format="png")
    finally:
        plt.close(fig)
