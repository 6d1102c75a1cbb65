"""Training batches from the tokenized cache: a Grain pipeline with exact O(1) resume.

The data order is a pure function of (seed, index), built from Grain's
random-access datasets:

* each task is a `MapDataset` over its cached examples, shuffled by Grain's
  index shuffle (a permutation per epoch, seeded by (seed, task, epoch): no
  shuffle buffer, no bias) and unbounded (epoch after epoch);
* the tasks are mixed by `MapDataset.mix` at the mixture's rates (a fixed,
  exact interleaving: example i comes from a task computed from i alone);
* buffer k packs mixture examples [k B, (k + 1) B) best-fit-decreasing into
  rows, in an order shuffled by (seed, k); host h of H packs buffers h, h + H, ...
  and so reads only its own rows;
* `IterDataset.mp_prefetch` packs buffers in worker processes, a few ahead of
  the trainer; their order does not depend on the number of workers.

`CacheBatches` cuts this host's row stream into batches. Its position is
(buffer, row): the next batch starts at that row of that buffer, so a restart
packs one buffer and continues, whatever the step. The position goes into every
Orbax checkpoint through Grain's checkpoint handler (one file per process).

No TensorFlow or seqio here: Grain's workers are spawned and import this module.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import sys

import grain
import numpy as np
from absl import flags

from mtllama_jax.data import cache, packing

log = logging.getLogger(__name__)
STATE_FORMAT = "mtllama-data-state/1"
BUFFERS = 1 << 60  # the row stream is unbounded


@dataclasses.dataclass(frozen=True)
class PipelineSpec:
    """Everything the data order depends on (and the knobs that do not: workers)."""

    cache_dir: str
    split: str
    tasks: tuple[str, ...]
    rates: tuple[float, ...]
    sequence_length: int
    rows: int  # per host and batch
    bos_id: int
    eos_id: int
    seed: int = 0
    buffer_size: int = 1024  # examples per packing buffer
    truncate: bool = True
    shard_index: int = 0
    num_shards: int = 1
    workers: int = 2  # 0: pack in this process
    prefetch: int = 2  # packed buffers each worker keeps ready

    def order(self) -> dict:
        """The fields that fix the order of rows (saved and compared on resume)."""
        return {
            "split": self.split,
            "seed": self.seed,
            "sequence_length": self.sequence_length,
            "rows": self.rows,
            "buffer_size": self.buffer_size,
            "truncate": self.truncate,
            "num_shards": self.num_shards,
            "tasks": _digest(self.tasks, self.rates),
        }


def _digest(tasks, rates) -> str:
    return hashlib.sha256(json.dumps([list(tasks), list(rates)]).encode()).hexdigest()[:16]


def _task_seed(seed: int, task: int) -> int:
    return int(np.random.SeedSequence([seed, task]).generate_state(1)[0])


class _Unbounded(grain.MapDataset):
    """A shuffled task read past its end: Grain reshuffles each epoch with a new seed."""

    def __init__(self, parent: grain.MapDataset):
        super().__init__(parent)

    def __len__(self) -> int:
        return sys.maxsize

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        return self._parent[index]


class _Tag:
    """(inputs, targets) -> (inputs, targets, task index)."""

    def __init__(self, task: int):
        self.task = task

    def __call__(self, example):
        return (*example, self.task)


def mixture(spec: PipelineSpec) -> grain.MapDataset:
    """Mixture example i -> (inputs, targets, task index), a pure function of (seed, i)."""
    parts = []
    for j, name in enumerate(spec.tasks):
        source = cache.CachedTask(spec.cache_dir, name, spec.split)
        ds = grain.MapDataset.source(source).shuffle(seed=_task_seed(spec.seed, j))
        parts.append(_Unbounded(ds).map(_Tag(j)))
    if len(parts) == 1:
        return parts[0]
    return grain.MapDataset.mix(parts, weights=list(spec.rates))


class PackBuffer:
    """Buffer k -> its packed rows as batch-contract arrays `[rows, L]`, plus its counts."""

    def __init__(self, spec: PipelineSpec):
        self.spec = spec
        self._mixture = None

    def __getstate__(self):
        return {"spec": self.spec}

    def __setstate__(self, state):
        self.spec, self._mixture = state["spec"], None

    def _examples(self, k: int):
        if self._mixture is None:
            self._mixture = mixture(self.spec)
        b = self.spec.buffer_size
        return (self._mixture[i] for i in range(k * b, (k + 1) * b))

    def __call__(self, k: int) -> dict:
        spec = self.spec
        stats = packing.PackingStats(spec.sequence_length)
        rows = list(
            packing.counted(
                packing.pack_rows(
                    self._examples(k),
                    length=spec.sequence_length,
                    eos_id=spec.eos_id,
                    stats=stats,
                    buffer_size=spec.buffer_size,
                    truncate=spec.truncate,
                    seed=spec.seed,
                    name=f"buffer {k}",
                ),
                stats,
            )
        )
        out = packing.rows_to_batch(rows, spec.sequence_length, spec.bos_id)
        out["counts"] = np.array([getattr(stats, f) for f in _COUNTS], np.int64)
        out["buffer"] = np.int64(k)
        return out


_COUNTS = (
    "examples",
    "dropped_empty_target",
    "truncated",
    "dropped_too_long",
    "segments",
    "rows",
    "tokens",
)


def check_tasks_fit(spec: PipelineSpec) -> None:
    """Refuses a task none of whose cached examples fits a row (the stream would never end)."""
    for name in spec.tasks:
        info = cache.CachedTask(spec.cache_dir, name, spec.split).info
        shortest = info["min_target_length"] if spec.truncate else info["min_length"]
        if shortest is None or shortest > spec.sequence_length:
            raise packing.NoFittingExamples(
                f"task {name!r} ({cache.task_folder(spec.cache_dir, name)}): none of its "
                f"{info['examples']} cached examples fits a row of {spec.sequence_length} "
                f"tokens: {info['empty_targets']} have an empty response, the others are "
                f"too long (shortest {'response' if spec.truncate else 'example'}: "
                f"{shortest} tokens, truncate={spec.truncate}). Fix the task's data, raise "
                f"the sequence length, or leave the task out of the mixture"
            )


class StateSnapshot:
    """A frozen position for Grain's Orbax checkpoint handler (saved as it was at save time)."""

    def __init__(self, state: bytes):
        self._state = state

    def get_state(self) -> bytes:
        return self._state


class CacheBatches:
    """Iterator of this host's batches from the cache; `get_state`/`set_state` for Orbax.

    Starts at `start_step`: at its beginning for step 0, at a restored position
    when `set_state` is called before the first batch, else (a checkpoint
    written without data state) by counting rows from the start, with a warning.
    """

    def __init__(self, spec: PipelineSpec, start_step: int = 0):
        self.spec, self.step = spec, start_step
        self.stats = packing.PackingStats(spec.sequence_length)
        self.task_names = spec.tasks
        self._position: tuple[int, int] | None = (0, 0) if start_step == 0 else None
        self._iterator = None
        self._current = None  # the packed buffer being cut, and the next row in it
        self._row = 0
        self._buffer = 0  # this host's ordinal of the current buffer

    # ---- position ----------------------------------------------------------------------

    def get_state(self) -> bytes:
        buffer, row = self._where()
        return json.dumps(
            {
                "format": STATE_FORMAT,
                "step": self.step,
                "buffer": buffer,
                "row": row,
                "order": self.spec.order(),
            },
            indent=1,
        ).encode()

    def set_state(self, state: bytes) -> None:
        saved = json.loads(state)
        if saved.get("format") != STATE_FORMAT:
            raise ValueError(
                f"data state of format {saved.get('format')!r}; this version reads {STATE_FORMAT!r}"
            )
        mine = self.spec.order()
        differ = [
            f"{k}: saved {saved['order'].get(k)!r}, now {mine[k]!r}"
            for k in mine
            if saved["order"].get(k) != mine[k]
        ]
        if differ:
            raise ValueError(
                "the checkpoint's data order was made with other settings, so resuming "
                "would not continue it: " + "; ".join(differ) + ". Resume with the run's "
                "original data settings (process count, batch size, length, seed, mixture), "
                "or start a new MODEL_DIR with this checkpoint's params as INIT_CHECKPOINT"
            )
        self.close()
        self.step = int(saved["step"])
        self._position = (int(saved["buffer"]), int(saved["row"]))

    def orbax_save_args(self):
        """This position, frozen now, as the Orbax args of checkpoint item `data`."""
        return grain.checkpoint.CheckpointSave(StateSnapshot(self.get_state()))

    def orbax_restore_args(self):
        """Orbax args that restore checkpoint item `data` into this iterator."""
        return grain.checkpoint.CheckpointRestore(self)

    def start_prefetch(self) -> None:
        """Starts the workers now (Grain's handler calls this after a restore)."""
        if self._iterator is None:
            self._open()

    def _where(self) -> tuple[int, int]:
        if self._iterator is None:
            return self._position if self._position is not None else self._seek(self.step)
        return self._buffer, self._row

    def _seek(self, step: int) -> tuple[int, int]:
        """(buffer, row) of `step` by packing every buffer before it: O(step)."""
        log.warning(
            "no data state for step %d (a checkpoint written before data state was "
            "saved): seeking by packing the %d batches before it",
            step,
            step,
        )
        packer, left, buffer = PackBuffer(self.spec), step * self.spec.rows, 0
        while True:
            rows = int(packer(self._global(buffer))["counts"][_COUNTS.index("rows")])
            if left < rows:
                return buffer, left
            left -= rows
            buffer += 1

    def _global(self, buffer: int) -> int:
        return self.spec.shard_index + buffer * self.spec.num_shards

    # ---- iteration ---------------------------------------------------------------------

    def _open(self) -> None:
        buffer, row = self._where()
        spec = self.spec
        check_tasks_fit(spec)
        ds = (
            grain.MapDataset.range(self._global(buffer), BUFFERS, spec.num_shards)
            .map(PackBuffer(spec))
            .to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=1))
        )
        if spec.workers:
            if not flags.FLAGS.is_parsed():  # Grain reads absl flags; this job has none
                flags.FLAGS.mark_as_parsed()
            ds = ds.mp_prefetch(
                grain.MultiprocessingOptions(
                    num_workers=spec.workers, per_worker_buffer_size=spec.prefetch
                )
            )
        self._iterator = iter(ds)
        self._buffer, self._current, self._row = buffer - 1, None, 0
        self._next_buffer()
        self._row = row

    def _next_buffer(self) -> None:
        packed = next(self._iterator)
        self._buffer += 1
        if int(packed["buffer"]) != self._global(self._buffer):
            raise RuntimeError(
                f"data pipeline out of order: buffer {int(packed['buffer'])} "
                f"where {self._global(self._buffer)} was expected"
            )
        counts = dict(zip(_COUNTS, packed.pop("counts").tolist()))
        for name, value in counts.items():
            setattr(self.stats, name, getattr(self.stats, name) + value)
        if counts["rows"] == 0:
            packing.check_some_fit(
                f"the cached mixture of {len(self.spec.tasks)} task(s)",
                self.stats,
                self.spec.truncate,
                limit=0,
            )
        self._current, self._row = packed, 0

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._iterator is None:
            self._open()
        parts, need = [], self.spec.rows
        while need:
            rows = len(self._current["segment_ids"])
            if self._row == rows:
                self._next_buffer()
                continue
            take = min(need, rows - self._row)
            parts.append(
                {k: self._current[k][self._row : self._row + take] for k in packing.FEATURES}
            )
            self._row += take
            need -= take
        self.step += 1
        if len(parts) == 1:
            return {k: np.array(v) for k, v in parts[0].items()}
        return {k: np.concatenate([p[k] for p in parts]) for k in packing.FEATURES}

    def close(self) -> None:
        """Stops the worker processes (the position is kept)."""
        if self._iterator is None:
            return
        self._position = (self._buffer, self._row)
        if hasattr(self._iterator, "close"):
            self._iterator.close()
        self._iterator = None
