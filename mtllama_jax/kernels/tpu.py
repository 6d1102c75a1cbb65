"""Flash attention kernels for Pallas' Mosaic TPU lowering (also runnable in TPU interpret mode).

Mosaic tiles the last two dimensions of every block by (8, 128), so the kernels
work on a [batch, heads, seq, head_dim] copy of the inputs, keep row statistics
as [seq, 1] columns (and [1, seq] rows where a transposed product needs them),
and pass segment ids in both shapes. The kv (or q) sweep is the innermost,
"arbitrary" grid axis with accumulators in VMEM scratch; causal steps above the
diagonal are skipped with `pl.when`, and their index maps repeat the last
needed block so that no copy is issued for them.

Written against the Mosaic rules but not run on TPU hardware here; the test
suite runs these kernels in TPU interpret mode on CPU.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

HEAD_DIMS = (64, 128, 256)
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
_SQ = pl.squeezed
NT = (((1,), (1,)), ((), ()))  # a @ b.T
NN = (((1,), (0,)), ((), ()))  # a @ b


def _dot(a, b, dims):
    return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _mask(rows, cols, q_seg, k_seg, *, causal, kv_len, padded):
    """rows/cols: int32 positions broadcastable to one shape; None when nothing is masked."""
    mask = None
    if causal:
        mask = cols <= rows
    elif padded:
        mask = cols < kv_len
    if q_seg is not None:
        same = q_seg == k_seg
        mask = same if mask is None else mask & same
    return mask


def _params(interpret, semantics):
    if interpret:
        return None
    return pltpu.CompilerParams(dimension_semantics=semantics)


def _interpret(interpret):
    return pltpu.InterpretParams() if interpret else False


def _fwd_kernel(*refs, causal, sm_scale, kv_len, padded, has_seg):
    if has_seg:
        q_ref, k_ref, v_ref, qs_ref, ks_ref, o_ref, lse_ref, m_ref, l_ref, acc_ref = refs
    else:
        q_ref, k_ref, v_ref, o_ref, lse_ref, m_ref, l_ref, acc_ref = refs
    block_q, block_k = q_ref.shape[0], k_ref.shape[0]
    i, j, nk = pl.program_id(2), pl.program_id(3), pl.num_programs(3)

    @pl.when(j == 0)
    def _():
        m_ref[...] = jnp.full(m_ref.shape, MASK_VALUE, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    def step():
        s = _dot(q_ref[...], k_ref[...], NT) * sm_scale
        rows = i * block_q + lax.broadcasted_iota(jnp.int32, s.shape, 0)
        cols = j * block_k + lax.broadcasted_iota(jnp.int32, s.shape, 1)
        mask = _mask(
            rows,
            cols,
            qs_ref[...] if has_seg else None,
            ks_ref[...] if has_seg else None,
            causal=causal,
            kv_len=kv_len,
            padded=padded,
        )
        if mask is not None:
            s = jnp.where(mask, s, MASK_VALUE)
        m_prev = m_ref[...]
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        p = jnp.exp(s - m_new)
        alpha = jnp.exp(m_prev - m_new)
        l_ref[...] = alpha * l_ref[...] + jnp.sum(p, axis=1, keepdims=True)
        acc_ref[...] = alpha * acc_ref[...] + _dot(p.astype(v_ref.dtype), v_ref[...], NN)
        m_ref[...] = m_new

    if causal:
        pl.when(j * block_k <= i * block_q + block_q - 1)(step)
    else:
        step()

    @pl.when(j == nk - 1)
    def _():
        o_ref[...] = (acc_ref[...] / l_ref[...]).astype(o_ref.dtype)
        lse_ref[...] = m_ref[...] + jnp.log(l_ref[...])


def _layouts(q, k, v, seg):
    """[b, h, s, d] copies and segment ids as columns [b, s, 1] and rows [b, 1, s]."""
    t = lambda x: jnp.swapaxes(x, 1, 2)
    cols = rows = None
    if seg is not None:
        cols, rows = seg[:, :, None], seg[:, None, :]
    return t(q), t(k), t(v), cols, rows


def forward(q, k, v, seg, *, causal, sm_scale, kv_len, blocks, interpret=False):
    """(out [b, s, h, d], lse [b, h, s, 1] fp32, natural log) for padded inputs."""
    b, s, h, d = q.shape
    group = h // k.shape[2]
    bq, bk = blocks.block_q, blocks.block_k
    qt, kt, vt, seg_cols, seg_rows = _layouts(q, k, v, seg)

    def kv_block(
        i, j
    ):  # causal: repeat the last block the row needs, so skipped steps copy nothing
        return jnp.minimum(j, (i * bq + bq - 1) // bk) if causal else j

    in_specs = [
        pl.BlockSpec((_SQ, _SQ, bq, d), lambda bi, hi, i, j: (bi, hi, i, 0)),
        pl.BlockSpec((_SQ, _SQ, bk, d), lambda bi, hi, i, j: (bi, hi // group, kv_block(i, j), 0)),
        pl.BlockSpec((_SQ, _SQ, bk, d), lambda bi, hi, i, j: (bi, hi // group, kv_block(i, j), 0)),
    ]
    args = [qt, kt, vt]
    if seg is not None:
        in_specs += [
            pl.BlockSpec((_SQ, bq, 1), lambda bi, hi, i, j: (bi, i, 0)),
            pl.BlockSpec((_SQ, 1, bk), lambda bi, hi, i, j: (bi, 0, kv_block(i, j))),
        ]
        args += [seg_cols, seg_rows]
    out, lse = pl.pallas_call(
        functools.partial(
            _fwd_kernel,
            causal=causal,
            sm_scale=sm_scale,
            kv_len=kv_len,
            padded=kv_len != s,
            has_seg=seg is not None,
        ),
        grid=(b, h, s // bq, s // bk),
        in_specs=in_specs,
        out_specs=[
            pl.BlockSpec((_SQ, _SQ, bq, d), lambda bi, hi, i, j: (bi, hi, i, 0)),
            pl.BlockSpec((_SQ, _SQ, bq, 1), lambda bi, hi, i, j: (bi, hi, i, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct(qt.shape, q.dtype),
            jax.ShapeDtypeStruct((b, h, s, 1), jnp.float32),
        ],
        scratch_shapes=[
            pltpu.VMEM((bq, 1), jnp.float32),
            pltpu.VMEM((bq, 1), jnp.float32),
            pltpu.VMEM((bq, d), jnp.float32),
        ],
        compiler_params=_params(interpret, ("parallel", "parallel", "parallel", "arbitrary")),
        interpret=_interpret(interpret),
        name="mtllama_flash_fwd_tpu",
    )(*args)
    return jnp.swapaxes(out, 1, 2), lse


def _dq_kernel(*refs, causal, sm_scale, kv_len, padded, has_seg):
    if has_seg:
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qs_ref, ks_ref, dq_ref, acc_ref = refs
    else:
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, acc_ref = refs
    block_q, block_k = q_ref.shape[0], k_ref.shape[0]
    i, j, nk = pl.program_id(2), pl.program_id(3), pl.num_programs(3)

    @pl.when(j == 0)
    def _():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    def step():
        s = _dot(q_ref[...], k_ref[...], NT) * sm_scale
        rows = i * block_q + lax.broadcasted_iota(jnp.int32, s.shape, 0)
        cols = j * block_k + lax.broadcasted_iota(jnp.int32, s.shape, 1)
        mask = _mask(
            rows,
            cols,
            qs_ref[...] if has_seg else None,
            ks_ref[...] if has_seg else None,
            causal=causal,
            kv_len=kv_len,
            padded=padded,
        )
        if mask is not None:
            s = jnp.where(mask, s, MASK_VALUE)
        p = jnp.exp(s - lse_ref[...])
        dp = _dot(do_ref[...], v_ref[...], NT)
        ds = p * (dp - delta_ref[...])
        acc_ref[...] += _dot(ds.astype(k_ref.dtype), k_ref[...], NN)

    if causal:
        pl.when(j * block_k <= i * block_q + block_q - 1)(step)
    else:
        step()

    @pl.when(j == nk - 1)
    def _():
        dq_ref[...] = (acc_ref[...] * sm_scale).astype(dq_ref.dtype)


def _dkv_kernel(*refs, causal, sm_scale, kv_len, padded, has_seg, num_q):
    if has_seg:
        (
            q_ref,
            k_ref,
            v_ref,
            do_ref,
            lse_ref,
            delta_ref,
            qs_ref,
            ks_ref,
            dk_ref,
            dv_ref,
            dk_acc,
            dv_acc,
        ) = refs
    else:
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, dk_acc, dv_acc = refs
    block_q, block_k = q_ref.shape[0], k_ref.shape[0]
    j, t, nt = pl.program_id(2), pl.program_id(3), pl.num_programs(3)
    i = t % num_q

    @pl.when(t == 0)
    def _():
        dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
        dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

    def step():
        s_t = _dot(k_ref[...], q_ref[...], NT) * sm_scale  # [block_k, block_q]
        cols = j * block_k + lax.broadcasted_iota(jnp.int32, s_t.shape, 0)
        rows = i * block_q + lax.broadcasted_iota(jnp.int32, s_t.shape, 1)
        mask = _mask(
            rows,
            cols,
            qs_ref[...] if has_seg else None,
            ks_ref[...] if has_seg else None,
            causal=causal,
            kv_len=kv_len,
            padded=padded,
        )
        if mask is not None:
            s_t = jnp.where(mask, s_t, MASK_VALUE)
        p_t = jnp.exp(s_t - lse_ref[...])
        dv_acc[...] += _dot(p_t.astype(do_ref.dtype), do_ref[...], NN)
        dp_t = _dot(v_ref[...], do_ref[...], NT)
        ds_t = p_t * (dp_t - delta_ref[...])
        dk_acc[...] += _dot(ds_t.astype(q_ref.dtype), q_ref[...], NN)

    if causal:
        pl.when(i * block_q + block_q - 1 >= j * block_k)(step)
    else:
        step()

    @pl.when(t == nt - 1)
    def _():
        dk_ref[...] = (dk_acc[...] * sm_scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def backward(q, k, v, seg, out, lse, do, *, causal, sm_scale, kv_len, blocks, interpret=False):
    """(dq, dk, dv) in [b, s, heads, d] for padded inputs, given the forward's out and lse."""
    b, s, h, d = q.shape
    kv_heads = k.shape[2]
    group = h // kv_heads
    has_seg = seg is not None
    qt, kt, vt, seg_cols, seg_rows = _layouts(q, k, v, seg)
    dot_t = jnp.swapaxes(do, 1, 2)
    delta = jnp.einsum("bshd,bshd->bhs", out.astype(jnp.float32), do.astype(jnp.float32))
    delta_cols, lse_rows, delta_rows = delta[..., None], lse.reshape(b, h, 1, s), delta[:, :, None]
    common = dict(
        causal=causal, sm_scale=sm_scale, kv_len=kv_len, padded=kv_len != s, has_seg=has_seg
    )

    bq, bk = blocks.block_q_dq, blocks.block_k_dq
    kv_block = lambda i, j: jnp.minimum(j, (i * bq + bq - 1) // bk) if causal else j
    row = lambda bi, hi, i, j: (bi, hi, i, 0)
    kv = lambda bi, hi, i, j: (bi, hi // group, kv_block(i, j), 0)
    in_specs = [
        pl.BlockSpec((_SQ, _SQ, bq, d), row),
        pl.BlockSpec((_SQ, _SQ, bk, d), kv),
        pl.BlockSpec((_SQ, _SQ, bk, d), kv),
        pl.BlockSpec((_SQ, _SQ, bq, d), row),
        pl.BlockSpec((_SQ, _SQ, bq, 1), row),
        pl.BlockSpec((_SQ, _SQ, bq, 1), row),
    ]
    args = [qt, kt, vt, dot_t, lse, delta_cols]
    if has_seg:
        in_specs += [
            pl.BlockSpec((_SQ, bq, 1), lambda bi, hi, i, j: (bi, i, 0)),
            pl.BlockSpec((_SQ, 1, bk), lambda bi, hi, i, j: (bi, 0, kv_block(i, j))),
        ]
        args += [seg_cols, seg_rows]
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, **common),
        grid=(b, h, s // bq, s // bk),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((_SQ, _SQ, bq, d), row),
        out_shape=jax.ShapeDtypeStruct(qt.shape, q.dtype),
        scratch_shapes=[pltpu.VMEM((bq, d), jnp.float32)],
        compiler_params=_params(interpret, ("parallel", "parallel", "parallel", "arbitrary")),
        interpret=_interpret(interpret),
        name="mtllama_flash_dq_tpu",
    )(*args)

    bq, bk = blocks.block_q_dkv, blocks.block_k_dkv
    num_q = s // bq

    def q_block(j, t):  # causal: repeat the first block the column needs for skipped steps
        i = t % num_q
        return jnp.maximum(i, (j * bk) // bq) if causal else i

    head = lambda ki, t: ki * group + t // num_q
    q_rows = lambda bi, ki, j, t: (bi, head(ki, t), q_block(j, t), 0)
    q_stats = lambda bi, ki, j, t: (bi, head(ki, t), 0, q_block(j, t))
    kv_rows = lambda bi, ki, j, t: (bi, ki, j, 0)
    in_specs = [
        pl.BlockSpec((_SQ, _SQ, bq, d), q_rows),
        pl.BlockSpec((_SQ, _SQ, bk, d), kv_rows),
        pl.BlockSpec((_SQ, _SQ, bk, d), kv_rows),
        pl.BlockSpec((_SQ, _SQ, bq, d), q_rows),
        pl.BlockSpec((_SQ, _SQ, 1, bq), q_stats),
        pl.BlockSpec((_SQ, _SQ, 1, bq), q_stats),
    ]
    args = [qt, kt, vt, dot_t, lse_rows, delta_rows]
    if has_seg:
        in_specs += [
            pl.BlockSpec((_SQ, 1, bq), lambda bi, ki, j, t: (bi, 0, q_block(j, t))),
            pl.BlockSpec((_SQ, bk, 1), lambda bi, ki, j, t: (bi, j, 0)),
        ]
        args += [seg_rows, seg_cols]
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, num_q=num_q, **common),
        grid=(b, kv_heads, s // bk, group * num_q),
        in_specs=in_specs,
        out_specs=[
            pl.BlockSpec((_SQ, _SQ, bk, d), kv_rows),
            pl.BlockSpec((_SQ, _SQ, bk, d), kv_rows),
        ],
        out_shape=[
            jax.ShapeDtypeStruct(kt.shape, k.dtype),
            jax.ShapeDtypeStruct(vt.shape, v.dtype),
        ],
        scratch_shapes=[pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, d), jnp.float32)],
        compiler_params=_params(interpret, ("parallel", "parallel", "parallel", "arbitrary")),
        interpret=_interpret(interpret),
        name="mtllama_flash_dkv_tpu",
    )(*args)
    t = lambda x: jnp.swapaxes(x, 1, 2)
    return t(dq), t(dk), t(dv)
