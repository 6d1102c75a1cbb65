"""The released code's answer matching and the strict matcher, on crafted outputs."""

import pytest

from mtllama_jax.answer_matching import (
    match_original,
    match_strict,
    qa_prediction,
    quick_ratio_choice,
)


@pytest.mark.parametrize(
    "matcher, choices, output, index, matched",
    [
        # SST-2: digits and stars first, then no/yes; nothing found -> the code's label 0 (No).
        ("sst2", ["No", "Yes"], "Yes, I would.", 1, True),
        ("sst2", ["No", "Yes"], "5 stars, yes", 1, True),
        ("sst2", ["No", "Yes"], "Not at all", 0, True),  # "no" inside "not"
        ("sst2", ["No", "Yes"], "Definitely", 0, False),
        # RTE checks yes before no; WiC no before yes.
        ("rte", ["Yes", "No"], "No, yes it is", 0, True),
        ("wic", ["No", "Yes"], "No, yes it is", 0, True),
        # MNLI: maybe, yes, no, then the letters a/b/c mean maybe/yes/no.
        ("mnli", ["Yes", "Maybe", "No"], "Maybe not", 1, True),
        ("mnli", ["Yes", "Maybe", "No"], "It's false", 1, True),  # the "a" of "false": maybe
        ("mnli", ["Yes", "Maybe", "No"], "xyz", 1, False),  # fallback: label 0 = maybe
        # OpenbookQA: "1." before letters; any "a" is A.
        ("openbookqa", ["sun", "moon", "rock", "tree"], "2. the moon", 1, True),
        ("openbookqa", ["sun", "moon", "rock", "tree"], "the planet", 0, True),
        ("openbookqa", ["sun", "moon", "rock", "tree"], "the moon", 0, False),  # fallback
        ("openbookqa", ["sun", "moon", "rock", "tree"], "(D) tree", 3, True),
        ("openbookqa", ["sun", "moon", "rock", "tree"], "bird", 1, True),
    ],
)
def test_original_keyword_rules(matcher, choices, output, index, matched):
    got = match_original(output, choices, matcher)
    assert (got.index, got.matched) == (index, matched)


def test_keyword_details_of_the_crafted_cases():
    # "impossible" contains neither "yes" nor "no": RTE falls back to label 0 (Yes)...
    got = match_original("Impossible", ["Yes", "No"], "rte")
    assert (got.index, got.matched) == (0, False)
    # ...and a letter rule fires on any word with an "a": MNLI "a" means maybe.
    assert match_original("A cat", ["Yes", "Maybe", "No"], "mnli").index == 1
    # "true" has no a/b/c and no yes/no/maybe: the "true" keyword means yes.
    assert match_original("True", ["Yes", "Maybe", "No"], "mnli").index == 0


def test_similarity_rule_for_copa_and_winogrande():
    choices = ["The sun was rising.", "The grass was cut."]
    assert match_original("the grass was cut", choices, "copa").index == 1
    assert match_original("The sun rose", choices, "copa").index == 0
    # Equal quick_ratio: the first option wins, as `score1 >= score2` in the code.
    assert quick_ratio_choice("ab", ["ba", "ab"]) == 0
    assert match_original("", ["x", "y"], "winogrande").index == 0


def test_tasks_the_code_never_saw_use_their_choices_as_keywords():
    choices = ["sports", "politics", "science"]
    assert match_original("It is about Science.", choices).index == 2
    got = match_original("economy", choices)
    assert (got.index, got.matched) == (-1, False)


def test_strict_matcher_wants_the_whole_label():
    assert match_strict(" Yes. ", ["No", "Yes"]).index == 1
    assert match_strict("Yes, I would", ["No", "Yes"]).index == -1
    assert match_strict("", ["No", "Yes"]).index == -1
    assert match_strict("the Moon!", ["sun", "The moon"]).index == 1


def test_qa_prediction_treats_none_as_empty():
    assert qa_prediction("  Denver Broncos ") == "Denver Broncos"
    assert qa_prediction("None of the above") == ""
    assert qa_prediction("none") == "none"  # the code's test is case-sensitive


def test_original_matcher_needs_choices():
    with pytest.raises(ValueError, match="answer_choices"):
        match_original("yes", [], "rte")
