"""Train-step speed: this project's jitted step vs transformers' PyTorch LLaMA, same shapes.

CPU (default): the tiny and small configs, batch x length tokens, AdamW, fp32,
one step = forward + backward + optimizer update; both measured in this run,
median of `--steps` steps after warmup, with the ratio printed.

    .venv/bin/python benchmarks/bench_train_step.py

Accelerator: a ~1B LLaMA-shaped model (TinyLlama-1.1B dims) at length 2048,
bf16 compute with fp32 master weights, one device; prints tokens/s and MFU for
each attention backend asked for. This path imports only jax/flax/optax/numpy
and mtllama_jax's core (no torch, seqio, TF or gin):

    python benchmarks/bench_train_step.py --config 1b --attention xla cudnn pallas \\
        --batch 4 --remat dots --no-torch
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from mtllama_jax import metrics, optim, partitioning, trainer  # noqa: E402
from mtllama_jax.models.llama.config import LlamaConfig  # noqa: E402
from mtllama_jax.models.llama.model import LlamaForCausalLM  # noqa: E402

CONFIGS = {
    "tiny": dict(),  # LlamaConfig.tiny()
    "small": dict(
        hidden_size=256,
        intermediate_size=688,
        num_layers=4,
        num_heads=8,
        num_kv_heads=4,
        head_dim=32,
        vocab_size=4096,
    ),
    # TinyLlama-1.1B dims: ~1.1B params, grouped-query attention.
    "1b": dict(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        num_layers=22,
        num_heads=32,
        num_kv_heads=4,
        head_dim=64,
        max_position_embeddings=4096,
        dtype="bfloat16",
    ),
}


def make_batch(rows: int, length: int, vocab: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, vocab, (rows, length + 1)).astype(np.int32)
    return dict(
        input_tokens=tokens[:, :-1],
        target_tokens=tokens[:, 1:],
        positions=np.broadcast_to(np.arange(length, dtype=np.int32), (rows, length)).copy(),
        segment_ids=np.ones((rows, length), np.int32),
        loss_weights=np.ones((rows, length), np.float32),
    )


def time_jax(config: LlamaConfig, batch, steps: int) -> float:
    """Median seconds per jitted train step on one device."""
    t = trainer.Trainer(
        LlamaForCausalLM(config),
        partitioning.Layout.one_device(),
        optim.make_optimizer(1e-4, weight_decay=0.0, clip_norm=1.0),
    )
    state = t.init_state(jax.random.key(0))
    global_batch = t.global_batch(batch)
    for _ in range(2):  # compile + warm up
        state, m = t.train_step(state, global_batch)
    jax.block_until_ready(m)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, m = t.train_step(state, global_batch)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_torch(config: LlamaConfig, batch, steps: int) -> float:
    """Median seconds per step of transformers' LlamaForCausalLM (fp32, same loss and AdamW)."""
    import torch
    import transformers

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count())
    hf = dict(config.to_hf())
    hf.pop("torch_dtype", None)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf))
    model.config._attn_implementation = "sdpa"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    inputs = torch.from_numpy(batch["input_tokens"]).long()
    targets = torch.from_numpy(batch["target_tokens"]).long()

    def step():
        opt.zero_grad(set_to_none=True)
        logits = model(input_ids=inputs).logits.float()
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    for _ in range(2):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", nargs="+", default=["tiny", "small"], choices=CONFIGS)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=None, help="default 128 (CPU), 2048")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument(
        "--attention", nargs="+", default=["xla"], choices=("xla", "cudnn", "pallas")
    )
    parser.add_argument("--remat", default="none")
    parser.add_argument("--no-torch", dest="torch", action="store_false")
    args = parser.parse_args(argv)
    device = jax.devices()[0]
    print(
        f"device: {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}, "
        f"{os.cpu_count()} CPU cores"
    )
    header = "| config | attention | batch x length | jax step ms | tokens/s | MFU |"
    if args.torch:
        header += " torch step ms | speedup |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for name in args.config:
        cpu_forms = jax.default_backend() == "cpu"
        base = (
            LlamaConfig.tiny(**CONFIGS[name])
            if name != "1b"
            else LlamaConfig(**CONFIGS[name], cpu_forms=cpu_forms)
        )
        length = args.length or (2048 if name == "1b" else 128)
        batch = make_batch(args.batch, length, base.vocab_size)
        tokens = args.batch * length
        for attention in args.attention:
            config = base.replace(attention=attention, remat=args.remat)
            jax_s = time_jax(config, batch, args.steps)
            util = metrics.mfu(config, length, tokens / jax_s, [device])
            row = (
                f"| {name} ({config.num_params / 1e6:.1f}M) | {attention} | "
                f"{args.batch} x {length} | {jax_s * 1e3:.1f} | {tokens / jax_s:,.0f} | "
                f"{'n/a' if util is None else f'{util:.1%}'} |"
            )
            if args.torch:
                torch_s = time_torch(config, batch, args.steps)
                row += f" {torch_s * 1e3:.1f} | {torch_s / jax_s:.2f}x |"
            print(row, flush=True)


if __name__ == "__main__":
    main()
