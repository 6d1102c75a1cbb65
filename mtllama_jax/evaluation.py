"""Zero-shot evaluation of params on seqio tasks and mixtures, under two named protocols.

* `generate` (MT-LLaMA's): greedy decoding of up to 64 new tokens, stopped at a
  newline or EOS; the text is mapped to an answer choice by the released code's
  matcher and by a strict matcher (`mtllama_jax.answer_matching`), reported side
  by side; QA sets (no choices, gold `answers`) get F1/EM under the official
  script of each set (SQuAD v1.1's; MLQA's for MLQA-en).
* `rank` (T0's): the answer choice with the highest summed log-likelihood after
  the prompt; lm-evaluation-harness' `acc_norm` (log-likelihood divided by the
  choice's length in characters) beside it.

A task's model-card set, matcher and T0 dataset are what `tasks/` recorded when
it registered the task (`mtllama_jax.task_metadata`). T0's held-out prompts are
summarised per dataset as the median over prompts, as T0 reports them. A task
whose data is missing on disk is reported as skipped with the reason (or raises
with `fail_on_missing`); prompts longer than the context are cut from the left
and counted per task.

Examples come from the tasks' features: `inputs` (token ids of the prompt),
`answer_choices`, `label` (-1: none), `answers` (QA gold spans), `example_id`.
`evaluate` is a plain function (params, model, vocabulary, task names) so the
training loop can call it; `train_hook` adapts it to the trainer's hook.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from typing import Any, Mapping, Sequence

import numpy as np

from mtllama_jax import answer_matching, decoding, partitioning, task_metadata

PROTOCOLS = ("generate", "rank")


@dataclasses.dataclass(frozen=True)
class EvalOptions:
    """How to evaluate (plain values; gin binds them in `mtllama_jax.main.eval`)."""

    protocols: tuple[str, ...] = PROTOCOLS
    split: str = "validation"
    batch_size: int = 16
    max_new_tokens: int = 64
    stop_strings: tuple[str, ...] = ("\n",)
    max_examples: int | None = None
    fail_on_missing: bool = False
    keep_predictions: bool = False

    def __post_init__(self):
        bad = [p for p in self.protocols if p not in PROTOCOLS]
        if bad or not self.protocols:
            raise ValueError(f"protocols={self.protocols!r}: choose from {PROTOCOLS}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size}: must be >= 1")


class MissingData(Exception):
    """A task's data is not on disk (the message names what is missing)."""


def task_names(names: Sequence[str]) -> list[str]:
    """Task names with mixtures expanded, in order, without repeats."""
    import seqio

    out: list[str] = []
    for name in names:
        try:
            item = seqio.get_mixture_or_task(name)
        except ValueError:
            raise ValueError(
                f"no seqio task or mixture named {name!r}; `import mtllama_jax.tasks` "
                "registers the project's (zeroshot_all, t0_eval_score, synthetic ones)"
            ) from None
        for task in getattr(item, "tasks", [item]):
            if task.name not in out:
                out.append(task.name)
    return out


def load_examples(task_name: str, split: str, max_examples: int | None = None) -> list[dict]:
    """The task's examples as plain Python values; raises MissingData when not on disk."""
    import seqio
    import tensorflow as tf

    task = seqio.get_mixture_or_task(task_name)
    try:
        ds = task.get_dataset(sequence_length=None, split=split, shuffle=False, num_epochs=1)
        if max_examples is not None:
            ds = ds.take(max_examples)
        return [_plain(ex) for ex in ds.as_numpy_iterator()]
    except (FileNotFoundError, tf.errors.NotFoundError) as e:
        raise MissingData(f"{type(e).__name__}: {e}") from None


def _plain(example: Mapping[str, Any]) -> dict:
    def value(v):
        if isinstance(v, bytes):
            return v.decode("utf-8")
        if isinstance(v, np.ndarray):
            if v.dtype.kind in "SO":
                return [x.decode("utf-8") if isinstance(x, bytes) else x for x in v.tolist()]
            return v.tolist()
        return v.item() if isinstance(v, np.generic) else v

    return {k: value(v) for k, v in example.items()}


def evaluate(
    params,
    model,
    vocabulary,
    names: Sequence[str],
    options: EvalOptions = EvalOptions(),
    *,
    decoder: decoding.Decoder | None = None,
    layout: partitioning.Layout | None = None,
    progress: bool = False,
) -> dict:
    """Evaluates every task of `names` (tasks or mixtures); returns the results dict.

    `model` is the flax language model (a `decoder` of it may be given instead
    of being built on `layout`). `vocabulary` is the tasks' seqio vocabulary
    (decodes generated ids, encodes answer choices). Result: {"tasks": {name: {...}},
    "skipped": {name: reason}, "t0_median": {dataset: {metric: median}}, "options": {...}}.
    """
    decoder = decoder or decoding.Decoder(model, layout)
    tasks, skipped = {}, {}
    for name in task_names(names):
        try:
            examples = load_examples(name, options.split, options.max_examples)
        except MissingData as e:
            if options.fail_on_missing:
                raise MissingData(f"task {name!r}: {e}") from None
            skipped[name] = str(e)
            continue
        if not examples:
            skipped[name] = f"split {options.split!r} has no examples"
            continue
        tasks[name] = evaluate_examples(
            decoder,
            params,
            vocabulary,
            examples,
            task_metadata.task_info(name),
            options,
            progress=f"{name}" if progress else None,
        )
    return {
        "tasks": tasks,
        "skipped": skipped,
        "t0_median": t0_medians(tasks),
        "options": dataclasses.asdict(options),
    }


def evaluate_examples(
    decoder: decoding.Decoder,
    params,
    vocabulary,
    examples: Sequence[Mapping[str, Any]],
    info: task_metadata.TaskInfo,
    options: EvalOptions,
    progress: str | None = None,
) -> dict:
    """Both protocols on one task's examples (plain dicts of the task's features).

    `info`: the task's recorded facts (`task_metadata.task_info`): its set picks the
    QA scoring, its matcher the released code's rule.
    """
    zero_shot_set = info.zero_shot_set
    bos = getattr(vocabulary, "bos_id", None)
    bos = decoder.config.bos_token_id if bos is None else int(bos)
    prompts = []
    for ex in examples:
        ids = list(ex["inputs"])
        prompts.append(ids if ids[:1] == [bos] else [bos] + ids)
    choices = [list(ex.get("answer_choices") or []) for ex in examples]
    labels = [int(ex.get("label", -1)) for ex in examples]
    answers = [list(ex.get("answers") or []) for ex in examples]
    has_choices = [bool(c) and 0 <= lab < len(c) for c, lab in zip(choices, labels)]
    is_qa = zero_shot_set in answer_matching.QA_SETS or (not any(has_choices) and any(answers))
    result: dict[str, Any] = {"examples": len(examples), "set": zero_shot_set}
    result["without_gold"] = (
        sum(1 for a in answers if not a) if is_qa else len(examples) - sum(has_choices)
    )
    predictions: list[dict] = [{"example_id": ex.get("example_id")} for ex in examples]

    if "generate" in options.protocols:
        outputs, truncated = _generate_all(decoder, params, vocabulary, prompts, options, progress)
        result["truncated_prompts"] = truncated
        if is_qa:
            result["qa_scoring"] = answer_matching.QA_SCORING.get(zero_shot_set, "squad")
            result["generate"] = qa_scores(outputs, answers, predictions, result["qa_scoring"])
        else:
            result["generate"] = _choice_scores(
                outputs, choices, labels, has_choices, info.matcher, predictions
            )
    if "rank" in options.protocols and not is_qa:
        result["rank"], truncated = _rank(
            decoder,
            params,
            vocabulary,
            prompts,
            choices,
            labels,
            has_choices,
            options,
            predictions,
        )
        result.setdefault("truncated_prompts", truncated)
    if options.keep_predictions:
        result["predictions"] = predictions
    return result


def _batches(items: Sequence, size: int):
    for start in range(0, len(items), size):
        yield start, items[start : start + size]


def _generate_all(decoder, params, vocabulary, prompts, options, progress):
    from tqdm import tqdm

    eos = {decoder.config.eos_token_id}
    if getattr(vocabulary, "eos_id", None) is not None:
        eos.add(int(vocabulary.eos_id))
    outputs, truncated = [], 0
    chunks = list(_batches(prompts, options.batch_size))
    for _, chunk in tqdm(chunks, desc=f"generate {progress}", disable=progress is None):
        gens = decoder.generate(
            params,
            chunk,
            max_new_tokens=options.max_new_tokens,
            stop_token_ids=sorted(eos),
            stop_strings=options.stop_strings,
            detokenize=vocabulary.decode,
        )
        outputs += [g.text for g in gens]
        truncated += sum(g.prompt_truncated for g in gens)
    return outputs, truncated


def _choice_scores(outputs, choices, labels, has_choices, matcher, predictions):
    original = strict = unmatched = 0
    for i, text in enumerate(outputs):
        predictions[i]["output"] = text
        if not has_choices[i]:
            continue
        o = answer_matching.match_original(text, choices[i], matcher)
        s = answer_matching.match_strict(text, choices[i])
        predictions[i].update(original=o.index, strict=s.index, label=labels[i])
        original += o.index == labels[i]
        strict += s.index == labels[i]
        unmatched += not o.matched
    n = max(sum(has_choices), 1)
    return {
        "accuracy_original": 100.0 * original / n,
        "accuracy_strict": 100.0 * strict / n,
        "unmatched_original": unmatched,
    }


def qa_scores(
    outputs: Sequence[str],
    answers: Sequence[Sequence[str]],
    predictions=None,
    scoring: str = "squad",
):
    """F1/EM (x100, max over gold answers) of generated outputs under an official script's rules.

    `scoring`: "squad" (the official SQuAD v1.1 script) or "mlqa" (the official
    MLQA script, lang en; see `answer_matching`). The released code's
    rule first: an output containing "None" is an empty answer. Examples without
    gold answers are left out.
    """
    from t5.evaluation import qa_utils  # SQuAD v1.1's official normalisation

    normalizers = {"squad": qa_utils.normalize_squad, "mlqa": answer_matching.normalize_mlqa_en}
    if scoring not in normalizers:
        raise ValueError(f"scoring={scoring!r}: choose from {sorted(normalizers)}")
    normalize = normalizers[scoring]

    golds, preds = [], []
    for i, text in enumerate(outputs):
        span = answer_matching.qa_prediction(text)
        if predictions is not None:
            predictions[i].update(output=text, span=span)
        if answers[i]:
            golds.append(answers[i])
            preds.append(span)
    if not golds:
        return {"f1": 0.0, "em": 0.0}
    scores = qa_utils.qa_metrics(
        [[normalize(g) for g in gold] for gold in golds], [normalize(p) for p in preds]
    )
    return {"f1": float(scores["f1"]), "em": float(scores["em"])}


def _rank(decoder, params, vocabulary, prompts, choices, labels, has_choices, options, predictions):
    pairs = [(i, j) for i in range(len(prompts)) if has_choices[i] for j in range(len(choices[i]))]
    encoded = {}
    for i, j in pairs:
        text = choices[i][j]
        if text not in encoded:
            encoded[text] = list(vocabulary.encode(text))
    loglik = np.zeros(len(pairs))
    truncated = set()
    for start, chunk in _batches(pairs, options.batch_size):
        sums, _, cut = decoder.score(
            params, [prompts[i] for i, _ in chunk], [encoded[choices[i][j]] for i, j in chunk]
        )
        loglik[start : start + len(chunk)] = sums
        truncated.update(i for (i, _), c in zip(chunk, cut) if c)
    by_example: dict[int, list[tuple[float, float]]] = {}
    for (i, j), ll in zip(pairs, loglik):
        by_example.setdefault(i, []).append((ll, ll / max(len(choices[i][j]), 1)))
    correct = correct_norm = 0
    for i, scores in by_example.items():
        pick = int(np.argmax([s for s, _ in scores]))
        pick_norm = int(np.argmax([s for _, s in scores]))
        predictions[i].update(
            rank=pick, rank_norm=pick_norm, label=labels[i], loglik=[float(s) for s, _ in scores]
        )
        correct += pick == labels[i]
        correct_norm += pick_norm == labels[i]
    n = max(len(by_example), 1)
    return {"accuracy": 100.0 * correct / n, "accuracy_norm": 100.0 * correct_norm / n}, len(
        truncated
    )


def t0_medians(tasks: Mapping[str, Mapping[str, Any]]) -> dict:
    """Median over prompts of every metric, per T0 held-out dataset (zero-shot sets excluded).

    A task's dataset is its recorded `TaskInfo.t0_dataset` (`task_metadata.task_info`).
    """
    groups: dict[str, dict[str, list[float]]] = {}
    for name, result in tasks.items():
        dataset = task_metadata.task_info(name).t0_dataset
        if dataset is None or result.get("set"):
            continue
        for protocol in PROTOCOLS:
            for metric, value in result.get(protocol, {}).items():
                if metric.startswith("accuracy") and not math.isnan(value):
                    key = f"{protocol}/{metric}"
                    groups.setdefault(dataset, {}).setdefault(key, []).append(value)
    return {
        d: {k: statistics.median(v) for k, v in metrics.items()}
        | {"prompts": max(len(v) for v in metrics.values())}
        for d, metrics in groups.items()
    }


def flat_metrics(results: Mapping[str, Any]) -> dict[str, float]:
    """{"task/protocol/metric": value} of a results dict (for metric writers)."""
    flat = {}
    for name, result in results["tasks"].items():
        for protocol in PROTOCOLS:
            for metric, value in result.get(protocol, {}).items():
                flat[f"{name}/{protocol}/{metric}"] = float(value)
    for dataset, metrics in results["t0_median"].items():
        for key, value in metrics.items():
            if key != "prompts":
                flat[f"t0_median/{dataset}/{key}"] = float(value)
    return flat


def train_hook(names: Sequence[str], vocabulary, options: EvalOptions = EvalOptions()):
    """The trainer's zero-shot hook: `hook(params, step, model, layout) -> metrics`.

    Bind it as `zero_shot_hook.evaluate` (see `mtllama_jax.main.train_job`); the compiled
    decoder is kept between calls.
    """
    decoders: dict = {}

    def hook(params, step, model, layout):
        del step
        key = (model.config, id(layout.mesh))
        if key not in decoders:
            decoders[key] = decoding.Decoder(model, layout)
        return flat_metrics(
            evaluate(params, model, vocabulary, names, options, decoder=decoders[key])
        )

    return hook
