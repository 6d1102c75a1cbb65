"""The language-model loss: weighted cross entropy, optional z-loss, token accuracy.

Losses are returned as *sums* with their denominators, not means, so that
gradient accumulation over microbatches (and data-parallel shards) adds them up
and divides once: the accumulated step then equals the step on the whole batch.

Normalisation (`normalize`):
  * ``"token"``: every weighted token counts the same (sum / number of tokens);
  * ``"sequence"``: every packed example counts the same, whatever its length
    (each token is weighted by 1 / tokens of its example; sum / examples).

Masks come from `loss_weights` (and `segment_ids` for per-example grouping),
never from the token values.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NORMALIZATIONS = ("token", "sequence")


def token_weights(loss_weights: jax.Array, segment_ids: jax.Array, normalize: str):
    """Per-token weights and their denominator for the chosen normalisation.

    Returns `(weights [batch, length] fp32, denominator scalar fp32)`; the loss
    is `sum(weights * nll) / denominator`.
    """
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"loss normalize={normalize!r}: choose one of {NORMALIZATIONS}")
    w = loss_weights.astype(jnp.float32)
    if normalize == "token":
        return w, jnp.sum(w)
    batch, length = segment_ids.shape
    # One bucket per (row, segment): weighted token count of each packed example.
    bucket = jnp.arange(batch)[:, None] * (length + 1) + segment_ids.astype(jnp.int32)
    counts = jax.ops.segment_sum(w.reshape(-1), bucket.reshape(-1), batch * (length + 1))
    per_token = counts[bucket]
    weights = jnp.where(per_token > 0, w / jnp.maximum(per_token, 1e-9), 0.0)
    return weights, jnp.sum(counts > 0).astype(jnp.float32)


def cross_entropy_sums(
    logits: jax.Array,
    targets: jax.Array,
    loss_weights: jax.Array,
    segment_ids: jax.Array,
    *,
    normalize: str = "token",
    z_loss: float = 0.0,
    task_ids: jax.Array | None = None,
    num_tasks: int = 0,
) -> dict[str, jax.Array]:
    """Summed loss terms of one (micro)batch; divide `loss` by `denominator`.

    logits fp32 `[batch, length, vocab]`, targets int `[batch, length]`.
    Returns a dict of fp32 scalars: `loss` (cross entropy + z-loss, weighted),
    `nll` (cross entropy alone, per-token weights), `z_loss`, `denominator`,
    `correct` (argmax hits on weighted tokens), `tokens` (weighted tokens),
    `nonpad` (tokens with a non-zero segment id). With `num_tasks`, also
    `task_nll` and `task_tokens` `[num_tasks]`: `nll` and `tokens` split by the
    task index of each token (`task_ids`); they add up to `nll` and `tokens`.
    """
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[
        ..., 0
    ]
    nll = log_z - target_logit
    weights, denominator = token_weights(loss_weights, segment_ids, normalize)
    z_term = z_loss * jnp.square(log_z)
    mask = loss_weights.astype(jnp.float32)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    sums = {
        "loss": jnp.sum(weights * (nll + z_term)),
        "nll": jnp.sum(mask * nll),
        "z_loss": jnp.sum(mask * z_term),
        "denominator": denominator,
        "correct": jnp.sum(mask * correct),
        "tokens": jnp.sum(mask),
        "nonpad": jnp.sum((segment_ids != 0).astype(jnp.float32)),
    }
    if num_tasks:
        ids = jnp.clip(task_ids.astype(jnp.int32), 0, num_tasks - 1).reshape(-1)
        sums["task_nll"] = jax.ops.segment_sum((mask * nll).reshape(-1), ids, num_tasks)
        sums["task_tokens"] = jax.ops.segment_sum(mask.reshape(-1), ids, num_tasks)
    return sums
