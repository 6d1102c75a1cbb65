"""The classes and functions gin files may configure, registered once for every entry point.

Library code never imports gin; entry points (`mtllama-train`, `mtllama-eval`,
...) import this module so that `gin/models/*.gin` can bind `LlamaConfig.*` and
`gin/runs/*.gin` the training run's option groups (`mtllama_jax/train_options.py`).
"""

import collections.abc
import dataclasses
import pathlib
import types
import typing
from typing import Sequence

import gin
import jax

from mtllama_jax import partitioning, train_options
from mtllama_jax.models.llama import config as model_config

# The presets: models/ (architectures), mesh/ (mesh sizes), runs/ (what to run).
# Entry points put this folder on gin's search path, so `--gin_file=runs/demo.gin`
# works from any directory of a source checkout (installed with `pip install -e .`).
GIN_DIR = pathlib.Path(__file__).resolve().parents[2] / "gin"

LlamaConfig = gin.external_configurable(model_config.LlamaConfig, name="LlamaConfig")


def model_config_from_gin() -> model_config.LlamaConfig:
    """The LlamaConfig that the parsed gin files describe, in CPU forms on a CPU backend."""
    return LlamaConfig(cpu_forms=jax.default_backend() == "cpu")


# `train.run`'s option groups, bound by their class names (gin/runs/finetune.gin).
_OPTIONS = {
    cls: gin.external_configurable(cls, name=cls.__name__)
    for cls in (
        train_options.LossOptions,
        train_options.NonfinitePolicy,
        train_options.CheckpointPolicy,
        train_options.LoopPeriods,
    )
}


def options_from_gin(cls):
    """The option group `cls` (a `train_options` class) that the parsed gin files describe."""
    options = _OPTIONS[cls]()
    check_argument_types(cls.__name__, cls, dataclasses.asdict(options))
    return options


@gin.configurable
def mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, rules: str = "fsdp"):
    """The `partitioning.Layout`: device mesh and logical rules (gin/mesh/*.gin).

    Args:
      data: data-parallel size (weights replicated across it).
      fsdp: fully-sharded data-parallel size; -1 takes the devices left over.
      tensor: tensor-parallel size (heads, MLP, vocabulary split across it).
      rules: logical axis rule set of `partitioning.RULE_SETS`: data, fsdp, fsdp_tp.
    """
    return partitioning.Layout.create(data, fsdp, tensor, rules)


def check_argument_types(name: str, fn, values: dict) -> None:
    """Refuses a gin-bound argument of the wrong type, naming the binding and the fix.

    Checks the plain annotations (int, float, str, bool, their `| None`, and
    sequences of them); a value gin bound as `'two'` for an int would otherwise
    fail later as a bare TypeError.
    """
    hints = typing.get_type_hints(fn)
    for arg, value in values.items():
        hint = hints.get(arg)
        if hint is None or _matches(value, hint):
            continue
        raise ValueError(
            f"gin binding {name}.{arg}={value!r} ({type(value).__name__}): {name}.{arg} "
            f"takes {_describe(hint)}; e.g. --gin.{name}.{arg}={_example(hint)} (strings in "
            "gin are quoted: --gin.NAME=\"'text'\")"
        )


def _options(hint) -> tuple:
    return (
        typing.get_args(hint)
        if typing.get_origin(hint) in (typing.Union, types.UnionType)
        else (hint,)
    )


def _matches(value, hint) -> bool:
    for option in _options(hint):
        origin = typing.get_origin(option) or option
        if option is type(None):
            if value is None:
                return True
        elif option is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return True
        elif option is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return True
        elif option in (str, bool):
            if isinstance(value, option):
                return True
        elif origin in (collections.abc.Sequence, list, tuple):
            inner = typing.get_args(option)
            if isinstance(value, (list, tuple)) and (
                not inner or all(_matches(v, inner[0]) for v in value)
            ):
                return True
        else:
            return True  # not checked here (callables, mappings, configurables)
    return False


def _describe(hint) -> str:
    names = []
    for option in _options(hint):
        origin = typing.get_origin(option)
        if option is type(None):
            names.append("None")
        elif origin is not None:
            names.append(
                f"a list of {_describe(typing.get_args(option)[0])}"
                if typing.get_args(option)
                else "a list"
            )
        else:
            names.append(getattr(option, "__name__", str(option)))
    return " or ".join(names)


def _example(hint) -> str:
    first = _options(hint)[0]
    return {int: "16", float: "0.1", bool: "True", str: "\"'text'\""}.get(first, "\"['a', 'b']\"")


@gin.configurable
def zero_shot_evaluator(
    mixture_or_task_names: Sequence[str] = gin.REQUIRED,
    protocols: Sequence[str] | None = None,
    split: str = "validation",
    batch_size: int = 16,
    max_new_tokens: int = 64,
    max_examples: int | None = 200,
):
    """The training loop's zero-shot hook: `zero_shot_hook.evaluate = @zero_shot_evaluator()`.

    Uses the registered tasks' vocabulary; arguments as for `evaluate_checkpoint`
    (`protocols` None: every protocol). seqio and TF are imported only when it is built.
    """
    from mtllama_jax import evaluation, vocab

    options = evaluation.EvalOptions(
        protocols=tuple(protocols or evaluation.PROTOCOLS),
        split=split,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        max_examples=max_examples,
    )
    return evaluation.train_hook(mixture_or_task_names, vocab.configured_vocabulary(), options)
