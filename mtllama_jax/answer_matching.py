"""Map generated text to an answer choice: the released MT-LLaMA matcher and a strict one.

The `generate` protocol produces free text; these functions turn it into the
index of an answer choice (or -1: no answer).

`match_original` reproduces the released evaluation code (mCLS/train-CLS.py of
https://github.com/DAMO-NLP-SG/MT-LLaMA):
the output is lower-cased; COPA and Winogrande pick the option with the higher
`difflib.SequenceMatcher(None, output, option).quick_ratio()` (ties to the
first); the other sets take the first keyword of a fixed, ordered table found
as a substring of the output, and when none is found the code predicts its
label 0 (counted as unmatched). Its quirks are kept on purpose: any output
containing the letter "a" is answer A for OpenbookQA, "a"/"b"/"c" are
maybe/yes/no for MNLI. Tasks the released code never saw (the synthetic sets,
T0's held-out prompts) use the same keyword rule with their own choices as the
keywords, in choice order, and no fallback.

`match_strict` accepts only an output equal to one choice after normalisation
(lower case, punctuation and surrounding space dropped).

QA outputs: `qa_prediction` applies the code's "an output containing 'None' is
an empty answer" before F1/EM, which follow the official script each set's
published number used (`QA_SCORING`, as MT-LLaMA's released QA evaluation
picked them): the official SQuAD v1.1 script for SQuAD, XQuAD and TyDiQA-GoldP,
the official MLQA script (lang `en`) for MLQA. The two differ in punctuation:
SQuAD's removes ASCII punctuation only, MLQA's every Unicode punctuation
character too (curly quotes, dashes, guillemets, ellipses).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import re
import string
import sys
import unicodedata
from typing import Sequence

# Keyword tables of the released code, in its order: keyword -> the answer it means.
# A str answer is compared with the task's choices after normalisation; an int is a
# choice position (OpenbookQA's letters and numbers). `fallback` is the code's label 0.
_SST2 = ["1", "2", "4", "5", "★", "★★", "★★★★", "★★★★★", "no", "yes"]
_SST2_MEANING = ["no", "no", "yes", "yes", "no", "no", "yes", "yes", "no", "yes"]
KEYWORD_RULES: dict[str, tuple[list[tuple[str, str | int]], str | int]] = {
    "sst2": (list(zip(_SST2, _SST2_MEANING)), "no"),
    "openbookqa": (
        [
            ("1.", 0),
            ("2.", 1),
            ("3.", 2),
            ("4.", 3),
            ("a", 0),
            ("b", 1),
            ("c", 2),
            ("d", 3),
            ("(a)", 0),
            ("(b)", 1),
            ("(c)", 2),
            ("(d)", 3),
        ],
        0,
    ),
    "mnli": (
        [
            ("maybe", "maybe"),
            ("yes", "yes"),
            ("no", "no"),
            ("a", "maybe"),
            ("b", "yes"),
            ("c", "no"),
            ("inconclusive", "maybe"),
            ("true", "yes"),
            ("false", "no"),
        ],
        "maybe",
    ),
    "wic": ([("no", "no"), ("yes", "yes")], "no"),
    "rte": ([("yes", "yes"), ("no", "no")], "yes"),
}
SIMILARITY_SETS = ("copa", "winogrande")
# QA set -> the rules of the official script its published F1/EM came from.
QA_SCORING = {"squad": "squad", "xquad_en": "squad", "tydiqa_en": "squad", "mlqa_en": "mlqa"}
QA_SCRIPTS = {
    "squad": "SQuAD v1.1's `evaluate-v1.1.py`",
    "mlqa": "MLQA's `mlqa_evaluation_v1.py`, lang `en`",
}
QA_SETS = tuple(QA_SCORING)
# The rules `match_original` knows by name (a task's `TaskInfo.matcher`).
MATCHERS = (*KEYWORD_RULES, *SIMILARITY_SETS)


@dataclasses.dataclass(frozen=True)
class Match:
    """The chosen choice index (-1: none) and whether a rule matched (not a fallback)."""

    index: int
    matched: bool


def normalize_label(text: str) -> str:
    """Lower case, no punctuation, single spaces: 'Yes.' -> 'yes'."""
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    return " ".join(text.split())


def _choice_of(answer: str | int, choices: Sequence[str]) -> int:
    if isinstance(answer, int):
        return answer if answer < len(choices) else -1
    wanted = normalize_label(answer)
    for i, choice in enumerate(choices):
        if normalize_label(choice) == wanted:
            return i
    return -1


def quick_ratio_choice(output: str, choices: Sequence[str]) -> int:
    """The choice most similar to the output by `quick_ratio`, ties to the first."""
    scores = [difflib.SequenceMatcher(None, output, c.lower()).quick_ratio() for c in choices]
    return max(range(len(choices)), key=lambda i: (scores[i], -i))


def match_original(output: str, choices: Sequence[str], matcher: str | None = None) -> Match:
    """The released code's answer for `output` among `choices` under the rule `matcher`.

    `matcher`: a name of `MATCHERS` (the model card's sets), None: the choices as keywords.
    """
    if not choices:
        raise ValueError("match_original needs the example's answer_choices; it has none")
    text = output.strip().lower()
    if matcher in SIMILARITY_SETS:
        return Match(quick_ratio_choice(text, choices), True)
    if matcher in KEYWORD_RULES:
        table, fallback = KEYWORD_RULES[matcher]
        for keyword, answer in table:
            if keyword in text:
                return Match(_choice_of(answer, choices), True)
        return Match(_choice_of(fallback, choices), False)
    for i, choice in enumerate(choices):
        if choice.strip().lower() and choice.strip().lower() in text:
            return Match(i, True)
    return Match(-1, False)


def match_strict(output: str, choices: Sequence[str]) -> Match:
    """The choice equal to the output after `normalize_label`, else -1."""
    wanted = normalize_label(output)
    for i, choice in enumerate(choices):
        if wanted and normalize_label(choice) == wanted:
            return Match(i, True)
    return Match(-1, False)


def qa_prediction(output: str) -> str:
    """The released QA scoring's span: empty when the output contains 'None'."""
    return "" if "None" in output else output.strip()


@functools.cache
def _unicode_punctuation() -> frozenset[str]:
    """MLQA's PUNCT: every character of a Unicode punctuation category (P*), and ASCII's."""
    return frozenset(
        chr(i) for i in range(sys.maxunicode) if unicodedata.category(chr(i)).startswith("P")
    ) | set(string.punctuation)


def normalize_mlqa_en(text: str) -> str:
    """MLQA's `normalize_answer(text, lang="en")`: lower case, Unicode punctuation, articles."""
    punctuation = _unicode_punctuation()
    text = "".join(ch for ch in text.lower() if ch not in punctuation)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())
