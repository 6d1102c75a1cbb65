"""The on-disk layout of a model folder, which `mtllama-convert` and training write.

A checkpoint folder (params only):

    config.json               the model (`LlamaConfig.to_hf()` plus this project's fields)
    tokenizer.model           the SentencePiece model (+ tokenizer_config.json,
                              special_tokens_map.json, added_tokens.json when given)
    params/                   the param tree, an Orbax (StandardCheckpointer) checkpoint

A training MODEL_DIR (`checkpoints.TrainCheckpoints`, `train.py`) holds:

    config.json               the model, as above; checked on every start
    tokenizer.model ...       the tokenizer files the run was given (copied)
    config.gin                the operative gin config of the latest start
    checkpoints/<step>/params the params pytree (Orbax), restorable on its own
    checkpoints/<step>/state  step, optimizer state, PRNG key, skipped-step count
    checkpoints/<step>/data   the data iterator's position, one file per process (when
                              the data source has one: the tokenized cache's pipeline)
    checkpoints/<step>/manifest.json  sha256 and size of the step's files
    corrupt_checkpoints/      steps found damaged on restore, moved aside
    metrics.jsonl, tensorboard/, run.lock   see `metrics` and `run_lock`

and opens like a checkpoint folder, at its latest step (`open_checkpoint`: its latest
intact one).

A folder is written under a temporary name beside its destination and renamed
when complete, so an interrupted write never leaves a half-written folder.
Params restore straight onto the caller's shardings (abstract arrays), and one
parameter at a time for converters that stream.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Iterator, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from mtllama_jax import atomic, models
from mtllama_jax.models.hf import read_config_json
from mtllama_jax.models.llama.config import LlamaConfig

PARAMS = "params"
CONFIG = "config.json"
TOKENIZER = "tokenizer.model"
CHECKPOINTS = "checkpoints"
STEP_MANIFEST = "manifest.json"
SET_ASIDE = "corrupt_checkpoints"
GIN_CONFIG = "config.gin"
# config.json's key for this project's own LlamaConfig fields.
OWN_KEY = "mtllama_jax"
# Tokenizer files copied along with tokenizer.model when present.
TOKENIZER_FILES = (
    TOKENIZER,
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.json",
)
_OWN_FIELDS = ("dtype", "param_dtype", "attention", "remat")
_CONVERT_HINT = "convert a Hugging Face folder with `mtllama-convert hf-to-jax --hf DIR --out {}`"


def save_params(
    folder,
    params,
    config: LlamaConfig,
    *,
    tokenizer_files: Sequence[str] = (),
    overwrite: bool = False,
) -> None:
    """Writes `params` (a nested dict of arrays), config.json and tokenizer files to `folder`."""
    with staged(folder, overwrite=overwrite) as tmp:
        write_contents(tmp, params, config, tokenizer_files)


def write_contents(folder, params, config: LlamaConfig, tokenizer_files: Sequence[str] = ()):
    """Writes a checkpoint folder's files into an existing (staging) folder."""
    ckptr = ocp.StandardCheckpointer()
    try:
        ckptr.save(os.path.join(os.path.abspath(folder), PARAMS), params)
        ckptr.wait_until_finished()
    finally:
        ckptr.close()  # its threads stop writing before a failed folder is removed
    if jax.process_index() == 0:
        write_config(folder, config)
        for src in tokenizer_files:
            shutil.copyfile(src, os.path.join(folder, os.path.basename(src)))


def write_config(folder, config: LlamaConfig) -> None:
    """`folder/config.json`: the Hugging Face fields plus this project's own (atomic)."""
    hf = dict(config.to_hf(), **{OWN_KEY: {k: getattr(config, k) for k in _OWN_FIELDS}})
    atomic.write_text(os.path.join(folder, CONFIG), json.dumps(hf, indent=2) + "\n")


def check_writable(folder, *, overwrite: bool = False) -> None:
    """Refuses, before any work, an output folder that exists or whose parent is not writable."""
    folder = os.path.abspath(os.fspath(folder))
    if os.path.exists(folder) and not overwrite:
        raise FileExistsError(
            f"output folder {folder} already exists; pass --overwrite (overwrite=True) to "
            "replace it, or choose another folder"
        )
    parent = os.path.dirname(folder)
    existing = parent
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise NotADirectoryError(
            f"{existing} is a file, not a folder; choose another output folder"
        )
    try:
        os.makedirs(parent, exist_ok=True)
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        raise OSError(
            e.errno,
            f"cannot write into {parent} ({e.strerror}); choose an output folder you can write to",
        ) from None


@contextlib.contextmanager
def staged(folder, *, overwrite: bool = False) -> Iterator[str]:
    """Yields a temporary folder beside `folder`; renames it to `folder` on success.

    Refuses an existing `folder` unless `overwrite`; on error the temporary
    folder is removed and `folder` is left as it was.
    """
    folder = os.path.abspath(os.fspath(folder))
    if os.path.exists(folder) and not overwrite:
        raise FileExistsError(
            f"output folder {folder} already exists; pass --overwrite (overwrite=True) to "
            "replace it, or choose another folder"
        )
    parent, name = os.path.split(folder)
    tmp = os.path.join(parent, f".{name}.partial")
    primary = jax.process_index() == 0
    if primary:
        os.makedirs(parent, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left by an earlier interrupted run
        os.makedirs(tmp)
    _sync("staged:start")
    try:
        yield tmp
        _sync("staged:written")
    except BaseException:
        if primary:
            _remove_settled(tmp)
        raise
    if primary:
        old = os.path.join(parent, f".{name}.old")
        if os.path.exists(folder):
            shutil.rmtree(old, ignore_errors=True)
            os.rename(folder, old)
        os.rename(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    _sync("staged:renamed")


def _remove_settled(folder: str, timeout_s: float = 10.0) -> None:
    """Removes `folder` until it stays removed: after a failed save, TensorStore's writer
    threads may still create files in it for a moment."""
    deadline = time.monotonic() + timeout_s
    while True:
        shutil.rmtree(folder, ignore_errors=True)
        time.sleep(0.2)
        if not os.path.exists(folder) or time.monotonic() > deadline:
            return


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


# ---- reading --------------------------------------------------------------------------------


def load_config(folder) -> LlamaConfig:
    """The LlamaConfig of a checkpoint folder or training MODEL_DIR."""
    path = os.path.join(folder, CONFIG)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} is missing: a checkpoint folder needs config.json (the model's Hugging "
            f"Face config); copy it from the model the weights came from, or "
            + _CONVERT_HINT.format(folder)
        )
    return models.config_from_hf(
        path,
        cpu_forms=jax.default_backend() == "cpu",
        **read_config_json(path).get(OWN_KEY, {}),
    )


def tokenizer_path(folder) -> str:
    """The folder's tokenizer.model, checked to exist."""
    path = os.path.join(folder, TOKENIZER)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} is missing: a checkpoint folder needs tokenizer.model (the LLaMA "
            "SentencePiece model); copy it from the model the weights came from"
        )
    return path


def tokenizer_files(folder) -> list[str]:
    """The tokenizer files present in `folder` (tokenizer.model first)."""
    return [
        os.path.join(folder, n) for n in TOKENIZER_FILES if os.path.exists(os.path.join(folder, n))
    ]


def is_model_dir(folder) -> bool:
    """Whether `folder` is a training MODEL_DIR (it has `checkpoints/`)."""
    return os.path.isdir(os.path.join(folder, CHECKPOINTS))


def checkpoints_dir(model_dir) -> str:
    """`<model_dir>/checkpoints`, where Orbax keeps a training run's steps."""
    return os.path.join(os.path.abspath(os.fspath(model_dir)), CHECKPOINTS)


def saved_steps(model_dir) -> list[int]:
    """The finished steps of a training MODEL_DIR, newest first."""
    manager = ocp.CheckpointManager(
        checkpoints_dir(model_dir), options=ocp.CheckpointManagerOptions(read_only=True)
    )
    steps = sorted(manager.all_steps(), reverse=True)
    manager.close()
    return steps


def params_dir(folder, step: int | None = None) -> str:
    """`folder/params`, or `folder/checkpoints/<step>/params` of a training MODEL_DIR."""
    folder = os.path.abspath(os.fspath(folder))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"checkpoint folder {folder} does not exist")
    if is_model_dir(folder):
        if step is None:
            steps = saved_steps(folder)
            if not steps:
                raise FileNotFoundError(
                    f"{folder}/{CHECKPOINTS} holds no finished step; train longer or point at "
                    "a converted checkpoint folder"
                )
            step = steps[0]
        path = os.path.join(folder, CHECKPOINTS, str(step), PARAMS)
    else:
        path = os.path.join(folder, PARAMS)
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"{path} is missing: a checkpoint folder keeps its weights in params/ (an Orbax "
            "checkpoint); " + _CONVERT_HINT.format(folder)
        )
    return path


def params_metadata(folder, step: int | None = None) -> dict:
    """The stored param tree as (shape, dtype) leaves, nothing read."""
    meta = ocp.StandardCheckpointer().metadata(params_dir(folder, step)).item_metadata
    return jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(tuple(m.shape), np.dtype(m.dtype)), dict(meta.tree)
    )


def load_params(folder, shardings=None, *, dtype=None, step: int | None = None):
    """The folder's params, restored straight onto `shardings` (a matching tree).

    Without shardings, everything lands on the first local device. `dtype`
    casts on restore; by default the stored dtypes are kept.
    """
    path = params_dir(folder, step)
    stored = params_metadata(folder, step)
    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: device, stored)
    want, got = jax.tree.structure(shardings), jax.tree.structure(stored)
    if want != got:
        raise ValueError(
            f"{path}: the stored param tree does not match the model's: stored has "
            f"{_first_paths(stored, shardings)}; check that config.json matches the weights"
        )
    target = jax.tree.map(
        lambda m, s: jax.ShapeDtypeStruct(m.shape, np.dtype(dtype or m.dtype), sharding=s),
        stored,
        shardings,
    )
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(path, target)


def open_checkpoint(folder, layout, step: int | None = None, dtype: str | None = None):
    """(model, params on the layout's mesh, tokenizer path) of a checkpoint folder or MODEL_DIR.

    `model` is the flax module built from the folder's config.json (`model.config`).
    A MODEL_DIR opens at its latest step, or `step`. `dtype` replaces the compute
    dtype of its config.json (one of config.COMPUTE_DTYPES); the params keep their
    stored dtype.
    """
    from mtllama_jax import partitioning

    if not os.path.isdir(folder):
        raise FileNotFoundError(f"checkpoint folder {folder} does not exist")
    config = load_config(folder)
    if dtype is not None:
        config = config.replace(dtype=dtype)
    tokenizer = tokenizer_path(folder)
    model = models.build_module(config)
    shardings = layout.param_shardings(partitioning.abstract_params(model))
    if is_model_dir(folder):
        _, params = load_intact_params(folder, shardings, step)
    else:
        params = load_params(folder, shardings)
    return model, params, tokenizer


def load_intact_params(model_dir, shardings, step: int | None = None):
    """(step, params) of a training MODEL_DIR: `step`, or the newest intact one.

    For readers (eval, chat): each step is checked against its manifest and for
    finite params; a damaged latest step is skipped with a warning naming it
    (nothing is moved), a damaged requested step is an error naming it.
    """
    directory = checkpoints_dir(model_dir)
    steps = saved_steps(model_dir) if step is None else [step]
    if not steps:
        raise FileNotFoundError(
            f"{directory} holds no finished step; train longer or point "
            "at a converted checkpoint folder"
        )
    problems = []
    for candidate in steps:
        try:
            verify_step(directory, candidate)
            try:
                params = load_params(model_dir, shardings, step=candidate)
            except Exception as e:  # Orbax and TensorStore raise many kinds
                raise ValueError(f"unreadable ({first_line(e)})") from None
            check_finite(params, f"{directory}/{candidate}/params")
        except ValueError as e:
            problems.append(f"step {candidate}: {e}")
            if step is None:
                print(
                    f"warning: checkpoint step {candidate} of {model_dir} is damaged ({e}); "
                    "trying the step before it",
                    file=sys.stderr,
                )
            continue
        return candidate, params
    raise ValueError(
        f"no intact checkpoint in {directory}:\n  "
        + "\n  ".join(problems)
        + "\nCopy the step again from a backup, or pick another with `step`."
    )


def load_param(folder, param_path: tuple[str, ...], *, dtype=None, step: int | None = None):
    """One parameter as a host numpy array (partial restore, for streaming converters)."""
    item = restore_args = None
    for key in reversed(param_path):
        item = {key: item if item is not None else 0}
        restore_args = {
            key: restore_args
            if restore_args is not None
            else ocp.RestoreArgs(restore_type=np.ndarray, dtype=dtype)
        }
    with ocp.PyTreeCheckpointer() as ckptr:
        tree = ckptr.restore(
            params_dir(folder, step),
            args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True),
        )
    for key in param_path:
        tree = tree[key]
    return tree


def first_line(error: BaseException) -> str:
    """An exception's type and the start of its first line, for one-line reports."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:300] if text else ''}"


# ---- step integrity -------------------------------------------------------------------------


def _step_files(folder: str) -> dict[str, str]:
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/")
            if rel != STEP_MANIFEST:
                files[rel] = os.path.join(root, name)
    return files


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def write_step_manifest(folder: str) -> None:
    """`<step>/manifest.json`: sha256 and size of each file of a committed step (atomic).

    Nothing is written when rotation deleted the step meanwhile.
    """
    try:
        files = {
            rel: {"sha256": _sha256(path), "size": os.path.getsize(path)}
            for rel, path in sorted(_step_files(folder).items())
        }
        atomic.write_text(
            os.path.join(folder, STEP_MANIFEST),
            json.dumps({"files": files}, indent=1, sort_keys=True) + "\n",
        )
    except FileNotFoundError:
        return


def verify_step(directory: str, step: int) -> None:
    """Raises ValueError naming the files of `step` that differ from its manifest.

    A step saved without a manifest (an older run, or killed between commit and
    manifest) is not checked here; its params are still checked to be finite.
    """
    folder = os.path.join(directory, str(step))
    path = os.path.join(folder, STEP_MANIFEST)
    if not os.path.exists(path):
        return
    try:
        with open(path) as f:
            want = json.load(f)["files"]
    except (ValueError, KeyError) as e:
        raise ValueError(f"{path} is unreadable ({e})") from None
    got = _step_files(folder)
    problems = [f"{rel} missing" for rel in sorted(set(want) - set(got))]
    for rel in sorted(set(want) & set(got)):
        if (
            os.path.getsize(got[rel]) != want[rel]["size"]
            or _sha256(got[rel]) != want[rel]["sha256"]
        ):
            problems.append(f"{rel} differs")
    if problems:
        shown = ", ".join(problems[:5]) + (" ..." if len(problems) > 5 else "")
        raise ValueError(f"files differ from {path}: {shown}")


def check_finite(params, where: str) -> None:
    """Raises ValueError naming the first parameters holding NaN or Inf."""
    flags = jax.tree.map(lambda x: jax.numpy.isfinite(x).all(), params)
    bad = [
        jax.tree_util.keystr(p)
        for p, ok in jax.tree_util.tree_leaves_with_path(flags)
        if not bool(ok)
    ]
    if bad:
        raise ValueError(f"{where}: parameter(s) {bad[:3]} hold NaN or Inf values")


def _first_paths(stored, wanted) -> str:
    a = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(stored)}
    b = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(wanted)}
    extra, missing = sorted(a - b)[:3], sorted(b - a)[:3]
    return f"extra {extra} and lacks {missing}"
