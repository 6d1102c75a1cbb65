"""Two local processes x 4 CPU devices (jax.distributed + gloo) train like one process x 8.

The two-process run is this file run as a script twice (process 0 and 1 of a
`jax.distributed` job on 127.0.0.1, gloo CPU collectives); each process feeds
only its own rows through `make_array_from_process_local_data`. This process
(8 devices) runs the same job, compares the loss curves, and restores the
checkpoint the two processes wrote onto its own mesh.
"""

import os
import subprocess
import sys

import jax
import numpy as np
from helpers import free_port, run_tiny

STEPS = 3


def test_two_processes_match_one_and_their_checkpoint_restores_here(tmp_path):
    from mtllama_jax import checkpoints, metrics, optim, partitioning, trainer
    from mtllama_jax.models.llama.config import LlamaConfig
    from mtllama_jax.models.llama.model import LlamaForCausalLM

    two_dir, one_dir = str(tmp_path / "two"), str(tmp_path / "one")
    port = free_port()
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS="--xla_force_host_platform_device_count=4",
        PYTHONPATH=os.pathsep.join(
            [os.path.dirname(__file__), os.path.dirname(os.path.dirname(__file__))]
        ),
    )
    workers = [
        subprocess.Popen(
            [sys.executable, __file__, two_dir, str(port), str(i)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [w.communicate(timeout=300)[0] for w in workers]
    for w, out in zip(workers, outputs):
        assert w.returncode == 0, out[-3000:]
    assert "process 1 of 2 with 4 local devices" in outputs[1], outputs[1][-2000:]

    reference, _ = run_tiny(one_dir, num_steps=STEPS)

    def losses(d):
        return [(r["step"], r["loss"]) for r in metrics.read_jsonl(f"{d}/metrics.jsonl")]

    two, one = losses(two_dir), losses(one_dir)
    assert [s for s, _ in two] == [s for s, _ in one] == list(range(1, STEPS + 1))
    np.testing.assert_allclose([loss for _, loss in two], [loss for _, loss in one], rtol=2e-6)

    step_fn = trainer.Trainer(
        LlamaForCausalLM(LlamaConfig.tiny()),
        partitioning.Layout.create(2, 2, 2, "fsdp_tp"),
        optim.make_optimizer(optim.learning_rate_schedule(3e-3, 7, "cosine", 2), 0.1),
    )
    ckpt = checkpoints.TrainCheckpoints(two_dir)
    restored = ckpt.restore(STEPS, step_fn.abstract_restore_target())
    ckpt.close()
    kernel = restored.params["layers"]["mlp"]["up_proj"]["kernel"]
    assert kernel.sharding == step_fn.state_shardings.params["layers"]["mlp"]["up_proj"]["kernel"]
    # Reductions run in another order across two processes; Adam turns tiny gradient
    # differences of rarely seen embedding rows into differences well below one update
    # (peak lr 3e-3), so params agree to a fraction of a step.
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=2e-4),
        restored,
        reference,
    )


if __name__ == "__main__":
    model_dir, port, process_id = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
    print(
        f"process {jax.process_index()} of {jax.process_count()} with "
        f"{jax.local_device_count()} local devices",
        flush=True,
    )
    run_tiny(model_dir, num_steps=STEPS)
