"""Exact resume: a run SIGKILLed mid-way and restarted equals an uninterrupted run, bitwise.

The reference run happens in this process; the interrupted run is this file
run as a script in a subprocess, which kills itself with SIGKILL when it is
asked for the batch of step KILL_AT (once the step-3 checkpoint is committed),
then is started again on the same MODEL_DIR.
"""

import os
import signal
import subprocess
import sys

import jax
import numpy as np
from helpers import NUM_STEPS, run_tiny, worker_env

KILL_AT = 5


def test_sigkill_and_restart_equals_uninterrupted(tmp_path):
    from mtllama_jax import checkpoints, metrics

    reference_dir, resumed_dir = str(tmp_path / "ref"), str(tmp_path / "resumed")
    reference, reason = run_tiny(reference_dir)
    assert reason == "done"

    killed = subprocess.run(
        [sys.executable, __file__, resumed_dir, str(KILL_AT)],
        env=worker_env(),
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
        env=worker_env(),
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
    from mtllama_jax.models.llama.config import LlamaConfig
    from mtllama_jax.models.llama.model import LlamaForCausalLM

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
