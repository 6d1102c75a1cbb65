"""A user's own instruction data (JSON or JSONL) as a seqio task, from gin.

    train.mixture_or_task_name = @register_mixture()
    register_mixture.name = "t0_plus_mine"
    register_mixture.tasks = ["t0_train", @register_user_task()]
    register_user_task.name = "mine"
    register_user_task.train_file = "/data/mine.jsonl"

Files: `.jsonl` (one object per line) or `.json` (a list of objects). Fields are
named by the user (`instruction_field`, `input_field`, `response_field`); left
unnamed, the LaMini-instruction layout (`instruction`, `response`) and the Alpaca
layout (`instruction`, `input`, `output`) are recognised from the first record.
An Alpaca `input` is appended to the instruction as `\\n\\n### Input:\\n{input}`.
"""

from __future__ import annotations

import io
import json
import os
import random

import gin
import seqio
import tensorflow as tf

from mtllama_jax.tasks import p3

LAYOUTS = {  # name -> (instruction, input, response) fields
    "lamini": ("instruction", None, "response"),
    "alpaca": ("instruction", "input", "output"),
}


def read_records(path: str) -> list[dict]:
    """Objects of a .json list or .jsonl file; errors name the file and line."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"instruction data file {path} does not exist")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise ValueError(
            f"{path}:{line}: not UTF-8 (byte 0x{raw[e.start]:02x} at column "
            f"{column}); save the file as UTF-8"
        ) from None
    with io.StringIO(text) as f:
        if path.endswith(".jsonl"):
            records = []
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(
                        f"{path}:{number}: not valid JSON ({e.msg}, column "
                        f"{e.colno}); a .jsonl file holds one object per line"
                    ) from e
        else:
            try:
                records = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{path}:{e.lineno}: not valid JSON ({e.msg}, column {e.colno})"
                ) from e
            if not isinstance(records, list):
                raise ValueError(
                    f"{path}: a .json file must hold a list of objects; use "
                    f".jsonl for one object per line"
                )
    for i, r in enumerate(records):
        if not isinstance(r, dict):
            raise ValueError(f"{path}: record {i + 1} is {type(r).__name__}, not an object")
    return records


def resolve_fields(path, record, instruction_field, input_field, response_field):
    """(instruction, input or None, response) field names for this file."""
    if instruction_field and response_field:
        fields = (instruction_field, input_field, response_field)
    else:
        keys = set(record)
        layout = (
            "alpaca"
            if {"instruction", "output"} <= keys
            else ("lamini" if {"instruction", "response"} <= keys else None)
        )
        if layout is None:
            raise ValueError(
                f"{path}: fields {sorted(keys)} match neither the LaMini (instruction, "
                f"response) nor the Alpaca (instruction, input, output) layout; name them "
                f"with register_user_task.instruction_field / response_field"
            )
        fields = LAYOUTS[layout]
    for f in fields:
        if f and f not in record and f != fields[1]:
            raise ValueError(f"{path}: record 1 has no field {f!r} (has {sorted(record)})")
    return fields


class JsonSource(seqio.DataSource):
    """Instruction/response pairs of JSON files, one per split, read when needed."""

    def __init__(self, files: dict[str, str], fields: tuple):
        self._paths, self._fields = files, fields
        super().__init__(splits=tuple(files))

    @property
    def supports_arbitrary_sharding(self) -> bool:
        return False

    def list_shards(self, split):
        return [self._paths[split]]

    def num_input_examples(self, split):
        return len(self._pairs(split))

    def _pairs(self, split) -> list[tuple[str, str]]:
        path = self._paths[split]
        records = read_records(path)
        if not records:
            return []
        inst, inp, resp = resolve_fields(path, records[0], *self._fields)
        pairs = []
        for number, r in enumerate(records, start=1):
            if inst not in r or resp not in r:
                raise ValueError(f"{path}: record {number} lacks {inst!r} or {resp!r}")
            prompt = str(r[inst])
            if inp and str(r.get(inp) or "").strip():
                prompt += "\n\n### Input:\n" + str(r[inp])
            pairs.append((prompt, "" if r[resp] is None else str(r[resp])))
        return pairs

    def get_dataset(self, split="train", shuffle=True, seed=None, shard_info=None, **_):
        pairs = self._pairs(split)
        if shard_info:
            pairs = pairs[shard_info.index :: shard_info.num_shards]
        if shuffle:
            random.Random(seed).shuffle(pairs)
        return tf.data.Dataset.from_tensor_slices(
            {
                "inputs": tf.constant([p for p, _ in pairs], tf.string, shape=[len(pairs)]),
                "targets": tf.constant([t for _, t in pairs], tf.string, shape=[len(pairs)]),
            }
        )


@gin.configurable
def register_user_task(
    name: str = "user_instructions",
    train_file: str = gin.REQUIRED,
    validation_file: str | None = None,
    wrapper: str = "alpaca",
    instruction_field: str | None = None,
    input_field: str | None = None,
    response_field: str | None = None,
) -> str:
    """Register a task over JSON/JSONL instruction data; returns its name.

    `wrapper` names the prompt wrapper (`mtllama_jax.formats.WRAPPERS`). Records
    with an empty response are dropped and counted by the packer.
    """
    if name in seqio.TaskRegistry.names():
        return name
    files = {"train": train_file}
    if validation_file:
        files["validation"] = validation_file
    seqio.TaskRegistry.add(
        name,
        source=JsonSource(files, (instruction_field, input_field, response_field)),
        preprocessors=p3.text_preprocessors(lambda: wrapper),
        output_features=p3.output_features(),
        metric_fns=[],
    )
    return name
