"""`mtllama-demo`: the embedded default end to end — `make demo` runs `gin/runs/demo.gin`.

1. Zero-shot evaluation of the freshly initialised tiny LLaMA (the exact params
   training starts from) on the held-out synthetic templates and clusters, both
   protocols.
2. Multi-task training on `synthetic_train` through the real pipeline: seqio,
   packing, the sharded train step on the local devices, Orbax checkpoints.
3. The same evaluation of the trained params.
4. A before/after table per held-out set and protocol (with chance level) in the
   layout of the model card's two tables, the per-task tables, `loss.png` and
   `results.png`, all in the run folder.

Flags as for `mtllama-train` (`--gin_file`, `--gin.NAME=VALUE`).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
from typing import Mapping, Sequence

import gin
import jax

from mtllama_jax import (
    atomic,
    decoding,
    evaluation,
    exits,
    metrics,
    models,
    reports,
    trainer,
)
from mtllama_jax.main import launch, train_job
from mtllama_jax.main.gin_configurables import mesh, model_config_from_gin

HELD_OUT = {
    "synthetic_heldout_templates": "Unseen templates (of trained tasks)",
    "synthetic_heldout_clusters": "Unseen tasks (clusters never trained on)",
}
PROTOCOL_METRICS = [
    ("rank", "accuracy"),
    ("generate", "accuracy_original"),
    ("generate", "accuracy_strict"),
]


def initial_params(seed: int):
    """The params `training.run` starts a fresh run from (same seed, same init)."""
    model = models.build_module(model_config_from_gin())
    layout = mesh()
    step = trainer.Trainer(model, layout, train_job.optimizer(1)[0])
    return model, layout, step.init_state(jax.random.key(seed)).params


def trained_params(model_dir: str, layout):
    from mtllama_jax.checkpoint_folder import open_checkpoint

    _, params, _ = open_checkpoint(model_dir, layout)
    return params


def row_groups() -> dict[str, list[str]]:
    """Table rows -> their tasks: each held-out set, then each held-out cluster on its own."""
    from mtllama_jax.tasks import synthetic

    groups = {title: evaluation.task_names([mixture]) for mixture, title in HELD_OUT.items()}
    for cluster in synthetic.HELD_OUT_CLUSTERS:
        groups[f"- {cluster} (unseen task)"] = [
            synthetic.task_name(cluster, t) for t in range(synthetic.num_templates(cluster))
        ]
    return groups


def summary_table(runs: Mapping[str, Mapping], chance: Mapping[str, float]) -> str:
    """Mean accuracy over each row's tasks, per protocol: before vs after."""
    header = (
        "| set | chance | "
        + " | ".join(
            f"{label}: {p} {m.replace('accuracy_', '').replace('accuracy', 'acc')}"
            for label in runs
            for p, m in PROTOCOL_METRICS
        )
        + " |"
    )
    lines = [header, "|---" * (2 + len(runs) * len(PROTOCOL_METRICS)) + "|"]
    for title, names in row_groups().items():
        cells = []
        for results in runs.values():
            for protocol, metric in PROTOCOL_METRICS:
                values = [
                    results["tasks"][n][protocol][metric] for n in names if n in results["tasks"]
                ]
                cells.append(f"{statistics.fmean(values):.1f}" if values else "n/a")
        lines.append(f"| {title} | {chance[title]:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def chance_levels(split: str) -> dict[str, float]:
    """Uniform-guess accuracy (%) of each table row, from its examples' choice counts."""
    levels = {}
    for title, names in row_groups().items():
        per_example = [
            1.0 / len(ex["answer_choices"])
            for name in names
            for ex in evaluation.load_examples(name, split)
        ]
        levels[title] = 100.0 * statistics.fmean(per_example)
    return levels


def loss_curve(model_dir: str, path: str) -> None:
    """loss.png: training loss (and validation loss, when measured) against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    log = os.path.join(model_dir, "metrics.jsonl")
    train_records = metrics.read_jsonl(log, "train")
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(
        [r["step"] for r in train_records], [r["loss"] for r in train_records], label="train loss"
    )
    valid = [r for r in metrics.read_jsonl(log, "validation") if "loss" in r]
    if valid:
        ax.plot(
            [r["step"] for r in valid], [r["loss"] for r in valid], "o-", label="validation loss"
        )
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per response token)")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    reports.save_figure(fig, path)


@gin.configurable
def demo(
    run_dir: str = gin.REQUIRED,
    seed: int = 0,
    eval_batch_size: int = 64,
    max_new_tokens: int = 16,
    max_examples: int | None = None,
    split: str = "validation",
) -> str:
    """Evaluate, train (gin `train.*`), evaluate again, and report into `run_dir`.

    Args:
      run_dir: the run folder; the model lives in `run_dir/model` (its MODEL_DIR).
      seed: the seed of init and data order (also bound to `train.seed`).
      eval_batch_size: prompts per evaluation batch.
      max_new_tokens: generation budget of the `generate` protocol (the longest
        answers are sentences of about 10 pieces; MT-LLaMA's evaluation used 64).
      max_examples: at most this many examples per task (None: all).
      split: the split of the held-out tasks to evaluate.
    """
    from mtllama_jax.tasks import synthetic

    os.makedirs(run_dir, exist_ok=True)
    model_dir = os.path.join(run_dir, "model")
    options = evaluation.EvalOptions(
        split=split,
        batch_size=eval_batch_size,
        max_new_tokens=max_new_tokens,
        max_examples=max_examples,
    )
    model, layout, params = initial_params(seed)
    vocabulary = synthetic.vocabulary()
    decoder = decoding.Decoder(model, layout)
    print("== zero-shot evaluation before training", flush=True)
    before = evaluation.evaluate(
        params, model, vocabulary, list(HELD_OUT), options, decoder=decoder, progress=True
    )
    del params
    print("== multi-task training on synthetic_train", flush=True)
    reason = train_job.train(model_dir=model_dir, seed=seed)
    if reason != "done":
        print(
            f"mtllama-demo: training ended early ({reason}); rerun `make demo` to continue",
            file=sys.stderr,
        )
        raise SystemExit(exits.PREEMPTED if reason == "preempted" else exits.NONFINITE)
    print("== zero-shot evaluation after training", flush=True)
    after = evaluation.evaluate(
        trained_params(model_dir, layout),
        model,
        vocabulary,
        list(HELD_OUT),
        options,
        decoder=decoder,
        progress=True,
    )
    runs = {"before training": before, "after training": after}
    report = "\n".join(
        [
            "## Held-out zero-shot accuracy (%), mean over each set's tasks",
            "",
            summary_table(runs, chance_levels(split)),
            "",
            "rank: the choice with the highest log-likelihood (T0's protocol); generate: greedy "
            "text matched to a choice by MT-LLaMA's original matcher or strictly.",
            "",
            reports.markdown_report(runs),
        ]
    )
    atomic.write_text(os.path.join(run_dir, "results.md"), report)
    atomic.write_text(os.path.join(run_dir, "results.json"), json.dumps(runs, indent=1))
    reports.bar_chart(
        runs,
        os.path.join(run_dir, "results.png"),
        title="Synthetic held-out tasks: before vs after multi-task training",
    )
    loss_curve(model_dir, os.path.join(run_dir, "loss.png"))
    print(report)
    print(
        f"\nwrote {run_dir}/results.md, results.json, results.png, loss.png; model in {model_dir}"
    )
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = launch.job_parser("mtllama-demo", __doc__.split("\n")[0])
    args = launch.parse_job_flags(parser, sys.argv[1:] if argv is None else argv)
    import mtllama_jax.tasks  # noqa: F401  registers the tasks and their gin configurables

    def job():
        launch.parse_gin(args.gin_file, args.gin_bindings, args.search_paths)
        demo()

    return exits.run_main("mtllama-demo", job)


if __name__ == "__main__":
    sys.exit(main())
