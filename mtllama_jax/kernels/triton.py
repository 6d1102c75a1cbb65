"""Flash attention kernels for Pallas' Triton (GPU) lowering; also run in interpret mode on CPU.

Layout stays [batch, seq, heads, head_dim] (no transposes): each program reads
strided [block, head_dim] tiles of one head. Inputs arrive padded to a multiple
of every block size; `kv_len` is the true length.

* forward: grid (q blocks, batch, q heads); online softmax over kv blocks in
  base 2, keeping the row log-sum-exp (log2 units) for the backward pass.
* dq: grid (q blocks, batch, q heads), looping over kv blocks.
* dk/dv: grid (kv blocks, batch, kv heads), looping over the q heads of the
  group and their q blocks, so grouped-query k/v are never repeated.

Causal kernels visit only kv blocks at or below the diagonal and apply the mask
only on blocks that straddle it or hold padding. With segment ids, every other
block pair is sorted by the ids' ranges: pairs that share no id are skipped,
pairs inside one segment run without a mask, the rest are masked.
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

LOG2E = math.log2(math.e)
# Finite so that a fully masked row gives exp2(0) instead of NaN; far below any real score.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
# 256 is left out: its default tiles would not fit the H100's shared memory (untuned there).
HEAD_DIMS = (16, 32, 64, 128)
_SQ = pl.squeezed  # a block dimension of size 1 that the kernel does not see


def _dot(a, b, trans_b=False, precision=None):
    dims = (((1,), (1,)), ((), ())) if trans_b else (((1,), (0,)), ((), ()))
    return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32, precision=precision)


def _mask(rows, cols, q_seg, k_seg, *, causal, kv_len, padded):
    """Boolean [len(rows), len(cols)]: causal, padding and segment masks combined."""
    mask = None
    if causal:
        mask = cols[None, :] <= rows[:, None]
    elif padded:
        mask = jnp.broadcast_to(cols[None, :] < kv_len, (rows.shape[0], cols.shape[0]))
    if q_seg is not None:
        same = q_seg[:, None] == k_seg[None, :]
        mask = same if mask is None else mask & same
    return mask


def _by_segments(q_seg, k_seg, skip, unmasked, masked):
    """Runs one of three branches for a block pair off the diagonal, by its segment ids.

    `skip` when the two blocks share no id (every pair is masked: no contribution),
    `unmasked` when a single id covers both blocks (no pair is masked), else `masked`.
    Range tests hold for ids in any order.
    """
    q_lo, q_hi, k_lo, k_hi = jnp.min(q_seg), jnp.max(q_seg), jnp.min(k_seg), jnp.max(k_seg)
    disjoint = (k_hi < q_lo) | (k_lo > q_hi)
    uniform = (q_lo == q_hi) & (k_lo == k_hi) & (q_lo == k_lo)
    return lax.cond(disjoint, skip, lambda: lax.cond(uniform, unmasked, masked))


def _sweep_kv_blocks(
    update, carry, *, k_ref, v_ref, ks_ref, q_seg, q_start, block_q, block_k, causal, kv_len, padded
):
    """Folds `update(carry, k, v, mask)` over the kv blocks that q rows [q_start, +block_q) see.

    Blocks below the diagonal (or before the padding) need no causal or padding mask: they
    run unmasked, or sorted by segment ids when there are any (`_by_segments`); the rest
    (the diagonal, the padding) run masked. `mask` is None where no mask applies.
    """
    has_seg = ks_ref is not None
    num_kv = k_ref.shape[0] // block_k
    rows = q_start + jnp.arange(block_q)

    def body(j, carry, masked):
        start = pl.multiple_of(j * block_k, block_k)
        k = k_ref[pl.ds(start, block_k), :]  # loaded before any branch, so the loads pipeline
        v = v_ref[pl.ds(start, block_k), :]
        k_seg = ks_ref[pl.ds(start, block_k)] if has_seg else None
        cols = start + jnp.arange(block_k)
        with_mask = lambda: update(
            carry,
            k,
            v,
            _mask(rows, cols, q_seg, k_seg, causal=causal, kv_len=kv_len, padded=padded),
        )
        if masked:
            return with_mask()
        if has_seg:
            return _by_segments(
                q_seg, k_seg, lambda: carry, lambda: update(carry, k, v, None), with_mask
            )
        return update(carry, k, v, None)

    if causal:
        hi = jnp.minimum(num_kv, pl.cdiv(q_start + block_q, block_k))
        below = q_start // block_k
    else:
        hi = num_kv
        below = kv_len // block_k if padded else num_kv
    carry = lax.fori_loop(0, below, functools.partial(body, masked=False), carry)
    return lax.fori_loop(below, hi, functools.partial(body, masked=True), carry)


def _params(num_warps, num_stages, interpret):
    if interpret:
        return None
    return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _fwd_kernel(*refs, causal, scale2, block_k, kv_len, padded, has_seg, precision):
    if has_seg:
        q_ref, k_ref, v_ref, qs_ref, ks_ref, o_ref, lse_ref = refs
    else:
        (q_ref, k_ref, v_ref, o_ref, lse_ref), qs_ref, ks_ref = refs, None, None
    block_q, d = q_ref.shape
    q_start = pl.program_id(0) * block_q
    q = q_ref[...]
    q_seg = qs_ref[...] if has_seg else None

    def update(carry, k, v, mask):
        acc, m, row_sum = carry
        s = _dot(q, k, trans_b=True, precision=precision) * scale2
        if mask is not None:
            s = jnp.where(mask, s, MASK_VALUE)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s - m_new[:, None])
        row_sum = row_sum * alpha + jnp.sum(p, axis=1)
        acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v, precision=precision)
        return acc, m_new, row_sum

    carry = (
        jnp.zeros((block_q, d), jnp.float32),
        jnp.full((block_q,), MASK_VALUE, jnp.float32),
        jnp.zeros((block_q,), jnp.float32),
    )
    acc, m, row_sum = _sweep_kv_blocks(
        update,
        carry,
        k_ref=k_ref,
        v_ref=v_ref,
        ks_ref=ks_ref,
        q_seg=q_seg,
        q_start=q_start,
        block_q=block_q,
        block_k=block_k,
        causal=causal,
        kv_len=kv_len,
        padded=padded,
    )
    o_ref[...] = (acc / row_sum[:, None]).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log2(row_sum)


def forward(q, k, v, seg, *, causal, sm_scale, kv_len, blocks, interpret):
    """(out [b, s, h, d], lse [b, h, s] fp32 in log2 units) for padded inputs."""
    b, s, h, d = q.shape
    kv_heads = k.shape[2]
    group = h // kv_heads
    bq, bk = blocks.block_q, blocks.block_k
    has_seg = seg is not None
    kernel = functools.partial(
        _fwd_kernel,
        causal=causal,
        scale2=sm_scale * LOG2E,
        block_k=bk,
        kv_len=kv_len,
        padded=kv_len != s,
        has_seg=has_seg,
        precision=_precision(q.dtype),
    )
    in_specs = [
        pl.BlockSpec((_SQ, bq, _SQ, d), lambda i, bi, hi: (bi, i, hi, 0)),
        pl.BlockSpec((_SQ, s, _SQ, d), lambda i, bi, hi: (bi, 0, hi // group, 0)),
        pl.BlockSpec((_SQ, s, _SQ, d), lambda i, bi, hi: (bi, 0, hi // group, 0)),
    ]
    args = [q, k, v]
    if has_seg:
        in_specs += [
            pl.BlockSpec((_SQ, bq), lambda i, bi, hi: (bi, i)),
            pl.BlockSpec((_SQ, s), lambda i, bi, hi: (bi, 0)),
        ]
        args += [seg, seg]
    return pl.pallas_call(
        kernel,
        grid=(s // bq, b, h),
        in_specs=in_specs,
        out_specs=[
            pl.BlockSpec((_SQ, bq, _SQ, d), lambda i, bi, hi: (bi, i, hi, 0)),
            pl.BlockSpec((_SQ, _SQ, bq), lambda i, bi, hi: (bi, hi, i)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((b, h, s), jnp.float32),
        ],
        compiler_params=_params(blocks.num_warps_fwd, blocks.num_stages_fwd, interpret),
        interpret=interpret,
        name="mtllama_flash_fwd",
    )(*args)


def _dq_kernel(*refs, causal, scale2, sm_scale, block_k, kv_len, padded, has_seg, precision):
    if has_seg:
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qs_ref, ks_ref, dq_ref = refs
    else:
        (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref), qs_ref, ks_ref = refs, None, None
    block_q, d = q_ref.shape
    q_start = pl.program_id(0) * block_q
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]
    q_seg = qs_ref[...] if has_seg else None

    def update(dq, k, v, mask):
        s = _dot(q, k, trans_b=True, precision=precision) * scale2
        if mask is not None:
            s = jnp.where(mask, s, MASK_VALUE)
        p = jnp.exp2(s - lse[:, None])
        dp = _dot(do, v, trans_b=True, precision=precision)
        ds = p * (dp - delta[:, None])
        return dq + _dot(ds.astype(k.dtype), k, precision=precision)

    dq = _sweep_kv_blocks(
        update,
        jnp.zeros((block_q, d), jnp.float32),
        k_ref=k_ref,
        v_ref=v_ref,
        ks_ref=ks_ref,
        q_seg=q_seg,
        q_start=q_start,
        block_q=block_q,
        block_k=block_k,
        causal=causal,
        kv_len=kv_len,
        padded=padded,
    )
    dq_ref[...] = (dq * sm_scale).astype(dq_ref.dtype)


def _dkv_kernel(*refs, causal, scale2, sm_scale, block_q, kv_len, padded, has_seg, precision):
    if has_seg:
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qs_ref, ks_ref, dk_ref, dv_ref = refs
    else:
        (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref) = refs
        qs_ref = ks_ref = None
    block_k, d = k_ref.shape
    seq, group = q_ref.shape[0], q_ref.shape[1]
    num_q = seq // block_q
    k_start = pl.program_id(0) * block_k
    k, v = k_ref[...], v_ref[...]
    k_seg = ks_ref[...] if has_seg else None
    cols = k_start + jnp.arange(block_k)

    def update(carry, q, do, lse, delta, mask_t):
        dk, dv = carry
        s_t = _dot(k, q, trans_b=True, precision=precision) * scale2  # [block_k, block_q]
        if mask_t is not None:
            s_t = jnp.where(mask_t, s_t, MASK_VALUE)
        p_t = jnp.exp2(s_t - lse[None, :])
        dv = dv + _dot(p_t.astype(do.dtype), do, precision=precision)
        dp_t = _dot(v, do, trans_b=True, precision=precision)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = dk + _dot(ds_t.astype(q.dtype), q, precision=precision)
        return dk, dv

    def body(i, carry, g, masked):
        start = pl.multiple_of(i * block_q, block_q)
        q = q_ref[pl.ds(start, block_q), g, :]
        do = do_ref[pl.ds(start, block_q), g, :]
        lse = lse_ref[g, pl.ds(start, block_q)]
        delta = delta_ref[g, pl.ds(start, block_q)]
        q_seg = qs_ref[pl.ds(start, block_q)] if has_seg else None
        rows = start + jnp.arange(block_q)
        with_mask = lambda: update(
            carry,
            q,
            do,
            lse,
            delta,
            _mask(rows, cols, q_seg, k_seg, causal=causal, kv_len=kv_len, padded=padded).T,
        )
        if masked:
            return with_mask()
        if has_seg:
            return _by_segments(
                q_seg,
                k_seg,
                lambda: carry,
                lambda: update(carry, q, do, lse, delta, None),
                with_mask,
            )
        return update(carry, q, do, lse, delta, None)

    # q blocks [lo, masked_hi) need the causal or padding mask; [masked_hi, num_q) do not.
    if causal:
        lo = k_start // block_q
        masked_hi = jnp.minimum(num_q, pl.cdiv(k_start + block_k, block_q))
    else:
        lo = 0
        masked_hi = num_q if padded else 0

    def group_body(g, carry):
        carry = lax.fori_loop(lo, masked_hi, functools.partial(body, g=g, masked=True), carry)
        return lax.fori_loop(masked_hi, num_q, functools.partial(body, g=g, masked=False), carry)

    zeros = jnp.zeros((block_k, d), jnp.float32)
    dk, dv = lax.fori_loop(0, group, group_body, (zeros, zeros))
    dk_ref[...] = (dk * sm_scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def backward(q, k, v, seg, out, lse, do, *, causal, sm_scale, kv_len, blocks, interpret):
    """(dq, dk, dv) for padded inputs, given the forward's output and log-sum-exp."""
    b, s, h, d = q.shape
    kv_heads = k.shape[2]
    group = h // kv_heads
    has_seg = seg is not None
    precision = _precision(q.dtype)
    delta = jnp.einsum("bshd,bshd->bhs", out.astype(jnp.float32), do.astype(jnp.float32))
    common = dict(
        causal=causal,
        scale2=sm_scale * LOG2E,
        sm_scale=sm_scale,
        kv_len=kv_len,
        padded=kv_len != s,
        has_seg=has_seg,
        precision=precision,
    )

    bq, bk = blocks.block_q_dq, blocks.block_k_dq
    row = lambda i, bi, hi: (bi, i, hi, 0)
    full_kv = lambda i, bi, hi: (bi, 0, hi // group, 0)
    in_specs = [
        pl.BlockSpec((_SQ, bq, _SQ, d), row),
        pl.BlockSpec((_SQ, s, _SQ, d), full_kv),
        pl.BlockSpec((_SQ, s, _SQ, d), full_kv),
        pl.BlockSpec((_SQ, bq, _SQ, d), row),
        pl.BlockSpec((_SQ, _SQ, bq), lambda i, bi, hi: (bi, hi, i)),
        pl.BlockSpec((_SQ, _SQ, bq), lambda i, bi, hi: (bi, hi, i)),
    ]
    args = [q, k, v, do, lse, delta]
    if has_seg:
        in_specs += [
            pl.BlockSpec((_SQ, bq), lambda i, bi, hi: (bi, i)),
            pl.BlockSpec((_SQ, s), lambda i, bi, hi: (bi, 0)),
        ]
        args += [seg, seg]
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, block_k=bk, **common),
        grid=(s // bq, b, h),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((_SQ, bq, _SQ, d), row),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_params(blocks.num_warps_bwd, blocks.num_stages_bwd, interpret),
        interpret=interpret,
        name="mtllama_flash_dq",
    )(*args)

    bq, bk = blocks.block_q_dkv, blocks.block_k_dkv
    kv_row = lambda j, bi, ki: (bi, j, ki, 0)
    group_rows = lambda j, bi, ki: (bi, 0, ki, 0)
    group_stats = lambda j, bi, ki: (bi, ki, 0)
    in_specs = [
        pl.BlockSpec((_SQ, s, group, d), group_rows),
        pl.BlockSpec((_SQ, bk, _SQ, d), kv_row),
        pl.BlockSpec((_SQ, bk, _SQ, d), kv_row),
        pl.BlockSpec((_SQ, s, group, d), group_rows),
        pl.BlockSpec((_SQ, group, s), group_stats),
        pl.BlockSpec((_SQ, group, s), group_stats),
    ]
    if has_seg:
        in_specs += [
            pl.BlockSpec((_SQ, s), lambda j, bi, ki: (bi, 0)),
            pl.BlockSpec((_SQ, bk), lambda j, bi, ki: (bi, j)),
        ]
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, block_q=bq, **common),
        grid=(s // bk, b, kv_heads),
        in_specs=in_specs,
        out_specs=[
            pl.BlockSpec((_SQ, bk, _SQ, d), kv_row),
            pl.BlockSpec((_SQ, bk, _SQ, d), kv_row),
        ],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=_params(blocks.num_warps_bwd, blocks.num_stages_bwd, interpret),
        interpret=interpret,
        name="mtllama_flash_dkv",
    )(*args)
    return dq, dk, dv


def _precision(dtype):
    """fp32 inputs get full-precision dots (not TF32); bf16/fp16 use the tensor cores as is."""
    return lax.Precision.HIGHEST if dtype == jnp.float32 else None
