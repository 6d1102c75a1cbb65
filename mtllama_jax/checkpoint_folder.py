"""A params-only checkpoint folder: what `mtllama-convert` writes and every tool opens.

    config.json               the model (`LlamaConfig.to_hf()` plus this project's fields)
    tokenizer.model           the SentencePiece model (+ tokenizer_config.json,
                              special_tokens_map.json, added_tokens.json when given)
    params/                   the param tree, an Orbax (StandardCheckpointer) checkpoint

A folder is written under a temporary name beside its destination and renamed
when complete, so an interrupted write never leaves a half-written folder.
Params restore straight onto the caller's shardings (abstract arrays), and one
parameter at a time for converters that stream. A training MODEL_DIR
(`checkpoints/<step>/params`) opens the same way, at its latest step.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from typing import Iterator, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from mtllama_jax.config import LlamaConfig, read_config_json

PARAMS = "params"
CONFIG = "config.json"
TOKENIZER = "tokenizer.model"
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
    hf = dict(config.to_hf(), mtllama_jax={k: getattr(config, k) for k in _OWN_FIELDS})
    with open(os.path.join(folder, CONFIG), "w") as f:
        f.write(json.dumps(hf, indent=2) + "\n")


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
    return LlamaConfig.from_hf(path, **read_config_json(path).get("mtllama_jax", {}))


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


def params_dir(folder, step: int | None = None) -> str:
    """`folder/params`, or `folder/checkpoints/<step>/params` of a training MODEL_DIR."""
    folder = os.path.abspath(os.fspath(folder))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"checkpoint folder {folder} does not exist")
    if os.path.isdir(os.path.join(folder, "checkpoints")):
        if step is None:
            manager = ocp.CheckpointManager(
                os.path.join(folder, "checkpoints"),
                options=ocp.CheckpointManagerOptions(read_only=True),
            )
            step = manager.latest_step()
            manager.close()
            if step is None:
                raise FileNotFoundError(
                    f"{folder}/checkpoints holds no finished step; train longer or point at "
                    "a converted checkpoint folder"
                )
        path = os.path.join(folder, "checkpoints", str(step), PARAMS)
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
    from mtllama_jax.model import LlamaForCausalLM

    if not os.path.isdir(folder):
        raise FileNotFoundError(f"checkpoint folder {folder} does not exist")
    config = load_config(folder)
    if dtype is not None:
        config = config.replace(dtype=dtype)
    tokenizer = tokenizer_path(folder)
    model = LlamaForCausalLM(config)
    shardings = layout.param_shardings(partitioning.abstract_params(model))
    if os.path.isdir(os.path.join(folder, "checkpoints")):  # a training MODEL_DIR
        from mtllama_jax import checkpoints

        target = jax.tree.map(
            lambda m, s: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=s),
            params_metadata(folder, step),
            shardings,
        )
        _, params = checkpoints.restore_intact_params(folder, target, step)  # skips damage
    else:
        params = load_params(folder, shardings)
    return model, params, tokenizer


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


def _first_paths(stored, wanted) -> str:
    a = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(stored)}
    b = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(wanted)}
    extra, missing = sorted(a - b)[:3], sorted(b - a)[:3]
    return f"extra {extra} and lacks {missing}"
