"""`mtllama-taskemb`: task embeddings of seqio tasks with a checkpoint, and their three uses.

    mtllama-taskemb --gin_file=mesh/single.gin --gin_file=runs/taskemb.gin \\
        --gin.CHECKPOINT="'runs/demo/model'" --gin.TASKEMB_DIR="'/tmp/taskemb'" \\
        --gin.taskemb.mode="'similarity'"

Modes (`taskemb.mode`), each writing `report.md` and `report.json`:

* `similarity`: embeddings of every task of `mixture_or_task_names` by each of
  `methods` (`embeddings_<method>.npz` keyed by task, `similarity_<method>.tsv`,
  `similarity_<method>.png` ordered by cluster); each task's nearest tasks; the
  adjusted Rand index of the embedding clusters against the true ones (the
  synthetic world's, or `tasks/t0_train_tasks.tsv`'s `task_cluster`).
* `prompts`: for each cluster among the tasks (one task per template), the
  template whose model embedding (the answers of `model_checkpoint`, default
  the surrogate) lies nearest its data embedding, against the mean, a random
  and the best template by accuracy on `eval_split`.
* `mixture`: the `k` tasks of `candidates` nearest `target`, and `k` at random.

Flags as for `mtllama-eval` (`--gin_file`, `--gin.NAME=VALUE`, `--gin_search_paths`).
Every output is written under a temporary name and renamed.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Sequence

import gin
import jax
import numpy as np

from mtllama_jax import (
    atomic,
    checkpoint_folder,
    decoding,
    evaluation,
    models,
    partitioning,
    taskemb,
    taskemb_analysis,
)
from mtllama_jax.main import launch
from mtllama_jax.main.gin_configurables import mesh

MODES = ("similarity", "prompts", "mixture")


def open_surrogate(folder: str, layout: partitioning.Layout, step: int | None = None):
    """(model, params on the layout's mesh, tokenizer.model path or None) of a checkpoint folder."""
    model = models.build_module(checkpoint_folder.load_config(folder))
    params = checkpoint_folder.load_params(
        folder, layout.param_shardings(partitioning.abstract_params(model)), step=step
    )
    tokenizer = os.path.join(folder, checkpoint_folder.TOKENIZER)
    return model, params, tokenizer if os.path.exists(tokenizer) else None


@gin.configurable("taskemb")
def job(
    checkpoint: str = gin.REQUIRED,
    mixture_or_task_names: Sequence[str] = gin.REQUIRED,
    output_dir: str = gin.REQUIRED,
    mode: str = "similarity",
    methods: Sequence[str] = ("data", "baseline"),
    model_checkpoint: str | None = None,
    target: str | None = None,
    candidates: Sequence[str] = (),
    k: int = 3,
    num_examples: int = 64,
    split: str = "train",
    seed: int = 0,
    subset: str = "norms",
    batch_size: int = 16,
    max_length: int | None = None,
    max_new_tokens: int = 32,
    eval_split: str = "validation",
    eval_examples: int | None = None,
    nearest_k: int = 3,
    step: int | None = None,
) -> dict:
    """The task-embedding job (gin/runs/taskemb.gin). Returns the report dict.

    Args:
      checkpoint: the surrogate checkpoint folder (config.json, tokenizer.model, params).
      mixture_or_task_names: the tasks to embed (mixtures expand to their tasks).
      output_dir: where the embeddings, matrices, heatmaps and reports go.
      mode: similarity, prompts or mixture (see the module doc).
      methods: embeddings of `similarity`: data (Fisher), baseline (hidden state), model.
      model_checkpoint: the model whose greedy answers make model embeddings
        (None: the surrogate itself).
      target: the target task of `mixture`.
      candidates: the tasks `mixture` picks from (mixtures expand).
      k: tasks `mixture` picks.
      num_examples: N, examples per task averaged (fewer when the split has fewer: noted).
      split: the split embedded.
      seed: the shuffle of the examples and the random baselines.
      subset: the Fisher's parameters, a name of `taskemb.PARAM_SUBSETS`.
      batch_size: examples per device batch (rounded up to the mesh's batch shards).
      max_length: longest example in tokens (None: the model's context); longer ones
        lose the start of their prompt.
      max_new_tokens: answer budget of the model embeddings.
      eval_split / eval_examples: what `prompts` measures each template's accuracy on.
      nearest_k: nearest tasks listed per task in `similarity`.
      step: the training step of a MODEL_DIR checkpoint (None: the latest).
    """
    if mode not in MODES:
        raise ValueError(f"taskemb.mode={mode!r}: choose one of {MODES}")
    os.makedirs(output_dir, exist_ok=True)
    layout = mesh()
    surrogate, params, tokenizer = open_surrogate(checkpoint, layout, step)
    _point_tasks_at(tokenizer)
    tasks = evaluation.task_names(mixture_or_task_names)
    if mode == "mixture":
        if not target:
            raise ValueError("taskemb.mode='mixture' needs taskemb.target, the target task")
        pool = [
            t for t in evaluation.task_names(candidates or mixture_or_task_names) if t != target
        ]
        tasks = [target] + pool
        methods = ("data",)
    for task in tasks:
        taskemb.check_vocabulary(surrogate.config, tokenizer, task)
    embedder = taskemb.Embedder(
        surrogate, layout, subset=subset, batch_size=batch_size, max_length=max_length
    )
    model = None
    if mode == "prompts" or "model" in methods:
        model = _model(
            model_checkpoint, layout, surrogate, params, tasks[0], max_new_tokens, batch_size
        )
    if mode == "prompts":
        methods = ("data", "model")
    print(
        f"mtllama-taskemb: {mode}: {len(tasks)} tasks, {num_examples} examples each, "
        f"Fisher over {subset} ({', '.join(embedder.paths)})",
        flush=True,
    )
    embeddings = taskemb.embed_tasks(
        embedder,
        params,
        tasks,
        methods=methods,
        split=split,
        num_examples=num_examples,
        seed=seed,
        answer=model.answer if model else None,
    )
    report = {
        "mode": mode,
        "checkpoint": os.path.abspath(checkpoint),
        "subset": subset,
        "parameters": list(embedder.paths),
        "num_examples": num_examples,
        "split": split,
        "seed": seed,
        "notes": sorted(
            {n for by_task in embeddings.values() for e in by_task.values() for n in e.notes}
        ),
    }
    primary = jax.process_index() == 0
    if primary:
        for method, by_task in embeddings.items():
            taskemb_analysis.write_npz(
                os.path.join(output_dir, f"embeddings_{method}.npz"),
                {t: e.vector for t, e in by_task.items()},
            )
    if mode == "similarity":
        report["methods"] = similarity(output_dir, embeddings, nearest_k, write=primary)
    elif mode == "prompts":
        accuracy = model.accuracy(tasks, eval_split, eval_examples)
        report["prompts"] = taskemb_analysis.prompt_selection(embeddings, accuracy, seed)
    else:
        vectors = {t: e.vector for t, e in embeddings["data"].items()}
        report |= {"target": target, "k": k} | taskemb_analysis.select_mixture(
            target, vectors, pool, k, seed
        )
        report["distances"] = {
            t: taskemb_analysis.distance(vectors[target], vectors[t]) for t in pool
        }
    if primary:
        atomic.write_text(
            os.path.join(output_dir, "report.json"), json.dumps(report, indent=1) + "\n"
        )
        atomic.write_text(os.path.join(output_dir, "report.md"), taskemb_analysis.markdown(report))
    return report


def _point_tasks_at(tokenizer: str | None) -> None:
    """Registered LLaMA tasks read the checkpoint's tokenizer (gin's tokenizer_settings wins)."""
    from mtllama_jax import vocab

    if tokenizer:
        vocab.configured_vocabulary().use_checkpoint_tokenizer(tokenizer)


def _model(folder, layout, surrogate, params, task, max_new_tokens, batch_size):
    """The model whose answers are embedded: `folder`'s, or the surrogate when None."""
    import seqio

    module = surrogate
    if folder is not None:
        module, params, _ = open_surrogate(folder, layout)
    vocabulary = seqio.get_mixture_or_task(task).output_features["targets"].vocabulary
    return taskemb.AnswerModel(
        decoding.Decoder(module, layout),
        params,
        vocabulary,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
    )


def similarity(output_dir: str, embeddings, nearest_k: int, write: bool = True) -> dict:
    """Per method: similarity matrix (.tsv) and heatmap (.png), nearest tasks, ARI."""
    out = {}
    for method, by_task in embeddings.items():
        names, sim = taskemb_analysis.cosine_similarity({t: e.vector for t, e in by_task.items()})
        clusters = taskemb_analysis.true_clusters(names)
        result = {"nearest": taskemb_analysis.nearest(names, sim, nearest_k)}
        known = [n for n in names if n in clusters]
        if len(set(clusters.values())) >= 2:
            idx = [names.index(n) for n in known]
            labels = taskemb_analysis.cluster(sim[np.ix_(idx, idx)], len(set(clusters.values())))
            result["ari"] = taskemb_analysis.adjusted_rand([clusters[n] for n in known], labels)
            result["clustered_tasks"] = len(known)
        if write:
            atomic.write_text(
                os.path.join(output_dir, f"similarity_{method}.tsv"),
                taskemb_analysis.similarity_tsv(names, sim),
            )
            taskemb_analysis.heatmap(
                names,
                sim,
                clusters,
                os.path.join(output_dir, f"similarity_{method}.png"),
                title=f"{method} embedding: cosine similarity",
            )
        out[method] = result
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = launch.job_parser("mtllama-taskemb", __doc__.split("\n")[0])
    args = launch.parse_job_flags(parser, sys.argv[1:] if argv is None else argv)
    import mtllama_jax.tasks  # noqa: F401  registers the tasks and their gin configurables

    try:
        launch.parse_gin(args.gin_file, args.gin_bindings, args.search_paths)
        report = job()
    except (ValueError, FileNotFoundError) as e:
        print(f"mtllama-taskemb: error: {e}", file=sys.stderr)
        return 2
    print(taskemb_analysis.markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
