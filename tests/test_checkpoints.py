"""Training checkpoints: restore onto another mesh, keep K, partial steps, MODEL_DIR, preemption."""

import json
import os
import signal

import jax
import numpy as np
import pytest
from helpers import run_tiny

from mtllama_jax import checkpoint_folder, checkpoints, metrics, optim, partitioning, trainer
from mtllama_jax.models.llama.config import LlamaConfig
from mtllama_jax.models.llama.model import LlamaForCausalLM
from mtllama_jax.train_options import CheckpointPolicy

CONFIG = LlamaConfig.tiny()


def make_trainer(sizes, rules):
    return trainer.Trainer(
        LlamaForCausalLM(CONFIG),
        partitioning.Layout.create(*sizes, rules=rules),
        optim.make_optimizer(1e-3, weight_decay=0.1),
    )


def test_restore_onto_another_mesh_keep_k_and_partial_steps(tmp_path):
    fsdp = make_trainer((1, 8, 1), "fsdp")
    state = fsdp.init_state(jax.random.key(0))
    ckpt = checkpoints.TrainCheckpoints(str(tmp_path), CheckpointPolicy(every_steps=2, keep=2))
    for step in range(1, 7):
        ckpt.maybe_save(step, state)
    ckpt.wait()
    assert list(ckpt.all_steps()) == [4, 6]
    # A step whose writing was interrupted stays in Orbax's temporary folder: never listed.
    partial = tmp_path / "checkpoints" / "8.orbax-checkpoint-tmp-1234567"
    (partial / "params").mkdir(parents=True)
    (partial / "params" / "garbage").write_text("half written")
    ckpt.close()

    ckpt = checkpoints.TrainCheckpoints(str(tmp_path), CheckpointPolicy(every_steps=2, keep=2))
    assert ckpt.latest_step() == 6
    tp = make_trainer((2, 2, 2), "fsdp_tp")
    restored = ckpt.restore(6, tp.abstract_restore_target())
    ckpt.close()
    kernel = restored.params["layers"]["attention"]["q_proj"]["kernel"]
    assert kernel.sharding == tp.state_shardings.params["layers"]["attention"]["q_proj"]["kernel"]
    assert "tensor" in jax.tree.leaves(tuple(kernel.sharding.spec))
    same = jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)), restored, state)
    assert all(jax.tree.leaves(same))
    shardings = jax.tree.map(lambda a: a.sharding, tp.abstract_restore_target().params)
    params = checkpoint_folder.load_params(str(tmp_path), shardings, step=6)
    assert np.array_equal(
        np.asarray(params["embed"]["embedding"]), np.asarray(state.params["embed"]["embedding"])
    )


def test_model_dir_of_another_model_is_refused_showing_both(tmp_path):
    checkpoints.write_model_dir_files(str(tmp_path), CONFIG, gin_config="# gin\n")
    assert json.load(open(tmp_path / "config.json"))["hidden_size"] == 64
    assert (tmp_path / "config.gin").read_text() == "# gin\n"
    checkpoints.check_model_dir(str(tmp_path), CONFIG.replace(attention="pallas"))  # same model
    with pytest.raises(ValueError) as err:
        checkpoints.check_model_dir(str(tmp_path), CONFIG.replace(hidden_size=128, num_layers=4))
    message = str(err.value)
    assert "config.json describes another model" in message
    assert "hidden_size: MODEL_DIR has 64, this run has 128" in message
    assert "num_hidden_layers: MODEL_DIR has 2, this run has 4" in message


def test_sigterm_saves_the_current_step_and_the_run_continues(tmp_path):
    model_dir = str(tmp_path)
    # The signal comes while the loop waits for step 2's batch: it stops there, at step 1.
    state, reason = run_tiny(
        model_dir,
        kill_at=1,
        sig=signal.SIGTERM,
        num_steps=4,
        checkpointing=CheckpointPolicy(every_steps=100),
    )
    assert reason == "preempted" and int(state.step) == 1
    assert checkpoints.TrainCheckpoints(model_dir).all_steps() == [1]
    state, reason = run_tiny(
        model_dir, num_steps=4, checkpointing=CheckpointPolicy(every_steps=100)
    )
    assert reason == "done" and int(state.step) == 4
    steps = [r["step"] for r in metrics.read_jsonl(os.path.join(model_dir, "metrics.jsonl"))]
    assert steps == [1, 2, 3, 4]
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_time_policy_waits_its_interval_from_the_start(tmp_path):
    import time

    import jax.numpy as jnp

    from mtllama_jax import train_state

    state = train_state.create({"w": jnp.ones((4,))}, optim.make_optimizer(1e-3), jax.random.key(0))
    ckpt = checkpoints.TrainCheckpoints(
        str(tmp_path), CheckpointPolicy(every_steps=None, every_minutes=1 / 60)
    )
    assert not ckpt.maybe_save(1, state)  # not at the first step of a run
    time.sleep(1.1)
    assert ckpt.maybe_save(2, state)
    ckpt.wait()
    assert not ckpt.maybe_save(3, state)
    ckpt.close()
    assert list(ckpt.all_steps()) == [2]


def test_model_dir_names_the_sentencepiece_model_tokenizer_model(tmp_path):
    spm, extra = tmp_path / "synthetic_spm.model", tmp_path / "special_tokens_map.json"
    spm.write_bytes(b"sp")
    extra.write_text("{}")
    model_dir = tmp_path / "model"
    checkpoints.write_model_dir_files(str(model_dir), CONFIG, [str(spm), str(extra)], "x = 1")
    assert sorted(os.listdir(model_dir)) == [
        "config.gin",
        "config.json",
        "special_tokens_map.json",
        "tokenizer.model",
    ]
    assert (model_dir / "tokenizer.model").read_bytes() == b"sp"
