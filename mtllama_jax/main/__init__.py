"""The jobs, side by side: each console script's `main`, and the front door they share.

`launch` (flags, gin parsing, logs) and `gin_configurables` (the mesh, the
model config, the option groups, the zero-shot evaluator) are what every job
uses; `train_job` is the gin-configured training both `train` and `demo` run.
Library modules never import this package.
"""
