"""lm-eval requests/s: the `mtllama_jax` model vs lm-eval's Hugging Face model (goal >= 1x).

Side by side in one run, on the same weights (a random LLaMA saved by
transformers, converted with hf-to-jax; lm-eval's `hf` model reads the
jax-to-hf export) and the same local tasks (tests/fixtures/lm_eval, over
JSONL written here): multiple choice (loglikelihood), generation
(generate_until, 12 greedy tokens) and perplexity (loglikelihood_rolling).
Each backend runs every task twice, alternating; the first run includes JAX's
compiles, the second is warm. fp32, the same batch size, all CPU cores.

    python benchmarks/bench_lm_eval.py                 # 21M-param model, window 256, CPU
    python benchmarks/bench_lm_eval.py --docs 200      # more requests per task
"""

import argparse
import json
import os
import tempfile
import time

import numpy as np
import sentencepiece as spm
import torch
import transformers
from lm_eval import simple_evaluate
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

from mtllama_jax.convert import cli
from mtllama_jax.lm_eval_adapter import MtllamaLM

TASKS = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "lm_eval")
HF_CONFIG = dict(vocab_size=1000, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                 num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=256,
                 bos_token_id=1, eos_token_id=2)


def build(root: str, docs: int):
    """(checkpoint folder, HF export, data folder, requests per task)."""
    rng = np.random.default_rng(0)
    letters = list("abcdefghijklmnopqrstuvwxyz")
    words = ["".join(rng.choice(letters, rng.integers(2, 8))) for _ in range(400)]

    def text(n):
        return " ".join(rng.choice(words, n))

    corpus = os.path.join(root, "corpus.txt")
    with open(corpus, "w") as f:
        f.write("\n".join(text(12) + "." for _ in range(3000)))
    spm.SentencePieceTrainer.train(
        input=corpus, model_prefix=os.path.join(root, "tokenizer"),
        vocab_size=HF_CONFIG["vocab_size"], model_type="bpe", byte_fallback=True, unk_id=0,
        bos_id=1, eos_id=2, pad_id=-1, normalization_rule_name="identity",
        remove_extra_whitespaces=False, minloglevel=2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**HF_CONFIG))
    hf = os.path.join(root, "hf")
    model.save_pretrained(hf)
    with open(os.path.join(root, "tokenizer.model"), "rb") as src, open(
            os.path.join(hf, "tokenizer.model"), "wb") as dst:
        dst.write(src.read())
    for name, content in (("special_tokens_map.json", {"bos_token": "<s>", "eos_token": "</s>",
                                                       "unk_token": "<unk>"}),
                          ("tokenizer_config.json", {"tokenizer_class": "LlamaTokenizer",
                                                     "add_bos_token": True})):
        with open(os.path.join(hf, name), "w") as f:
            json.dump(content, f)
    ckpt, export = os.path.join(root, "ckpt"), os.path.join(root, "export")
    cli.main(["hf-to-jax", "--hf", hf, "--out", ckpt])
    cli.main(["jax-to-hf", "--ckpt", ckpt, "--out", export])

    data = os.path.join(root, "data")
    os.makedirs(data)
    rows = {
        "mc": [{"question": text(int(rng.integers(20, 120))) + "?",
                "choices": [text(int(rng.integers(1, 6))) for _ in range(4)],
                "label": int(rng.integers(4))} for _ in range(docs)],
        "gen": [{"prompt": text(int(rng.integers(10, 80))), "answer": "x"}
                for _ in range(max(docs // 4, 1))],
        "rolling": [{"text": text(int(rng.integers(100, 400))) + "."}
                    for _ in range(max(docs // 8, 1))],
    }
    for name, items in rows.items():
        with open(os.path.join(data, f"{name}.jsonl"), "w") as f:
            f.write("".join(json.dumps(r) + "\n" for r in items))
    requests = {"fixture_mc": 4 * docs, "fixture_gen": len(rows["gen"]),
                "fixture_rolling": len(rows["rolling"])}
    return ckpt, export, data, requests


def seconds(lm, task, data):
    cwd = os.getcwd()
    os.chdir(data)
    try:
        start = time.perf_counter()
        simple_evaluate(model=lm, tasks=[task], bootstrap_iters=0, log_samples=False,
                        task_manager=TaskManager(include_path=TASKS), verbosity="ERROR")
        return time.perf_counter() - start
    finally:
        os.chdir(cwd)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--docs", type=int, default=64, help="multiple-choice documents")
    parser.add_argument("--batch_size", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        ckpt, export, data, requests = build(root, args.docs)
        ours = MtllamaLM(checkpoint=ckpt, dtype="float32", batch_size=args.batch_size)
        theirs = HFLM(pretrained=export, dtype="float32", batch_size=args.batch_size,
                      device="cpu")
        rows = []
        for task, n in requests.items():
            times = {"ours": [], "hf": []}
            for _ in range(2):
                times["ours"].append(seconds(ours, task, data))
                times["hf"].append(seconds(theirs, task, data))
            rows.append((task, n, times))
    print(f"| task | requests | ours req/s (1st, with compiles) | ours req/s (warm) | "
          f"hf req/s (warm) | ours/hf (warm) |")
    print("|---|---|---|---|---|---|")
    for task, n, t in rows:
        print(f"| {task} | {n} | {n / t['ours'][0]:.1f} | {n / t['ours'][1]:.1f} | "
              f"{n / t['hf'][1]:.1f} | {t['hf'][1] / t['ours'][1]:.2f}x |")


if __name__ == "__main__":
    main()
