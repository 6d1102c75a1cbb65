"""ReCoRD for lm-eval (`lamini_record.yaml`): prompt, choices and SQuAD token F1 / exact match.

The prompt and choices are lm-eval 0.4's `record` task's; F1 and EM are SQuAD's
official definitions (lowercase, no punctuation, no a/an/the, whitespace
collapsed), maximised over the gold answers.
"""

import collections
import re
import string

import numpy as np

PUNCTUATION = set(string.punctuation)


def doc_to_text(doc):
    passage, *highlights = doc["passage"].strip().split("\n@highlight\n")
    return passage + "\n\n" + "".join(f"  - {h}.\n" for h in highlights)


def _answer(query, entity):
    return f"  - {query}".replace("@placeholder", entity)


def doc_to_target(doc):
    return _answer(doc["query"], doc["answers"][0])


def doc_to_choice(doc):
    return [_answer(doc["query"], entity) for entity in doc["entities"]]


def process_docs(dataset):
    return dataset.map(
        lambda doc: {
            "passage": doc["passage"],
            "query": doc["query"],
            "entities": sorted(set(doc["entities"])),
            "answers": sorted(set(doc["answers"])),
        }
    )


def _normalize(text):
    text = "".join(c for c in text.lower() if c not in PUNCTUATION)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def f1_score(prediction, gold):
    pred, ref = _normalize(prediction).split(), _normalize(gold).split()
    if not pred or not ref:
        return float(pred == ref)
    same = sum((collections.Counter(pred) & collections.Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction, gold):
    return float(_normalize(prediction) == _normalize(gold))


def process_results(doc, results):
    prediction = doc["entities"][int(np.argmax([ll for ll, _ in results]))]
    return {
        "f1": max(f1_score(prediction, gold) for gold in doc["answers"]),
        "em": max(exact_match(prediction, gold) for gold in doc["answers"]),
    }
