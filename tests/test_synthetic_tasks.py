"""The synthetic tasks of the embedded default: contract, held-out splits, determinism."""
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
        f"synthetic_{c}" for c in synthetic.HELD_OUT_CLUSTERS}
    assert len(templates) == len(synthetic.TRAINING_CLUSTERS)
    # No held-out prompt text occurs among the training prompts.
    seen = {e.prompt for name in train for e in synthetic.generate(
        *_cluster_template(name), "train", 200)}
    held = {e.prompt for name in templates | clusters for e in synthetic.generate(
        *_cluster_template(name), "validation", 200)}
    assert not seen & held


def _cluster_template(task_name):
    cluster, template = task_name[len("synthetic_"):].rsplit("_t", 1)
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
    # MT-LLaMA's wrapper by default; the prompt states the right choice, not the others.
    prompt = vocab.decode(ex["inputs"])
    stem = answer.split(" ")[0]  # the asked person's name starts the completed sentence
    assert f"Complete the sentence: {stem} " in prompt and prompt.endswith(" ...### Assistant:")
    assert answer in prompt and sum(c in prompt for c in ex["answer_choices"]) == 1
    assert ex["example_id"] == "completion_t0_validation_0"


def test_committed_sentencepiece_model_is_what_the_script_builds(tmp_path):
    out = tmp_path / "spm.model"
    subprocess.run([sys.executable, "scripts/train_synthetic_spm.py", "--out", str(out)],
                   check=True, capture_output=True)
    with open(synthetic.SPM_MODEL, "rb") as committed:
        assert out.read_bytes() == committed.read()
