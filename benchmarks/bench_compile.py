"""Compile time of a train step (loss + gradients) at 32 layers against 2 layers.

Layers are stacked with `nn.scan`, so XLA compiles one layer body whatever the
depth; the ratio should stay near 1 (goal <= 1.5x). Prints one table.

    .venv/bin/python benchmarks/bench_compile.py [--hidden 256] [--repeats 3]
"""

import argparse
import os
import platform
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from mtllama_jax.models.llama.config import LlamaConfig  # noqa: E402
from mtllama_jax.models.llama.model import LlamaForCausalLM  # noqa: E402


def compile_seconds(config: LlamaConfig, batch: int, length: int) -> float:
    """Wall time to lower and compile value_and_grad of the LM loss (shapes only)."""
    model = LlamaForCausalLM(config)
    tokens = jax.ShapeDtypeStruct((batch, length), jnp.int32)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))

    def loss(variables, tokens):
        logits = model.apply(variables, tokens)
        logp = jax.nn.log_softmax(logits[:, :-1])
        return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1).mean()

    start = time.perf_counter()
    jax.jit(jax.value_and_grad(loss)).lower(params, tokens).compile()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    base = LlamaConfig.tiny(
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 3,
        num_heads=8,
        num_kv_heads=4,
        head_dim=args.hidden // 8,
        vocab_size=1024,
    )
    times = {}
    for layers in (2, 32):
        config = base.replace(num_layers=layers)
        # Each repeat uses a fresh config hash so nothing is served from a cache.
        samples = [
            compile_seconds(config.replace(rms_norm_eps=1e-6 + i * 1e-9), 2, args.length)
            for i in range(args.repeats)
        ]
        times[layers] = float(np.median(samples))
    print(
        f"machine: {platform.machine()} {os.cpu_count()} cores, jax {jax.__version__}, "
        f"backend {jax.default_backend()}"
    )
    print("| layers | compile s (median of %d) |" % args.repeats)
    print("|---|---|")
    for layers, seconds in times.items():
        print(f"| {layers} | {seconds:.2f} |")
    print(f"ratio 32/2 layers: {times[32] / times[2]:.2f}x (goal <= 1.5x)")


if __name__ == "__main__":
    main()
