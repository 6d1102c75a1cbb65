"""Times mtllama_jax's Pallas flash attention against cuDNN, XLA and JAX's own Pallas mha.

One table: forward and forward+backward TFLOP/s per sequence length (causal,
bf16, head_dim 128, batch x seq = 16k tokens, 16 heads), each backend measured
side by side in the same run, with ratios of this kernel to each of them; then
a memory check at seq 32k, batch 1 (this kernel vs the XLA reference).

    python benchmarks/bench_attention.py              # on a GPU
    python benchmarks/bench_attention.py --check      # GPU correctness vs reference first
    python benchmarks/bench_attention.py --tune       # block-size sweep (--tune_shape, default
                                                      # seq 4k, head_dim 128), then the table
                                                      # with the best setting found
    python benchmarks/bench_attention.py --smoke      # tiny interpret-mode pass on CPU

FLOPs count the useful (unmasked) half of causal attention: forward
2 * 2 * b * h * s^2 * d / 2, backward 2.5 times the forward.
"""

import argparse
import dataclasses
import functools
import math
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from mtllama_jax.kernels import BlockSizes, flash_attention, reference_attention

TOKENS = 16384
HEADS = 16


def _inputs(batch, seq, heads, kv_heads, head_dim, dtype, seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(keys[0], (batch, seq, heads, head_dim), dtype)
    k = jax.random.normal(keys[1], (batch, seq, kv_heads, head_dim), dtype)
    v = jax.random.normal(keys[2], (batch, seq, kv_heads, head_dim), dtype)
    do = jax.random.normal(keys[3], (batch, seq, heads, head_dim), dtype)
    return q, k, v, do


def _implementations(smoke, blocks):
    """name -> attention(q, k, v) with causal masking and the default scale."""
    impls = {}
    if smoke:
        impls["pallas (ours)"] = functools.partial(
            flash_attention, causal=True, backend="interpret", block_sizes=blocks
        )
        impls["xla reference"] = functools.partial(reference_attention, causal=True)
        return impls
    from jax.experimental.pallas.ops.gpu import attention as jax_pallas_attention

    impls["pallas (ours)"] = functools.partial(flash_attention, causal=True, block_sizes=blocks)
    impls["cudnn"] = lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, is_causal=True, implementation="cudnn"
    )
    impls["xla reference"] = functools.partial(reference_attention, causal=True)
    impls["jax pallas mha"] = lambda q, k, v: jax_pallas_attention.mha(
        q, k, v, None, sm_scale=1.0 / math.sqrt(q.shape[-1]), causal=True
    )
    return impls


def _fwd_bwd(attn):
    def loss(q, k, v, do):
        return jnp.sum(attn(q, k, v).astype(jnp.float32) * do.astype(jnp.float32))

    grad = jax.grad(loss, argnums=(0, 1, 2))
    return jax.jit(grad)


def _time(fn, args, repeats):
    """Seconds per call of fn(*args): median over 5 rounds of `repeats` back-to-back calls.

    Queuing calls and waiting once per round keeps host dispatch out of the figure.
    """
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    rounds = []
    for _ in range(5):
        start = time.perf_counter()
        out = [fn(*args) for _ in range(repeats)]
        jax.block_until_ready(out)
        rounds.append((time.perf_counter() - start) / repeats)
    return statistics.median(rounds)


def _flops(batch, seq, heads, head_dim):
    fwd = 4 * batch * heads * seq * seq * head_dim / 2
    return fwd, 3.5 * fwd


def measure(impls, seqs, head_dim, dtype, repeats, tokens, heads):
    """rows: dict(seq, name, fwd_tflops, fwdbwd_tflops) (None where a backend fails)."""
    rows = []
    for seq in seqs:
        batch = max(1, tokens // seq)
        q, k, v, do = _inputs(batch, seq, heads, heads, head_dim, dtype, seed=seq)
        fwd_flops, total_flops = _flops(batch, seq, heads, head_dim)
        for name, attn in impls.items():
            row = {"seq": seq, "batch": batch, "name": name, "fwd": None, "fwdbwd": None}
            try:
                row["fwd"] = fwd_flops / _time(jax.jit(attn), (q, k, v), repeats) / 1e12
                row["fwdbwd"] = total_flops / _time(_fwd_bwd(attn), (q, k, v, do), repeats) / 1e12
            except Exception as err:  # a backend that cannot run this size is reported, not fatal
                print(
                    f"  {name} seq {seq}: {type(err).__name__}: {str(err).splitlines()[0][:120]}",
                    file=sys.stderr,
                )
            rows.append(row)
            print(
                f"  seq {seq:6d} {name:16s} fwd {row['fwd'] or 0:7.1f} "
                f"fwd+bwd {row['fwdbwd'] or 0:7.1f}"
                " TFLOP/s",
                file=sys.stderr,
                flush=True,
            )
    return rows


def print_table(rows, names):
    ours = "pallas (ours)"
    others = [n for n in names if n != ours]
    fmt = lambda x: "  n/a" if x is None else f"{x:6.4g}"
    ratio = lambda a, b: "  n/a" if a is None or b is None else f"{a / b:5.2f}x"
    header = (
        "| seq | batch | pass | "
        + " | ".join(names)
        + " | "
        + " | ".join(f"ours/{n}" for n in others)
        + " |"
    )
    print(header)
    print("|" + "---|" * (3 + len(names) + len(others)))
    for seq in sorted({r["seq"] for r in rows}):
        by_name = {r["name"]: r for r in rows if r["seq"] == seq}
        for key, label in (("fwd", "fwd"), ("fwdbwd", "fwd+bwd")):
            vals = [by_name[n][key] for n in names]
            mine = by_name[ours][key]
            print(
                f"| {seq} | {by_name[ours]['batch']} | {label} | "
                + " | ".join(map(fmt, vals))
                + " | "
                + " | ".join(ratio(mine, by_name[n][key]) for n in others)
                + " |"
            )


def memory_check(impls, seq, head_dim, dtype, heads):
    """Compiled temp memory of fwd+bwd at batch 1 (and whether it runs) for ours and XLA's."""
    q, k, v, do = _inputs(1, seq, heads, heads, head_dim, dtype)
    print(f"\nmemory at seq {seq}, batch 1, {heads} heads, head_dim {head_dim}, fwd+bwd:")
    for name in ("pallas (ours)", "xla reference"):
        fn = _fwd_bwd(impls[name])
        try:
            compiled = fn.lower(q, k, v, do).compile()
            temp = compiled.memory_analysis().temp_size_in_bytes / 2**20
            jax.block_until_ready(compiled(q, k, v, do))
            print(f"  {name:16s} ran; XLA temp buffers {temp:10.1f} MiB")
        except Exception as err:
            print(f"  {name:16s} failed: {type(err).__name__}: {str(err).splitlines()[0][:160]}")


CHECK_CASES = [  # batch, seq, q_heads, kv_heads, head_dim, causal, segment ids
    (2, 300, 8, 2, 64, True, True),
    (1, 1000, 8, 1, 128, True, False),
    (2, 517, 4, 4, 128, False, True),
    (1, 1, 4, 1, 64, True, False),
    (1, 2048, 16, 16, 128, True, False),
    (1, 2048, 8, 2, 64, True, True),
]


def check(backend=None, cases=CHECK_CASES):
    """Prints the relative error of out, dq, dk, dv against the reference, fp32 and bf16."""
    for dtype, tol in ((jnp.float32, 2e-5), (jnp.bfloat16, 2e-2)):
        for b, s, h, kvh, d, causal, seg in cases:
            q, k, v, do = _inputs(b, s, h, kvh, d, dtype, seed=s + h)
            segment_ids = (
                jnp.sort(jax.random.randint(jax.random.PRNGKey(s), (b, s), 1, 4), axis=1)
                if seg
                else None
            )
            outs = []
            for fn in (functools.partial(flash_attention, backend=backend), reference_attention):
                attn = functools.partial(fn, segment_ids=segment_ids, causal=causal)
                if dtype == jnp.bfloat16 and fn is reference_attention:  # ground truth in fp32
                    cast = lambda x: x.astype(jnp.float32)
                    attn = lambda q, k, v, a=attn: a(cast(q), cast(k), cast(v))
                out = jax.jit(attn)(q, k, v)
                grads = _fwd_bwd(attn)(q, k, v, do)
                outs.append([out, *grads])
            # relative to max(|ref|, 1): at seq 1 the exact dq and dk are zero
            errs = [
                float(
                    jnp.linalg.norm(a.astype(jnp.float32) - r.astype(jnp.float32))
                    / max(float(jnp.linalg.norm(r.astype(jnp.float32))), 1.0)
                )
                for a, r in zip(*outs)
            ]
            ok = all(e <= tol for e in errs)
            print(
                f"check {jnp.dtype(dtype).name} b{b} s{s} h{h}/{kvh} d{d} "
                f"causal={causal} seg={seg}: "
                f"out/dq/dk/dv rel err {' '.join(f'{e:.1e}' for e in errs)} "
                f"{'ok' if ok else 'FAIL'}"
            )


FWD_SWEEP = [
    (128, 64, 8, 3),
    (128, 128, 8, 3),
    (128, 128, 8, 4),
    (128, 64, 8, 4),
    (64, 128, 4, 3),
    (256, 64, 8, 3),
    (128, 128, 4, 3),
    (128, 64, 4, 3),
    (64, 64, 4, 3),
]
BWD_SWEEP = [
    (64, 64, 64, 64, 4, 2),
    (64, 64, 64, 64, 8, 2),
    (32, 64, 64, 32, 4, 2),
    (64, 128, 128, 64, 8, 2),
    (128, 64, 64, 128, 8, 2),
    (64, 64, 64, 64, 4, 1),
    (32, 128, 128, 32, 8, 2),
    (64, 128, 128, 64, 8, 3),
    (64, 64, 64, 64, 4, 3),
    (128, 128, 128, 128, 8, 2),
]


def tune(shape, segments, dtype, repeats):
    """Forward then backward block/warp sweeps for one shape; returns the best BlockSizes.

    shape: (batch, seq, q_heads, kv_heads, head_dim); segments: pass all-ones segment ids,
    as the model does, so the masked code path is the one timed.
    """
    batch, seq, heads, kv_heads, head_dim = shape
    q, k, v, do = _inputs(batch, seq, heads, kv_heads, head_dim, dtype)
    seg = jnp.ones((batch, seq), jnp.int32) if segments else None
    fwd_flops, total = _flops(batch, seq, heads, head_dim)

    def rate(blocks, flops, fwd_only):
        attn = functools.partial(flash_attention, causal=True, block_sizes=blocks, segment_ids=seg)
        fn = jax.jit(attn) if fwd_only else _fwd_bwd(attn)
        try:
            return flops / _time(fn, (q, k, v) if fwd_only else (q, k, v, do), repeats) / 1e12
        except Exception as err:  # a setting that does not compile is skipped
            print(f"  {blocks}: {type(err).__name__}", file=sys.stderr)
            return 0.0

    print(
        f"tune: batch {batch} seq {seq} heads {heads}/{kv_heads} head_dim {head_dim} "
        f"segments {segments}",
        flush=True,
    )
    best_fwd, best = None, -1.0
    for bq, bk, warps, stages in FWD_SWEEP:
        blocks = BlockSizes(block_q=bq, block_k=bk, num_warps_fwd=warps, num_stages_fwd=stages)
        t = rate(blocks, fwd_flops, True)
        print(
            f"tune fwd bq {bq} bk {bk} warps {warps} stages {stages}: {t:6.1f} TFLOP/s", flush=True
        )
        if t > best:
            best_fwd, best = blocks, t
    best_all, best = best_fwd, -1.0
    for bq, bk, bq2, bk2, warps, stages in BWD_SWEEP:
        blocks = dataclasses.replace(
            best_fwd,
            block_q_dkv=bq,
            block_k_dkv=bk,
            block_q_dq=bq2,
            block_k_dq=bk2,
            num_warps_bwd=warps,
            num_stages_bwd=stages,
        )
        t = rate(blocks, total, False)
        print(
            f"tune fwd+bwd dkv {bq}/{bk} dq {bq2}/{bk2} warps {warps} stages {stages}: "
            f"{t:6.1f} TFLOP/s",
            flush=True,
        )
        if t > best:
            best_all, best = blocks, t
    print(f"best: {best_all}", flush=True)
    return best_all


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny interpret-mode pass on CPU")
    parser.add_argument("--check", action="store_true", help="correctness against the reference")
    parser.add_argument(
        "--tune",
        action="store_true",
        help="block-size sweep for --tune_shape, then the table with the best",
    )
    parser.add_argument(
        "--tune_shape",
        default=f"{TOKENS // 4096},4096,{HEADS},{HEADS},128",
        help="batch,seq,q_heads,kv_heads,head_dim to tune for",
    )
    parser.add_argument(
        "--tune_segments",
        action="store_true",
        help="tune with (all-ones) segment ids, the model's code path",
    )
    parser.add_argument("--seqs", default="512,1024,2048,4096,8192,16384")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--memory_seq", type=int, default=32768)
    args = parser.parse_args(argv)
    dtype = jnp.bfloat16
    print(f"jax {jax.__version__}, device: {jax.devices()[0].device_kind}")
    if args.smoke:
        blocks = BlockSizes(
            block_q=16, block_k=16, block_q_dq=16, block_k_dq=16, block_q_dkv=16, block_k_dkv=16
        )
        impls = _implementations(True, blocks)
        rows = measure(impls, [32, 64], 64, dtype, 2, tokens=64, heads=2)
        print_table(rows, list(impls))
        return
    if args.check:
        check()
    shape = tuple(int(x) for x in args.tune_shape.split(","))
    blocks = tune(shape, args.tune_segments, dtype, args.repeats) if args.tune else None
    impls = _implementations(False, blocks)
    seqs = [int(s) for s in args.seqs.split(",") if s]
    rows = measure(impls, seqs, 128, dtype, args.repeats, TOKENS, HEADS)
    if args.memory_seq:
        memory_check(impls, args.memory_seq, 128, dtype, HEADS)
    print(
        f"\ncausal, bf16, head_dim 128, {HEADS} heads, batch x seq = {TOKENS} tokens; TFLOP/s; "
        f"ours with {blocks or 'default blocks'}"
    )
    print_table(rows, list(impls))


if __name__ == "__main__":
    main()
