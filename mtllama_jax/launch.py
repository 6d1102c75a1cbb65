"""What every job's flag parsing shares: `--verbose`, and quiet other libraries without it.

A job's own messages (its prints, progress bars and the `mtllama_jax.*` loggers)
always show. Without `--verbose`, other libraries' log lines do not: TensorFlow's
C++ start-up lines (CUDA probing on a CPU machine, oneDNN and CPU-feature
notices), absl's, Orbax's, seqio's and t5's Python warnings, transformers'
messages and other packages' Python warnings; their errors still show.
`--verbose` leaves every library at its own defaults.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import warnings

# Loggers that set a level of their own, so the root logger's does not reach them.
_OWN_LEVEL_LOGGERS = ("absl", "tensorflow", "transformers", "jax", "orbax")


def add_verbose_flag(parser: argparse.ArgumentParser) -> None:
    """Adds `--verbose` (other libraries' log messages too) to a job's parser."""
    parser.add_argument("--verbose", action="store_true",
                        help="also show other libraries' log messages (TensorFlow, XLA, absl, "
                             "Orbax, seqio, transformers)")


def configure_logs(verbose: bool, *, uses_tensorflow: bool = True) -> None:
    """Quiets other libraries' logs unless `verbose`; call before TensorFlow is imported.

    TensorFlow (2.19 and later) writes its start-up lines to stderr whatever
    TF_CPP_MIN_LOG_LEVEL says, so a job that uses it imports it here with stderr
    silenced, and hides the GPUs from it (JAX owns the accelerators; TF only reads
    data), which is where it probes CUDA.
    """
    if verbose:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if uses_tensorflow:
        with _stderr_silenced():
            import tensorflow as tf

            try:
                tf.config.set_visible_devices([], "GPU")
            except RuntimeError:  # TF already initialised its devices; leave them be.
                pass
    logging.getLogger().setLevel(logging.ERROR)
    for name in _OWN_LEVEL_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    own = logging.getLogger("mtllama_jax")
    if own.level == logging.NOTSET:
        own.setLevel(logging.WARNING)  # the root's default level, kept for our messages
    warnings.filterwarnings("ignore")
    warnings.filterwarnings("default", module="mtllama_jax")


@contextlib.contextmanager
def _stderr_silenced():
    """Points file descriptor 2 at /dev/null (C++ libraries write there directly)."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
