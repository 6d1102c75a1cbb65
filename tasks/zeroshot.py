"""The model card's zero-shot sets as seqio tasks: `zeroshot_<set>` and `zeroshot_all`.

Each set is read from a local copy under one folder (gin `eval_data_dir.path`,
else $MTLLAMA_EVAL_DIR): its public file (SQuAD v1.1 JSON, GLUE TSV, SuperGLUE /
OpenbookQA / Winogrande JSONL) or, when that is absent, the hub's parquet
downloaded under `hub/<repo>/`. `SETS` is the one table of files, sources and
readers; `data_table()` renders it for `tasks/EVAL_DATA.md`. A set with neither
raises FileNotFoundError naming the set, both files and where to get them, so
`mtllama-eval` reports it as skipped and runs the others.

Prompts are MT-LLaMA's (https://github.com/DAMO-NLP-SG/MT-LLaMA): the released evaluation code's
strings by default (they produced the published numbers), the model card's by
`zeroshot_prompt_style.style = 'card'`. They differ in three places: the code
sends the QA and SST-2 prompts without the chat wrapper (the card wraps every
prompt in `mtllama`), OpenbookQA names the stem `question_stem`, and COPA's
code string puts `. - ` after choice 1.

The released code cut QA inputs to 1,024 tokens. Here the context is cut
instead, whole words from its end, until BOS + prompt fit 1,024 tokens, so the
question and the closing "Answer:" survive; cut prompts are counted and logged.

Examples carry what `mtllama_jax.evaluation` reads: `inputs` (the prompt),
`targets` (the gold answer), `answers` (QA gold spans), `answer_choices` and
`label` (-1 when the example has no gold label), `example_id`. Choice order
follows `mtllama_jax.answer_matching`'s keyword tables (SST-2 and WiC No/Yes,
MNLI Yes/Maybe/No, RTE Yes/No, OpenbookQA A-D). Examples without gold answers
or choices are kept, counted and logged; the evaluation reports them.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import logging
import os
from typing import Callable

import gin
import seqio
import tensorflow as tf

from mtllama_jax import answer_matching, formats, task_metadata, vocab
from mtllama_jax.env import gin_or_env
from mtllama_jax.tasks import eval_readers

EVAL_DIR_ENV = "MTLLAMA_EVAL_DIR"
STYLES = ("code", "card")
QA_MAX_TOKENS = 1024  # the released code's cut of QA inputs (BOS included)
log = logging.getLogger(__name__)  # mtllama_jax.tasks.*: shown without --verbose


@gin.configurable
def eval_data_dir(path: str | None = None) -> str:
    """Folder of the zero-shot sets: gin `eval_data_dir.path`, else $MTLLAMA_EVAL_DIR."""
    path = gin_or_env(path, EVAL_DIR_ENV)
    if not path:
        raise FileNotFoundError(
            f"no evaluation folder configured: set {EVAL_DIR_ENV}=/path/to/eval_data (the "
            "folder holding squad/, glue/, superglue/, ... as listed in tasks/EVAL_DATA.md) or "
            "bind eval_data_dir.path in gin"
        )
    return path


@gin.configurable
def zeroshot_prompt_style(style: str = "code") -> str:
    """`code` (the released evaluation's strings, default) or `card` (the model card's)."""
    if style not in STYLES:
        raise ValueError(f"zeroshot_prompt_style.style={style!r}: choose from {STYLES}")
    return style


@dataclasses.dataclass(frozen=True)
class Hub:
    """The set on the Hugging Face hub, its parquet downloaded under `hub/<repo>/`."""

    repo: str
    config: str
    splits: dict[str, str]  # seqio split -> the hub's split
    columns: tuple[str, ...]
    record: Callable[[dict], dict | None] = dict  # hub row -> public record (None: skip)
    revision: str | None = None  # where only the hub's converter branch holds parquet

    def stem(self, split: str) -> str:
        """`<stem>-*.parquet` (the hub's main branch) or `<stem>/*.parquet` (its converter's)."""
        return f"hub/{self.repo}/{self.config}/{self.splits[split]}"

    def patterns(self, split: str) -> list[str]:
        return [f"{self.stem(split)}-*.parquet", f"{self.stem(split)}/*.parquet"]

    def download_command(self, split: str, root: str) -> str:
        """The command that fetches this split's parquet (printed in errors; nothing downloads)."""
        revision = f" --revision {self.revision}" if self.revision else ""
        return (
            f"huggingface-cli download {self.repo} --repo-type dataset{revision} --include "
            f"'{self.config}/{self.splits[split]}*' --local-dir {root}/hub/{self.repo}"
        )


@dataclasses.dataclass(frozen=True)
class ZeroShotSet:
    """One set: public files per split (relative to the folder), source, reader, prompt."""

    files: dict[str, str]
    source: str
    format: str
    read: Callable[[str], eval_readers.Located]
    fields: tuple[str, ...]  # what the prompt needs from a record
    prompt: Callable[[dict, str], str]  # (record, style) -> instruction
    choices: Callable[[dict], tuple[list[str], int]]  # record -> (choices, label)
    hub: Hub
    wrapped_in_code: bool = True  # the released code wrapped it in `mtllama`
    max_tokens: int | None = None  # cut the context to fit (QA)


def _qa_prompt(r, style):
    context = " ".join(r["context"].split())
    return (
        f"Answer the question according to the context. Question: {r['question']}. "
        f"Context: {context}. Answer:"
    )


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
    return (
        f"{r['premise']} {lead} Help me pick the more plausible option: - {r['choice1']}"
        f"{sep}{r['choice2']}"
    )


def _obqa_prompt(r, style):
    options = " ".join(f"- ({letter}) {c}" for letter, c in zip("ABCD", r["choices"]))
    return f"{r['stem']} Which is the correct answer? {options}"


def _hub_qa(row, id_prefix=None):
    if id_prefix and not str(row["id"]).startswith(id_prefix):
        return None
    answers = (row["answers"] or {}).get("text") or []
    return {
        "id": row["id"],
        "question": row["question"],
        "context": row["context"],
        "answers": list(answers),
    }


def _hub_mnli(row):
    names = {0: "entailment", 1: "neutral", 2: "contradiction"}
    return {
        "id": row["idx"],
        "sentence1": row["premise"],
        "sentence2": row["hypothesis"],
        "gold_label": names.get(row["label"]),
    }


def _hub_obqa(row):
    choices = row["choices"] or {}
    return eval_readers.openbookqa_record(
        row["id"],
        row["question_stem"],
        list(zip(choices.get("label") or [], choices.get("text") or [])),
        row["answerKey"],
    )


QA = dict(
    format="SQuAD v1.1 JSON",
    read=eval_readers.squad_json,
    fields=(),
    prompt=_qa_prompt,
    choices=_no_choices,
    wrapped_in_code=False,
    max_tokens=QA_MAX_TOKENS,
)
QA_COLUMNS = ("id", "question", "context", "answers")
SUPERGLUE = "https://dl.fbaipublicfiles.com/glue/superglue/data/v2"
SG_PARQUET = "refs/convert/parquet"
VALIDATION = {"validation": "validation"}

SETS: dict[str, ZeroShotSet] = {
    "squad": ZeroShotSet(
        {"validation": "squad/dev-v1.1.json"},
        "https://rajpurkar.github.io/SQuAD-explorer/dataset/dev-v1.1.json",
        hub=Hub("rajpurkar/squad", "plain_text", VALIDATION, QA_COLUMNS, _hub_qa),
        **QA,
    ),
    "xquad_en": ZeroShotSet(
        {"validation": "xquad/xquad.en.json"},
        "https://github.com/deepmind/xquad/raw/master/xquad.en.json",
        hub=Hub("google/xquad", "xquad.en", VALIDATION, QA_COLUMNS, _hub_qa),
        **QA,
    ),
    "tydiqa_en": ZeroShotSet(
        {"validation": "tydiqa/tydiqa-goldp-v1.1-dev.json"},
        "https://storage.googleapis.com/tydiqa/v1.1/tydiqa-goldp-v1.1-dev.json (English ids kept)",
        hub=Hub(
            "google-research-datasets/tydiqa",
            "secondary_task",
            VALIDATION,
            QA_COLUMNS,
            functools.partial(_hub_qa, id_prefix="english"),
        ),
        **dict(QA, read=functools.partial(eval_readers.squad_json, id_prefix="english")),
    ),
    "mlqa_en": ZeroShotSet(
        {
            "validation": "mlqa/dev-context-en-question-en.json",
            "test": "mlqa/test-context-en-question-en.json",
        },
        "https://dl.fbaipublicfiles.com/MLQA/MLQA_V1.zip (MLQA_V1/{dev,test}/)",
        hub=Hub(
            "google/xtreme",
            "MLQA.en.en",
            {"validation": "validation", "test": "test"},
            QA_COLUMNS,
            _hub_qa,
        ),
        **QA,
    ),
    "sst2": ZeroShotSet(
        {"validation": "glue/SST-2/dev.tsv"},
        "https://dl.fbaipublicfiles.com/glue/data/SST-2.zip",
        "GLUE TSV",
        eval_readers.tsv,
        ("sentence",),
        lambda r, s: (
            f"{r['sentence']} Based on this review, would the user recommend this "
            "product? No or Yes?"
        ),
        _fixed(("No", "Yes"), "label", {"0": 0, "1": 1}),
        Hub("nyu-mll/glue", "sst2", VALIDATION, ("sentence", "label", "idx")),
        wrapped_in_code=False,
    ),
    "openbookqa": ZeroShotSet(
        {"validation": "openbookqa/Main/dev.jsonl", "test": "openbookqa/Main/test.jsonl"},
        "https://ai2-public-datasets.s3.amazonaws.com/open-book-qa/OpenBookQA-V1-Sep2018.zip "
        "(OpenBookQA-V1-Sep2018/Data/Main/)",
        "OpenbookQA JSONL",
        eval_readers.openbookqa_jsonl,
        (),
        _obqa_prompt,
        lambda r: (list(r["choices"]), r["label"]),
        Hub(
            "allenai/openbookqa",
            "main",
            {"validation": "validation", "test": "test"},
            ("id", "question_stem", "choices", "answerKey"),
            _hub_obqa,
        ),
    ),
    "copa": ZeroShotSet(
        {"validation": "superglue/COPA/val.jsonl"},
        f"{SUPERGLUE}/COPA.zip",
        "SuperGLUE JSONL",
        eval_readers.jsonl,
        ("premise", "choice1", "choice2", "question"),
        _copa_prompt,
        lambda r: ([r["choice1"], r["choice2"]], _label(r.get("label"), {"0": 0, "1": 1})),
        Hub(
            "aps/super_glue",
            "copa",
            VALIDATION,
            ("premise", "choice1", "choice2", "question", "label", "idx"),
            revision=SG_PARQUET,
        ),
    ),
    "winogrande": ZeroShotSet(
        {"validation": "winogrande/dev.jsonl"},
        "https://storage.googleapis.com/ai2-mosaic/public/winogrande/winogrande_1.1.zip "
        "(winogrande_1.1/dev.jsonl)",
        "Winogrande JSONL",
        eval_readers.jsonl,
        ("sentence", "option1", "option2"),
        lambda r, s: (
            f"{r['sentence']} In the previous sentence, does _ refer to "
            f"{r['option1']} or {r['option2']}?"
        ),
        lambda r: ([r["option1"], r["option2"]], _label(r.get("answer"), {"1": 0, "2": 1})),
        Hub(
            "allenai/winogrande",
            "winogrande_xl",
            VALIDATION,
            ("sentence", "option1", "option2", "answer"),
        ),
    ),
    "wic": ZeroShotSet(
        {"validation": "superglue/WiC/val.jsonl"},
        f"{SUPERGLUE}/WiC.zip",
        "SuperGLUE JSONL",
        eval_readers.jsonl,
        ("word", "sentence1", "sentence2"),
        lambda r, s: (
            f'Does the word "{r["word"]}" have the same meaning in these two '
            f"sentences? Yes, No? {r['sentence1']} {r['sentence2']}"
        ),
        _fixed(("No", "Yes"), "label", {"false": 0, "true": 1, "0": 0, "1": 1}),
        Hub(
            "aps/super_glue",
            "wic",
            VALIDATION,
            ("word", "sentence1", "sentence2", "label", "idx"),
            revision=SG_PARQUET,
        ),
    ),
    "mnli": ZeroShotSet(
        {"validation": "glue/MNLI/dev_matched.tsv"},
        "https://dl.fbaipublicfiles.com/glue/data/MNLI.zip",
        "GLUE TSV",
        eval_readers.tsv,
        ("sentence1", "sentence2"),
        lambda r, s: (
            f"{r['sentence1']} Question: Does this imply that {r['sentence2']}? "
            "Please response with 'Yes', 'No', or 'Maybe'."
        ),
        _fixed(
            ("Yes", "Maybe", "No"),
            "gold_label",
            {"entailment": 0, "neutral": 1, "contradiction": 2},
        ),
        Hub(
            "nyu-mll/glue",
            "mnli",
            {"validation": "validation_matched"},
            ("premise", "hypothesis", "label", "idx"),
            _hub_mnli,
        ),
    ),
    "rte": ZeroShotSet(
        {"validation": "superglue/RTE/val.jsonl"},
        f"{SUPERGLUE}/RTE.zip",
        "SuperGLUE JSONL",
        eval_readers.jsonl,
        ("premise", "hypothesis"),
        lambda r, s: (
            f'Given {r["premise"]} Is it guaranteed true that "{r["hypothesis"]}"? Yes or no?'
        ),
        _fixed(("Yes", "No"), "label", {"entailment": 0, "not_entailment": 1, "0": 0, "1": 1}),
        Hub(
            "aps/super_glue",
            "rte",
            VALIDATION,
            ("premise", "hypothesis", "label", "idx"),
            revision=SG_PARQUET,
        ),
    ),
}


def set_files(name: str, split: str) -> tuple[str, list[str]]:
    """("public", [file]) or ("hub", parquet files) of `name`'s split; raises when neither."""
    spec, root = SETS[name], eval_data_dir()
    if split not in spec.files:
        raise FileNotFoundError(
            f"zero-shot set {name!r} has no {split!r} split; it has {sorted(spec.files)}"
        )
    public = os.path.join(root, spec.files[split])
    if os.path.exists(public):
        return "public", [public]
    hub = sorted(
        p for pattern in spec.hub.patterns(split) for p in glob.glob(os.path.join(root, pattern))
    )
    if hub:
        return "hub", hub
    raise FileNotFoundError(
        f"zero-shot set {name!r}: no {split} data under {root} ({EVAL_DIR_ENV} or gin "
        f"eval_data_dir.path). Expected {spec.files[split]} ({spec.format}; get it from "
        f"{spec.source}) or the hub's parquet {' or '.join(spec.hub.patterns(split))} (`"
        f"{spec.hub.download_command(split, root)}`)"
    )


def _records(spec: ZeroShotSet, kind: str, paths: list[str]) -> eval_readers.Located:
    """(where, record) in the public format's fields, from the public file or the hub's rows."""
    if kind == "public":
        yield from spec.read(paths[0])
        return
    for where, row in eval_readers.parquet(paths, spec.hub.columns):
        try:
            record = spec.hub.record(row)
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{where}: unexpected {spec.hub.repo} row ({e!r})") from None
        if record is not None:
            yield where, record


def _fit_context(record: dict, render: Callable[[dict], str], limit: int) -> tuple[str, bool]:
    """The prompt, its context cut (whole words, from the end) so BOS + prompt <= limit."""
    v = vocab.configured_vocabulary()
    fits = lambda r: len(v.encode(render(r))) + 1 <= limit  # noqa: E731
    if fits(record):
        return render(record), False
    words = record["context"].split()
    lo, hi = 0, len(words)  # the most words that fit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(dict(record, context=" ".join(words[:mid]))) else (lo, mid - 1)
    return render(dict(record, context=" ".join(words[:lo]))), True


def examples(name: str, split: str) -> list[dict]:
    """The set's examples as evaluation records (prompt wrapped as the chosen style says)."""
    spec, style = SETS[name], zeroshot_prompt_style()
    kind, paths = set_files(name, split)
    wrap = formats.get_wrapper("mtllama" if (spec.wrapped_in_code or style == "card") else "raw")
    render = lambda r: wrap(spec.prompt(r, style))  # noqa: E731
    out, ungraded, cut = [], 0, 0
    for i, (where, record) in enumerate(_records(spec, kind, paths)):
        missing = [f for f in spec.fields if f not in record]
        if missing:
            raise ValueError(
                f"{where}: no field(s) {missing}; expected {spec.format} (see tasks/EVAL_DATA.md)"
            )
        if spec.max_tokens:
            inputs, was_cut = _fit_context(record, render, spec.max_tokens)
            cut += was_cut
        else:
            inputs = render(record)
        choices, label = spec.choices(record)
        answers = [a for a in record.get("answers", []) if a]
        ungraded += not answers and label < 0
        example_id = next((record[k] for k in ("id", "idx", "qID") if record.get(k) is not None), i)
        out.append(
            {
                "inputs": inputs,
                "targets": answers[0] if answers else (choices[label] if label >= 0 else ""),
                "answers": answers,
                "answer_choices": choices,
                "label": label,
                "example_id": str(example_id),
            }
        )
    source = paths[0] if kind == "public" else f"{len(paths)} parquet file(s) of {spec.hub.repo}"
    if ungraded:
        log.warning(
            "zero-shot set %s (%s): %d of %d examples have no gold answer or label",
            name,
            source,
            ungraded,
            len(out),
        )
    if cut:
        log.warning(
            "zero-shot set %s (%s): %d of %d contexts cut to fit %d tokens",
            name,
            source,
            cut,
            len(out),
            spec.max_tokens,
        )
    return out


def data_table() -> str:
    """The markdown table of `tasks/EVAL_DATA.md`: per task, split files, sources, scoring."""
    lines = [
        "| task | split: file under the folder (format) | where to get it | or the "
        "hub's parquet: `hub/<stem>-*.parquet` or `hub/<stem>/*.parquet` | scored as "
        "the published number (`generate`) |",
        "|---|---|---|---|---|",
    ]
    for name, spec in SETS.items():
        files = "<br>".join(f"{split}: `{rel}`" for split, rel in spec.files.items())
        hub = "<br>".join(
            f"{split}: `{spec.hub.stem(split)[len('hub/') :]}`"
            + (f" (revision `{spec.hub.revision}`)" if spec.hub.revision else "")
            for split in spec.hub.splits
        )
        scoring = answer_matching.QA_SCORING.get(name)
        scored = (
            f"F1/EM by {answer_matching.QA_SCRIPTS[scoring]}"
            if scoring
            else "accuracy, the released code's matcher"
        )
        lines.append(
            f"| `zeroshot_{name}` | {files} ({spec.format}) | {spec.source} | {hub} | {scored} |"
        )
    return "\n".join(lines) + "\n"


def _dataset_fn(name: str, split: str, shuffle_files: bool, seed: int | None = None):
    del shuffle_files, seed  # evaluation reads every example in file order
    records = examples(name, split)
    return tf.data.Dataset.from_generator(
        lambda: iter(records),
        output_signature={
            "inputs": tf.TensorSpec([], tf.string),
            "targets": tf.TensorSpec([], tf.string),
            "answers": tf.TensorSpec([None], tf.string),
            "answer_choices": tf.TensorSpec([None], tf.string),
            "label": tf.TensorSpec([], tf.int32),
            "example_id": tf.TensorSpec([], tf.string),
        },
    )


def register() -> None:
    """`zeroshot_<set>` for every set (its set and matcher recorded), and `zeroshot_all`."""
    v = vocab.configured_vocabulary()
    features = {
        "inputs": seqio.Feature(v, add_eos=False),
        "targets": seqio.Feature(v, add_eos=True),
    }
    names = []
    for name, spec in SETS.items():
        task = f"zeroshot_{name}"
        names.append(task)
        if task in seqio.TaskRegistry.names():
            continue
        matcher = name if name in answer_matching.MATCHERS else None
        task_metadata.record(task, task_metadata.TaskInfo(zero_shot_set=name, matcher=matcher))
        seqio.TaskRegistry.add(
            task,
            source=seqio.FunctionDataSource(
                functools.partial(_dataset_fn, name), splits=tuple(spec.files)
            ),
            preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos],
            output_features=features,
            metric_fns=[],
        )
    if "zeroshot_all" not in seqio.MixtureRegistry.names():
        seqio.MixtureRegistry.add("zeroshot_all", names, default_rate=1.0)


register()
