"""lm-eval requests/s: the `mtllama_jax` model vs lm-eval's Hugging Face model (goal >= 1x).

Side by side in one run, on the same weights (a random LLaMA saved by
transformers, converted with hf-to-jax; lm-eval's `hf` model reads the
jax-to-hf export) and the same local tasks (tests/fixtures/lm_eval, over
JSONL written here): multiple choice (loglikelihood), generation
(generate_until, 12 greedy tokens) and perplexity (loglikelihood_rolling).
lm-eval builds each task's requests once; each backend answers them twice
(lm-eval's `loglikelihood` / `generate_until` / `loglikelihood_rolling` call,
metrics excluded), alternating; the first run includes JAX's compiles, the
second is warm. fp32, the same batch size, all CPU cores.

    python benchmarks/bench_lm_eval.py                 # 13.6M-param model, window 256, CPU
    python benchmarks/bench_lm_eval.py --docs 200      # more requests per task
"""

import argparse
import json
import os
import tempfile
import time

import jax
import numpy as np
import sentencepiece as spm
import torch
import transformers
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

from mtllama_jax.lm_eval_adapter import MtllamaLM
from mtllama_jax.main import convert_cli

TASKS = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "lm_eval")
REQUESTS = ("fixture_mc", "fixture_gen", "fixture_rolling")
HF_CONFIG = dict(
    vocab_size=1000,
    hidden_size=512,
    intermediate_size=1376,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=8,
    max_position_embeddings=256,
    bos_token_id=1,
    eos_token_id=2,
)


def build(root: str, docs: int):
    """(checkpoint folder, HF export, data folder)."""
    rng = np.random.default_rng(0)
    letters = list("abcdefghijklmnopqrstuvwxyz")
    words = ["".join(rng.choice(letters, rng.integers(2, 8))) for _ in range(400)]

    def text(n):
        return " ".join(rng.choice(words, n))

    corpus = os.path.join(root, "corpus.txt")
    with open(corpus, "w") as f:
        f.write("\n".join(text(12) + "." for _ in range(3000)))
    spm.SentencePieceTrainer.train(
        input=corpus,
        model_prefix=os.path.join(root, "tokenizer"),
        vocab_size=HF_CONFIG["vocab_size"],
        model_type="bpe",
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        minloglevel=2,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**HF_CONFIG))
    hf = os.path.join(root, "hf")
    model.save_pretrained(hf)
    with (
        open(os.path.join(root, "tokenizer.model"), "rb") as src,
        open(os.path.join(hf, "tokenizer.model"), "wb") as dst,
    ):
        dst.write(src.read())
    for name, content in (
        (
            "special_tokens_map.json",
            {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
        ),
        ("tokenizer_config.json", {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True}),
    ):
        with open(os.path.join(hf, name), "w") as f:
            json.dump(content, f)
    ckpt, export = os.path.join(root, "ckpt"), os.path.join(root, "export")
    convert_cli.main(["hf-to-jax", "--hf", hf, "--out", ckpt])
    convert_cli.main(["jax-to-hf", "--ckpt", ckpt, "--out", export])

    data = os.path.join(root, "data")
    os.makedirs(data)
    rows = {
        "mc": [
            {
                "question": text(int(rng.integers(20, 120))) + "?",
                "choices": [text(int(rng.integers(1, 6))) for _ in range(4)],
                "label": int(rng.integers(4)),
            }
            for _ in range(docs)
        ],
        "gen": [
            {"prompt": text(int(rng.integers(10, 80))), "answer": "x"}
            for _ in range(max(docs // 4, 1))
        ],
        "rolling": [
            {"text": text(int(rng.integers(100, 400))) + "."} for _ in range(max(docs // 8, 1))
        ],
    }
    for name, items in rows.items():
        with open(os.path.join(data, f"{name}.jsonl"), "w") as f:
            f.write("".join(json.dumps(r) + "\n" for r in items))
    return ckpt, export, data


def task_requests(data):
    """{task: its lm-eval Instances}, built once by lm-eval from the local tasks."""
    cwd = os.getcwd()
    os.chdir(data)  # the tasks' data_files are relative
    try:
        tasks = TaskManager(include_path=TASKS).load(list(REQUESTS))["tasks"]
        for task in tasks.values():
            task.build_all_requests()
        return {name: [req for req in tasks[name].instances] for name in REQUESTS}
    finally:
        os.chdir(cwd)


def seconds(lm, requests):
    """Wall time of the model answering the requests (lm-eval's own call, no metrics)."""
    kind = requests[0].request_type
    start = time.perf_counter()
    getattr(lm, kind)(requests, disable_tqdm=True)
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--docs", type=int, default=64, help="multiple-choice documents")
    parser.add_argument("--batch_size", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        ckpt, export, data = build(root, args.docs)
        ours = MtllamaLM(checkpoint=ckpt, dtype="float32", batch_size=args.batch_size)
        theirs = HFLM(pretrained=export, dtype="float32", batch_size=args.batch_size, device="cpu")
        requests = task_requests(data)
        rows = []
        for task, reqs in requests.items():
            times = {"ours": [], "hf": []}
            for _ in range(2):
                times["ours"].append(seconds(ours, reqs))
                times["hf"].append(seconds(theirs, reqs))
            rows.append((task, reqs[0].request_type, len(reqs), times))
    print(
        f"{sum(p.size for p in jax.tree.leaves(ours.params)) / 1e6:.1f}M params, window "
        f"{HF_CONFIG['max_position_embeddings']}, batch {args.batch_size}, fp32, "
        f"{os.cpu_count()} CPU cores"
    )
    print(
        "| task | requests | ours req/s (1st, with compiles) | ours req/s (warm) | "
        "hf req/s (1st) | hf req/s (warm) | ours/hf (warm) |"
    )
    print("|---|---|---|---|---|---|---|")
    for task, kind, n, t in rows:
        print(
            f"| {task} ({kind}) | {n} | {n / t['ours'][0]:.1f} | {n / t['ours'][1]:.1f} | "
            f"{n / t['hf'][0]:.1f} | {n / t['hf'][1]:.1f} | "
            f"**{t['hf'][1] / t['ours'][1]:.2f}x** |"
        )


if __name__ == "__main__":
    main()
