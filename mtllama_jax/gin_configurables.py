"""The classes gin files may configure, registered once for every entry point.

Library code never imports gin; entry points (`mtllama-train`, `mtllama-eval`,
...) import this module so that `gin/models/*.gin` can bind `LlamaConfig.*`.
"""

import difflib
import inspect
import logging
import pathlib
import re
from typing import Sequence

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


def parse_gin(files: Sequence[str], bindings: Sequence[str], search_paths: Sequence[str] = ()):
    """Parses gin files and bindings; an unknown name is reported with the near names."""
    for path in [*search_paths, str(GIN_DIR)]:
        gin.add_config_file_search_path(path)
    logging.disable(logging.ERROR)  # gin logs every search-path miss as an error
    try:
        gin.parse_config_files_and_bindings(files, bindings, finalize_config=False)
    except ValueError as e:
        raise ValueError(_unknown_binding_message(str(e))) from None
    except OSError as e:
        raise FileNotFoundError(
            f"{e}; gin files are looked up in --gin_search_paths and {GIN_DIR}"
        ) from None
    finally:
        logging.disable(logging.NOTSET)


def _unknown_binding_message(error: str) -> str:
    lines = [line.strip() for line in error.strip().splitlines() if line.strip()]
    if not re.match(r"(No configurable matching|Configurable '.*' doesn't have)", lines[0]):
        return error
    match = re.match(r"([\w./]+)\s*=", lines[-1])
    name = match.group(1) if match else lines[0]
    near = difflib.get_close_matches(name, _bindable_names(), n=5, cutoff=0.6)
    hint = f" Near names: {', '.join(near)}." if near else ""
    return f"unknown gin binding {name!r}: {lines[0]}{hint}\n  " + "\n  ".join(lines[1:])


def _bindable_names() -> list[str]:
    """Every `configurable.parameter` gin knows about."""
    names = []
    for selector, configurable in gin.config._REGISTRY.items():  # gin has no public listing
        if selector.startswith("gin."):
            continue
        short = selector.split(".")[-1]
        try:
            params = inspect.signature(configurable.wrapped).parameters
        except (TypeError, ValueError):
            continue
        hidden = {"self", "args", "kwargs", *(configurable.denylist or ())}
        allowed = configurable.allowlist
        names += [f"{short}.{p}" for p in params
                  if p not in hidden and (not allowed or p in allowed)]
    return names
