"""Readers for the public formats of the zero-shot sets; each yields (where, record).

`where` names the file and the line (row, question id) a record came from, so a
record that lacks a field the prompt needs can be reported there. A file that
is not in the format expected raises ValueError naming the file and, for
line-based formats, the line. Field names are the formats' own.
"""

from __future__ import annotations

import csv
import json
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

Located = Iterator[tuple[str, dict]]


def squad_json(path: str, id_prefix: str | None = None) -> Located:
    """SQuAD v1.1 JSON (also XQuAD, TyDiQA-GoldP, MLQA): one record per question.

    Records: id, question, context, answers (the gold span texts). `id_prefix`
    keeps only questions whose id starts with it (TyDiQA-GoldP's "english").
    """
    with open(path, encoding="utf-8") as f:
        try:
            document = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not JSON ({e}); expected SQuAD v1.1 JSON") from None
    if not isinstance(document, dict) or not isinstance(document.get("data"), list):
        raise ValueError(
            f"{path}: no top-level 'data' list; expected SQuAD v1.1 JSON "
            "({'data': [{'paragraphs': [{'context', 'qas'}]}]})"
        )
    for article in document["data"]:
        for paragraph in article.get("paragraphs", []):
            for qa in paragraph.get("qas", []):
                if id_prefix and not str(qa.get("id", "")).startswith(id_prefix):
                    continue
                where = f"{path}, question {qa.get('id')!r}"
                if "question" not in qa or "context" not in paragraph:
                    raise ValueError(
                        f"{where}: no 'question' or no 'context' in its paragraph; "
                        "expected SQuAD v1.1 JSON"
                    )
                yield (
                    where,
                    {
                        "id": qa.get("id"),
                        "question": qa["question"],
                        "context": paragraph["context"],
                        "answers": [a.get("text", "") for a in qa.get("answers", [])],
                    },
                )


def jsonl(path: str) -> Located:
    """JSON Lines (SuperGLUE, Winogrande): one object per non-empty line."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}, line {number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not a JSON object ({e})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
            yield where, record


def tsv(path: str) -> Located:
    """GLUE's TSV (header row; no quoting, as GLUE writes it): one record per row."""
    with open(path, encoding="utf-8", newline="") as f:
        rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(rows, None)
        if not header or len(header) < 2:
            raise ValueError(f"{path}, line 1: expected a tab-separated header row")
        for number, row in enumerate(rows, 2):
            if not row:
                continue
            if len(row) != len(header):
                raise ValueError(
                    f"{path}, line {number}: {len(row)} tab-separated fields, the "
                    f"header has {len(header)}"
                )
            yield f"{path}, line {number}", dict(zip(header, row))


def openbookqa_record(id_, stem: str, choices: list[tuple[str, str]], answer_key) -> dict:
    """id, stem, choice texts in label order (A-D), label (-1: no or unknown answerKey)."""
    choices = sorted(choices)
    labels = [label for label, _ in choices]
    return {
        "id": id_,
        "stem": stem,
        "choices": [text for _, text in choices],
        "label": labels.index(answer_key) if answer_key in labels else -1,
    }


def openbookqa_jsonl(path: str) -> Located:
    """OpenbookQA JSONL (question.stem, question.choices[{text, label}], answerKey)."""
    for where, record in jsonl(path):
        question = record.get("question")
        if not isinstance(question, dict) or "stem" not in question or "choices" not in question:
            raise ValueError(
                f"{where}: no question.stem / question.choices; expected OpenbookQA JSONL"
            )
        choices = [(c.get("label", ""), c.get("text", "")) for c in question["choices"]]
        yield (
            where,
            openbookqa_record(record.get("id"), question["stem"], choices, record.get("answerKey")),
        )


def parquet(paths: list[str], columns: tuple[str, ...]) -> Located:
    """The hub's parquet files, in order: one record (the listed columns) per row."""
    for path in paths:
        try:
            file = pq.ParquetFile(path)
        except (pa.ArrowException, OSError) as e:
            raise ValueError(f"{path}: not a readable parquet file ({e}); re-download it") from e
        names = file.schema_arrow.names
        missing = [c for c in columns if c not in names]
        if missing:
            raise ValueError(
                f"{path}: no column(s) {missing} (has {names}); is this the hub's "
                "copy of the set named in tasks/EVAL_DATA.md?"
            )
        row = 0
        try:
            for batch in file.iter_batches(batch_size=1024, columns=list(columns)):
                for record in batch.to_pylist():
                    yield f"{path}, row {row}", record
                    row += 1
        except pa.ArrowException as e:
            raise ValueError(f"{path}: corrupt parquet after row {row}: {e}") from e
