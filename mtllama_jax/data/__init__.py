"""Training data: the batch contract and packing, the seqio stream, the tokenized cache.

* `packing`: examples -> packed rows -> batch dicts (no TensorFlow);
* `stream`: `batches(...)`, read and tokenised on the fly by seqio (TensorFlow);
* `cache`: the tokenized cache's files, manifest and checks (no TensorFlow);
* `build`: writes a cache from seqio tasks in worker processes (TensorFlow);
* `pipeline`: the Grain pipeline that trains from a cache (no TensorFlow).

`data.batches`, `data.examples` and `data.BatchIterator` load `stream` (and so
TensorFlow) on first use, so that the pipeline's workers never import it.
"""

from mtllama_jax.data.packing import (  # noqa: F401
    FEATURES,
    NoFittingExamples,
    PackingStats,
    best_fit_decreasing,
    counted,
    fit_example,
    pack_rows,
    rows_to_batch,
    single_rows,
)

_STREAM = ("batches", "examples", "BatchIterator")


def __getattr__(name):
    if name in _STREAM:
        from mtllama_jax.data import stream

        return getattr(stream, name)
    raise AttributeError(f"module 'mtllama_jax.data' has no attribute {name!r}")
