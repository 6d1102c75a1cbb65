"""`mtllama-lm-eval`: lm-evaluation-harness' own command line, with this project's model.

    mtllama-lm-eval --model mtllama_jax --model_args checkpoint=/ckpt/run1 \\
        --tasks lamini --batch_size 16 --output_path /results/run1

lm-eval 0.4 looks models up in its own registry only (it reads no entry
points), so this entry registers `mtllama_jax` (`mtllama_jax.lm_eval_adapter`)
and hands every flag to lm-eval's CLI unchanged; results land where lm-eval
puts them. Before that it

* sets HF_DATASETS_OFFLINE / HF_HUB_OFFLINE (unless set): nothing is downloaded;
* adds this project's lm-eval tasks (tasks/lm_eval/: the `lamini` group) to
  the task folders, beside any --include_path;
* opens each requested task's dataset: a task whose dataset is not available
  offline is named with the fix and left out, and the others run (a group with
  such a task runs as its remaining tasks).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from typing import Sequence

OFFLINE = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
MODEL = ("mtllama_jax", "mtllama_jax.lm_eval_adapter:MtllamaLM")
OFFLINE_FIX = (
    "fetch it on a machine with network into a Hugging Face cache (HF_HOME=/data/hf python "
    "-c \"import datasets; datasets.load_dataset('PATH', 'NAME')\" for the task's "
    "dataset_path and dataset_name), copy that folder here and export HF_HOME=/data/hf "
    "(README, section 5)"
)


def project_tasks() -> str:
    """The folder of this project's lm-eval tasks (found without importing mtllama_jax.tasks)."""
    folder = importlib.util.find_spec("mtllama_jax.tasks").submodule_search_locations[0]
    return os.path.join(folder, "lm_eval")


def project_groups() -> dict[str, str]:
    """This project's lm-eval groups: name -> YAML path."""
    return {"lamini": os.path.join(project_tasks(), "lamini.yaml")}


def split_tasks(argv: Sequence[str]) -> tuple[list[str] | None, list[str]]:
    """(the --tasks names, argv without the --tasks flag) as lm-eval's CLI reads them."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--tasks", "-t", nargs="+")
    known, _ = parser.parse_known_args(argv)
    if known.tasks is None:
        return None, list(argv)
    rest, skipping = [], False
    for arg in argv:
        if arg in ("--tasks", "-t"):
            skipping = True
        elif arg.startswith("--tasks="):
            skipping = False
        elif skipping and not arg.startswith("-"):
            continue
        else:
            skipping = False
            rest.append(arg)
    return [t for item in known.tasks for t in item.split(",") if t], rest


def include_paths(argv: Sequence[str]) -> list[str]:
    """This project's task folder, then the --include_path of argv if any."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--include_path")
    given = parser.parse_known_args(argv)[0].include_path
    return [project_tasks()] + ([given] if given else [])


def available_tasks(names: Sequence[str], include: Sequence[str]):
    """(names to run, {task: why it cannot run offline}); groups of this project expand."""
    import yaml
    from lm_eval.tasks import TaskManager

    local = TaskManager(include_defaults=False, include_path=list(include))  # quick to index
    managers = {}
    groups = project_groups()
    missing: dict[str, str] = {}

    def opens(name: str) -> bool:
        if name in local.all_tasks or name in local.all_groups:
            manager = local
        else:  # one of lm-eval's own: index them all, once
            manager = managers.get("all") or managers.setdefault(
                "all", TaskManager(include_path=list(include))
            )
        try:
            manager.load([name])
        except OSError as e:  # ConnectionError offline, FileNotFoundError for local files
            missing[name] = f"{type(e).__name__}: {e}"
            return False
        except KeyError:  # not a task: lm-eval's CLI reports it
            pass
        return True

    kept = []
    for name in names:
        if name in groups:
            with open(groups[name]) as f:
                members = yaml.safe_load(f)["task"]
            present = [m for m in members if opens(m)]
            kept += [name] if len(present) == len(members) else present
        elif opens(name):
            kept.append(name)
    return kept, missing


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    for name in OFFLINE:
        os.environ.setdefault(name, "1")
    import lm_eval.models  # noqa: F401  lm-eval's own models first: it fills an empty registry
    from lm_eval.api.registry import model_registry

    if MODEL[0] not in model_registry:
        model_registry.register(MODEL[0], target=MODEL[1])
    tasks, rest = split_tasks(argv)
    include = include_paths(argv)
    if tasks is not None and not (rest[:1] and rest[0] in ("ls", "validate")):
        kept, missing = available_tasks(tasks, include)
        for name, why in missing.items():
            print(
                f"mtllama-lm-eval: task {name} left out, its dataset is not available "
                f"offline ({why}); to run it, {OFFLINE_FIX}",
                file=sys.stderr,
            )
        if not kept:
            print("mtllama-lm-eval: no requested task can run offline", file=sys.stderr)
            return 2
        argv = rest + ["--tasks", ",".join(kept)]
    from lm_eval._cli import HarnessCLI  # what lm_eval.__main__.cli_evaluate runs
    from lm_eval.utils import setup_logging

    sys.argv = ["lm-eval"] + argv
    setup_logging()
    cli = HarnessCLI()
    args = cli.parse_args()
    if hasattr(args, "include_path"):  # lm-eval's TaskManager takes a list of folders
        args.include_path = include
    try:
        cli.execute(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"mtllama-lm-eval: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
