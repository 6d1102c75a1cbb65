"""The classes and functions gin files may configure, registered once for every entry point.

Library code never imports gin; entry points (`mtllama-train`, `mtllama-eval`,
...) import this module so that `gin/models/*.gin` can bind `LlamaConfig.*`.
"""

import pathlib

import gin

from mtllama_jax import config as model_config
from mtllama_jax import partitioning

# The presets: models/ (architectures), mesh/ (mesh sizes), runs/ (what to run).
# Entry points put this folder on gin's search path, so `--gin_file=runs/demo.gin`
# works from any directory of a source checkout (installed with `pip install -e .`).
GIN_DIR = pathlib.Path(__file__).resolve().parent.parent / "gin"

LlamaConfig = gin.external_configurable(model_config.LlamaConfig, name="LlamaConfig")


def model_config_from_gin() -> model_config.LlamaConfig:
    """The LlamaConfig that the parsed gin files describe."""
    return LlamaConfig()


@gin.configurable
def mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, rules: str = "fsdp"):
    """The device mesh and logical rules (gin/mesh/*.gin).

    Args:
      data: data-parallel size (weights replicated across it).
      fsdp: fully-sharded data-parallel size; -1 takes the devices left over.
      tensor: tensor-parallel size (heads, MLP, vocabulary split across it).
      rules: logical axis rule set of `partitioning.RULE_SETS`: data, fsdp, fsdp_tp.
    """
    return partitioning.make_mesh(data, fsdp, tensor), partitioning.logical_axis_rules(rules)
