"""The LLaMA decoder in Flax linen: LLaMA-1, LLaMA-2 (grouped-query) and LLaMA-3.

One readable file, in the layout of Hugging Face's `LlamaForCausalLM` so its
weights map one to one (see `hf_names.py` beside this file):

    embed/embedding                          [vocab, embed]
    layers/attention_norm/scale              [layers, embed]
    layers/attention/{q,k,v}_proj/kernel     [layers, embed, heads|kv_heads, head_dim]
    layers/attention/o_proj/kernel           [layers, heads, head_dim, embed]
    layers/mlp_norm/scale                    [layers, embed]
    layers/mlp/{gate,up}_proj/kernel         [layers, embed, mlp]
    layers/mlp/down_proj/kernel              [layers, mlp, embed]
    final_norm/scale                         [embed]
    lm_head/kernel                           [embed, vocab]   (absent when tied)

Every parameter is boxed with its logical axis names (the names in brackets
above); `mtllama_jax.partitioning` maps them onto a device mesh. Layers are
stacked with `nn.scan`, so compile time does not grow with depth.

With `config.cpu_forms` (the jobs set it on a CPU backend) three spellings
differ: a shallow layer stack is unrolled, projections are 2-D matmuls, and
attention puts query rows head-major before its products. They compute the same
values with the same parameters; each avoids copies XLA:CPU would otherwise make
(see benchmarks/RESULTS.md, "Train step"). Accelerators keep the forms above.

Attention comes from the registry `mtllama_jax.kernels.registry.ATTENTION` by
`config.attention`; decoding attends over the cache with its plain-JAX form.

Packed rows carry `segment_ids` (1, 2, ... per example, 0 for padding) and
`positions` that restart at 0 in each segment: a token attends only to earlier
tokens of its own segment, and rotary embeddings see per-segment positions.

Decoding keeps a KV cache in the `cache` collection (`decode=True`): each call
writes its tokens at `cache_index` and attends to earlier slots of the same
segment, so left padding is simply segment 0. `model.init(..., decode=True)`
returns an empty one (zeros) of the length it was called with.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from mtllama_jax.kernels.reference import attention_mask, dot_product_attention
from mtllama_jax.kernels.registry import attention_fn
from mtllama_jax.models.llama.config import REMAT_POLICIES, LlamaConfig, rope_type

__all__ = ["LlamaForCausalLM", "lm_head_logits"]


def rope_inverse_frequencies(config: LlamaConfig) -> np.ndarray:
    """Per-pair rotary frequencies, with linear or LLaMA-3.1 scaling applied."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, d, 2, dtype=np.float32) / d))
    kind = rope_type(config.rope_scaling)
    s = config.rope_scaling
    if kind == "linear":
        inv_freq = inv_freq / float(s["factor"])
    elif kind == "llama3":
        factor, low, high = (
            float(s["factor"]),
            float(s["low_freq_factor"]),
            float(s["high_freq_factor"]),
        )
        old_len = float(s["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv_freq = np.where(medium, smoothed, scaled)
    return inv_freq.astype(np.float32)


def rotary_tables(config: LlamaConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos and sin of shape [batch, length, head_dim] for the given positions (fp32)."""
    inv_freq = jnp.asarray(rope_inverse_frequencies(config))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates [batch, length, heads, head_dim] in Hugging Face's rotate-half layout."""
    half = x.shape[-1] // 2
    xf = x.astype(jnp.float32)
    rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    out = xf * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return out.astype(x.dtype)


@jax.custom_vjp
def lm_head_logits(x, kernel):
    """fp32 logits x @ kernel ([..., embed] x [embed, vocab]) whose backward stays in x's dtype.

    Autodiff of a dot with fp32 output would run both backward matmuls on the fp32
    cotangent (TF32 on a GPU: ~6% of a 1B model's step on an H200); casting the
    cotangent to the compute dtype first keeps them on the bf16 tensor cores, as
    every other matmul of the step. With fp32 compute this is plain autodiff.
    """
    return jnp.einsum("...e,ev->...v", x, kernel, preferred_element_type=jnp.float32)


def _lm_head_fwd(x, kernel):
    return lm_head_logits(x, kernel), (x, kernel)


def _lm_head_bwd(residuals, d_logits):
    x, kernel = residuals
    d_logits = d_logits.astype(x.dtype)
    dx = jnp.einsum("...v,ev->...e", d_logits, kernel, preferred_element_type=jnp.float32)
    dk = jnp.einsum("...e,...v->ev", x, d_logits, preferred_element_type=jnp.float32)
    return dx.astype(x.dtype), dk.astype(kernel.dtype)


lm_head_logits.defvjp(_lm_head_fwd, _lm_head_bwd)


# Deepest stack that `layer_unroll` unrolls on CPU: compile time grows with the
# unrolled depth, so deep models keep the loop there too.
MAX_UNROLLED_CPU_LAYERS = 8


def layer_unroll(config: LlamaConfig) -> int:
    """How many layers `nn.scan` unrolls: all of a shallow stack on CPU, otherwise 1.

    XLA:CPU runs a scanned layer as a while loop that slices every stacked weight
    and writes every saved activation into a stacked buffer per iteration, and it
    cannot fuse across iterations; for the tiny CPU configs that bookkeeping cost
    more than a third of a train step. Accelerators keep the loop (one compiled
    layer body whatever the depth).
    """
    if config.cpu_forms and config.num_layers <= MAX_UNROLLED_CPU_LAYERS:
        return config.num_layers
    return 1


def _logical_init(init, names):
    return nn.with_logical_partitioning(init, names)


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in fp32, as LLaMA does."""

    config: LlamaConfig
    axis_name: tuple = ("embed",)

    @nn.compact
    def __call__(self, x):
        c = self.config
        scale = self.param(
            "scale",
            _logical_init(nn.initializers.ones, self.axis_name),
            (x.shape[-1],),
            jnp.dtype(c.param_dtype),
        )
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + c.rms_norm_eps)
        return (scale.astype(jnp.float32) * xf).astype(jnp.dtype(c.dtype))


class Projection(nn.Module):
    """A bias-free dense map over named axes: `kernel` has shape in_shape + out_shape."""

    config: LlamaConfig
    in_axes: tuple[str, ...]
    out_shape: tuple[int, ...]
    out_axes: tuple[str, ...]

    @nn.compact
    def __call__(self, x):
        c = self.config
        n_in = len(self.in_axes)
        in_shape = x.shape[-n_in:]
        init = nn.initializers.normal(stddev=c.initializer_range)
        kernel = self.param(
            "kernel",
            _logical_init(init, self.in_axes + self.out_axes),
            tuple(in_shape) + tuple(self.out_shape),
            jnp.dtype(c.param_dtype),
        )
        dtype = jnp.dtype(c.dtype)
        x, kernel = x.astype(dtype), kernel.astype(dtype)
        if c.cpu_forms:
            # XLA:CPU wraps a contraction over several named axes in copies that
            # transpose the gradients, the weights and the weight gradient; the same
            # product as one 2-D matmul needs none (1.2x on the tiny CPU train step).
            # Accelerators keep the named-axis form, which their layouts (TPU tiles)
            # and sharding propagation handle directly.
            rows, cols = math.prod(in_shape), math.prod(self.out_shape)
            flat = jax.lax.dot_general(
                x.reshape(-1, rows),
                kernel.reshape(rows, cols),
                (((1,), (0,)), ((), ())),
                preferred_element_type=dtype,
            )
            return flat.reshape(*x.shape[:-n_in], *self.out_shape)
        contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
        return jax.lax.dot_general(x, kernel, (contract, ((), ())), preferred_element_type=dtype)


class LMHead(nn.Module):
    """The untied output projection `kernel` [embed, vocab]: fp32 logits (`lm_head_logits`)."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x):
        c = self.config
        kernel = self.param(
            "kernel",
            _logical_init(nn.initializers.normal(stddev=c.initializer_range), ("embed", "vocab")),
            (x.shape[-1], c.vocab_size),
            jnp.dtype(c.param_dtype),
        )
        dtype = jnp.dtype(c.dtype)
        return lm_head_logits(x.astype(dtype), kernel.astype(dtype))


class Attention(nn.Module):
    """Multi-head attention with grouped KV heads, rotary positions, segment masks."""

    config: LlamaConfig
    decode: bool = False

    @nn.compact
    def __call__(self, x, cos, sin, segment_ids):
        c = self.config
        heads = ("batch", "length", "heads", "head_dim")
        kv_heads = ("batch", "length", "kv_heads", "head_dim")
        q = Projection(
            c, ("embed",), (c.num_heads, c.head_dim), ("heads", "head_dim"), name="q_proj"
        )(x)
        k = Projection(
            c, ("embed",), (c.num_kv_heads, c.head_dim), ("kv_heads", "head_dim"), name="k_proj"
        )(x)
        v = Projection(
            c, ("embed",), (c.num_kv_heads, c.head_dim), ("kv_heads", "head_dim"), name="v_proj"
        )(x)
        q = nn.with_logical_constraint(checkpoint_name(q, "query_proj"), heads)
        k = nn.with_logical_constraint(checkpoint_name(k, "key_proj"), kv_heads)
        v = nn.with_logical_constraint(checkpoint_name(v, "value_proj"), kv_heads)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        sm_scale = 1.0 / math.sqrt(c.head_dim)

        if self.decode:
            out = self._cached_attention(q, k, v, segment_ids, sm_scale)
        else:
            attend = attention_fn(c.attention, cpu_forms=c.cpu_forms)
            out = attend(q, k, v, segment_ids, sm_scale)
        out = nn.with_logical_constraint(out, heads)
        return Projection(c, ("heads", "head_dim"), (c.hidden_size,), ("embed",), name="o_proj")(
            out
        )

    def _cached_attention(self, q, k, v, segment_ids, sm_scale):
        """Writes k/v at `cache_index` and attends over the whole cache."""
        batch, length = segment_ids.shape
        initialising = not self.has_variable("cache", "cached_key")
        kv_axes = ("batch", "length", "kv_heads", "head_dim")
        cached_key = self.variable(
            "cache", "cached_key", _logical_init(jnp.zeros, kv_axes), k.shape, k.dtype
        )
        cached_value = self.variable(
            "cache", "cached_value", _logical_init(jnp.zeros, kv_axes), v.shape, v.dtype
        )
        cached_segments = self.variable(
            "cache",
            "cached_segment_ids",
            _logical_init(jnp.zeros, ("batch", "length")),
            (batch, length),
            jnp.int32,
        )
        cache_index = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
        head_major = self.config.cpu_forms
        if initialising:  # shapes only: the cache spans the length init was called with
            mask = attention_mask(segment_ids, segment_ids)
            return dot_product_attention(q, k, v, mask, sm_scale, head_major=head_major)
        index = cache_index.value
        cached_key.value = jax.lax.dynamic_update_slice(cached_key.value, k, (0, index, 0, 0))
        cached_value.value = jax.lax.dynamic_update_slice(cached_value.value, v, (0, index, 0, 0))
        cached_segments.value = jax.lax.dynamic_update_slice(
            cached_segments.value, segment_ids.astype(jnp.int32), (0, index)
        )
        cache_index.value = index + length
        mask = attention_mask(segment_ids, cached_segments.value, q_offset=index)
        return dot_product_attention(
            q, cached_key.value, cached_value.value, mask, sm_scale, head_major=head_major
        )


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x):
        c = self.config
        gate = Projection(c, ("embed",), (c.intermediate_size,), ("mlp",), name="gate_proj")(x)
        up = Projection(c, ("embed",), (c.intermediate_size,), ("mlp",), name="up_proj")(x)
        hidden = nn.with_logical_constraint(nn.silu(gate) * up, ("batch", "length", "mlp"))
        return Projection(c, ("mlp",), (c.hidden_size,), ("embed",), name="down_proj")(hidden)


class DecoderLayer(nn.Module):
    """Pre-norm attention and MLP blocks with residuals; scanned over depth."""

    config: LlamaConfig
    decode: bool = False

    @nn.compact
    def __call__(self, x, cos, sin, segment_ids):
        c = self.config
        residual_axes = ("batch", "length", "embed")
        h = Attention(c, self.decode, name="attention")(
            RMSNorm(c, name="attention_norm")(x), cos, sin, segment_ids
        )
        x = nn.with_logical_constraint(x + h, residual_axes)
        h = MLP(c, name="mlp")(RMSNorm(c, name="mlp_norm")(x))
        x = nn.with_logical_constraint(x + h, residual_axes)
        return x, None


class LlamaForCausalLM(nn.Module):
    """LLaMA with its LM head; `__call__` returns fp32 logits [batch, length, vocab]."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, tokens, positions=None, segment_ids=None, decode: bool = False):
        c = self.config
        batch, length = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
        if segment_ids is None:
            segment_ids = jnp.ones((batch, length), jnp.int32)
        init = nn.initializers.normal(stddev=c.initializer_range)
        embed = nn.Embed(
            c.vocab_size,
            c.hidden_size,
            dtype=jnp.dtype(c.dtype),
            param_dtype=jnp.dtype(c.param_dtype),
            embedding_init=_logical_init(init, ("vocab", "embed")),
            name="embed",
        )
        x = nn.with_logical_constraint(embed(tokens), ("batch", "length", "embed"))
        cos, sin = rotary_tables(c, positions)

        layer = DecoderLayer
        policy = REMAT_POLICIES[c.remat]
        if c.remat != "none":
            layer = nn.remat(layer, policy=policy, prevent_cse=False)
        stack = nn.scan(
            layer,
            variable_axes={"params": 0, "cache": 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast,) * 3,
            length=c.num_layers,
            unroll=layer_unroll(c),
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        x, _ = stack(c, decode, name="layers")(x, cos, sin, segment_ids)
        x = RMSNorm(c, name="final_norm")(x)
        if c.tie_word_embeddings:
            logits = lm_head_logits(x, embed.embedding.astype(x.dtype).T)
        else:
            logits = LMHead(c, name="lm_head")(x)
        return nn.with_logical_constraint(logits.astype(jnp.float32), ("batch", "length", "vocab"))
