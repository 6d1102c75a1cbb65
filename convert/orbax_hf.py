"""Hugging Face LLaMA folder <-> this project's checkpoint folder (Orbax params).

hf-to-jax reads one HF tensor at a time (memory-mapped) into its slot of the
param tree; with a mesh, each finished parameter goes straight onto its
NamedSharding, so Orbax writes the sharded layout. jax-to-hf restores one
parameter at a time (Orbax partial restore) and streams its HF tensors into
safetensors shards, so it holds at most one stacked parameter.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import jax
import numpy as np

from mtllama_jax import checkpoint_folder, models
from mtllama_jax.convert import hf_files, hf_params, manifest
from mtllama_jax.models.llama.config import LlamaConfig

# Vocabulary-sized params and the axis their rows lie along.
VOCAB_AXES = {("embed", "embedding"): 0, ("lm_head", "kernel"): 1}


def hf_to_jax(
    hf_dir,
    out,
    *,
    dtype=None,
    overwrite=False,
    layout=None,
    vocab_size=None,
    allow_no_tokenizer=False,
) -> None:
    """Converts an HF folder to a checkpoint folder (config.json, tokenizer, params/).

    `vocab_size` larger than the folder's appends zero rows to the embedding and
    the LM head: LLaMA's 32000 -> MT-LLaMA's 32001 for `[PAD]`, the zero row the
    published delta is relative to (`[PAD]` is never a training target). A folder
    without tokenizer.model is refused unless `allow_no_tokenizer` (then warned).
    With a `partitioning.Layout`, each param is written in its sharded layout.
    """
    hf_dir = os.fspath(hf_dir)
    checkpoint_folder.check_writable(out, overwrite=overwrite)
    config = models.config_from_hf(hf_dir)
    if not os.path.exists(os.path.join(hf_dir, checkpoint_folder.TOKENIZER)):
        if not allow_no_tokenizer:
            raise FileNotFoundError(
                f"{hf_dir} has no tokenizer.model (the SentencePiece model mtllama-eval, "
                "mtllama-chat and training read); copy it into the folder, or pass "
                "--no-tokenizer to convert the weights alone"
                + (
                    " (this folder's tokenizer.json is copied, but not read by them)"
                    if os.path.exists(os.path.join(hf_dir, "tokenizer.json"))
                    else ""
                )
            )
        print(
            f"hf-to-jax: warning: {hf_dir} has no tokenizer.model; the output cannot be "
            "evaluated or chatted with until one is copied into it",
            file=sys.stderr,
        )
    weights = hf_files.HFWeights(hf_dir)
    hf_params.check_hf_names(weights.names(), config, hf_dir)
    mappings = hf_params.tensor_mappings(config)  # the folder's tensors, as stored
    if vocab_size is not None:
        if vocab_size < config.vocab_size:
            raise ValueError(
                f"--vocab-size {vocab_size} is smaller than {hf_dir}/config.json's vocab_size "
                f"{config.vocab_size}: rows can be added, not dropped"
            )
        config = config.replace(vocab_size=vocab_size)
    shardings = {}
    if layout is not None:
        from mtllama_jax import partitioning

        abstract = partitioning.abstract_params(models.build_module(config))
        shardings = hf_params.flatten(layout.param_shardings(abstract))
    remaining = {}  # param path -> HF tensors still to fill in
    for t in mappings:
        remaining[t.param_path] = remaining.get(t.param_path, 0) + 1
    flat = {}
    for t in mappings:
        hf_params.check_hf_shape(t, weights.shape(t.hf_name), hf_dir)
        value = t.to_param(weights.get(t.hf_name))
        value = value.astype(dtype or value.dtype, copy=False)
        if t.param_path in VOCAB_AXES and value.shape[VOCAB_AXES[t.param_path]] < config.vocab_size:
            value = _zero_rows(value, VOCAB_AXES[t.param_path], config.vocab_size)
        if t.layer is None:
            flat[t.param_path] = np.array(value)
        else:
            if t.param_path not in flat:
                full = (config.num_layers,) + t.param_shape
                flat[t.param_path] = np.empty(full, value.dtype)
            flat[t.param_path][t.layer] = value
        remaining[t.param_path] -= 1
        if not remaining[t.param_path] and t.param_path in shardings:
            flat[t.param_path] = jax.device_put(flat[t.param_path], shardings[t.param_path])
    stored = np.dtype(flat[("embed", "embedding")].dtype).name
    config = config.replace(param_dtype=stored)
    with checkpoint_folder.staged(out, overwrite=overwrite) as tmp:
        checkpoint_folder.write_contents(
            tmp, hf_params.unflatten(flat), config, checkpoint_folder.tokenizer_files(hf_dir)
        )
        manifest.write(tmp)


def _zero_rows(value: np.ndarray, axis: int, size: int) -> np.ndarray:
    pad = [(0, 0)] * value.ndim
    pad[axis] = (0, size - value.shape[axis])
    return np.pad(value, pad)


def jax_to_hf(ckpt, out, *, dtype=None, max_shard_size="5GB", overwrite=False) -> None:
    """Converts a checkpoint folder or training MODEL_DIR (latest step) to an HF folder."""
    ckpt = os.fspath(ckpt)
    checkpoint_folder.check_writable(out, overwrite=overwrite)
    config = checkpoint_folder.load_config(ckpt)
    stored = hf_params.flatten(checkpoint_folder.params_metadata(ckpt))
    expected = hf_params.param_shapes(config)
    for path, shape in expected.items():
        if path not in stored:
            raise ValueError(
                f"{ckpt}: parameter {'/'.join(path)} is missing; check that "
                "config.json matches the checkpoint"
            )
        if tuple(stored[path].shape) != shape:
            raise ValueError(
                f"{ckpt}: parameter {'/'.join(path)} has shape "
                f"{tuple(stored[path].shape)} but config.json implies {shape}"
            )
    # Grouped by parameter so each stacked parameter is restored once.
    order = list(expected)
    mappings = sorted(
        hf_params.tensor_mappings(config), key=lambda t: (order.index(t.param_path), t.layer or 0)
    )
    out_dtype = {t.hf_name: np.dtype(dtype or stored[t.param_path].dtype) for t in mappings}
    specs = [(t.hf_name, t.hf_shape, out_dtype[t.hf_name]) for t in mappings]

    def tensors():
        path, value = None, None
        for t in mappings:
            if t.param_path != path:
                path, value = None, None  # drop the previous parameter first
                value = checkpoint_folder.load_param(ckpt, t.param_path, dtype=out_dtype[t.hf_name])
                path = t.param_path
            part = value if t.layer is None else value[t.layer]
            yield t.hf_name, t.to_hf(part)

    name = out_dtype["model.embed_tokens.weight"].name
    with checkpoint_folder.staged(out, overwrite=overwrite) as tmp:
        hf_files.write_safetensors(tmp, specs, tensors(), hf_files.parse_size(max_shard_size))
        write_hf_config(tmp, config, name)
        copy_tokenizer(ckpt, tmp)
        manifest.write(tmp)


def write_hf_config(folder, config: LlamaConfig, dtype_name: str) -> None:
    """config.json (weights' dtype stated) and generation_config.json of an HF folder."""
    hf = config.to_hf()
    hf["torch_dtype"] = hf["dtype"] = dtype_name
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
    generation = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id}
    if config.pad_token_id is not None:
        generation["pad_token_id"] = config.pad_token_id
    with open(os.path.join(folder, "generation_config.json"), "w") as f:
        json.dump(generation, f, indent=2)


def copy_tokenizer(src, dst) -> None:
    """Copies src's tokenizer files (tokenizer.model and its JSON companions) into dst."""
    for path in checkpoint_folder.tokenizer_files(src):
        shutil.copyfile(path, os.path.join(dst, os.path.basename(path)))
