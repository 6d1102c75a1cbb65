"""lm-eval's model `mtllama_jax` against lm-eval's own Hugging Face model on the same weights.

A random LLaMA (window 64) is saved as a Hugging Face folder, converted with
hf-to-jax, and exported back with jax-to-hf; lm-eval's `hf` model reads the
export, ours the checkpoint folder. The local tasks of tests/fixtures/lm_eval
(multiple choice, generation, rolling log-likelihood, over JSONL written here)
must give the same per-request results: log-likelihoods within 1e-4, the same
is_greedy flags, accuracies and generated text. Some requests are longer than
the window.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers
import yaml
from helpers import train_bpe_spm
from lm_eval import simple_evaluate
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

from mtllama_jax.lm_eval_adapter import MtllamaLM
from mtllama_jax.main import convert_cli, lm_eval_cli

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "lm_eval")
WINDOW = 64
WORDS = "the cat sat on a mat while dogs ran far away from home in rain".split()


def sentence(rng, n):
    return " ".join(rng.choice(WORDS, n))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return build_folders(tmp_path_factory.mktemp("lm_eval"))


def build_folders(root):
    """(checkpoint folder, its jax-to-hf export, the data folder with the tasks' JSONL)."""
    rng = np.random.default_rng(0)
    lines = [sentence(rng, 9) + rng.choice([".", "?", ","]) for _ in range(400)]
    # As LLaMA's tokenizer.model: identity normalisation, spaces kept, byte fallback.
    train_bpe_spm(
        lines,
        root / "tokenizer",
        320,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=320,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=WINDOW,
            bos_token_id=1,
            eos_token_id=2,
        )
    )
    with torch.no_grad():  # wide weights: peaked logits, so greedy choices are not near-ties
        for name, p in model.named_parameters():
            p.copy_(
                1.0 + 0.2 * torch.randn_like(p)
                if name.endswith("norm.weight")
                else 0.25 * torch.randn_like(p)
            )
        # Byte pieces (ids 3-258) never win: greedy text stays valid UTF-8, where
        # SentencePiece and HF's ByteFallback decoder render bad byte runs differently.
        model.lm_head.weight[3:259] = 0.0
    hf = root / "hf"
    model.save_pretrained(hf)
    (hf / "tokenizer.model").write_bytes((root / "tokenizer.model").read_bytes())
    (hf / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})
    )
    (hf / "tokenizer_config.json").write_text(
        json.dumps(
            {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False}
        )
    )
    convert_cli.main(["hf-to-jax", "--hf", str(hf), "--out", str(root / "ckpt")])
    convert_cli.main(["jax-to-hf", "--ckpt", str(root / "ckpt"), "--out", str(root / "export")])

    data = root / "data"
    data.mkdir()
    mc = [
        {
            "question": sentence(rng, 6) + "?",
            "choices": [sentence(rng, k) for k in (1, 2, 3)],
            "label": int(rng.integers(3)),
        }
        for _ in range(6)
    ]
    mc.append(
        {"question": sentence(rng, 90) + "?", "choices": ["cat", "dogs ran", "home"], "label": 1}
    )  # far longer than the window
    gen = [{"prompt": sentence(rng, 5), "answer": "cat"} for _ in range(5)]
    gen.append({"prompt": sentence(rng, 80), "answer": "mat"})  # longer than 64 - 12
    rolling = [{"text": sentence(rng, n) + "."} for n in (4, 20, 150)]  # 150: several windows
    for name, rows in (("mc", mc), ("gen", gen), ("rolling", rolling)):
        (data / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(root / "ckpt"), str(root / "export"), str(data)


@pytest.fixture(scope="module")
def ours(folders):
    return MtllamaLM(checkpoint=folders[0], dtype="float32", batch_size=4)


@pytest.fixture(scope="module")
def theirs(folders):
    return HFLM(pretrained=folders[1], dtype="float32", batch_size=4, device="cpu")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    import datasets
    import huggingface_hub

    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def evaluate(lm, data, tasks):
    cwd = os.getcwd()
    os.chdir(data)  # the fixtures' data_files are relative
    try:
        return simple_evaluate(
            model=lm,
            tasks=tasks,
            bootstrap_iters=0,
            log_samples=True,
            task_manager=TaskManager(include_path=FIXTURES),
        )
    finally:
        os.chdir(cwd)


def by_doc(samples):
    return {s["doc_id"]: s["resps"] for s in samples}


def test_local_tasks_equal_lm_evals_hf_model(folders, ours, theirs):
    tasks = ["fixture_mc", "fixture_gen", "fixture_rolling"]
    a, b = evaluate(ours, folders[2], tasks), evaluate(theirs, folders[2], tasks)
    longest = max(
        len(ours.tok_encode(json.loads(line)["question"]))
        for line in open(os.path.join(folders[2], "mc.jsonl"))
    )
    assert longest > WINDOW + 1  # requests longer than the window are compared too
    for task in tasks:
        ra, rb = by_doc(a["samples"][task]), by_doc(b["samples"][task])
        assert ra.keys() == rb.keys()
        for doc in ra:
            for x, y in zip(ra[doc], rb[doc]):
                x, y = x[0], y[0]
                if task == "fixture_mc":
                    assert x[0] == pytest.approx(y[0], abs=1e-4) and x[1] == y[1], (doc, x, y)
                elif task == "fixture_rolling":
                    assert x == pytest.approx(y, abs=1e-4), (doc, x, y)
                else:
                    assert x == y, (doc, x, y)
        metrics_a = {k: v for k, v in a["results"][task].items() if not k.endswith("stderr")}
        metrics_b = {k: v for k, v in b["results"][task].items() if not k.endswith("stderr")}
        assert metrics_a.keys() == metrics_b.keys()
        for key in metrics_a:
            if key.startswith(("acc", "exact_match")):
                assert metrics_a[key] == metrics_b[key], (task, key)
            elif isinstance(metrics_a[key], float):
                assert metrics_a[key] == pytest.approx(metrics_b[key], rel=1e-5), (task, key)
    assert any(r[0][0] for r in by_doc(a["samples"]["fixture_gen"]).values())  # not all empty


def request(kind, *args):
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def test_empty_continuations_and_contexts(ours, theirs):
    pairs = [("the cat sat", ""), ("", "the cat sat"), ("dogs ran ", "far"), ("", "")]
    got = ours.loglikelihood([request("loglikelihood", *p) for p in pairs])
    assert got[0] == (0.0, True) and got[3] == (0.0, True)
    want = theirs.loglikelihood([request("loglikelihood", *p) for p in pairs[1:3]])
    for g, w in zip(got[1:3], want):
        assert g[0] == pytest.approx(w[0], abs=1e-4) and g[1] == w[1]
    with pytest.raises(AssertionError):  # what lm-eval's HF model does with one
        theirs.loglikelihood([request("loglikelihood", *pairs[0])])


def test_stop_strings_that_span_token_boundaries(ours, theirs):
    prompt = "the cat sat on a mat while"
    free = ours.decoder.generate(
        ours.params, [ours.tok_encode(prompt)], max_new_tokens=16, detokenize=ours.tok_decode
    )[0]
    text = free.text
    for k in range(2, len(free.tokens)):  # a stop string made of two tokens' ends
        cut = len(ours.tok_decode(free.tokens[:k]))
        stop = text[cut - 1 : cut + 1]
        if 0 < cut < len(text) and stop.strip() and text.find(stop) == cut - 1:
            break
    else:
        pytest.fail(f"no stop string spans two tokens of {text!r}")
    kwargs = {"until": [stop], "max_gen_toks": 16, "do_sample": False}
    got = ours.generate_until([request("generate_until", prompt, kwargs)])
    want = theirs.generate_until([request("generate_until", prompt, kwargs)])
    assert got == want == [text[: cut - 1]]


def test_bad_model_args_name_the_fix(folders, tmp_path):
    with pytest.raises(
        ValueError,
        match=r"unknown key\(s\) \['pretrained'\].*valid keys:\n"
        r"  checkpoint: ",
    ):
        MtllamaLM(checkpoint=folders[0], pretrained="x")
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(
        FileNotFoundError,
        match=r"does not hold a model: expected a training "
        r"MODEL_DIR.*notes.txt",
    ):
        MtllamaLM(checkpoint=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no such folder"):
        MtllamaLM(checkpoint=str(tmp_path / "absent"))


def test_a_hugging_face_folder_opens_converted_in_memory_on_a_mesh(folders, ours):
    hf = MtllamaLM(
        checkpoint=folders[1], dtype="float32", batch_size=4, mesh="2x2x2", rules="fsdp_tp"
    )
    assert len(hf.decoder.layout.mesh.devices.flat) == 8
    reqs = [
        request("loglikelihood", "the cat", " sat on a mat"),
        request("loglikelihood", "dogs ran", " far away from home"),
    ]
    for (a, greedy_a), (b, greedy_b) in zip(hf.loglikelihood(reqs), ours.loglikelihood(reqs)):
        assert a == pytest.approx(b, abs=1e-5) and greedy_a == greedy_b


def test_cli_runs_lm_evals_flags_and_leaves_out_a_task_missing_offline(folders, tmp_path):
    out = tmp_path / "results"
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    run = subprocess.run(
        [
            os.path.join(os.path.dirname(sys.executable), "mtllama-lm-eval"),
            "--model",
            "mtllama_jax",
            "--model_args",
            f"checkpoint={folders[0]}",
            "dtype=float32",
            "--tasks",
            "fixture_mc,fixture_missing,lamini",
            "--include_path",
            FIXTURES,
            "--batch_size",
            "4",
            "--output_path",
            str(out),
        ],
        cwd=folders[2],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "task fixture_missing left out, its dataset is not available offline" in run.stderr
    assert "absent.jsonl" in run.stderr and "export HF_HOME=" in run.stderr
    with open(lm_eval_cli.project_groups()["lamini"]) as f:
        lamini = yaml.safe_load(f)["task"]
    for task in lamini:  # each of LaMini's tasks resolves, and is named as absent offline
        assert f"task {task} left out, its dataset is not available offline" in run.stderr
    (results,) = out.rglob("results_*.json")
    got = json.loads(results.read_text())["results"]
    assert list(got) == ["fixture_mc"] and "acc,none" in got["fixture_mc"]
    assert "|fixture_mc|" in run.stdout  # lm-eval's own table


def test_lamini_group_lists_15_tasks_with_lamini_metrics():
    with open(lm_eval_cli.project_groups()["lamini"]) as f:
        group = yaml.safe_load(f)
    assert group["group"] == "lamini" and len(set(group["task"])) == 15
    metrics = group["metadata"]["lamini_metric"]
    assert list(metrics) == group["task"]
    assert sorted(k for k, v in metrics.items() if v == "acc_norm") == [
        "arc_challenge",
        "hellaswag",
        "openbookqa",
        "piqa",
        "sciq",
    ]
    assert metrics["lamini_record"] == "f1"


def test_record_scores_the_likeliest_entity_by_squad_f1():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "record", os.path.join(lm_eval_cli.project_tasks(), "record.py")
    )
    record = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(record)
    doc = {
        "passage": "Rain fell.\n@highlight\nDogs ran",
        "query": "@placeholder ran home",
        "entities": ["The Dogs", "cats"],
        "answers": ["dogs", "the big dogs"],
    }
    assert record.doc_to_text(doc) == "Rain fell.\n\n  - Dogs ran.\n"
    assert record.doc_to_choice(doc) == ["  - The Dogs ran home", "  - cats ran home"]
    assert record.process_results(doc, [(-1.0, False), (-2.0, False)]) == {"f1": 1.0, "em": 1.0}
    assert record.process_results(doc, [(-3.0, False), (-2.0, False)]) == {"f1": 0.0, "em": 0.0}
    assert record.f1_score("big red dogs", "the big dogs") == pytest.approx(0.8)
