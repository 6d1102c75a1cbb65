"""Runs that must not hang, lose work or corrupt silently (issue 16's seven findings).

A tiny LLaMA on one CPU device, a few steps each: a signal while the loop
waits for data, a second signal, damaged and non-finite checkpoints, rotation
after non-finite steps, a torn metrics.jsonl, the skipped-step bound, two runs
on one MODEL_DIR, and a bf16 INIT_CHECKPOINT.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import synthetic_batches, worker_env

from mtllama_jax import (
    checkpoint_folder,
    checkpoints,
    exits,
    metrics,
    optim,
    partitioning,
    run_lock,
    train_state,
    trainer,
    training,
)
from mtllama_jax.models.llama.config import LlamaConfig
from mtllama_jax.models.llama.model import LlamaForCausalLM
from mtllama_jax.train_options import CheckpointPolicy, LoopPeriods, NonfinitePolicy

CONFIG = LlamaConfig.tiny(num_layers=1)
ROWS, LENGTH = 2, 16


def run_small(model_dir, batches=None, num_steps=3, **kw):
    """training.run on one device, every step checkpointed unless told otherwise."""
    schedule = optim.learning_rate_schedule(1e-3, num_steps, "constant")
    kw.setdefault("checkpointing", CheckpointPolicy(every_steps=1))
    return training.run(
        LlamaForCausalLM(CONFIG),
        partitioning.Layout.one_device(),
        (optim.make_optimizer(schedule), schedule),
        str(model_dir),
        num_steps,
        batches or synthetic_batches(seed=0, rows=ROWS, length=LENGTH, vocab=CONFIG.vocab_size),
        periods=LoopPeriods(log_every_steps=1),
        progress=False,
        **kw,
    )


# ---- 1. signals ---------------------------------------------------------------------------


def test_a_signal_while_waiting_for_data_saves_and_ends_the_run(tmp_path):
    """A stream that never yields again (every example dropped) no longer hangs the run."""
    source = synthetic_batches(seed=0, rows=ROWS, length=LENGTH, vocab=CONFIG.vocab_size)

    def stuck(start):
        for _, batch in zip(range(2), source(start)):
            yield batch
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.time() + 60
        while time.time() < deadline:  # waits for data that never comes
            time.sleep(0.01)
        raise AssertionError("the signal did not end the wait for data")

    state, reason = run_small(
        tmp_path, stuck, num_steps=5, checkpointing=CheckpointPolicy(every_steps=100)
    )
    assert reason == "preempted" and int(state.step) == 2
    assert checkpoints.TrainCheckpoints(str(tmp_path)).all_steps() == [2]


def test_a_second_signal_ends_the_process(tmp_path):
    script = textwrap.dedent("""
        import os, signal, sys, time
        from mtllama_jax import preemption
        with preemption.PreemptionWatch() as watch:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)
            assert watch.requested()
            os.kill(os.getpid(), signal.SIGTERM)  # a step that never ends: the user insists
            time.sleep(30)
        print("survived")
    """)
    proc = subprocess.run(
        [sys.executable, "-c", script],
        env=worker_env(),
        timeout=120,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == -signal.SIGTERM, proc.stderr[-2000:]
    assert "survived" not in proc.stdout
    assert "a second signal ends the process" in proc.stderr


# ---- 2. checkpoint integrity ----------------------------------------------------------------


def _flip_a_byte(folder):
    files = [os.path.join(r, n) for r, _, ns in os.walk(folder) for n in ns]
    chunk = max(files, key=os.path.getsize)  # a parameter chunk
    with open(chunk, "r+b") as f:
        f.seek(os.path.getsize(chunk) // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    return chunk


def test_damaged_and_non_finite_steps_are_set_aside_and_the_run_resumes_before_them(
    tmp_path, capsys
):
    trainer_ = trainer.Trainer(
        LlamaForCausalLM(CONFIG),
        partitioning.Layout.one_device(),
        optim.make_optimizer(optim.learning_rate_schedule(1e-3, 2, "constant")),
    )
    state = trainer_.init_state(jax.random.key(0))
    ckpt = checkpoints.TrainCheckpoints(str(tmp_path), CheckpointPolicy(async_save=False))
    for step in (1, 2):
        ckpt.save(step, state.replace(step=jnp.int32(step)))
    nan = jax.tree.map(lambda x: x * jnp.nan, state.params)
    ckpt.save(3, state.replace(step=jnp.int32(3), params=nan))  # intact files, garbage values
    ckpt.close()
    assert json.load(open(tmp_path / "checkpoints" / "2" / "manifest.json"))["files"]
    _flip_a_byte(tmp_path / "checkpoints" / "2" / "params")  # flipped bits on disk

    state, reason = run_small(tmp_path, num_steps=2)
    assert reason == "done" and int(state.step) == 2
    err = capsys.readouterr().err
    assert "checkpoint step 3 is damaged" in err and "hold NaN or Inf" in err
    assert "checkpoint step 2 is damaged" in err and "differ" in err
    assert sorted(n.split(".")[0] for n in os.listdir(tmp_path / "corrupt_checkpoints")) == [
        "2",
        "3",
    ]
    assert [r["step"] for r in metrics.read_jsonl(tmp_path / "metrics.jsonl")] == [2]

    # No intact step left: refused, naming each. Step 1 has no manifest (as when killed
    # between commit and manifest) and lost a chunk: Orbax cannot read it.
    _flip_a_byte(tmp_path / "checkpoints" / "2" / "params")
    os.remove(tmp_path / "checkpoints" / "1" / "manifest.json")
    os.remove(_flip_a_byte(tmp_path / "checkpoints" / "1" / "params"))
    ckpt = checkpoints.TrainCheckpoints(str(tmp_path))
    with pytest.raises(ValueError) as err:
        ckpt.restore_latest(trainer_.abstract_restore_target())
    ckpt.close()
    message = str(err.value)
    assert "step 2: files differ from" in message and "step 1: unreadable" in message
    assert "start a new MODEL_DIR" in message


def test_rotation_keeps_the_newest_step_whose_loss_was_finite(tmp_path):
    state = train_state.create({"w": jnp.ones((4,))}, optim.make_optimizer(1e-3), jax.random.key(0))
    ckpt = checkpoints.TrainCheckpoints(
        str(tmp_path), CheckpointPolicy(every_steps=1, keep=1, async_save=False)
    )
    for step, nonfinite in ((1, 0), (2, 0), (3, 1), (4, 1)):
        ckpt.maybe_save(step, state, nonfinite=jnp.int32(nonfinite))
    ckpt.close()
    assert list(checkpoints.TrainCheckpoints(str(tmp_path)).all_steps()) == [2, 4]


# ---- 3. a torn metrics.jsonl ----------------------------------------------------------------


def test_a_torn_last_metrics_line_is_dropped_and_other_damage_names_the_file(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    good = [json.dumps({"step": s, "kind": "train", "loss": 1.0}) + "\n" for s in (1, 2, 3)]
    path.write_text("".join(good) + '{"step": 4, "kind": "tr')
    assert [r["step"] for r in metrics.read_jsonl(str(path))] == [1, 2, 3]
    metrics.truncate_jsonl(str(path), 2)
    assert path.read_text() == "".join(good[:2])
    assert "dropped a torn last line" in capsys.readouterr().err
    path.write_text(good[0] + "not json\n" + good[1])
    with pytest.raises(ValueError, match=r"metrics.jsonl, line 2: not a metrics record"):
        metrics.truncate_jsonl(str(path), 5)


# ---- 4. the skipped-step bound ----------------------------------------------------------------


def test_too_many_skipped_steps_stop_the_run_and_are_counted(tmp_path, capsys):
    source = synthetic_batches(seed=0, rows=ROWS, length=LENGTH, vocab=CONFIG.vocab_size)

    def diverging(start):
        for step, batch in enumerate(source(start), start):
            if step >= 2:  # a NaN loss from here on, as a diverged run has
                batch = dict(batch, loss_weights=batch["loss_weights"] * np.nan)
            yield batch

    state, reason = run_small(
        tmp_path,
        diverging,
        num_steps=20,
        checkpointing=CheckpointPolicy(every_steps=100),
        nonfinite=NonfinitePolicy(max_consecutive_skips=3),
    )
    assert reason == "nonfinite"
    assert int(state.skipped) >= 3 and int(state.step) < 20
    err = capsys.readouterr().err
    assert "3 steps in a row had a non-finite loss" in err
    assert f"{int(state.skipped)} of {int(state.step)} steps were skipped" in err
    assert checkpoints.TrainCheckpoints(str(tmp_path)).all_steps() == [int(state.step)]
    limit = trainer.SkipLimit(None, 0.15)
    assert not any(limit.exceeded(i % 10 == 0) for i in range(30))  # 3 of 30: within 15%
    assert not limit.exceeded(True) and limit.exceeded(True)  # 4 of 31 is, 5 of 32 is not


# ---- 5. one run per MODEL_DIR --------------------------------------------------------------


def test_a_second_run_on_a_locked_model_dir_is_refused_naming_the_holder(tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from mtllama_jax import run_lock\n"
            f"with run_lock.ModelDirLock({str(tmp_path)!r}):\n"
            "    print('locked', flush=True); sys.stdin.readline()",
        ],
        env=worker_env(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    deadline = threading.Timer(120, holder.kill)  # bounds the readline below
    deadline.start()
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(exits.ModelDirBusy) as err:
            run_small(tmp_path)
        assert f"pid {holder.pid}" in str(err.value) and "another run" in str(err.value)
        assert not os.path.exists(tmp_path / "config.json")  # nothing written
        assert exits.run_main("mtllama-train", lambda: run_small(tmp_path)) == exits.MODEL_DIR_BUSY
    finally:
        holder.communicate("\n", timeout=60)
        deadline.cancel()
    with run_lock.ModelDirLock(str(tmp_path)):  # released when the holder ended
        pass


def test_the_object_store_lock_refuses_a_live_holder_and_takes_over_a_stale_one(tmp_path):
    lock = tmp_path / "run.lock"
    live = {"host": "node7", "pid": 4242, "since": time.time(), "heartbeat": time.time()}
    lock.write_text(json.dumps(live))
    with pytest.raises(exits.ModelDirBusy, match="host node7, pid 4242"):
        with run_lock.ModelDirLock(str(tmp_path), heartbeat=True, heartbeat_s=0.05):
            pass
    lock.write_text(json.dumps(dict(live, heartbeat=time.time() - 600)))  # its holder died
    with run_lock.ModelDirLock(str(tmp_path), heartbeat=True, heartbeat_s=0.05):
        beat = json.loads(lock.read_text())
        assert beat["pid"] == os.getpid()
        time.sleep(0.3)
        assert json.loads(lock.read_text())["heartbeat"] > beat["heartbeat"]
    assert not lock.exists()


# ---- 6. a bf16 INIT_CHECKPOINT ----------------------------------------------------------------


def test_a_bf16_init_checkpoint_trains_with_the_configs_float32_master_weights(tmp_path):
    rng = np.random.default_rng(0)
    bf16 = jax.tree.map(
        lambda a: rng.normal(0, 0.02, a.shape).astype(jnp.bfloat16),
        nn.unbox(partitioning.abstract_params(LlamaForCausalLM(CONFIG))),
    )
    checkpoint_folder.save_params(tmp_path / "init", bf16, CONFIG.replace(param_dtype="bfloat16"))
    state, _ = run_small(tmp_path / "run", num_steps=1, init_checkpoint=str(tmp_path / "init"))
    assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype("float32")}


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_a_full_disk_during_a_checkpoint_save_ends_in_one_message(tmp_path, capsys, caplog):
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    w = jax.random.normal(jax.random.key(0), (300_000,))  # random: OCDBT cannot compress it
    state = train_state.create({"w": w}, optim.make_optimizer(1e-3), jax.random.key(0))
    state = state.replace(
        opt_state=jax.tree.map(lambda x: x + w if x.shape == w.shape else x, state.opt_state)
    )  # 3.6 MB in all

    def save():
        ckpt = checkpoints.TrainCheckpoints(str(small / "run"))
        try:
            ckpt.save(1, state)  # asynchronous: the error comes from the background threads
        finally:
            ckpt.close()

    try:
        code = exits.run_main("mtllama-train", save)
    finally:
        subprocess.run(["umount", "-l", str(small)], check=True)
    assert code == exits.ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("mtllama-train: error: the disk is full"), err[-3:]
    assert not [line for line in err if line.startswith("Traceback")]
    assert not [r for r in caplog.records if r.levelname == "ERROR" and r.exc_info]


def test_an_init_checkpoint_of_another_model_names_init_checkpoint_and_its_fix(tmp_path):
    other = CONFIG.replace(hidden_size=32, head_dim=8)
    zeros = jax.tree.map(
        lambda a: np.zeros(a.shape, np.float32),
        nn.unbox(partitioning.abstract_params(LlamaForCausalLM(other))),
    )
    checkpoint_folder.save_params(tmp_path / "init", zeros, other)
    with pytest.raises(ValueError) as err:
        run_small(tmp_path / "run", num_steps=1, init_checkpoint=str(tmp_path / "init"))
    message = str(err.value)
    assert "hidden_size: INIT_CHECKPOINT has 32, this run has 64" in message
    assert "that matches INIT_CHECKPOINT" in message and "Point MODEL_DIR" not in message
