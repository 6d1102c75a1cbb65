"""The optimizer: AdamW with a weight-decay mask, global-norm clipping, LR schedules.

Plain functions of plain arguments; `mtllama-train` binds them from gin
(`optimizer.*`, see `gin/runs/finetune.gin`).
"""

from __future__ import annotations

import jax
import optax

SCHEDULES = ("constant", "cosine", "linear")


def learning_rate_schedule(
    peak: float,
    total_steps: int,
    kind: str = "cosine",
    warmup_steps: int = 0,
    warmup_fraction: float = 0.0,
    final_fraction: float = 0.0,
) -> optax.Schedule:
    """Linear warmup from 0 to `peak`, then constant / cosine / linear decay.

    Warmup lasts `warmup_steps`, or `warmup_fraction * total_steps` when that is
    larger (MT-LLaMA's script used 3%). Decay ends at `final_fraction * peak`
    on `total_steps`.
    """
    if kind not in SCHEDULES:
        raise ValueError(f"optimizer.schedule={kind!r}: choose one of {SCHEDULES}")
    if total_steps <= 0:
        raise ValueError(f"train steps={total_steps}: must be positive")
    warmup = max(int(warmup_steps), int(round(warmup_fraction * total_steps)))
    warmup = min(warmup, total_steps)
    decay_steps = max(total_steps - warmup, 1)
    end = peak * final_fraction
    if kind == "constant":
        after = optax.constant_schedule(peak)
    elif kind == "cosine":
        after = optax.cosine_decay_schedule(peak, decay_steps, alpha=final_fraction)
    else:
        after = optax.linear_schedule(peak, end, decay_steps)
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def decay_mask(params, decay_embeddings: bool = True):
    """True where weight decay applies: projection kernels (and embeddings by option).

    Norm scales never decay; the mask follows the param tree's leaf names.
    """

    def decays(path, _):
        name = getattr(path[-1], "key", getattr(path[-1], "name", ""))
        return name == "kernel" or (decay_embeddings and name == "embedding")

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(
    learning_rate: optax.ScalarOrSchedule,
    weight_decay: float = 0.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    clip_norm: float | None = 1.0,
    decay_embeddings: bool = True,
) -> optax.GradientTransformation:
    """AdamW after clipping by global norm (`clip_norm=None` turns clipping off).

    Moments are kept in the params' dtype: fp32 with fp32 master weights.
    """
    parts = []
    if clip_norm:
        parts.append(optax.clip_by_global_norm(clip_norm))
    parts.append(
        optax.adamw(
            learning_rate,
            b1=b1,
            b2=b2,
            eps=eps,
            weight_decay=weight_decay,
            mask=lambda p: decay_mask(p, decay_embeddings),
        )
    )
    return optax.chain(*parts)
