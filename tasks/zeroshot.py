"""The model card's zero-shot sets as seqio tasks: `zeroshot_<set>` and `zeroshot_all`.

Each set is read from a local copy in its public format under one folder (gin
`eval_data_dir.path`, else $MTLLAMA_EVAL_DIR); `SETS` says which file, where
to get it and how to read it (also listed in `tasks/EVAL_DATA.md`). A missing
file raises FileNotFoundError naming the set, the file and its source, so
`mtllama-eval` reports the set as skipped and runs the others.

Prompts are `../shared/reference/prompts.md`'s: the released evaluation code's
strings by default (they produced the published numbers), the model card's by
`zeroshot_prompt_style.style = 'card'`. They differ in three places: the code
sends the QA and SST-2 prompts without the chat wrapper (the card wraps every
prompt in `mtllama`), OpenbookQA names the stem `question_stem`, and COPA's
code string puts `. - ` after choice 1. The released code also cut QA inputs to
1,024 tokens; here prompts longer than the model's context are cut from the
left by the evaluation instead (and counted).

Examples carry what `mtllama_jax.evaluation` reads: `inputs` (the prompt),
`targets` (the gold answer), `answers` (QA gold spans), `answer_choices` and
`label` (-1 when the example has no gold label), `example_id`. Choice order
follows `mtllama_jax.answer_matching`'s keyword tables (e.g. SST-2 No/Yes,
MNLI Yes/Maybe/No). Examples without gold answers or choices are kept, counted
and logged; the evaluation reports them.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from typing import Callable, Iterator

import gin
import seqio
import tensorflow as tf

from mtllama_jax import formats, vocab
from mtllama_jax.tasks import eval_readers

EVAL_DIR_ENV = "MTLLAMA_EVAL_DIR"
STYLES = ("code", "card")


@gin.configurable
def eval_data_dir(path: str | None = None) -> str:
    """Folder of the zero-shot sets: gin `eval_data_dir.path`, else $MTLLAMA_EVAL_DIR."""
    path = path or os.environ.get(EVAL_DIR_ENV)
    if not path:
        raise FileNotFoundError(
            f"no evaluation folder configured: set {EVAL_DIR_ENV}=/path/to/eval_data (the "
            "folder holding squad/, glue/, superglue/, ... as listed in tasks/EVAL_DATA.md) or "
            "bind eval_data_dir.path in gin")
    return path


@gin.configurable
def zeroshot_prompt_style(style: str = "code") -> str:
    """`code` (the released evaluation's strings, default) or `card` (the model card's)."""
    if style not in STYLES:
        raise ValueError(f"zeroshot_prompt_style.style={style!r}: choose from {STYLES}")
    return style


@dataclasses.dataclass(frozen=True)
class ZeroShotSet:
    """One set: its files per split (relative to the folder), source, reader and prompt."""

    files: dict[str, str]
    source: str
    read: Callable[[str], Iterator[dict]]
    prompt: Callable[[dict, str], str]  # (record, style) -> instruction
    choices: Callable[[dict], tuple[list[str], int]]  # record -> (choices, label)
    wrapped_in_code: bool = True  # the released code wrapped it in `mtllama`


def _qa_prompt(r, style):
    context = " ".join(r["context"].split())
    return (f"Answer the question according to the context. Question: {r['question']}. "
            f"Context: {context}. Answer:")


def _no_choices(r):
    return [], -1


def _label(value, table: dict[str, int]) -> int:
    """The choice index a gold label names (-1: missing or unknown, counted as ungraded)."""
    return table.get(str(value).strip().lower(), -1) if value is not None else -1


def _fixed(choices, field: str, table: dict[str, int]):
    return lambda r: (list(choices), _label(r.get(field), table))


def _copa_prompt(r, style):
    lead = "This happened because..." if r["question"] == "cause" else "As a consequence..."
    sep = ". - " if style == "code" else " - "
    return (f"{r['premise']} {lead} Help me pick the more plausible option: - {r['choice1']}"
            f"{sep}{r['choice2']}")


def _obqa_prompt(r, style):
    options = " ".join(f"- ({letter}) {c}" for letter, c in zip("ABCD", r["choices"]))
    return f"{r['stem']} Which is the correct answer? {options}"


SQUAD_URL = "https://rajpurkar.github.io/SQuAD-explorer/dataset/dev-v1.1.json"
SETS: dict[str, ZeroShotSet] = {
    "squad": ZeroShotSet(
        {"validation": "squad/dev-v1.1.json"}, SQUAD_URL,
        eval_readers.squad_json, _qa_prompt, _no_choices, wrapped_in_code=False),
    "xquad_en": ZeroShotSet(
        {"validation": "xquad/xquad.en.json"},
        "https://github.com/deepmind/xquad (xquad.en.json)",
        eval_readers.squad_json, _qa_prompt, _no_choices, wrapped_in_code=False),
    "tydiqa_en": ZeroShotSet(
        {"validation": "tydiqa/tydiqa-goldp-v1.1-dev.json"},
        "https://storage.googleapis.com/tydiqa/v1.1/tydiqa-goldp-v1.1-dev.json (English ids kept)",
        functools.partial(eval_readers.squad_json, id_prefix="english"),
        _qa_prompt, _no_choices, wrapped_in_code=False),
    "mlqa_en": ZeroShotSet(
        {"validation": "mlqa/dev-context-en-question-en.json",
         "test": "mlqa/test-context-en-question-en.json"},
        "https://dl.fbaipublicfiles.com/MLQA/MLQA_V1.zip (MLQA_V1/{dev,test}/)",
        eval_readers.squad_json, _qa_prompt, _no_choices, wrapped_in_code=False),
    "sst2": ZeroShotSet(
        {"validation": "glue/SST-2/dev.tsv"},
        "https://dl.fbaipublicfiles.com/glue/data/SST-2.zip",
        eval_readers.tsv,
        lambda r, s: (f"{r['sentence']} Based on this review, would the user recommend this "
                      "product? No or Yes?"),
        _fixed(("No", "Yes"), "label", {"0": 0, "1": 1}),
        wrapped_in_code=False),
    "openbookqa": ZeroShotSet(
        {"validation": "openbookqa/Main/dev.jsonl", "test": "openbookqa/Main/test.jsonl"},
        "https://ai2-public-datasets.s3.amazonaws.com/open-book-qa/OpenBookQA-V1-Sep2018.zip",
        eval_readers.openbookqa_jsonl, _obqa_prompt,
        lambda r: (list(r["choices"]), r["label"])),
    "copa": ZeroShotSet(
        {"validation": "superglue/COPA/val.jsonl"},
        "https://dl.fbaipublicfiles.com/glue/superglue/data/v2/COPA.zip",
        eval_readers.jsonl, _copa_prompt,
        lambda r: ([r["choice1"], r["choice2"]], _label(r.get("label"), {"0": 0, "1": 1}))),
    "winogrande": ZeroShotSet(
        {"validation": "winogrande/dev.jsonl"},
        "https://storage.googleapis.com/ai2-mosaic/public/winogrande/winogrande_1.1.zip",
        eval_readers.jsonl,
        lambda r, s: (f"{r['sentence']} In the previous sentence, does _ refer to "
                      f"{r['option1']} or {r['option2']}?"),
        lambda r: ([r["option1"], r["option2"]], _label(r.get("answer"), {"1": 0, "2": 1}))),
    "wic": ZeroShotSet(
        {"validation": "superglue/WiC/val.jsonl"},
        "https://dl.fbaipublicfiles.com/glue/superglue/data/v2/WiC.zip",
        eval_readers.jsonl,
        lambda r, s: (f'Does the word "{r["word"]}" have the same meaning in these two '
                      f"sentences? Yes, No? {r['sentence1']} {r['sentence2']}"),
        _fixed(("No", "Yes"), "label", {"false": 0, "true": 1, "0": 0, "1": 1})),
    "mnli": ZeroShotSet(
        {"validation": "glue/MNLI/dev_matched.tsv"},
        "https://dl.fbaipublicfiles.com/glue/data/MNLI.zip",
        eval_readers.tsv,
        lambda r, s: (f"{r['sentence1']} Question: Does this imply that {r['sentence2']}? "
                      "Please response with 'Yes', 'No', or 'Maybe'."),
        _fixed(("Yes", "Maybe", "No"), "gold_label",
               {"entailment": 0, "neutral": 1, "contradiction": 2})),
    "rte": ZeroShotSet(
        {"validation": "superglue/RTE/val.jsonl"},
        "https://dl.fbaipublicfiles.com/glue/superglue/data/v2/RTE.zip",
        eval_readers.jsonl,
        lambda r, s: f'Given {r["premise"]} Is it guaranteed true that "{r["hypothesis"]}"? '
                     "Yes or no?",
        _fixed(("Yes", "No"), "label", {"entailment": 0, "not_entailment": 1, "0": 0, "1": 1})),
}


def set_file(name: str, split: str) -> str:
    """The file of `name`'s `split` under the evaluation folder; raises when missing."""
    spec = SETS[name]
    if split not in spec.files:
        raise FileNotFoundError(
            f"zero-shot set {name!r} has no {split!r} split; it has {sorted(spec.files)}")
    path = os.path.join(eval_data_dir(), spec.files[split])
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"zero-shot set {name!r}: {path} not found. Expected {spec.files[split]} under the "
            f"evaluation folder ({EVAL_DIR_ENV} or gin eval_data_dir.path); get it from "
            f"{spec.source}")
    return path


def examples(name: str, split: str) -> list[dict]:
    """The set's examples as evaluation records (prompt wrapped as the chosen style says)."""
    spec, style = SETS[name], zeroshot_prompt_style()
    path = set_file(name, split)
    wrap = formats.get_wrapper("mtllama") if (spec.wrapped_in_code or style == "card") else None
    out, ungraded = [], 0
    for i, record in enumerate(spec.read(path)):
        instruction = spec.prompt(record, style)
        choices, label = spec.choices(record)
        answers = [a for a in record.get("answers", []) if a]
        if not answers and label < 0:
            ungraded += 1
        out.append({
            "inputs": wrap(instruction) if wrap else instruction,
            "targets": answers[0] if answers else (choices[label] if label >= 0 else ""),
            "answers": answers,
            "answer_choices": choices,
            "label": label,
            "example_id": str(record.get("id", f"{name}_{split}_{i}")),
        })
    if ungraded:
        logging.warning("zero-shot set %s (%s): %d of %d examples have no gold answer or label",
                        name, path, ungraded, len(out))
    return out


def _dataset_fn(name: str, split: str, shuffle_files: bool, seed: int | None = None):
    del shuffle_files, seed  # evaluation reads every example in file order
    records = examples(name, split)
    return tf.data.Dataset.from_generator(
        lambda: iter(records),
        output_signature={
            "inputs": tf.TensorSpec([], tf.string), "targets": tf.TensorSpec([], tf.string),
            "answers": tf.TensorSpec([None], tf.string),
            "answer_choices": tf.TensorSpec([None], tf.string),
            "label": tf.TensorSpec([], tf.int32), "example_id": tf.TensorSpec([], tf.string),
        })


def register() -> None:
    """`zeroshot_<set>` for every set, and the `zeroshot_all` mixture."""
    v = vocab.configured_vocabulary()
    features = {"inputs": seqio.Feature(v, add_eos=False),
                "targets": seqio.Feature(v, add_eos=True)}
    names = []
    for name, spec in SETS.items():
        task = f"zeroshot_{name}"
        names.append(task)
        if task in seqio.TaskRegistry.names():
            continue
        seqio.TaskRegistry.add(
            task,
            source=seqio.FunctionDataSource(functools.partial(_dataset_fn, name),
                                            splits=tuple(spec.files)),
            preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos],
            output_features=features, metric_fns=[])
    if "zeroshot_all" not in seqio.MixtureRegistry.names():
        seqio.MixtureRegistry.add("zeroshot_all", names, default_rate=1.0)


register()
