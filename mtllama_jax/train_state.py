"""The training state: step, params, optimizer state, the run's PRNG key, skipped steps.

Everything a run needs to continue bit for bit lives here and nowhere else (the
data order is a function of the seed and `step`), so saving this pytree is
saving the run. The key is stored as raw `uint32` key data so that Orbax and
`jnp.where` treat it as a plain array.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from mtllama_jax import partitioning


@flax.struct.dataclass
class TrainState:
    """One training run's state; a pytree of arrays only."""

    step: jax.Array  # int32 scalar: optimizer steps taken (skipped ones included)
    params: Any
    opt_state: Any
    rng: jax.Array  # uint32 key data of the run's key
    skipped: jax.Array  # int32 scalar: steps skipped for a non-finite loss or gradient

    def key(self) -> jax.Array:
        """The run's key as a typed PRNG key."""
        return jax.random.wrap_key_data(self.rng)


def create(params, tx: optax.GradientTransformation, key: jax.Array) -> TrainState:
    """A fresh state at step 0 around `params` (call under jit to keep shardings)."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        rng=jax.random.key_data(key),
        skipped=jnp.zeros((), jnp.int32),
    )


def state_shardings(boxed_params, layout: partitioning.Layout, tx: optax.GradientTransformation):
    """(abstract state, NamedShardings of the state) from the boxed abstract params.

    Optimizer moments take their param's sharding; counters and the key are
    replicated.
    """
    abstract = jax.eval_shape(lambda p: create(p, tx, jax.random.key(0)), nn.unbox(boxed_params))
    replicated = layout.replicated()
    shardings = TrainState(
        step=replicated,
        params=layout.param_shardings(boxed_params),
        opt_state=layout.shardings_like_params(abstract.opt_state, boxed_params),
        rng=replicated,
        skipped=replicated,
    )
    return abstract, shardings


def with_shardings(abstract, shardings):
    """ShapeDtypeStructs that carry their target sharding (what Orbax restores onto)."""
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
