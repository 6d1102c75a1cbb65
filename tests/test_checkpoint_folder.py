"""Params-only checkpoint folders: save, restore onto shardings, one param, MODEL_DIR, errors."""

import json
import os

import jax
import numpy as np
import pytest

from mtllama_jax import checkpoint_folder, checkpoints, partitioning
from mtllama_jax.convert import hf_params
from mtllama_jax.models.llama.config import LlamaConfig
from mtllama_jax.models.llama.model import LlamaForCausalLM
from mtllama_jax.train_options import CheckpointPolicy
from mtllama_jax.train_state import TrainState

CONFIG = LlamaConfig.tiny(num_layers=1)


def make_params():
    """Random numpy params of CONFIG's shapes (no model init to compile)."""
    rng = np.random.default_rng(0)
    flat = {
        path: rng.standard_normal(shape, np.float32)
        for path, shape in hf_params.param_shapes(CONFIG).items()
    }
    return hf_params.unflatten(flat)


def same(a, b):
    return all(
        jax.tree.leaves(
            jax.tree.map(lambda x, y: np.array_equal(np.asarray(x), np.asarray(y)), a, b)
        )
    )


def test_save_then_restore_onto_another_mesh(tmp_path):
    params = make_params()
    tok = tmp_path / "tokenizer.model"
    tok.write_bytes(b"spm")
    folder = tmp_path / "ckpt"
    checkpoint_folder.save_params(folder, params, CONFIG, tokenizer_files=[str(tok)])
    assert sorted(os.listdir(folder)) == ["config.json", "params", "tokenizer.model"]
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no staging left
    assert checkpoint_folder.load_config(folder) == CONFIG
    assert checkpoint_folder.tokenizer_path(folder) == str(folder / "tokenizer.model")

    shardings = partitioning.Layout.create(2, 2, 2, "fsdp_tp").param_shardings(
        partitioning.abstract_params(LlamaForCausalLM(CONFIG))
    )
    restored = checkpoint_folder.load_params(folder, shardings)
    q = restored["layers"]["attention"]["q_proj"]["kernel"]
    assert q.sharding == shardings["layers"]["attention"]["q_proj"]["kernel"]
    assert same(restored, params)
    as_bf16 = checkpoint_folder.load_params(folder, dtype="bfloat16")
    assert as_bf16["embed"]["embedding"].dtype == jax.numpy.bfloat16
    one = checkpoint_folder.load_param(folder, ("layers", "mlp", "up_proj", "kernel"))
    assert isinstance(one, np.ndarray)
    assert np.array_equal(one, np.asarray(params["layers"]["mlp"]["up_proj"]["kernel"]))


def test_existing_folder_needs_overwrite_and_failed_write_leaves_it(tmp_path):
    params = make_params()
    folder = tmp_path / "ckpt"
    checkpoint_folder.save_params(folder, params, CONFIG)
    with pytest.raises(FileExistsError, match="--overwrite"):
        checkpoint_folder.save_params(folder, params, CONFIG)
    with pytest.raises(FileNotFoundError):  # a tokenizer file that does not exist
        checkpoint_folder.save_params(
            folder, params, CONFIG, overwrite=True, tokenizer_files=[str(tmp_path / "nope.model")]
        )
    assert same(checkpoint_folder.load_params(folder), params)  # the old folder is intact
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    doubled = jax.tree.map(lambda a: a * 2, params)
    checkpoint_folder.save_params(folder, doubled, CONFIG, overwrite=True)
    assert same(checkpoint_folder.load_params(folder), doubled)


def test_training_model_dir_opens_at_its_latest_step(tmp_path):
    params = make_params()
    state = TrainState(
        params=params, step=np.int32(0), opt_state={}, rng=jax.random.key(0), skipped=np.int32(0)
    )
    ckpt = checkpoints.TrainCheckpoints(
        str(tmp_path), CheckpointPolicy(every_steps=None, async_save=False)
    )
    ckpt.save(3, state)
    ckpt.save(5, state.replace(params=jax.tree.map(lambda a: a + 1, params)))
    ckpt.close()
    checkpoints.write_model_dir_files(str(tmp_path), CONFIG)
    assert checkpoint_folder.params_dir(tmp_path).endswith(os.path.join("5", "params"))
    restored = checkpoint_folder.load_params(tmp_path)
    assert same(restored, jax.tree.map(lambda a: a + 1, params))
    assert checkpoint_folder.load_config(tmp_path) == CONFIG


def test_missing_files_are_named_with_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        checkpoint_folder.load_params(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match=r"params is missing.*hf-to-jax"):
        checkpoint_folder.load_params(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"config.json is missing"):
        checkpoint_folder.load_config(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"tokenizer.model is missing"):
        checkpoint_folder.tokenizer_path(tmp_path)
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(FileNotFoundError, match="no finished step"):
        checkpoint_folder.load_params(tmp_path)


def test_a_folder_of_another_model_is_refused(tmp_path):
    params = make_params()
    checkpoint_folder.save_params(tmp_path / "c", params, CONFIG)
    other = CONFIG.replace(tie_word_embeddings=True)
    shardings = partitioning.Layout.create(1, 8, 1, "fsdp").param_shardings(
        partitioning.abstract_params(LlamaForCausalLM(other))
    )
    with pytest.raises(ValueError, match=r"extra \[\"\['lm_head'\]"):
        checkpoint_folder.load_params(tmp_path / "c", shardings)
    assert json.loads((tmp_path / "c" / "config.json").read_text())["vocab_size"] == 512
