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
import difflib
import inspect
import logging
import os
import re
import sys
import warnings
from typing import Sequence

import gin

from mtllama_jax.main.gin_configurables import GIN_DIR

# Loggers that set a level of their own, so the root logger's does not reach them.
_OWN_LEVEL_LOGGERS = ("absl", "tensorflow", "transformers", "jax", "orbax")


def job_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """A job's parser with the T5X-style flags every gin job takes.

    `--gin_file` (repeatable), `--gin_search_paths` (comma-separated), `--verbose`;
    `--gin.NAME=VALUE` bindings are collected by `parse_job_flags`.
    """
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--gin_file", action="append", default=[], help="gin file (repeatable)")
    parser.add_argument("--gin_search_paths", default="", help="comma-separated folders")
    add_verbose_flag(parser)
    return parser


def parse_job_flags(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """Parses a `job_parser`'s flags, quiets other libraries' logs, collects the bindings.

    The result has `gin_bindings` (gin's `NAME = VALUE` lines) and `search_paths`
    (the folders of `--gin_search_paths`).
    """
    args, rest = parser.parse_known_args(argv)
    configure_logs(args.verbose)
    args.gin_bindings = []
    for item in rest:
        if not item.startswith("--gin."):
            parser.error(f"unrecognised argument {item!r}; gin bindings are --gin.NAME=VALUE")
        binding = item[len("--gin.") :]
        if "=" not in binding:
            parser.error(f"{item!r}: a binding is --gin.NAME=VALUE")
        args.gin_bindings.append(binding.replace("=", " = ", 1))
    args.search_paths = [p for p in args.gin_search_paths.split(",") if p]
    return args


def add_verbose_flag(parser: argparse.ArgumentParser) -> None:
    """Adds `--verbose` (other libraries' log messages too) to a job's parser."""
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="also show other libraries' log messages (TensorFlow, XLA, absl, "
        "Orbax, seqio, transformers)",
    )


def configure_logs(verbose: bool, *, uses_tensorflow: bool = True) -> None:
    """Quiets other libraries' logs unless `verbose`; call before TensorFlow is imported.

    A job that `uses_tensorflow` hides the GPUs from it here (`hide_gpus_from_tensorflow`).
    TensorFlow (2.19 and later) writes its start-up lines to stderr whatever
    TF_CPP_MIN_LOG_LEVEL says, so without `verbose` that first import runs with
    stderr silenced (it is where TF probes CUDA).
    """
    if not verbose:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if uses_tensorflow:
        with contextlib.nullcontext() if verbose else _stderr_silenced():
            hide_gpus_from_tensorflow()
    if verbose:
        return
    logging.getLogger().setLevel(logging.ERROR)
    for name in _OWN_LEVEL_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    own = logging.getLogger("mtllama_jax")
    if own.level == logging.NOTSET:
        own.setLevel(logging.WARNING)  # the root's default level, kept for our messages
    warnings.filterwarnings("ignore")
    warnings.filterwarnings("default", module="mtllama_jax")


def hide_gpus_from_tensorflow() -> None:
    """TensorFlow reads data on the host; JAX owns the accelerators.

    Every job that reads data calls this (through `configure_logs`) before
    TensorFlow makes its devices; later calls change nothing.
    """
    import tensorflow as tf

    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # TF already initialised its devices; leave them be.
        pass


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


def parse_gin(files: Sequence[str], bindings: Sequence[str], search_paths: Sequence[str] = ()):
    """Parses gin files and bindings; an unknown name is reported with the near names.

    Every file, included ones too, is found as a real path: as given (absolute, or
    relative to the working directory), then in `search_paths`, then in the package's
    gin/ folder.
    """
    folders = [*search_paths, str(GIN_DIR)]
    paths = [resolve_gin_file(f, folders) for f in files]
    try:
        with _filesystem_lookup(folders):
            gin.parse_config_files_and_bindings(paths, bindings, finalize_config=False)
    except ValueError as e:
        raise ValueError(_unknown_binding_message(str(e))) from None
    except SyntaxError as e:
        where = f"{e.filename}, line {e.lineno}: " if e.filename else ""
        raise ValueError(
            f"gin cannot parse {where}{(e.text or '').strip()!r} ({e.msg.splitlines()[-1].strip()}"
            "); a string value is quoted, e.g. --gin.MODEL_DIR=\"'/tmp/run'\""
        ) from None
    except OSError as e:
        raise FileNotFoundError(
            f"{e}\n  (gin files are looked up as given, then in --gin_search_paths, then in "
            f"{GIN_DIR})"
        ) from None


def resolve_gin_file(name: str, folders: Sequence[str]) -> str:
    """The absolute path of gin file `name`: as given, else the first of `folders` holding it."""
    for candidate in [name, *(os.path.join(folder, name) for folder in folders)]:
        if os.path.isfile(candidate):
            return os.path.abspath(candidate)
    raise FileNotFoundError(
        f"gin file {name} not found in the working directory {os.getcwd()} nor in "
        f"{', '.join(folders)}; give its path, or its folder with --gin_search_paths"
    )


@contextlib.contextmanager
def _filesystem_lookup(folders: Sequence[str]):
    """Gin looks up included files only on disk: as given, then in `folders`.

    Gin's other reader takes `runs/x.gin` for a file of the Python package `runs`;
    a folder named so in the working directory (the demo's `runs/`) is a namespace
    package without a file, and gin fails with a TypeError. Gin has no public
    setter for either list, hence the private names; both are restored.
    """
    prefixes, readers = gin.config._LOCATION_PREFIXES, gin.config._FILE_READERS
    saved = list(prefixes), list(readers)
    prefixes[:] = ["", *folders]
    readers[:] = [(open, os.path.isfile)]
    try:
        yield
    finally:
        prefixes[:], readers[:] = saved


def _unknown_binding_message(error: str) -> str:
    lines = [line.strip() for line in error.strip().splitlines() if line.strip()]
    if not re.match(r"(No configurable matching|Configurable '.*' doesn't have)", lines[0]):
        return error
    match = re.match(r"([\w./]+)\s*=", lines[-1])
    name = match.group(1) if match else lines[0]
    near = difflib.get_close_matches(name, _bindable_names(), n=5, cutoff=0.6)
    hint = f" Near names: {', '.join(near)}." if near else ""
    return f"unknown gin binding {name!r}: {lines[0]}{hint}\n  " + "\n  ".join(lines[1:])


def _bindable_names() -> list[str]:
    """Every `configurable.parameter` gin knows about."""
    names = []
    for selector, configurable in gin.config._REGISTRY.items():  # gin has no public listing
        if selector.startswith("gin."):
            continue
        short = selector.split(".")[-1]
        try:
            params = inspect.signature(configurable.wrapped).parameters
        except (TypeError, ValueError):
            continue
        hidden = {"self", "args", "kwargs", *(configurable.denylist or ())}
        allowed = configurable.allowlist
        names += [
            f"{short}.{p}" for p in params if p not in hidden and (not allowed or p in allowed)
        ]
    return names
