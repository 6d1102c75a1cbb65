"""`mtllama-cache`: tokenizes a seqio task or mixture into a cache that training reads.

    mtllama-cache --mixture_or_task_name=t0_train --split=train --out=/data/t0_cache
    mtllama-train ... --gin.train.data_cache="'/data/t0_cache'"

Flags: `--mixture_or_task_name`, `--split`, `--out` (shorthands for
`--gin.cache.NAME=...`), `--gin_file`, `--gin.NAME=VALUE` and
`--gin_search_paths` as for `mtllama-train`: give the gin files and bindings
that configure the data (P3 folder, tokenizer, wrapper, user tasks and
mixtures), so the tasks are tokenised exactly as the training job reads them.
Rerunning it builds only the tasks that are missing or whose tokenizer,
wrapper or source files changed.
"""

from __future__ import annotations

import argparse
import functools
import sys
from typing import Sequence

import gin

from mtllama_jax.main import launch

SHORTHANDS = ("mixture_or_task_name", "split", "out")


@gin.configurable("cache")
def job_settings(
    mixture_or_task_name: str = gin.REQUIRED,
    out: str = gin.REQUIRED,
    split: str = "train",
    workers: int | None = None,
    shard_index: int = 0,
    num_shards: int = 1,
    verify: bool = False,
    progress: bool = True,
) -> dict:
    """The `mtllama-cache` job's settings (gin `cache.*`); evaluating them registers the tasks.

    Args:
      mixture_or_task_name: a registered task or mixture (`mtllama_jax.tasks`), or a
        gin reference that registers one (`@register_mixture()`).
      out: the cache folder (`train.data_cache` reads it).
      split: the split to cache.
      workers: tokenising processes (one task each at a time); None: one per core.
      shard_index / num_shards: this host's share of the tasks, for building on
        several hosts at once into one shared folder.
      verify: afterwards, recompute every cached file's sha256 against its task.json.
      progress: show a progress bar with an ETA.
    """
    return dict(
        mixture_or_task_name=mixture_or_task_name,
        out=out,
        split=split,
        workers=workers,
        shard_index=shard_index,
        num_shards=num_shards,
        verify=verify,
        progress=progress,
    )


def configure_worker(gin_files, gin_bindings, gin_search_paths) -> None:
    """A spawned build worker's setup: this job's gin configuration, and `cache.*`
    evaluated once, which registers a mixture that a gin reference names."""
    launch.parse_gin(gin_files, gin_bindings, gin_search_paths)
    job_settings()


def cache(
    gin_files: Sequence[str] = (),
    gin_bindings: Sequence[str] = (),
    gin_search_paths: Sequence[str] = (),
) -> dict:
    """Builds the cache the parsed gin configuration describes (`cache.*`); its manifest."""
    from mtllama_jax.data import build
    from mtllama_jax.data import cache as cache_files

    settings = job_settings()
    verify = settings.pop("verify")
    manifest = build.build(
        settings.pop("mixture_or_task_name"),
        settings.pop("split"),
        settings.pop("out"),
        configure_worker=functools.partial(
            configure_worker, list(gin_files), list(gin_bindings), list(gin_search_paths)
        ),
        **settings,
    )
    if verify:
        for task in manifest["tasks"]:
            cache_files.CachedTask(manifest["out"], task, manifest["split"]).verify()
    return manifest


def parse_flags(argv: Sequence[str]) -> argparse.Namespace:
    """The jobs' T5X-style flags (`launch.job_parser`) plus the three shorthands."""
    parser = launch.job_parser("mtllama-cache", __doc__.split("\n")[0])
    for name in SHORTHANDS:
        parser.add_argument(f"--{name}", help=f"shorthand for --gin.cache.{name}")
    args = launch.parse_job_flags(parser, argv)
    for name in SHORTHANDS:
        value = getattr(args, name)
        if value is not None:
            args.gin_bindings.append(f"cache.{name} = {value!r}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_flags(sys.argv[1:] if argv is None else argv)
    import mtllama_jax.tasks  # noqa: F401  registers the tasks and their gin configurables
    from mtllama_jax.data.cache import CacheError

    try:
        launch.parse_gin(args.gin_file, args.gin_bindings, args.search_paths)
        manifest = cache(
            gin_files=args.gin_file,
            gin_bindings=args.gin_bindings,
            gin_search_paths=args.search_paths,
        )
    except (ValueError, FileNotFoundError, CacheError, OSError, RuntimeError) as e:
        print(f"mtllama-cache: error: {e}", file=sys.stderr)
        return 2
    tasks = manifest["tasks"]
    print(
        f"mtllama-cache: {len(tasks)} task(s), "
        f"{sum(t['examples'] for t in tasks.values())} examples, "
        f"{sum(t['tokens'] for t in tasks.values())} tokens"
        + (
            f"; {len(manifest['missing'])} task(s) left to other hosts"
            if manifest["missing"]
            else ""
        ),
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
