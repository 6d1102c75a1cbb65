"""Readers for the public formats of the zero-shot sets; each yields plain records.

A file that is not in the format expected raises ValueError naming the file
and, for line-based formats, the line. Field names are the formats' own.
"""

from __future__ import annotations

import csv
import json
from typing import Iterator


def squad_json(path: str, id_prefix: str | None = None) -> Iterator[dict]:
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
        raise ValueError(f"{path}: no top-level 'data' list; expected SQuAD v1.1 JSON "
                         "({'data': [{'paragraphs': [{'context', 'qas'}]}]})")
    for article in document["data"]:
        for paragraph in article.get("paragraphs", []):
            for qa in paragraph.get("qas", []):
                if id_prefix and not str(qa.get("id", "")).startswith(id_prefix):
                    continue
                if "question" not in qa or "context" not in paragraph:
                    raise ValueError(f"{path}: question {qa.get('id')!r} lacks 'question' or "
                                     "its paragraph's 'context'; expected SQuAD v1.1 JSON")
                yield {"id": qa.get("id"), "question": qa["question"],
                       "context": paragraph["context"],
                       "answers": [a.get("text", "") for a in qa.get("answers", [])]}


def jsonl(path: str) -> Iterator[dict]:
    """JSON Lines (SuperGLUE, Winogrande): one object per non-empty line."""
    for _, record in _numbered_jsonl(path):
        yield record


def _numbered_jsonl(path: str) -> Iterator[tuple[int, dict]]:
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {number}: not a JSON object ({e})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}, line {number}: expected a JSON object, got "
                                 f"{type(record).__name__}")
            yield number, record


def tsv(path: str) -> Iterator[dict]:
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
                raise ValueError(f"{path}, line {number}: {len(row)} tab-separated fields, the "
                                 f"header has {len(header)}")
            yield dict(zip(header, row))


def openbookqa_jsonl(path: str) -> Iterator[dict]:
    """OpenbookQA JSONL: records id, stem, choices (texts in label order), label."""
    for number, record in _numbered_jsonl(path):
        question = record.get("question")
        if not isinstance(question, dict) or "stem" not in question or "choices" not in question:
            raise ValueError(f"{path}, line {number}: no question.stem / question.choices; "
                             "expected OpenbookQA JSONL")
        choices = sorted(question["choices"], key=lambda c: c.get("label", ""))
        labels = [c.get("label") for c in choices]
        key = record.get("answerKey")
        yield {"id": record.get("id"), "stem": question["stem"],
               "choices": [c.get("text", "") for c in choices],
               "label": labels.index(key) if key in labels else -1}
