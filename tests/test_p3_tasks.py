"""P3 tasks over fixture folders in both published layouts, and the t0_train mixture."""

import json
import os
import re

import numpy as np
import pytest
import seqio
import tensorflow as tf
from helpers import PARQUET_TASK, p3_rows, session_spm, write_parquet

import mtllama_jax.tasks  # noqa: F401  (registers everything)
from mtllama_jax import data, formats, vocab
from mtllama_jax.tasks import mixing, p3

TFRECORD_TASK = "glue_mrpc_paraphrase"


def write_tfrecord(folder, split, records):
    os.makedirs(folder, exist_ok=True)
    with tf.io.TFRecordWriter(os.path.join(folder, f"{split}.tfrecord-00000-of-00001")) as w:
        for r in records:
            feature = {
                k: tf.train.Feature(bytes_list=tf.train.BytesList(value=[r[k].encode()]))
                for k in ("inputs_pretokenized", "targets_pretokenized")
            }
            feature["inputs"] = tf.train.Feature(int64_list=tf.train.Int64List(value=[5, 6]))
            w.write(
                tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()
            )
    info = {
        "features": {
            "inputs": {"dtype": "int32", "shape": [None]},
            "inputs_pretokenized": {"dtype": "string", "shape": []},
            "targets_pretokenized": {"dtype": "string", "shape": []},
        },
        "num_shards": 1,
        "seqio_version": "0.0.6",
    }
    with open(os.path.join(folder, f"info.{split}.json"), "w") as f:
        json.dump(info, f)


@pytest.fixture(scope="module")
def p3_dir(tmp_path_factory):
    os.environ[vocab.TOKENIZER_ENV] = session_spm(tmp_path_factory)
    root = tmp_path_factory.mktemp("p3")
    records = p3_rows(40, "mrpc")
    records[7]["targets_pretokenized"] = "  "  # an empty target
    write_parquet(str(root / PARQUET_TASK), "train", records, shards=2)
    write_parquet(str(root / PARQUET_TASK), "validation", p3_rows(6, "val"))
    write_tfrecord(str(root / TFRECORD_TASK), "train", p3_rows(30, "para"))
    os.environ[p3.P3_DIR_ENV] = str(root)
    yield str(root)
    del os.environ[p3.P3_DIR_ENV]


def test_t0_train_mixture_has_t0_rates():
    mixture = seqio.get_mixture_or_task("t0_train")
    table = p3.t0_train_table()
    assert len(mixture.tasks) == len(table) == 313
    assert len({r["hf_dataset"] + r["hf_subset"] for r in table}) == 38
    assert sum(mixture.get_rate(t) for t in mixture.tasks) == 17_277_798
    by_name = {t.name: t for t in mixture.tasks}
    for r in table:  # the table's rates follow T0's rule
        assert mixing.t0_rate(by_name[r["task"]]) == r["rate"]


def decode_segments(batch, vocabulary, r=0):
    out = []
    for s in range(1, batch["segment_ids"][r].max() + 1):
        m = batch["segment_ids"][r] == s
        tokens, targets = batch["input_tokens"][r][m], batch["target_tokens"][r][m]
        w = batch["loss_weights"][r][m]
        assert batch["positions"][r][m].tolist() == list(range(m.sum()))
        assert tokens[0] == vocabulary.bos_id and targets[-1] == vocabulary.eos_id
        out.append(
            (
                vocabulary.decode(targets[w == 0].tolist()),
                vocabulary.decode(targets[w == 1].tolist()),
            )
        )
    return out


@pytest.mark.parametrize("task,prefix", [(PARQUET_TASK, "mrpc"), (TFRECORD_TASK, "para")])
def test_both_layouts_read_wrap_and_pack(p3_dir, task, prefix):
    it = data.batches(task, split="train", sequence_length=256, batch_size=2, seed=3)
    batch = next(it)
    vocabulary = vocab.configured_vocabulary()
    segments = [s for r in range(2) for s in decode_segments(batch, vocabulary, r)]
    assert segments
    for prompt, response in segments:
        assert prompt.startswith(formats.WRAPPERS["mtllama_user"].prefix + f"{prefix} question")
        assert prompt.endswith("\n### ASSISTANT:") and response in ("yes", "no maybe answer")
    assert all(batch[k].shape == (2, 256) for k in data.FEATURES)


def test_empty_target_counted_and_dropped(p3_dir):
    it = data.batches(
        PARQUET_TASK, split="train", sequence_length=512, batch_size=4, seed=0, num_epochs=1
    )
    segments = sum(int(b["segment_ids"].max(axis=1).sum()) for b in it)
    assert it.stats.dropped_empty_target == 1 and it.stats.examples == 40
    assert segments == 39 and "1 with an empty target" in it.stats.report()


def test_resume_and_host_shards(p3_dir):
    def take(n, **kw):
        it = data.batches(
            PARQUET_TASK,
            split="train",
            sequence_length=128,
            batch_size=2,
            seed=5,
            buffer_size=16,
            **kw,
        )
        return [next(it) for _ in range(n)]

    full, resumed = take(5), take(2, start_step=3)
    for a, b in zip(full[3:], resumed):
        for k in data.FEATURES:
            np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(
        take(
            1,
        )[0]["input_tokens"],
        data.batches(
            PARQUET_TASK, split="train", sequence_length=128, batch_size=2, seed=6
        ).__next__()["input_tokens"],
    )
    host = [
        data.batches(
            PARQUET_TASK,
            split="train",
            sequence_length=512,
            batch_size=1,
            seed=0,
            shard_index=i,
            num_shards=2,
            num_epochs=1,
        )
        for i in (0, 1)
    ]
    prompts = [
        {p for b in h for p, _ in decode_segments(b, vocab.configured_vocabulary())} for h in host
    ]
    assert prompts[0] and prompts[1] and not prompts[0] & prompts[1]
    assert len(prompts[0] | prompts[1]) == 39


def test_validation_split_and_fixture_mixture(p3_dir):
    name = mixing.register_mixture(
        "p3_fixture_mix", [PARQUET_TASK, TFRECORD_TASK], rate=mixing.equal
    )
    batch = next(data.batches(name, split="train", sequence_length=1024, batch_size=1, seed=0))
    prompts = [p for p, _ in decode_segments(batch, vocab.configured_vocabulary())]
    assert any("mrpc" in p for p in prompts) and any("para" in p for p in prompts)
    # only the parquet task has a validation split; the mixture skips the other
    val = list(
        data.batches(
            name, split="validation", sequence_length=1024, batch_size=1, seed=0, num_epochs=1
        )
    )
    assert len(val) == 1 and val[0]["segment_ids"].max() == 6


def test_missing_task_folder_names_task_path_and_fix(p3_dir):
    with pytest.raises(FileNotFoundError) as e:
        data.batches("t0_train", split="train", sequence_length=64, batch_size=1, seed=0)
    message = str(e.value)
    missing = re.match(r"P3 task '([^']+)'", message).group(1)
    assert missing in {r["task"] for r in p3.t0_train_table()} - {PARQUET_TASK, TFRECORD_TASK}
    assert os.path.join(p3_dir, missing) in message
    assert "huggingface-cli download bigscience/P3" in message and p3.P3_DIR_ENV in message


def test_corrupt_parquet_names_the_file(p3_dir, tmp_path, monkeypatch):
    folder = tmp_path / PARQUET_TASK
    folder.mkdir()
    bad = folder / "train-00000-of-00001.parquet"
    bad.write_bytes(b"PAR1 this is not parquet")
    monkeypatch.setenv(p3.P3_DIR_ENV, str(tmp_path))
    with pytest.raises(ValueError, match=rf"{bad}: not a readable parquet file"):
        data.batches(PARQUET_TASK, split="train", sequence_length=64, batch_size=1, seed=0)
