"""apply-delta: streaming (tensor by tensor, memory-mapped) vs load-everything, side by side.

Generates a fp16 LLaMA-shaped base (32000 tokens) and a delta (32001, the [PAD]
rule) of >= 2 GB each, then runs, each in a fresh subprocess, `mtllama-convert
apply-delta` and a FastChat-style reference that loads base and delta whole,
adds, and saves. Prints peak resident memory (ru_maxrss of the child) and MB/s
(output bytes / wall time), and the issue's bound: 2 x largest tensor + 0.5 GB.

    python benchmarks/bench_convert.py --workdir /tmp/bench_convert [--layers 20]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

import numpy as np

from mtllama_jax.convert import hf_files, hf_params
from mtllama_jax.models.llama.config import LlamaConfig

CHILD = r"""
import json, resource, sys, time
import numpy as np
from mtllama_jax.convert import delta  # same imports in both children (same baseline)
mode, base, dlt, out = sys.argv[1:]
status = open("/proc/self/status").read()
import_rss = int(status.split("VmRSS:")[1].split()[0]) / 1024
start = time.perf_counter()
if mode == "streaming":
    delta.apply_delta(base, dlt, out, max_shard_size="2GB")
else:
    import os
    from safetensors.numpy import load_file, save_file
    b = load_file(os.path.join(base, "model.safetensors"))
    d = load_file(os.path.join(dlt, "model.safetensors"))
    for name, w in d.items():
        x = b.pop(name).astype(np.float16)
        if x.shape != w.shape:
            x = np.concatenate([x, np.zeros((w.shape[0] - x.shape[0],) + w.shape[1:], x.dtype)])
        d[name] = x + w
    os.makedirs(out)
    save_file(d, os.path.join(out, "model.safetensors"))
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "import_rss_mb": import_rss,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def generate(folder, config: LlamaConfig, seed: int) -> int:
    """An HF folder of fp16 tensors (tiles of one random block: fast to make); returns bytes."""
    os.makedirs(folder)
    block = np.random.default_rng(seed).normal(0, 0.02, 1 << 22).astype(np.float16)
    mappings = hf_params.tensor_mappings(config)
    specs = [(t.hf_name, t.hf_shape, np.dtype(np.float16)) for t in mappings]

    def tensors():
        for i, t in enumerate(mappings):
            n = int(np.prod(t.hf_shape))
            reps = -(-n // block.size)
            yield t.hf_name, np.roll(np.tile(block, reps)[:n], i).reshape(t.hf_shape)

    hf_files.write_safetensors(folder, specs, tensors(), 1 << 40)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config.to_hf(), f)
    with open(os.path.join(folder, "tokenizer.model"), "wb") as f:
        f.write(b"placeholder")  # copied, never parsed
    return sum(int(np.prod(s[1])) * 2 for s in specs)


def run(mode, base, dlt, out) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    done = subprocess.run(
        [sys.executable, "-c", CHILD, mode, base, dlt, out],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="/tmp/bench_convert")
    parser.add_argument("--layers", type=int, default=20)
    args = parser.parse_args()
    shape = dict(
        hidden_size=2048,
        intermediate_size=5504,
        num_layers=args.layers,
        num_heads=16,
        num_kv_heads=16,
        head_dim=128,
    )
    base_config = LlamaConfig(vocab_size=32000, **shape)
    delta_config = base_config.replace(vocab_size=32001)
    shutil.rmtree(args.workdir, ignore_errors=True)
    base, dlt = os.path.join(args.workdir, "base"), os.path.join(args.workdir, "delta")
    size = generate(base, base_config, 0)
    out_bytes = generate(dlt, delta_config, 1)
    largest = max(int(np.prod(t.hf_shape)) * 2 for t in hf_params.tensor_mappings(delta_config))
    print(
        f"model: {size / 1e9:.2f} GB fp16 ({args.layers} layers), largest tensor "
        f"{largest / 1e6:.0f} MB; bound 2 x largest + 0.5 GB = "
        f"{(2 * largest + 0.5e9) / 1e6:.0f} MB (+ the interpreter's imports)"
    )
    rows = {}
    for mode in ("streaming", "load-everything"):
        rows[mode] = run(mode, base, dlt, os.path.join(args.workdir, mode))
    print(f"{'apply-delta':<18}{'peak RSS MB':>12}{'after imports':>14}{'seconds':>10}{'MB/s':>8}")
    for mode, r in rows.items():
        print(
            f"{mode:<18}{r['peak_rss_mb']:>12.0f}{r['import_rss_mb']:>14.0f}"
            f"{r['seconds']:>10.1f}{out_bytes / 1e6 / r['seconds']:>8.0f}"
        )
    s, ref = rows["streaming"], rows["load-everything"]
    print(
        f"ratio streaming / load-everything: peak RSS {s['peak_rss_mb'] / ref['peak_rss_mb']:.2f}"
        f", speed {ref['seconds'] / s['seconds']:.2f}x"
    )
    shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
