"""T0 held-out `*_score_eval` tasks: choice rows grouped per example, both P3 layouts."""

import collections
import json
import logging
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import seqio
import tensorflow as tf
from helpers import session_spm

import mtllama_jax.tasks  # noqa: F401  registers the tasks
from mtllama_jax import evaluation, formats, task_metadata, vocab
from mtllama_jax.tasks import p3, t0_eval

SUBSET = "super_glue_rte_GPT_3_style_score_eval"
WSC = "super_glue_wsc.fixed_GPT_3_Style_score_eval"
CHOICES = ["yes", "no", "maybe"]


def score_rows(examples):
    """P3's layout: one row per (example, choice); `is_correct` on the gold choice."""
    return [
        {
            "inputs_pretokenized": f"premise {e} question? ",
            "targets_pretokenized": c,
            "answer_choices": CHOICES,
            "idx": [e, k],
            "is_correct": k == gold,
            "weight": 1.0,
        }
        for e, gold in enumerate(examples)
        for k, c in enumerate(CHOICES)
    ]


def write_tfrecord(folder, split, rows):
    os.makedirs(folder)
    with tf.io.TFRecordWriter(os.path.join(folder, f"{split}.tfrecord-00000-of-00001")) as w:
        for r in rows:
            f = {
                "inputs_pretokenized": tf.train.Feature(
                    bytes_list=tf.train.BytesList(value=[r["inputs_pretokenized"].encode()])
                ),
                "answer_choices": tf.train.Feature(
                    bytes_list=tf.train.BytesList(value=[c.encode() for c in r["answer_choices"]])
                ),
                "idx": tf.train.Feature(int64_list=tf.train.Int64List(value=r["idx"])),
                "is_correct": tf.train.Feature(
                    int64_list=tf.train.Int64List(value=[int(r["is_correct"])])
                ),
            }
            w.write(tf.train.Example(features=tf.train.Features(feature=f)).SerializeToString())
    info = {
        "features": {k: {"dtype": "string"} for k in ("inputs_pretokenized", "answer_choices")}
        | {"idx": {"dtype": "int32"}, "is_correct": {"dtype": "bool"}}
    }
    with open(os.path.join(folder, f"info.{split}.json"), "w") as f:
        json.dump(info, f)


@pytest.fixture()
def p3_dir(tmp_path, tmp_path_factory, monkeypatch):
    folder = tmp_path / SUBSET
    folder.mkdir()
    pq.write_table(
        pa.Table.from_pylist(score_rows([2, 0, 1])),
        str(folder / "validation-00000-of-00001.parquet"),
    )
    write_tfrecord(str(tmp_path / WSC), "validation", score_rows([1, 1]))
    monkeypatch.setenv(p3.P3_DIR_ENV, str(tmp_path))
    os.environ[vocab.TOKENIZER_ENV] = session_spm(tmp_path_factory)  # as the data tests
    return tmp_path


def test_every_held_out_prompt_is_a_task_of_its_dataset():
    names = evaluation.task_names(["t0_eval_score"])
    rows = t0_eval.t0_eval_table()
    anli = sum(r["hf_dataset"] == "anli" for r in rows)
    assert len(names) == len(rows) + 2 * anli  # ANLI: one task per round
    datasets = {task_metadata.task_info(n).t0_dataset for n in names}
    assert None not in datasets
    assert {
        "super_glue_wsc_fixed",
        "anli_r1",
        "anli_r3",
        "hellaswag",
        "winogrande_winogrande_xl",
        "story_cloze_2016",
    } <= datasets
    assert task_metadata.task_info("anli_GPT_3_style_r2_score_eval").t0_dataset == "anli_r2"
    assert task_metadata.task_info(t0_eval.task_name(WSC)).t0_dataset == "super_glue_wsc_fixed"
    counts = collections.Counter(task_metadata.task_info(n).t0_dataset for n in names)
    assert (counts["super_glue_cb"], counts["anli_r3"], counts["hellaswag"]) == (15, 15, 4)


@pytest.mark.parametrize(
    "subset,labels", [(SUBSET, [2, 0, 1]), (WSC, [1, 1])], ids=["parquet", "tfrecord"]
)
def test_choice_rows_group_into_one_example_each(p3_dir, subset, labels):
    examples = evaluation.load_examples(t0_eval.task_name(subset), "validation")
    assert [e["label"] for e in examples] == labels
    assert all(e["answer_choices"] == CHOICES for e in examples)
    v = vocab.configured_vocabulary()
    assert v.decode(examples[0]["inputs"]) == formats.get_wrapper("mtllama")("premise 0 question?")
    assert v.decode(examples[0]["targets"]) == CHOICES[labels[0]]


def test_missing_subset_is_skipped_with_the_download_hint(p3_dir):
    name = t0_eval.task_name("hellaswag_Predict_ending_with_hint_score_eval")
    with pytest.raises(evaluation.MissingData, match="huggingface-cli download bigscience/P3"):
        evaluation.load_examples(name, "validation")
    assert name in seqio.TaskRegistry.names()


def test_t5s_rank_classification_agrees_with_the_grouped_examples(p3_dir):
    """t5's preprocessor turns the grouped records back into P3's rows; t5's metric on
    those rows equals the accuracy of the grouped label (the rank protocol's)."""
    from t5.data import preprocessors
    from t5.evaluation import metrics

    grouped = t0_eval.ScoreEvalSource(SUBSET).get_dataset("validation", shuffle=False)
    rows = preprocessors.rank_classification(
        grouped,
        inputs_fn=lambda ex: tf.fill(tf.shape(ex["answer_choices"]), ex["inputs"]),
        targets_fn=lambda ex: ex["answer_choices"],
        is_correct_fn=lambda ex: tf.equal(tf.range(tf.size(ex["answer_choices"])), ex["label"]),
        mode="eval",
    )
    got = [
        (r["idx"].tolist(), r["inputs"].decode(), r["targets"].decode(), bool(r["is_correct"]))
        for r in rows.as_numpy_iterator()
    ]
    assert got == [
        (r["idx"], r["inputs_pretokenized"].strip(), r["targets_pretokenized"], r["is_correct"])
        for r in score_rows([2, 0, 1])
    ]

    examples = list(grouped.as_numpy_iterator())
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(len(examples), len(CHOICES)))
    picks = scores.argmax(-1)
    picks[0] = examples[0]["label"]  # one right, so accuracy is not trivially 0
    scores[0, picks[0]] = 10.0
    expected = 100.0 * np.mean([p == e["label"] for p, e in zip(picks, examples)])
    targets = [(tuple(r[0]), r[3], 1.0, 1) for r in got]
    t5_accuracy = metrics.rank_classification(targets, scores.reshape(-1).tolist())["accuracy"]
    assert t5_accuracy == pytest.approx(expected) and 0 < expected < 100


def test_damaged_subsets_are_named(p3_dir, caplog):
    rows = score_rows([0, 1])
    rows = rows[:2] + rows[3:] + rows[2:3]  # example 0's last choice row moved to the end
    folder = p3_dir / "super_glue_cb_GPT_3_style_score_eval"
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist(rows), str(folder / "validation-00000-of-00001.parquet"))
    with pytest.raises(
        ValueError,
        match="super_glue_cb_GPT_3_style_score_eval: the choice rows of example 0 are not together",
    ):
        evaluation.load_examples(t0_eval.task_name(folder.name), "validation")
    rows = [dict(r, is_correct=False) if r["idx"][0] == 1 else r for r in score_rows([0, 1])]
    pq.write_table(pa.Table.from_pylist(rows), str(folder / "validation-00000-of-00001.parquet"))
    with caplog.at_level(logging.WARNING):
        examples = evaluation.load_examples(t0_eval.task_name(folder.name), "validation")
    assert [e["label"] for e in examples] == [0, -1]
    assert "1 of 2 examples have no correct choice" in caplog.text


def test_a_tfrecord_split_without_its_info_file_is_skipped_naming_it(p3_dir):
    os.remove(p3_dir / WSC / "info.validation.json")
    with pytest.raises(evaluation.MissingData, match="info.validation.json missing"):
        evaluation.load_examples(t0_eval.task_name(WSC), "validation")
