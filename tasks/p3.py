"""P3 (the T0 training templates) as seqio tasks, read from a local copy of P3.

One task per row of `t0_train_tasks.tsv`, named as P3 names its subset, reading
`<P3 dir>/<task>/` in either layout P3 has been published in:

* parquet (the hub): `<split>-*.parquet` (or `<split>/*.parquet`);
* tfrecord (the original release): `<split>.tfrecord-*` with `info.<split>.json`.

Fields used: `inputs_pretokenized` (the prompt) and `targets_pretokenized` (the
answer); both are stripped, the prompt is wrapped (`p3_wrapper`, default
`mtllama_user`, the wrapper of MT-LLaMA's training script) and tokenised with the
shared LLaMA vocabulary. The P3 folder comes from gin (`p3_data_dir.path`) or
`MTLLAMA_P3_DIR`, looked up when data is read.
"""

from __future__ import annotations

import csv
import functools
import glob
import json
import os
import random

import gin
import pyarrow as pa
import pyarrow.parquet as pq
import seqio
import tensorflow as tf

from mtllama_jax import formats, vocab
from mtllama_jax.env import gin_or_env

P3_DIR_ENV = "MTLLAMA_P3_DIR"
TABLE = os.path.join(os.path.dirname(__file__), "t0_train_tasks.tsv")
FIELDS = ("inputs_pretokenized", "targets_pretokenized")


@gin.configurable
def p3_data_dir(path: str | None = None) -> str:
    """Folder holding P3's task folders: gin `p3_data_dir.path`, else $MTLLAMA_P3_DIR."""
    path = gin_or_env(path, P3_DIR_ENV)
    if not path:
        raise ValueError(
            f"no P3 folder configured: set {P3_DIR_ENV}=/path/to/P3/data (the folder that "
            f"holds one folder per task) or bind p3_data_dir.path in gin"
        )
    return path


@gin.configurable
def p3_wrapper(name: str = "mtllama_user") -> str:
    """Prompt wrapper of the P3 training tasks (`mtllama_jax.formats.WRAPPERS`)."""
    return name


def output_features() -> dict[str, seqio.Feature]:
    """`inputs` (prompt, no EOS) and `targets` (response + EOS), one LLaMA vocabulary."""
    v = vocab.configured_vocabulary()
    return {"inputs": seqio.Feature(v, add_eos=False), "targets": seqio.Feature(v, add_eos=True)}


def text_preprocessors(wrapper_name) -> list:
    """strip, wrap inputs with `wrapper_name()` (read at read time), tokenise, EOS."""

    def strip_and_wrap(ds):
        ds = ds.map(
            lambda ex: {k: tf.strings.strip(ex[k]) for k in ("inputs", "targets")},
            num_parallel_calls=tf.data.AUTOTUNE,
        )
        return formats.wrap_preprocessor(ds, wrapper=wrapper_name())

    strip_and_wrap.prompt_wrapper = wrapper_name  # recorded by the tokenized cache
    return [strip_and_wrap, seqio.preprocessors.tokenize, seqio.preprocessors.append_eos]


def missing_task_message(task: str, folder: str) -> str:
    return (
        f"P3 task {task!r}: no data at {folder} (expected {task}/<split>-*.parquet or "
        f"{task}/<split>.tfrecord-* with info.<split>.json). Get it with `huggingface-cli "
        f"download bigscience/P3 --repo-type dataset --include 'data/{task}/*' --local-dir "
        f"P3` and set {P3_DIR_ENV}=P3/data (or gin p3_data_dir.path)"
    )


class P3Source(seqio.DataSource):
    """One P3 task folder; splits and files are listed when first needed."""

    def __init__(self, task: str):
        self._task = task
        super().__init__(splits=())

    @property
    def folder(self) -> str:
        return os.path.join(p3_data_dir(), self._task)

    def _files(self) -> dict[str, tuple[str, list[str]]]:
        """split -> (layout, sorted files)."""
        folder = self.folder
        if not os.path.isdir(folder):
            raise FileNotFoundError(missing_task_message(self._task, folder))
        found: dict[str, tuple[str, list[str]]] = {}
        for path in sorted(
            glob.glob(os.path.join(folder, "*.parquet"))
            + glob.glob(os.path.join(folder, "*", "*.parquet"))
        ):
            rel = os.path.relpath(path, folder)
            split = rel.split(os.sep)[0] if os.sep in rel else rel.split("-")[0]
            found.setdefault(split, ("parquet", []))[1].append(path)
        for path in sorted(glob.glob(os.path.join(folder, "*.tfrecord*"))):
            split = os.path.basename(path).split(".tfrecord")[0]
            found.setdefault(split, ("tfrecord", []))[1].append(path)
        if not found:
            raise FileNotFoundError(missing_task_message(self._task, folder))
        return found

    @property
    def splits(self):
        return tuple(self._files())

    @property
    def supports_arbitrary_sharding(self) -> bool:
        return False

    def list_shards(self, split: str) -> list[str]:
        return self._split_files(split)[1]

    def _split_files(self, split):
        files = self._files()
        if split not in files:
            raise ValueError(
                f"P3 task {self._task!r} has no {split!r} split in {self.folder}; "
                f"it has {sorted(files)}"
            )
        return files[split]

    def num_input_examples(self, split: str) -> int | None:
        layout, files = self._split_files(split)
        if layout == "parquet":
            return sum(_parquet_file(f).metadata.num_rows for f in files)
        stats = os.path.join(self.folder, f"stats.{split}.json")
        if os.path.exists(stats):
            with open(stats) as f:
                return json.load(f).get("examples")
        return None

    def get_dataset(self, split="train", shuffle=True, seed=None, shard_info=None, **_):
        layout, files = self._split_files(split)
        if shard_info:
            files = files[shard_info.index :: shard_info.num_shards]
        if shuffle:
            files = list(files)
            random.Random(seed).shuffle(files)
        if layout == "parquet":
            ds = _parquet_dataset(files)
        else:
            ds = _tfrecord_dataset(files, os.path.join(self.folder, f"info.{split}.json"))
        return ds.map(lambda ex: {"inputs": ex[FIELDS[0]], "targets": ex[FIELDS[1]]})


def _parquet_file(path: str) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{path}: not a readable parquet file ({e}); re-download it") from e


def _parquet_dataset(files: list[str]) -> tf.data.Dataset:
    for path in files:  # fail early, naming the file, on a bad footer or missing field
        names = _parquet_file(path).schema_arrow.names
        for field in FIELDS:
            if field not in names:
                raise ValueError(f"{path}: no field {field!r} (has {names}); is this P3?")

    def rows():
        for path in files:
            row = 0
            try:
                for batch in _parquet_file(path).iter_batches(batch_size=1024, columns=FIELDS):
                    columns = [batch.column(f).to_pylist() for f in FIELDS]
                    for i in range(batch.num_rows):
                        yield {f: (c[i] or "").encode() for f, c in zip(FIELDS, columns)}
                    row += batch.num_rows
            except pa.ArrowException as e:
                raise ValueError(f"{path}: corrupt parquet after row {row}: {e}") from e

    spec = {f: tf.TensorSpec([], tf.string) for f in FIELDS}
    return tf.data.Dataset.from_generator(rows, output_signature=spec)


def _tfrecord_dataset(files: list[str], info_path: str) -> tf.data.Dataset:
    if not os.path.exists(info_path):
        raise FileNotFoundError(f"{info_path} missing: a P3 tfrecord split needs its info file")
    with open(info_path) as f:
        features = json.load(f).get("features", {})
    for field in FIELDS:
        if features.get(field, {}).get("dtype") != "string":
            raise ValueError(f"{info_path}: no string feature {field!r}; is this P3?")
    spec = {f: tf.io.FixedLenFeature([], tf.string) for f in FIELDS}
    return tf.data.TFRecordDataset(files).map(lambda r: tf.io.parse_single_example(r, spec))


@functools.cache
def t0_train_table() -> list[dict]:
    """Rows of t0_train_tasks.tsv (ints for sizes and rates, bools for flags)."""
    with open(TABLE, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    for r in rows:
        for k in ("train_size", "num_templates", "rate"):
            r[k] = int(r[k])
        for k in ("original_task", "has_answer_choices"):
            r[k] = r[k] == "True"
    return rows


def register_p3_task(name: str) -> None:
    """Register the P3 subset `name` (idempotent)."""
    if name in seqio.TaskRegistry.names():
        return
    seqio.TaskRegistry.add(
        name,
        source=P3Source(name),
        preprocessors=text_preprocessors(p3_wrapper),
        output_features=output_features(),
        metric_fns=[],
    )


def register_t0_train() -> None:
    """313 T0 training tasks and the `t0_train` mixture at T0's rates."""
    table = t0_train_table()
    for row in table:
        register_p3_task(row["task"])
    if "t0_train" not in seqio.MixtureRegistry.names():
        seqio.MixtureRegistry.add("t0_train", [(r["task"], r["rate"]) for r in table])
