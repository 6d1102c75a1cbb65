"""Exact resume: a run SIGKILLed mid-way and restarted equals an uninterrupted run, bitwise.

The reference run happens in this process; the interrupted run is this file
run as a script in a subprocess, which kills itself with SIGKILL when it is
asked for the batch of step KILL_AT (once the step-3 checkpoint is committed),
then is started again on the same MODEL_DIR.
"""

import itertools
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np

NUM_STEPS = 7
KILL_AT = 5


def synthetic_batches(seed: int, rows: int, length: int, vocab: int):
    """Packed-looking batches, a function of (seed, step); each process takes its rows."""

    def batches(start: int):
        for step in itertools.count(start):
            rng = np.random.default_rng([seed, step])
            tokens = rng.integers(3, vocab, (rows, length + 1)).astype(np.int32)
            cut = rng.integers(2, length - 2, rows)
            index = np.arange(length)
            segment = np.where(index[None] < cut[:, None], 1, 2).astype(np.int32)
            segment[:, -2:] = 0  # trailing padding
            positions = np.where(segment == 1, index, index - cut[:, None]).astype(np.int32)
            weights = ((positions > 2) & (segment > 0)).astype(np.float32)
            batch = dict(
                input_tokens=tokens[:, :-1],
                target_tokens=tokens[:, 1:],
                positions=np.where(segment > 0, positions, 0),
                segment_ids=segment,
                loss_weights=weights,
            )
            per = rows // jax.process_count()
            lo = jax.process_index() * per
            yield {k: v[lo : lo + per] for k, v in batch.items()}

    return batches


def run_tiny(model_dir: str, kill_at: int | None = None, sig=signal.SIGKILL, **kw):
    """The run under test: tiny LLaMA, FSDP over 8 devices, checkpoint every 3 steps.

    Sends itself `sig` when asked for the batch of step `kill_at`.
    """
    from mtllama_jax import optim, partitioning, train
    from mtllama_jax.config import LlamaConfig
    from mtllama_jax.model import LlamaForCausalLM

    config = LlamaConfig.tiny()
    layout = partitioning.Layout.create(1, -1, 1, "fsdp")
    schedule = optim.learning_rate_schedule(3e-3, NUM_STEPS, "cosine", warmup_steps=2)
    tx = optim.make_optimizer(schedule, weight_decay=0.1)
    source = synthetic_batches(seed=1, rows=16, length=32, vocab=config.vocab_size)

    def batches(start):
        for step, batch in zip(itertools.count(start), source(start)):
            if step == kill_at and sig == signal.SIGKILL:
                # once step 3's async save is committed, so that restore is tested
                committed = os.path.join(model_dir, "checkpoints", "3")
                deadline = time.time() + 120
                while not os.path.isdir(committed) and time.time() < deadline:
                    time.sleep(0.05)
            if step == kill_at:
                os.kill(os.getpid(), sig)
            yield batch

    kw.setdefault("checkpoint_every_steps", 3)
    return train.run(
        LlamaForCausalLM(config),
        layout,
        (tx, schedule),
        model_dir,
        kw.pop("num_steps", NUM_STEPS),
        batches,
        seed=3,
        microbatches=2,
        log_every_steps=1,
        progress=False,
        **kw,
    )


def _worker_env(extra=None):
    env = dict(os.environ)
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
    env["PYTHONPATH"] = os.pathsep.join(
        [os.path.dirname(os.path.dirname(__file__))] + [p for p in [env.get("PYTHONPATH")] if p]
    )
    env.update(extra or {})
    return env


def test_sigkill_and_restart_equals_uninterrupted(tmp_path):
    from mtllama_jax import checkpoints, metrics

    reference_dir, resumed_dir = str(tmp_path / "ref"), str(tmp_path / "resumed")
    reference, reason = run_tiny(reference_dir)
    assert reason == "done"

    killed = subprocess.run(
        [sys.executable, __file__, resumed_dir, str(KILL_AT)],
        env=_worker_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    logged = [r["step"] for r in metrics.read_jsonl(os.path.join(resumed_dir, "metrics.jsonl"))]
    assert logged == list(range(1, KILL_AT + 1)), logged  # killed before step KILL_AT + 1
    saved = checkpoints.TrainCheckpoints(resumed_dir).all_steps()
    assert saved == [3], saved

    resumed = subprocess.run(
        [sys.executable, __file__, resumed_dir, "-1"],
        env=_worker_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    def curve(d):
        return [
            (r["step"], r["loss"], r["grad_norm"])
            for r in metrics.read_jsonl(os.path.join(d, "metrics.jsonl"))
        ]

    assert curve(resumed_dir) == curve(reference_dir)
    assert [s for s, _, _ in curve(reference_dir)] == list(range(1, NUM_STEPS + 1))

    from mtllama_jax import optim, partitioning, trainer
    from mtllama_jax.config import LlamaConfig
    from mtllama_jax.model import LlamaForCausalLM

    step_fn = trainer.Trainer(
        LlamaForCausalLM(LlamaConfig.tiny()),
        partitioning.Layout.create(1, -1, 1, "fsdp"),
        optim.make_optimizer(optim.learning_rate_schedule(3e-3, NUM_STEPS, "cosine", 2), 0.1),
    )
    ckpt = checkpoints.TrainCheckpoints(resumed_dir)
    restored = ckpt.restore(NUM_STEPS, step_fn.abstract_restore_target())
    ckpt.close()
    assert int(restored.step) == NUM_STEPS
    same = jax.tree.map(
        lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)), restored, reference
    )
    assert all(jax.tree.leaves(same)), same


if __name__ == "__main__":
    kill = int(sys.argv[2])
    run_tiny(sys.argv[1], kill_at=None if kill < 0 else kill)
