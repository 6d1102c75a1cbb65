"""`mtllama-lm-eval`: lm-evaluation-harness' own command line, with this project's model.

    mtllama-lm-eval --model mtllama_jax --model_args checkpoint=/ckpt/run1 \\
        --tasks lamini --batch_size 16 --output_path /results/run1

lm-eval 0.4 looks models up in its own registry only (it reads no entry
points), so this entry registers `mtllama_jax` (`mtllama_jax.lm_eval_adapter`)
and hands every flag to lm-eval's CLI unchanged; results land where lm-eval
puts them. Before that it

* sets HF_DATASETS_OFFLINE / HF_HUB_OFFLINE (unless set): nothing is downloaded;
* resolves this project's groups (`lamini`: tasks/lm_eval/lamini.yaml);
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


def project_groups() -> dict[str, str]:
    """This project's lm-eval groups: name -> YAML path (no import of mtllama_jax.tasks)."""
    folder = importlib.util.find_spec("mtllama_jax.tasks").submodule_search_locations[0]
    return {"lamini": os.path.join(folder, "lm_eval", "lamini.yaml")}


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


def include_path(argv: Sequence[str]) -> str | None:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--include_path")
    return parser.parse_known_args(argv)[0].include_path


def available_tasks(names: Sequence[str], include: str | None):
    """(names to run, {task: why it cannot run offline}); groups of this project expand."""
    import yaml
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=include)
    groups = project_groups()
    missing: dict[str, str] = {}

    def opens(name: str) -> bool:
        try:
            manager.load([name])
        except OSError as e:  # ConnectionError offline, FileNotFoundError for local files
            missing[name] = f"{type(e).__name__}: {e}"
            return False
        return True

    kept = []
    for name in names:
        if name in groups:
            with open(groups[name]) as f:
                members = yaml.safe_load(f)["task"]
            present = [m for m in members if opens(m)]
            kept += [groups[name]] if len(present) == len(members) else present
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
    if tasks is not None and not (rest[:1] and rest[0] in ("ls", "validate")):
        kept, missing = available_tasks(tasks, include_path(argv))
        for name, why in missing.items():
            print(f"mtllama-lm-eval: task {name} left out, its dataset is not available "
                  f"offline ({why}); to run it, {OFFLINE_FIX}", file=sys.stderr)
        if not kept:
            print("mtllama-lm-eval: no requested task can run offline", file=sys.stderr)
            return 2
        argv = rest + ["--tasks", ",".join(kept)]
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm-eval"] + argv
    try:
        cli_evaluate()
    except (FileNotFoundError, ValueError) as e:
        print(f"mtllama-lm-eval: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
