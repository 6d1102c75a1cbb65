"""T0 held-out `*_score_eval` tasks: choice rows grouped per example, both P3 layouts."""

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import seqio
import tensorflow as tf

import mtllama_jax.tasks  # noqa: F401  registers the tasks
from mtllama_jax import evaluation, formats, vocab
from mtllama_jax.tasks import p3, synthetic, t0_eval

SUBSET = "super_glue_rte_GPT_3_style_score_eval"
WSC = "super_glue_wsc.fixed_GPT_3_Style_score_eval"
CHOICES = ["yes", "no", "maybe"]


def score_rows(examples):
    """P3's layout: one row per (example, choice); `is_correct` on the gold choice."""
    return [{"inputs_pretokenized": f"premise {e} question? ", "targets_pretokenized": c,
             "answer_choices": CHOICES, "idx": [e, k], "is_correct": k == gold, "weight": 1.0}
            for e, gold in enumerate(examples) for k, c in enumerate(CHOICES)]


def write_tfrecord(folder, split, rows):
    os.makedirs(folder)
    with tf.io.TFRecordWriter(os.path.join(folder, f"{split}.tfrecord-00000-of-00001")) as w:
        for r in rows:
            f = {"inputs_pretokenized": tf.train.Feature(bytes_list=tf.train.BytesList(
                     value=[r["inputs_pretokenized"].encode()])),
                 "answer_choices": tf.train.Feature(bytes_list=tf.train.BytesList(
                     value=[c.encode() for c in r["answer_choices"]])),
                 "idx": tf.train.Feature(int64_list=tf.train.Int64List(value=r["idx"])),
                 "is_correct": tf.train.Feature(int64_list=tf.train.Int64List(
                     value=[int(r["is_correct"])]))}
            w.write(tf.train.Example(features=tf.train.Features(feature=f)).SerializeToString())
    info = {"features": {k: {"dtype": "string"} for k in ("inputs_pretokenized",
                                                           "answer_choices")}
            | {"idx": {"dtype": "int32"}, "is_correct": {"dtype": "bool"}}}
    with open(os.path.join(folder, f"info.{split}.json"), "w") as f:
        json.dump(info, f)


@pytest.fixture()
def p3_dir(tmp_path, monkeypatch):
    folder = tmp_path / SUBSET
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist(score_rows([2, 0, 1])),
                   str(folder / "validation-00000-of-00001.parquet"))
    write_tfrecord(str(tmp_path / WSC), "validation", score_rows([1, 1]))
    monkeypatch.setenv(p3.P3_DIR_ENV, str(tmp_path))
    monkeypatch.setenv(vocab.TOKENIZER_ENV, os.environ.get(vocab.TOKENIZER_ENV,
                                                           synthetic.SPM_MODEL))
    return tmp_path


def test_every_held_out_prompt_is_a_task_of_its_dataset():
    names = evaluation.task_names(["t0_eval_score"])
    rows = t0_eval.t0_eval_table()
    anli = sum(r["hf_dataset"] == "anli" for r in rows)
    assert len(names) == len(rows) + 2 * anli  # ANLI: one task per round
    datasets = {evaluation.t0_dataset(n) for n in names}
    assert None not in datasets
    assert {"super_glue_wsc_fixed", "anli_r1", "anli_r3", "hellaswag",
            "winogrande_winogrande_xl", "story_cloze_2016"} <= datasets


@pytest.mark.parametrize("subset,labels", [(SUBSET, [2, 0, 1]), (WSC, [1, 1])],
                         ids=["parquet", "tfrecord"])
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
