"""Exit codes of the jobs, and the one error handler every entry point's `main()` uses.

A user's mistake (a missing file, a bad flag value, a full disk) ends as one
line, `prog: error: <message>`, and exit code 2, never a traceback. Each other
way a job can end has its own code, so a scheduler can tell them apart:

    0    finished
    2    error: the message names the file, field or flag and the fix
    3    training stopped on non-finite losses (NonfinitePolicy.action='stop', or more
         skipped steps than NonfinitePolicy.max_consecutive_skips / max_skipped_fraction)
    4    training preempted by SIGTERM/SIGINT; the current step is saved, rerun to continue
    5    evaluation: every requested set was skipped (no data found)
    6    MODEL_DIR is held by another run (its host and pid are named)
    130  interrupted (Ctrl-C outside a training loop)
    141  the output pipe was closed (as any Unix tool)
"""

from __future__ import annotations

import errno
import logging
import os
import re
import sys
from typing import Callable

OK = 0
ERROR = 2
NONFINITE = 3
PREEMPTED = 4
ALL_SKIPPED = 5
MODEL_DIR_BUSY = 6
INTERRUPTED = 130
BROKEN_PIPE = 141


class ModelDirBusy(RuntimeError):
    """Another run holds MODEL_DIR's lock (exit code MODEL_DIR_BUSY)."""


class _BackgroundSaveErrors(logging.Filter):
    """Drops Orbax's tracebacks of a failed background save (one per thread, hundreds of
    lines on a full disk): Orbax raises the same error, and `run_main` prints it once."""

    def filter(self, record: logging.LogRecord) -> bool:
        path = record.pathname.replace("\\", "/")
        return not (
            record.levelno >= logging.ERROR and record.exc_info and "orbax/checkpoint" in path
        )


def run_main(prog: str, job: Callable[[], int | None]) -> int:
    """Runs `job()`; a user's error is printed as `prog: error: ...` and returns its exit code."""
    absl = logging.getLogger("absl")
    if not any(isinstance(f, _BackgroundSaveErrors) for f in absl.filters):
        absl.addFilter(_BackgroundSaveErrors())
    try:
        return job() or OK
    except BrokenPipeError:  # the reader of stdout went away (`| head`): stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so that the exit's flush does not fail too
        return BROKEN_PIPE
    except ModelDirBusy as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return MODEL_DIR_BUSY
    except (ValueError, OSError) as e:  # FileNotFoundError, PermissionError, ENOSPC ...
        print(f"{prog}: error: {_message(e)}", file=sys.stderr)
        return ERROR
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return INTERRUPTED


def _message(error: BaseException) -> str:
    """The error's own text; a full disk (errno 28, however wrapped) is said so first."""
    text = str(error) or type(error).__name__
    # gin appends where it called from; the message already names the binding or file.
    text = re.sub(r"\n\s*In call to configurable '[^']*' \(<[^>]*>\)", "", text)
    full = (isinstance(error, OSError) and error.errno == errno.ENOSPC) or (
        "No space left on device" in text
    )
    if full:
        text = f"the disk is full: free space or choose another folder ({text})"
    return text
