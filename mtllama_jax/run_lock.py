"""One run per MODEL_DIR: an exclusive lock held for the run's whole life.

Two runs on one MODEL_DIR (a requeued job whose old copy still runs) would
interleave metrics.jsonl and overwrite each other's checkpoints, so the second
is refused, naming the holder. On a local or network file system the lock is
`fcntl.flock` on `MODEL_DIR/run.lock` (released by the kernel when the holder
dies, however it dies); the file records the holder's host and pid. On an
object store (`gs://...`), which has no locks, `run.lock` holds host, pid and a
heartbeat refreshed every `heartbeat_s`; a lock whose heartbeat is older than
`stale_s` is taken over. Process 0 locks for all processes of a run.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

from mtllama_jax.exits import ModelDirBusy

LOCK_NAME = "run.lock"


def _me() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}


def _describe(holder: dict, path: str) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
    return (
        f"{os.path.dirname(path)} is in use by another run (host {holder.get('host')}, "
        f"pid {holder.get('pid')}, since {since}; lock {path}). Wait for it to end or "
        "stop it, or use another MODEL_DIR."
    )


class ModelDirLock:
    """Context manager: holds MODEL_DIR's lock or raises `exits.ModelDirBusy` naming the holder.

    `heartbeat=None` picks flock for local paths and a heartbeat file for URLs.
    """

    def __init__(
        self,
        model_dir: str,
        *,
        heartbeat: bool | None = None,
        heartbeat_s: float = 60.0,
        stale_s: float = 300.0,
    ):
        self.model_dir = model_dir
        self.heartbeat = "://" in model_dir if heartbeat is None else heartbeat
        self.heartbeat_s, self.stale_s = heartbeat_s, stale_s
        self.path = model_dir.rstrip("/") + "/" + LOCK_NAME
        self._fd = None
        self._stop = threading.Event()
        self._thread = None

    def __enter__(self):
        error = None
        if jax.process_index() == 0:
            try:
                self._acquire_heartbeat() if self.heartbeat else self._acquire_flock()
            except ModelDirBusy as e:
                error = e
        if jax.process_count() > 1:
            busy = multihost_utils.broadcast_one_to_all(np.int32(error is not None))
            if busy and error is None:
                error = ModelDirBusy(
                    f"{self.model_dir} is in use by another run (see process 0's message)"
                )
        if error is not None:
            raise error
        return self

    def __exit__(self, *exc):
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self._release_heartbeat()

    # ---- local: flock ----------------------------------------------------------------------

    def _acquire_flock(self) -> None:
        os.makedirs(self.model_dir, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            with open(self.path) as f:
                text = f.read()
            os.close(fd)
            try:
                holder = json.loads(text)
            except ValueError:
                holder = {}
            raise ModelDirBusy(_describe(holder, self.path)) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(_me()) + "\n").encode(), 0)
        self._fd = fd

    # ---- object stores: heartbeat file -----------------------------------------------------

    def _epath(self):
        from etils import epath

        return epath.Path(self.path)

    def _read_holder(self) -> dict | None:
        path = self._epath()
        try:
            return json.loads(path.read_text())
        except (FileNotFoundError, ValueError):
            return None

    def _acquire_heartbeat(self) -> None:
        me = _me()
        holder = self._read_holder()
        if (
            holder
            and (holder.get("host"), holder.get("pid")) != (me["host"], me["pid"])
            and time.time() - holder.get("heartbeat", 0) < self.stale_s
        ):
            raise ModelDirBusy(_describe(holder, self.path))
        path = self._epath()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._record = dict(me, heartbeat=time.time())
        path.write_text(json.dumps(self._record))
        time.sleep(min(1.0, self.heartbeat_s))  # a run that wrote at the same time wins or loses
        holder = self._read_holder()
        if not holder or holder.get("pid") != me["pid"] or holder.get("host") != me["host"]:
            raise ModelDirBusy(_describe(holder or {}, self.path))
        self._thread = threading.Thread(target=self._beat, daemon=True, name="run-lock")
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            self._record["heartbeat"] = time.time()
            self._epath().write_text(json.dumps(self._record))

    def _release_heartbeat(self) -> None:
        holder = self._read_holder()
        if holder and (holder.get("host"), holder.get("pid")) == (
            self._record["host"],
            self._record["pid"],
        ):
            self._epath().unlink(missing_ok=True)
