"""T0's held-out evaluation: the P3 `*_score_eval` subsets as seqio tasks, `t0_eval_score`.

One task per prompt of `t0_eval_tasks.tsv` (ANLI once per round), reading
`<P3 dir>/<prompt>_score_eval/` in P3's parquet or tfrecord layout. Those
subsets hold one row per (example, answer choice), the layout t5's
`rank_classification` preprocessor writes: fields `inputs_pretokenized`,
`answer_choices`, `idx` = [example, choice] and `is_correct`.

Here the rows of one example are grouped back into one record (`inputs`,
`answer_choices`, `label` = the correct choice), the input of t5's
preprocessor, because that is what the `rank` protocol of
`mtllama_jax.evaluation` scores: the choice with the highest summed
log-likelihood (T0's rank classification), plus length-normalised accuracy and
the median over a dataset's prompts, as T0 reports them. t5's `rank_classification`
metric is not attached as a seqio `metric_fn`: seqio would feed it one scored
row per choice, which the grouped tasks do not yield. The two agree:
t5's preprocessor turns a grouped record back into P3's rows, and t5's metric
on those rows gives the rank protocol's accuracy (tests/test_t0_eval_tasks.py).

Task names are the P3 subset names with `.` made `_` (seqio's rule). Each task's
T0 dataset (the table's `hf_dataset` and `hf_subset`, ANLI per round) is
recorded with it (`mtllama_jax.task_metadata`) for the evaluation's medians.
"""

from __future__ import annotations

import csv
import functools
import json
import logging
import os

import gin
import pyarrow as pa
import seqio
import tensorflow as tf

from mtllama_jax import formats, task_metadata
from mtllama_jax.tasks import p3

TABLE = os.path.join(os.path.dirname(__file__), "t0_eval_tasks.tsv")
FIELDS = ("inputs_pretokenized", "answer_choices", "idx", "is_correct")
ANLI_ROUNDS = ("r1", "r2", "r3")
log = logging.getLogger(__name__)  # mtllama_jax.tasks.*: shown without --verbose


@functools.cache
def t0_eval_table() -> list[dict]:
    with open(TABLE, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def p3_subsets() -> dict[str, str]:
    """The P3 `*_score_eval` subset of every held-out prompt -> its T0 dataset.

    The dataset is `<hf_dataset>_<hf_subset>` with `.` made `_` (`super_glue_wsc_fixed`);
    ANLI has one subset and dataset per round (`anli_r1`).
    """
    subsets = {}
    for row in t0_eval_table():
        dataset = "_".join(filter(None, (row["hf_dataset"], row["hf_subset"]))).replace(".", "_")
        rounds = [f"_{r}" for r in ANLI_ROUNDS] if row["hf_dataset"] == "anli" else [""]
        subsets |= {f"{row['task']}{r}_score_eval": f"{dataset}{r}" for r in rounds}
    return subsets


def task_name(subset: str) -> str:
    return subset.replace(".", "_")


def group_choices(rows, source: str):
    """Rows of (inputs, choices, idx, is_correct), in file order -> one record per example.

    P3 writes an example's choice rows together; rows of one example found apart
    mean a damaged copy (ValueError naming `source`). An example with no correct
    row keeps label -1 and is counted, logged and reported by the evaluation.
    """
    current, record, seen, no_label = None, None, set(), 0
    for inputs, choices, idx, is_correct in rows:
        example = int(idx[0])
        if example != current:
            if record is not None:
                no_label += record["label"] < 0
                yield record
            if example in seen:
                raise ValueError(
                    f"{source}: the choice rows of example {example} are not "
                    "together (P3 writes them in a row); re-download the subset"
                )
            seen.add(example)
            current = example
            record = {
                "inputs": inputs,
                "answer_choices": list(choices or []),
                "label": -1,
                "example_id": f"{os.path.basename(source)}/{example}",
            }
        if is_correct and record["label"] < 0:
            record["label"] = int(idx[1])
    if record is not None:
        no_label += record["label"] < 0
        yield record
    if no_label:
        log.warning("%s: %d of %d examples have no correct choice", source, no_label, len(seen))


class ScoreEvalSource(p3.P3Source):
    """A P3 `*_score_eval` folder, its choice rows grouped per example.

    The split is read when the dataset is built (a held-out subset is at most a
    few ten thousand rows), so a missing info file or a damaged subset raises its
    own FileNotFoundError / ValueError rather than a tf.data error.
    """

    def get_dataset(self, split="validation", shuffle=False, seed=None, shard_info=None, **_):
        layout, files = self._split_files(split)
        if layout == "parquet":
            rows = _parquet_rows(files)
        else:
            rows = _tfrecord_rows(files, os.path.join(self.folder, f"info.{split}.json"))
        records = [dict(r, inputs=r["inputs"].strip()) for r in group_choices(rows, self.folder)]
        return tf.data.Dataset.from_generator(
            lambda: iter(records),
            output_signature={
                "inputs": tf.TensorSpec([], tf.string),
                "answer_choices": tf.TensorSpec([None], tf.string),
                "label": tf.TensorSpec([], tf.int32),
                "example_id": tf.TensorSpec([], tf.string),
            },
        )


def _parquet_rows(files):
    for path in files:
        table = p3._parquet_file(path)
        names = table.schema_arrow.names
        missing = [f for f in FIELDS if f not in names]
        if missing:
            raise ValueError(
                f"{path}: no field(s) {missing} (has {names}); is this a P3 *_score_eval subset?"
            )
        try:
            for batch in table.iter_batches(batch_size=1024, columns=list(FIELDS)):
                yield from zip(*(batch.column(f).to_pylist() for f in FIELDS))
        except pa.ArrowException as e:
            raise ValueError(f"{path}: corrupt parquet ({e}); re-download it") from e


def _tfrecord_rows(files, info_path):
    if not os.path.exists(info_path):
        raise FileNotFoundError(f"{info_path} missing: a P3 tfrecord split needs its info file")
    with open(info_path) as f:
        features = json.load(f).get("features", {})
    missing = [f for f in FIELDS if f not in features]
    if missing:
        raise ValueError(f"{info_path}: no feature(s) {missing}; is this a P3 *_score_eval subset?")
    spec = {
        "inputs_pretokenized": tf.io.FixedLenFeature([], tf.string),
        "answer_choices": tf.io.VarLenFeature(tf.string),
        "idx": tf.io.FixedLenFeature([2], tf.int64),
        "is_correct": tf.io.FixedLenFeature([], tf.int64),
    }
    for raw in tf.data.TFRecordDataset(files).as_numpy_iterator():
        ex = tf.io.parse_single_example(raw, spec)
        yield (
            ex["inputs_pretokenized"].numpy().decode(),
            [c.decode() for c in tf.sparse.to_dense(ex["answer_choices"]).numpy()],
            ex["idx"].numpy().tolist(),
            bool(ex["is_correct"].numpy()),
        )


@gin.configurable
def t0_eval_wrapper(name: str = "mtllama") -> str:
    """Prompt wrapper of the held-out prompts: MT-LLaMA's evaluation wrapper by default."""
    return name


def _wrap_with_target(ds):
    """The prompt wrapped (`t0_eval_wrapper`), the correct choice as `targets`."""
    ds = ds.map(
        lambda ex: dict(ex, targets=tf.gather(ex["answer_choices"], tf.maximum(ex["label"], 0)))
    )
    return formats.wrap_preprocessor(ds, wrapper=t0_eval_wrapper())


def register() -> None:
    """A task per held-out prompt and the `t0_eval_score` mixture."""
    names = []
    for subset, dataset in p3_subsets().items():
        name = task_name(subset)
        names.append(name)
        if name in seqio.TaskRegistry.names():
            continue
        task_metadata.record(name, task_metadata.TaskInfo(t0_dataset=dataset))
        seqio.TaskRegistry.add(
            name,
            source=ScoreEvalSource(subset),
            preprocessors=[
                _wrap_with_target,
                seqio.preprocessors.tokenize,
                seqio.preprocessors.append_eos,
            ],
            output_features=p3.output_features(),
            metric_fns=[],
        )
    if "t0_eval_score" not in seqio.MixtureRegistry.names():
        seqio.MixtureRegistry.add("t0_eval_score", names, default_rate=1.0)


register()
