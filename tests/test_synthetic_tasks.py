"""The synthetic tasks of the embedded default: contract, held-out splits, determinism."""

import random
import re
import subprocess
import sys

import seqio

import mtllama_jax.tasks  # noqa: F401  registers the tasks
from mtllama_jax import evaluation
from mtllama_jax.tasks import synthetic


def test_generation_is_deterministic_and_splits_differ():
    a = synthetic.generate("extractive_qa", 1, "train", 50)
    assert a == synthetic.generate("extractive_qa", 1, "train", 50)
    assert a != synthetic.generate("extractive_qa", 1, "validation", 50)


def test_every_answer_is_one_of_the_offered_choices():
    for cluster in synthetic.CLUSTERS:
        for template in range(synthetic.num_templates(cluster)):
            for ex in synthetic.generate(cluster, template, "validation", 30):
                assert 0 <= ex.label < len(ex.choices)
                assert len(set(ex.choices)) == len(ex.choices), ex


def test_labels_are_balanced_enough_that_chance_is_chance():
    for cluster in synthetic.CLUSTERS:
        examples = synthetic.generate(cluster, 0, "validation", 400)
        counts = [sum(e.label == k for e in examples) for k in range(len(examples[0].choices))]
        assert max(counts) / len(examples) < 1.5 / len(counts), (cluster, counts)


def test_held_out_templates_and_clusters_never_reach_training():
    train = {t.name for t in seqio.get_mixture_or_task("synthetic_train").tasks}
    templates = {t.name for t in seqio.get_mixture_or_task("synthetic_heldout_templates").tasks}
    clusters = {t.name for t in seqio.get_mixture_or_task("synthetic_heldout_clusters").tasks}
    assert not train & templates and not train & clusters
    assert {n.split("_t")[0] for n in clusters} == {
        f"synthetic_{c}" for c in synthetic.HELD_OUT_CLUSTERS
    }
    assert len(templates) == len(synthetic.TRAINING_CLUSTERS)
    # No held-out prompt text occurs among the training prompts.
    seen = {
        e.prompt
        for name in train
        for e in synthetic.generate(*_cluster_template(name), "train", 200)
    }
    held = {
        e.prompt
        for name in templates | clusters
        for e in synthetic.generate(*_cluster_template(name), "validation", 200)
    }
    assert not seen & held


def _cluster_template(task_name):
    cluster, template = task_name[len("synthetic_") :].rsplit("_t", 1)
    return cluster, int(template)


def test_tasks_meet_the_evaluation_contract():
    vocab = synthetic.vocabulary()
    assert (vocab.unk_id, vocab.tokenizer.bos_id(), vocab.eos_id) == (0, 1, 2)
    examples = evaluation.load_examples("synthetic_completion_t0", "validation", 3)
    assert len(examples) == 3
    ex = examples[0]
    assert ex["targets"][-1] == vocab.eos_id
    answer = ex["answer_choices"][ex["label"]]
    assert ex["answers"] == [answer] and vocab.decode(ex["targets"]) == answer
    # MT-LLaMA's wrapper by default; the prompt asks to complete a sentence and ends the turn.
    prompt = vocab.decode(ex["inputs"])
    assert "Complete the sentence: " in prompt and prompt.endswith(" ...### Assistant:")
    assert ex["example_id"] == "completion_t0_validation_0"


def test_held_out_clusters_are_answered_by_reading_the_passage():
    """The right choice is the one the passage states; the others are of the same kind."""
    kind_of = {v: k for k, values in synthetic.VALUES.items() for v in values}
    for template in range(synthetic.num_templates("completion")):
        for ex in synthetic.generate("completion", template, "validation", 100):
            stated = [c for c in ex.choices if f" {c}." in ex.prompt]
            assert stated == [ex.choices[ex.label]], ex
            assert len({kind_of[c.split(" ")[0]] for c in ex.choices}) == 1, ex
    for template in range(synthetic.num_templates("nli")):
        for ex in synthetic.generate("nli", template, "validation", 100):
            assert [c for c in ex.choices if c in ex.prompt] == [ex.choices[ex.label]], ex
            true, false = (c.split(" ") for c in (ex.choices[ex.label], ex.choices[1 - ex.label]))
            assert len(true) == len(false) and sum(map(str.__ne__, true, false)) == 1, ex


def test_a_passage_states_one_fact_per_kind():
    """So the asked kind names the fact (binding values to names is not what the demo tests)."""
    for _ in range(200):
        passage = synthetic._passage(random.Random(_))
        assert 1 <= len(passage.kinds) <= synthetic.MAX_FACTS
        assert len(set(passage.kinds)) == len(passage.kinds)
        assert len(set(passage.people)) == len(passage.people)


def test_no_held_out_instruction_occurs_in_training_prompts():
    """Four-word runs of held-out prompts, the passages' statements aside, are never trained.

    (Three-word runs would flag "this sentence <name>", which completion's "Finish
    this sentence:" shares with topic's "Classify the topic of this sentence:".)
    """
    train = {
        t
        for name in _tasks("synthetic_train")
        for e in synthetic.generate(*_cluster_template(name), "train", 300)
        for t in _instruction_runs(e.prompt)
    }
    for name in _tasks("synthetic_heldout_clusters"):
        held = {
            t
            for e in synthetic.generate(*_cluster_template(name), "validation", 300)
            for t in _instruction_runs(e.prompt)
        }
        assert held and not held & train, (name, sorted(held & train)[:5])


def _tasks(mixture):
    return [t.name for t in seqio.get_mixture_or_task(mixture).tasks]


_STATEMENT = re.compile(
    "|".join(
        re.escape(form)
        .replace(r"\{n\}", "(?:" + "|".join(synthetic.NAMES) + ")")
        .replace(r"\{v\}", "(?:" + "|".join(synthetic.VALUES[kind]) + ")")
        for kind, forms in synthetic.STATEMENTS.items()
        for form in forms
    )
)


def _instruction_runs(prompt):
    """Four-word runs of a prompt with every statement of a fact cut out (no run spans a cut)."""
    runs = set()
    for piece in _STATEMENT.split(prompt):
        words = "".join(c if c.isalnum() else " " for c in piece.lower()).split()
        runs.update(zip(words, words[1:], words[2:], words[3:]))
    return runs


def test_committed_sentencepiece_model_is_what_the_script_builds(tmp_path):
    out = tmp_path / "spm.model"
    subprocess.run(
        [sys.executable, "scripts/train_synthetic_spm.py", "--out", str(out)],
        check=True,
        capture_output=True,
    )
    with open(synthetic.SPM_MODEL, "rb") as committed:
        assert out.read_bytes() == committed.read()
