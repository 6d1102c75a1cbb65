"""Settings that gin binds, with an environment variable as the fallback.

No TensorFlow or seqio here: task modules, the data cache and the jobs share it.
"""

from __future__ import annotations

import os


def gin_or_env(value, name: str, default: str | None = None):
    """`value` (a gin binding) when set, else environment variable `name`, else `default`.

    None and "" count as unset, for the binding and the variable alike.
    """
    if value is not None and value != "":
        return value
    return os.environ.get(name) or default
