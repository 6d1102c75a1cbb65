"""The public flash_attention: checks, backend dispatch, padding, custom VJP and sharding.

The kernels themselves live in `triton.py` (GPU, and CPU interpret mode) and
`tpu.py` (Mosaic TPU). This module pads the sequence to a multiple of the block
sizes (the kernels mask the padding), ties forward and backward kernels together
with `jax.custom_vjp`, and, under a mesh of several devices, runs them per shard
with `jax.shard_map`, split as the logical axis rules in effect (flax's
`nn.logical_axis_rules`) split the model's batch and heads.
"""

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from mtllama_jax.kernels import tpu as tpu_kernels
from mtllama_jax.kernels import triton as triton_kernels
from mtllama_jax.kernels.validation import check_head_dim, check_inputs

# The logical names of the operands' axes, as the model constrains them.
Q_AXES = ("batch", "length", "heads", "head_dim")
KV_AXES = ("batch", "length", "kv_heads", "head_dim")
# Backends each platform (jax.default_backend()) can run.
# 'interpret' runs the Triton kernels and 'tpu_interpret' the Mosaic TPU kernels in Pallas'
# interpreter: slow, for tests on any platform.
PLATFORM_BACKENDS = {
    "gpu": ("triton", "interpret", "tpu_interpret"),
    "cuda": ("triton", "interpret", "tpu_interpret"),
    "rocm": ("triton", "interpret", "tpu_interpret"),
    "tpu": ("tpu", "interpret", "tpu_interpret"),
    "cpu": ("interpret", "tpu_interpret"),
}


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes (powers of two) and Triton launch settings; TPU ignores the warp/stage fields."""

    block_q: int = 128
    block_k: int = 128
    block_q_dq: int = 64
    block_k_dq: int = 64
    block_q_dkv: int = 64
    block_k_dkv: int = 64
    num_warps_fwd: int = 8
    num_stages_fwd: int = 3
    num_warps_bwd: int = 4
    num_stages_bwd: int = 2

    def fit(self, seq_len, minimum):
        """Shrinks every block to at most the padded sequence (never below `minimum`)."""
        cap = max(minimum, 1 << max(0, (seq_len - 1).bit_length()))
        sizes = {
            f.name: min(getattr(self, f.name), cap)
            for f in dataclasses.fields(self)
            if f.name.startswith("block_")
        }
        return dataclasses.replace(self, **sizes)

    def largest(self):
        return max(
            getattr(self, f.name) for f in dataclasses.fields(self) if f.name.startswith("block_")
        )


DEFAULT_BLOCKS = {
    "triton": BlockSizes(),
    "interpret": BlockSizes(block_q=64, block_k=64),
    "tpu": BlockSizes(
        block_q=512, block_k=512, block_q_dq=512, block_k_dq=512, block_q_dkv=512, block_k_dkv=512
    ),
}
DEFAULT_BLOCKS["tpu_interpret"] = DEFAULT_BLOCKS["tpu"]
# fp32 tiles take twice the shared memory: smaller blocks, shallower pipelines.
DEFAULT_BLOCKS_FP32 = {
    "triton": BlockSizes(block_q=64, block_k=64, num_warps_fwd=4, num_stages_fwd=2)
}
# 16-bit settings tuned for one head_dim, used in place of DEFAULT_BLOCKS for that
# (backend, head_dim). head_dim 64: TinyLlama-1.1B's attention (batch 8, seq 2048, 32/4
# heads, packed segments) on an H200, by `bench_attention.py --tune --tune_shape
# 8,2048,32,4,64 --tune_segments`: 231 TFLOP/s forward (the default setting: 194) and
# 223 forward+backward (the default backward setting: 218).
TUNED_BLOCKS: dict[tuple[str, int], BlockSizes] = {
    ("triton", 64): BlockSizes(
        block_q=128,
        block_k=64,
        num_warps_fwd=4,
        num_stages_fwd=3,
        num_warps_bwd=4,
        num_stages_bwd=3,
    ),
}
MIN_BLOCK = {"triton": 16, "interpret": 8, "tpu": 128, "tpu_interpret": 128}
HEAD_DIMS = {
    "triton": triton_kernels.HEAD_DIMS,
    "interpret": triton_kernels.HEAD_DIMS,
    "tpu": tpu_kernels.HEAD_DIMS,
    "tpu_interpret": tpu_kernels.HEAD_DIMS,
}


def pick_backend(backend=None):
    """The backend to run here: `backend` if this platform runs it, else the platform's own."""
    platform = jax.default_backend()
    available = PLATFORM_BACKENDS.get(platform, ("interpret",))
    if backend is None:
        return available[0]
    if backend not in available:
        raise ValueError(
            f"flash_attention backend {backend!r} cannot run on platform {platform!r}; "
            f"available here: {list(available)}"
        )
    return backend


def _block_sizes(block_sizes, backend, seq_len, head_dim, dtype):
    base = TUNED_BLOCKS.get((backend, head_dim), DEFAULT_BLOCKS[backend])
    if jnp.dtype(dtype).itemsize > 2:
        base = DEFAULT_BLOCKS_FP32.get(backend, DEFAULT_BLOCKS[backend])
    if isinstance(block_sizes, dict):
        unknown = set(block_sizes) - {f.name for f in dataclasses.fields(BlockSizes)}
        if unknown:
            raise ValueError(
                f"unknown block_sizes keys {sorted(unknown)}; known: "
                f"{[f.name for f in dataclasses.fields(BlockSizes)]}"
            )
        base = dataclasses.replace(base, **block_sizes)
    elif block_sizes is not None:
        base = block_sizes
    for f in dataclasses.fields(base):
        size = getattr(base, f.name)
        if f.name.startswith("block_") and (size < 1 or size & (size - 1)):
            raise ValueError(f"block_sizes.{f.name} must be a power of two; got {size}")
    return base.fit(seq_len, MIN_BLOCK[backend])


@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything about a call that is not an array (hashable: a custom_vjp nondiff arg)."""

    causal: bool
    sm_scale: float
    kv_len: int
    blocks: BlockSizes
    backend: str

    def run_forward(self, q, k, v, seg):
        kw = dict(
            causal=self.causal, sm_scale=self.sm_scale, kv_len=self.kv_len, blocks=self.blocks
        )
        if self.backend.startswith("tpu"):
            return tpu_kernels.forward(
                q, k, v, seg, interpret=self.backend == "tpu_interpret", **kw
            )
        return triton_kernels.forward(q, k, v, seg, interpret=self.backend == "interpret", **kw)

    def run_backward(self, q, k, v, seg, out, lse, do):
        kw = dict(
            causal=self.causal, sm_scale=self.sm_scale, kv_len=self.kv_len, blocks=self.blocks
        )
        if self.backend.startswith("tpu"):
            return tpu_kernels.backward(
                q, k, v, seg, out, lse, do, interpret=self.backend == "tpu_interpret", **kw
            )
        return triton_kernels.backward(
            q, k, v, seg, out, lse, do, interpret=self.backend == "interpret", **kw
        )


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q, k, v, seg, static):
    return static.run_forward(q, k, v, seg)[0]


def _flash_fwd(q, k, v, seg, static):
    out, lse = static.run_forward(q, k, v, seg)
    # Named so that a remat policy can keep them (REMAT_POLICIES["dots_attention"]) and the
    # backward pass does not run the forward kernel a second time to get them back.
    out, lse = checkpoint_name(out, "flash_out"), checkpoint_name(lse, "flash_lse")
    return out, (q, k, v, seg, out, lse)


def _flash_bwd(static, residuals, do):
    q, k, v, seg, out, lse = residuals
    dq, dk, dv = static.run_backward(q, k, v, seg, out, lse, do)
    return dq, dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _local_attention(q, k, v, seg, *, causal, sm_scale, block_sizes, backend):
    """Pads to the blocks, runs the kernels on this device's arrays, slices the padding off."""
    seq = q.shape[1]
    blocks = _block_sizes(block_sizes, backend, seq, q.shape[3], q.dtype)
    padded = -(-seq // blocks.largest()) * blocks.largest()
    if padded != seq:
        pad = ((0, 0), (0, padded - seq), (0, 0), (0, 0))
        q, k, v = (jnp.pad(x, pad) for x in (q, k, v))
        if seg is not None:
            seg = jnp.pad(seg, ((0, 0), (0, padded - seq)), constant_values=-1)
    static = _Static(bool(causal), float(sm_scale), seq, blocks, backend)
    return _flash(q, k, v, seg, static)[:, :seq]


def _fit(spec, shape, mesh):
    """`spec` keeping, per dimension, the mesh axes (size > 1) whose product divides it."""
    fitted = []
    for entry, dim in zip(spec, shape):
        axes, size = [], 1
        for axis in (entry,) if isinstance(entry, str) else entry or ():
            n = mesh.shape.get(axis, 1)
            if n > 1 and dim % (size * n) == 0:
                axes.append(axis)
                size *= n
        fitted.append(tuple(axes) if len(axes) > 1 else (axes[0] if axes else None))
    return fitted


def _shard_specs(mesh, q, k):
    """PartitionSpecs of q, k/v and segment ids from the logical axis rules in effect.

    Batch and heads split as the rules say, where the mesh axes divide them; q's
    and kv's heads split alike or not at all (each shard keeps whole KV groups).
    The kernels need whole sequences and heads, so rules splitting `length` or
    `head_dim` are refused.
    """
    q_spec = _fit(nn.logical_to_mesh_axes(Q_AXES), q.shape, mesh)
    kv_spec = _fit(nn.logical_to_mesh_axes(KV_AXES), k.shape, mesh)
    for i in (1, 3):
        if q_spec[i] or kv_spec[i]:
            raise ValueError(
                f"flash_attention needs whole {Q_AXES[i]!r} per device, but the logical axis "
                f"rules split it over {q_spec[i] or kv_spec[i]!r}; drop that rule"
            )
    if q_spec[2] != kv_spec[2]:
        q_spec[2] = kv_spec[2] = None
    return P(*q_spec), P(*kv_spec), P(q_spec[0], None)


def flash_attention(
    q, k, v, *, segment_ids=None, causal=True, sm_scale=None, block_sizes=None, backend=None
):
    """Memory-efficient exact attention for q [b, s, h, d], k/v [b, s, kv_h, d].

    segment_ids [b, s] int: queries see only keys with the same id (packing);
    causal: query i sees keys j <= i; sm_scale defaults to head_dim ** -0.5;
    block_sizes: a `BlockSizes` or a dict of its fields to override;
    backend: 'triton', 'tpu', 'interpret' or 'tpu_interpret' (default: the platform's own).
    Returns [b, s, h, d] in q's dtype; differentiable in q, k and v.
    """
    check_inputs(q, k, v, segment_ids)
    backend = pick_backend(backend)
    check_head_dim(q.shape[3], backend, HEAD_DIMS[backend])
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(q.shape[3])
    if segment_ids is not None:
        segment_ids = segment_ids.astype(jnp.int32)
    local = functools.partial(
        _local_attention, causal=causal, sm_scale=sm_scale, block_sizes=block_sizes, backend=backend
    )
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1 or mesh.manual_axes:
        return local(q, k, v, segment_ids)
    q_spec, kv_spec, seg_spec = _shard_specs(mesh, q, k)
    if segment_ids is None:
        fn = jax.shard_map(
            lambda q, k, v: local(q, k, v, None),
            mesh=mesh,
            in_specs=(q_spec, kv_spec, kv_spec),
            out_specs=q_spec,
            check_vma=False,
        )
        return fn(q, k, v)
    fn = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(q_spec, kv_spec, kv_spec, seg_spec),
        out_specs=q_spec,
        check_vma=False,
    )
    return fn(q, k, v, segment_ids)
