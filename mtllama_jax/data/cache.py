"""The tokenized cache on disk: one folder per task of memory-mapped token arrays.

    <cache>/manifest.json              what was built: split, tasks, counts (a summary)
    <cache>/tasks/<task>/task.json     the task's fingerprint, counts and file checksums
    <cache>/tasks/<task>/tokens.int32  every example's inputs then targets, back to back
    <cache>/tasks/<task>/offsets.int64 start of example i at [i], the end at [examples]
    <cache>/tasks/<task>/input_lengths.int32  where each example's targets begin

Example i is `tokens[offsets[i]:offsets[i+1]]`, split after `input_lengths[i]`
tokens: O(1) random access with numpy's memory maps, no parsing, and only the
pages read are resident. A task is written under `tasks/.<task>.staging-<pid>`
and renamed when complete, so a folder named after a task is always whole.

The fingerprint (tokenizer sha256 and ids, prompt wrapper, source files with
sizes and mtimes) is compared with the task's current one before training:
a cache of another tokenizer, wrapper or source is refused, naming what differs.

No TensorFlow here: the pipeline's worker processes import this module.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil

import numpy as np

FORMAT = "mtllama-cache/1"
TASKS = "tasks"
MANIFEST = "manifest.json"
TASK_JSON = "task.json"
LOCK = ".lock"
FILES = {
    "tokens": ("tokens.int32", "<i4"),
    "offsets": ("offsets.int64", "<i8"),
    "input_lengths": ("input_lengths.int32", "<i4"),
}  # little-endian on every host


class CacheError(ValueError):
    """A cache that cannot be used as it is; the message names the file and the fix."""


def rebuild_command(cache_dir: str, name: str, split: str) -> str:
    return (
        f"mtllama-cache --mixture_or_task_name={name} --split={split} --out={cache_dir} "
        f"(with the gin files and bindings of this run)"
    )


def task_folder(cache_dir: str, task: str) -> str:
    return os.path.join(cache_dir, TASKS, task)


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_write_json(path: str, value) -> None:
    """Writes JSON under a temporary name, then renames (the user's umask applies)."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=1, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class TaskWriter:
    """Appends examples of one task into its staging folder; `commit` renames it into place."""

    def __init__(self, cache_dir: str, task: str):
        self.final = task_folder(cache_dir, task)
        self.staging = os.path.join(cache_dir, TASKS, f".{task}.staging-{os.getpid()}")
        shutil.rmtree(self.staging, ignore_errors=True)
        os.makedirs(self.staging)
        # Held while the task is written: a staging folder whose lock is free is dead.
        self._lock = open(os.path.join(self.staging, LOCK), "w")
        fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._tokens = open(os.path.join(self.staging, FILES["tokens"][0]), "wb")
        self._digest = hashlib.sha256()
        self._ends, self._input_lengths = [], []
        self.tokens = 0
        self.empty_targets = 0
        # The shortest example and response with a non-empty response: whether any fits.
        self.min_length = self.min_target_length = None

    def add(self, inputs: np.ndarray, targets: np.ndarray, eos_id: int) -> None:
        data = np.concatenate([inputs, targets]).astype("<i4").tobytes()
        self._tokens.write(data)
        self._digest.update(data)
        self.tokens += len(inputs) + len(targets)
        self._ends.append(self.tokens)
        self._input_lengths.append(len(inputs))
        if np.any(targets != eos_id):
            n = len(inputs) + len(targets)
            self.min_length = n if self.min_length is None else min(self.min_length, n)
            self.min_target_length = (
                len(targets)
                if self.min_target_length is None
                else min(self.min_target_length, len(targets))
            )
        else:
            self.empty_targets += 1

    def commit(self, info: dict) -> dict:
        """Writes the index arrays and task.json, then renames staging to the task's name."""
        self._tokens.flush()
        os.fsync(self._tokens.fileno())
        self._tokens.close()
        files = {FILES["tokens"][0]: {"bytes": self.tokens * 4, "sha256": self._digest.hexdigest()}}
        arrays = {
            "offsets": np.array([0, *self._ends], "<i8"),
            "input_lengths": np.array(self._input_lengths, "<i4"),
        }
        for key, array in arrays.items():
            name = FILES[key][0]
            path = os.path.join(self.staging, name)
            with open(path, "wb") as f:
                f.write(array.tobytes())
                f.flush()
                os.fsync(f.fileno())
            files[name] = {
                "bytes": array.nbytes,
                "sha256": hashlib.sha256(array.tobytes()).hexdigest(),
            }
        info = dict(
            info,
            format=FORMAT,
            examples=len(self._ends),
            tokens=self.tokens,
            empty_targets=self.empty_targets,
            min_length=self.min_length,
            min_target_length=self.min_target_length,
            files=files,
        )
        atomic_write_json(os.path.join(self.staging, TASK_JSON), info)
        old = None
        if os.path.exists(self.final):  # a stale build of this task: swap, then delete
            old = f"{self.staging}.old"
            os.replace(self.final, old)
        os.replace(self.staging, self.final)
        if old:
            shutil.rmtree(old, ignore_errors=True)
        self._lock.close()
        return info

    def abort(self) -> None:
        """Removes the staging folder (a failed or interrupted task leaves nothing behind)."""
        if not self._tokens.closed:
            self._tokens.close()
        shutil.rmtree(self.staging, ignore_errors=True)
        self._lock.close()


def remove_dead_staging(cache_dir: str) -> None:
    """Deletes the staging folders of killed builds (nobody holds their lock)."""
    root = os.path.join(cache_dir, TASKS)
    for entry in os.listdir(root):
        if not (entry.startswith(".") and ".staging-" in entry):
            continue
        folder = os.path.join(root, entry)
        try:
            with open(os.path.join(folder, LOCK), "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # a live build of another process or host is writing it
        except OSError:
            pass  # no lock file: killed before it was made, or a swapped-out old copy
        shutil.rmtree(folder, ignore_errors=True)


def read_task_info(cache_dir: str, task: str) -> dict | None:
    """The task's task.json, or None when the task is not in the cache."""
    path = os.path.join(task_folder(cache_dir, task), TASK_JSON)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            info = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CacheError(
            f"{path}: unreadable ({e}); delete {os.path.dirname(path)} and "
            f"rerun mtllama-cache to rebuild the task"
        ) from None
    if info.get("format") != FORMAT:
        raise CacheError(
            f"{path}: format {info.get('format')!r}, this version reads {FORMAT!r};"
            f" rebuild the cache with mtllama-cache"
        )
    return info


def fingerprint_differences(saved: dict, current: dict) -> list[str]:
    """What differs between two fingerprints, one line per field."""
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if a != b:
            out.append(f"{key}: cache has {json.dumps(a)}, this run has {json.dumps(b)}")
    return out


def write_manifest(cache_dir: str, name: str, split: str, tasks) -> dict:
    """Summarises the complete tasks found in the cache (any host may rewrite it)."""
    infos = {t: read_task_info(cache_dir, t) for t in tasks}
    manifest = {
        "format": FORMAT,
        "mixture_or_task_name": name,
        "split": split,
        "out": cache_dir,
        "tasks": {
            t: {k: i[k] for k in ("examples", "tokens", "empty_targets", "fingerprint")}
            for t, i in infos.items()
            if i is not None
        },
        "missing": sorted(t for t, i in infos.items() if i is None),
    }
    atomic_write_json(os.path.join(cache_dir, MANIFEST), manifest)
    return manifest


class CachedTask:
    """Random access to one cached task: `task[i]` is (inputs, targets) int32 arrays.

    Checked when opened (file sizes against task.json, offsets monotone and
    ending at the token count), memory-mapped on first access; pickles as its
    path, so worker processes map the files themselves.
    """

    def __init__(self, cache_dir: str, task: str, split: str):
        self.cache_dir, self.task, self.split = cache_dir, task, split
        self.folder = task_folder(cache_dir, task)
        info = read_task_info(cache_dir, task)
        if info is None:
            raise CacheError(
                f"task {task!r} is not in the cache {cache_dir} (no "
                f"{os.path.join(self.folder, TASK_JSON)})"
            )
        if info.get("split") != split:
            raise CacheError(
                f"{self.folder}: cached split {info.get('split')!r}, not {split!r}; "
                f"build {split!r} into another folder"
            )
        self.info = info
        self.examples = int(info["examples"])
        self._arrays = None
        self._check()

    def _check(self) -> None:
        for name, meta in self.info["files"].items():
            path = os.path.join(self.folder, name)
            size = os.path.getsize(path) if os.path.exists(path) else None
            if size != meta["bytes"]:
                raise CacheError(
                    f"{path}: {size} bytes, task.json says {meta['bytes']}: truncated or "
                    f"corrupt. Delete {self.folder} and rerun mtllama-cache to rebuild it"
                )
        offsets = self.offsets
        if (
            len(offsets) != self.examples + 1
            or offsets[0] != 0
            or offsets[-1] != self.info["tokens"]
        ):
            raise self._corrupt()

    def _corrupt(self) -> CacheError:
        return CacheError(
            f"{self.folder}: {FILES['offsets'][0]} or {FILES['input_lengths'][0]} "
            f"is corrupt (offsets not increasing from 0 to {self.info['tokens']} "
            f"tokens). Delete the folder and rerun mtllama-cache to rebuild it"
        )

    def _map(self):
        if self._arrays is None:
            self._arrays = {
                key: np.memmap(os.path.join(self.folder, name), dtype=dtype, mode="r")
                if self.info["files"][name]["bytes"]
                else np.zeros(0, dtype)
                for key, (name, dtype) in FILES.items()
            }
        return self._arrays

    @property
    def offsets(self) -> np.ndarray:
        return self._map()["offsets"]

    @property
    def input_lengths(self) -> np.ndarray:
        return self._map()["input_lengths"]

    def __len__(self) -> int:
        return self.examples

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a = self._map()
        start, end = int(a["offsets"][i]), int(a["offsets"][i + 1])
        cut = start + int(a["input_lengths"][i])
        if not start <= cut <= end:
            raise self._corrupt()
        tokens = a["tokens"]
        return np.asarray(tokens[start:cut], np.int32), np.asarray(tokens[cut:end], np.int32)

    def lengths(self) -> tuple[np.ndarray, np.ndarray]:
        """(total tokens, target tokens) of every example, without reading tokens."""
        total = np.diff(self.offsets)
        return total, total - self.input_lengths

    def verify(self) -> None:
        """Checks every file's sha256 against task.json and the offsets (reads the task)."""
        lengths = np.diff(self.offsets)
        if np.any(lengths < 0) or np.any(self.input_lengths > lengths):
            raise self._corrupt()
        for name, meta in self.info["files"].items():
            path = os.path.join(self.folder, name)
            if sha256_file(path) != meta["sha256"]:
                raise CacheError(
                    f"{path}: sha256 differs from task.json: corrupt. Delete "
                    f"{self.folder} and rerun mtllama-cache to rebuild it"
                )

    def __getstate__(self):
        return {
            "cache_dir": self.cache_dir,
            "task": self.task,
            "split": self.split,
            "info": self.info,
        }

    def __setstate__(self, state):
        self.cache_dir, self.task, self.split = state["cache_dir"], state["task"], state["split"]
        self.info = state["info"]
        self.folder = task_folder(self.cache_dir, self.task)
        self.examples = int(self.info["examples"])
        self._arrays = None
