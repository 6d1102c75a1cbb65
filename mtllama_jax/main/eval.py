"""`mtllama-eval`: zero-shot evaluation of a checkpoint, gin-configured (T5X-style flags).

    mtllama-eval --gin_file=mesh/single.gin --gin_file=runs/eval.gin \\
        --gin.CHECKPOINT="'/ckpt/mt-llama-7b'" --gin.EVAL_OUTPUT_DIR="'/tmp/eval'"

Flags: `--gin_file` (repeatable; looked up in `--gin_search_paths`, then the
package's `gin/`), `--gin.NAME=VALUE` (repeatable). Gin binds
`evaluate_checkpoint` (what to evaluate and how) and `mesh` (as for training).
Writes `results.json`, `results.md` (model-card tables) and `results.png` to the
output folder and prints the tables.

A checkpoint is a folder with `config.json` and `tokenizer.model`: a training
MODEL_DIR (its latest step, or `step`) or a converted folder (`mtllama-convert
hf-to-jax`). The registered tasks are tokenised with that `tokenizer.model`.
The training loop's hook (`gin_configurables.zero_shot_evaluator`) runs the same
evaluation.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Sequence

import gin
import jax

from mtllama_jax import atomic, evaluation, exits, reports
from mtllama_jax.checkpoint_folder import open_checkpoint
from mtllama_jax.main import launch
from mtllama_jax.models.llama.config import COMPUTE_DTYPES


def checkpoint_vocabulary(tokenizer_path: str):
    """The registered tasks' vocabulary, pointed at the checkpoint's tokenizer.model."""
    from mtllama_jax import vocab

    return vocab.configured_vocabulary().use_checkpoint_tokenizer(tokenizer_path)


@gin.configurable
def evaluate_checkpoint(
    checkpoint: str = gin.REQUIRED,
    mixture_or_task_names: Sequence[str] = gin.REQUIRED,
    output_dir: str = gin.REQUIRED,
    step: int | None = None,
    label: str | None = None,
    protocols: Sequence[str] = evaluation.PROTOCOLS,
    split: str = "validation",
    batch_size: int = 16,
    max_new_tokens: int = 64,
    max_examples: int | None = None,
    fail_on_missing: bool = False,
    keep_predictions: bool = True,
    dtype: str | None = None,
):
    """The evaluation job (gin/runs/eval.gin). Returns the results dict.

    Args:
      checkpoint: a folder with config.json and tokenizer.model (see the module doc).
      mixture_or_task_names: seqio tasks or mixtures (zeroshot_all, t0_eval_score, ...).
      output_dir: where results.json, results.md and results.png go.
      step: the training step of a MODEL_DIR to evaluate (None: the latest).
      label: the row label in the tables (default: the checkpoint folder's name).
      protocols: any of "generate" (greedy, matched) and "rank" (log-likelihood).
      split: the tasks' split to evaluate.
      batch_size: prompts (generate) or prompt-choice pairs (rank) per device batch.
      max_new_tokens: generation budget; MT-LLaMA's evaluation used 64.
      max_examples: at most this many examples per task (None: all).
      fail_on_missing: a task whose data is not on disk is an error instead of skipped.
      keep_predictions: store each example's output, picks and log-likelihoods.
      dtype: compute dtype, float32, bfloat16 or float16 (None: the checkpoint's
        config.json); results.json records the one used.
    """
    from mtllama_jax import checkpoint_folder
    from mtllama_jax.main.gin_configurables import check_argument_types, mesh

    check_argument_types("evaluate_checkpoint", evaluate_checkpoint, locals())
    if jax.process_index() == 0:  # before the evaluation, not after it
        checkpoint_folder.check_writable(os.path.join(output_dir, "results.json"), overwrite=True)
    layout = mesh()
    if dtype is not None and dtype not in COMPUTE_DTYPES:
        raise ValueError(f"evaluate_checkpoint.dtype={dtype!r}: choose one of {COMPUTE_DTYPES}")
    model, params, tokenizer = open_checkpoint(checkpoint, layout, step, dtype)
    options = evaluation.EvalOptions(
        protocols=tuple(protocols),
        split=split,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        max_examples=max_examples,
        fail_on_missing=fail_on_missing,
        keep_predictions=keep_predictions,
    )
    results = evaluation.evaluate(
        params,
        model,
        checkpoint_vocabulary(tokenizer),
        mixture_or_task_names,
        options,
        layout=layout,
        progress=True,
    )
    results["checkpoint"] = os.path.abspath(checkpoint)
    results["dtype"] = model.config.dtype
    results["label"] = label or os.path.basename(os.path.normpath(checkpoint))
    if jax.process_index() == 0:
        write_outputs(results, output_dir, results["label"])
    return results


def write_outputs(results: dict, output_dir: str, label: str) -> str:
    """results.json, results.md and results.png (each written atomically); returns the tables."""
    os.makedirs(output_dir, exist_ok=True)
    table = reports.markdown_report({label: results})
    atomic.write_text(os.path.join(output_dir, "results.json"), json.dumps(results, indent=1))
    atomic.write_text(os.path.join(output_dir, "results.md"), table)
    if results["tasks"]:
        reports.bar_chart({label: results}, os.path.join(output_dir, "results.png"))
    return table


def main(argv: Sequence[str] | None = None) -> int:
    parser = launch.job_parser("mtllama-eval", __doc__.split("\n")[0])
    args = launch.parse_job_flags(parser, sys.argv[1:] if argv is None else argv)
    import mtllama_jax.tasks  # noqa: F401  registers the tasks and their gin configurables

    def job():
        launch.parse_gin(args.gin_file, args.gin_bindings, args.search_paths)
        try:
            results = evaluate_checkpoint()
        except evaluation.MissingData as e:  # fail_on_missing
            raise ValueError(str(e)) from None
        print(reports.markdown_report({results["label"]: results}))
        if results["skipped"] and not results["tasks"]:
            print(
                f"mtllama-eval: every set was skipped (no data found): "
                f"{sorted(results['skipped'])}; see the reasons in results.json",
                file=sys.stderr,
            )
            return exits.ALL_SKIPPED
        return exits.OK

    return exits.run_main("mtllama-eval", job)


if __name__ == "__main__":
    sys.exit(main())
