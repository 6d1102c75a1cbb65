"""Atomic file writes: a temporary file beside the destination, renamed over it when complete.

The temporary file is created as a plain `open(path, "w")` creates a file (mode
0666 less the umask, applied by the kernel, default ACLs included), so the
finished file is as readable as any other the user writes; `tempfile.mkstemp`
would leave it 0600, unreadable to the user's group.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from typing import Iterator


@contextlib.contextmanager
def replacing(path) -> Iterator[str]:
    """Yields a new empty file's path beside `path`; renames it to `path` if the block succeeds.

    A failed block leaves `path` as it was and removes the temporary file.
    """
    path = os.fspath(path)
    folder, name = os.path.split(os.path.abspath(path))
    while True:  # a fresh name: another writer's temporary file is never reused
        tmp = os.path.join(folder, f".{name}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            break
        except FileExistsError:
            continue
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(path, text: str) -> None:
    """Writes `text` to `path` atomically."""
    with replacing(path) as tmp, open(tmp, "w") as f:
        f.write(text)


def write_bytes(path, data: bytes) -> None:
    """Writes `data` to `path` atomically."""
    with replacing(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def copy_file(src, dst) -> None:
    """Copies the contents of `src` to `dst` atomically (the mode of a new file, not src's)."""
    with replacing(dst) as tmp:
        shutil.copyfile(src, tmp)
