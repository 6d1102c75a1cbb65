"""The classes gin files may configure, registered once for every entry point.

Library code never imports gin; entry points (`mtllama-train`, `mtllama-eval`,
...) import this module so that `gin/models/*.gin` can bind `LlamaConfig.*`.
"""

import pathlib

import gin

from mtllama_jax import config as model_config

# The presets: models/ (architectures), mesh/ (mesh sizes), runs/ (what to run).
# Entry points put this folder on gin's search path, so `--gin_file=runs/demo.gin`
# works from any directory of a source checkout (installed with `pip install -e .`).
GIN_DIR = pathlib.Path(__file__).resolve().parent.parent / "gin"

LlamaConfig = gin.external_configurable(model_config.LlamaConfig, name="LlamaConfig")


def model_config_from_gin() -> model_config.LlamaConfig:
    """The LlamaConfig that the parsed gin files describe."""
    return LlamaConfig()

