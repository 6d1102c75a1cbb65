"""Decoding cost per new token: 256 vs 128 new tokens with the KV cache (goal <= 2.2x).

Side by side in one run: `Decoder.generate` (KV cache, prefill + one step per
token) and a no-cache reference that recomputes the whole sequence for each new
token (a jitted forward over the sequence so far, padded to a multiple of 32).
With the cache, each token costs the same however many came before, so 256 new
tokens take about twice the time of 128; without it the cost per token grows
with the length.

    python benchmarks/bench_decoding.py               # 68M-param model, batch 1, CPU-sized
    python benchmarks/bench_decoding.py --reference   # also the no-cache reference (slow)
"""

import argparse
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mtllama_jax import decoding
from mtllama_jax.models.llama.config import LlamaConfig
from mtllama_jax.models.llama.model import LlamaForCausalLM

# Wide and shallow, so that, as for a 7B model, reading the weights dominates a step and the
# cache is a few percent of it (a toy model's step is dominated by its cache-length terms).
CONFIG = LlamaConfig.tiny(
    vocab_size=8192,
    hidden_size=1024,
    intermediate_size=2816,
    num_layers=4,
    num_heads=8,
    num_kv_heads=8,
    head_dim=128,
    max_position_embeddings=512,
)
BUCKET = 32


def timed(fn, repeats):
    fn()  # compile and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt", type=int, default=64, help="prompt length")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--reference",
        action="store_true",
        help="also time the no-cache reference (minutes on a CPU)",
    )
    args = parser.parse_args()

    model = LlamaForCausalLM(CONFIG)
    params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
    rng = np.random.default_rng(0)
    prompts = [
        [1] + rng.integers(3, CONFIG.vocab_size, args.prompt - 1).tolist()
        for _ in range(args.batch)
    ]
    decoder = decoding.Decoder(model, length_bucket=BUCKET)
    forward = jax.jit(lambda p, t: model.apply({"params": p}, t))

    def cached(n):
        decoder.generate(params, prompts, max_new_tokens=n)

    def recompute(n):
        tokens = np.array(prompts, np.int32)
        for _ in range(n):
            length = tokens.shape[1]
            padded = np.zeros((args.batch, BUCKET * -(-length // BUCKET)), np.int32)
            padded[:, :length] = tokens
            nxt = np.asarray(jnp.argmax(forward(params, padded)[:, length - 1], -1))
            tokens = np.concatenate([tokens, nxt[:, None].astype(np.int32)], axis=1)

    print(
        f"devices: {jax.devices()}; batch {args.batch}, prompt {args.prompt}, "
        f"model {CONFIG.num_params / 1e6:.1f}M params, median of {args.repeats}"
    )
    print("| method | 128 new (s) | 256 new (s) | 256/128 | ms per token at 256 |")
    print("|---|---|---|---|---|")
    methods = [("KV cache (Decoder.generate)", cached)]
    if args.reference:
        methods.append(("no cache (recompute)", recompute))
    results = {}
    for name, fn in methods:
        t128 = timed(lambda: fn(128), args.repeats)
        t256 = timed(lambda: fn(256), args.repeats)
        results[name] = (t128, t256)
        print(
            f"| {name} | {t128:.3f} | {t256:.3f} | {t256 / t128:.2f}x | {1000 * t256 / 256:.2f} |"
        )
    c128, c256 = results[methods[0][0]]
    print(f"\nKV cache 256/128 = {c256 / c128:.2f}x (goal <= 2.2x)")
    if args.reference:
        r128, r256 = results[methods[1][0]]
        print(f"speed-up over recomputation at 256 new tokens: {r256 / c256:.1f}x")


if __name__ == "__main__":
    main()
