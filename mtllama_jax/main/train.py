"""`mtllama-train`: the gin-configured training job (T5X-style flags).

    mtllama-train --gin_file=models/tiny.gin --gin_file=mesh/single.gin \\
        --gin_file=runs/finetune.gin --gin.MODEL_DIR="'/tmp/run'" --gin.train.num_steps=100

Flags: `--gin_file` (repeatable; looked up in `--gin_search_paths`, then in
the package's `gin/` folder), `--gin.NAME=VALUE` (repeatable gin bindings),
`--gin_search_paths` (comma-separated), and for several hosts either nothing
(on a cluster `jax.distributed.initialize()` reads the environment:
`--multihost`) or `--coordinator_address`, `--num_processes`, `--process_id`.

Gin binds the configurables of `train_job` (`train`: what to run; `optimizer`;
`zero_shot_hook`), `mesh` (device mesh and sharding rules), `LlamaConfig`
(gin/models/*.gin) and the option groups of `train_options` (`LossOptions`,
`NonfinitePolicy`, `CheckpointPolicy`, `LoopPeriods`), each documented in its
docstring. `mtllama_jax.training.run` is the same job with plain arguments and
any batch source; tests and scripts call it without gin.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

import jax

from mtllama_jax import exits
from mtllama_jax.main import launch
from mtllama_jax.main.train_job import train


def parse_flags(argv: Sequence[str]) -> argparse.Namespace:
    """The jobs' T5X-style flags (`launch.job_parser`) plus the multi-host ones."""
    parser = launch.job_parser("mtllama-train", __doc__.split("\n")[0])
    parser.add_argument(
        "--multihost",
        action="store_true",
        help="jax.distributed.initialize() from the cluster environment",
    )
    parser.add_argument("--coordinator_address", help="host:port of process 0")
    parser.add_argument("--num_processes", type=int)
    parser.add_argument("--process_id", type=int)
    return launch.parse_job_flags(parser, argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_flags(sys.argv[1:] if argv is None else argv)
    if args.coordinator_address or args.multihost:
        jax.distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
    import mtllama_jax.tasks  # noqa: F401  registers the tasks and their gin configurables

    def job():
        launch.parse_gin(args.gin_file, args.gin_bindings, args.search_paths)
        reason = train()
        print(f"mtllama-train: {_ENDINGS[reason][1]}", file=sys.stderr)
        return _ENDINGS[reason][0]

    return exits.run_main("mtllama-train", job)


# How a run ended: (exit code, message).
_ENDINGS = {
    "done": (exits.OK, "finished"),
    "preempted": (
        exits.PREEMPTED,
        "stopped by a signal; the current step is saved, rerun to continue",
    ),
    "nonfinite": (
        exits.NONFINITE,
        "stopped on non-finite losses or gradients; the last good state is saved",
    ),
}


if __name__ == "__main__":
    sys.exit(main())
