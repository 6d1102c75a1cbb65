"""Both protocols over real seqio tasks: planted answers, QA F1/EM, missing sets, medians."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import seqio
import tensorflow as tf
from helpers import train_bpe_spm

from mtllama_jax import decoding, evaluation, partitioning, task_metadata
from mtllama_jax.models.llama.config import LlamaConfig
from mtllama_jax.models.llama.model import LlamaForCausalLM
from mtllama_jax.vocab import LlamaVocabulary

CONFIG = LlamaConfig.tiny(vocab_size=320, max_position_embeddings=96)
MODEL = LlamaForCausalLM(CONFIG)
WORDS = ["alpha", "beta", "gamma", "delta", "lorem", "ipsum", "river", "stone", "cloud", "query"]
PLANTED = "river stone"
OTHERS = ["gamma delta", "lorem ipsum"]


@pytest.fixture(scope="module")
def vocab(tmp_path_factory):
    folder = tmp_path_factory.mktemp("spm")
    lines = [" ".join(WORDS[(i * j + j) % len(WORDS)] for j in range(1, 9)) for i in range(300)]
    return LlamaVocabulary(
        train_bpe_spm(lines, folder / "tokenizer", CONFIG.vocab_size, byte_fallback=True)
    )


def _register(name, examples, vocab, missing=None, info=None):
    """A seqio task over in-memory examples (or one whose source file is missing).

    `info`: its `task_metadata.TaskInfo`, recorded as `tasks/` does (None: a plain task).
    """

    def dataset_fn(split, shuffle_files, seed=None):
        if missing:
            raise FileNotFoundError(f"{missing}: no such file; download the set first")
        return tf.data.Dataset.from_generator(
            lambda: iter(examples),
            output_signature={
                "inputs": tf.TensorSpec([], tf.string),
                "targets": tf.TensorSpec([], tf.string),
                "answer_choices": tf.TensorSpec([None], tf.string),
                "answers": tf.TensorSpec([None], tf.string),
                "label": tf.TensorSpec([], tf.int32),
                "example_id": tf.TensorSpec([], tf.string),
            },
        )

    feature = seqio.Feature(vocab, add_eos=False)
    seqio.TaskRegistry.remove(name)
    seqio.TaskRegistry.add(
        name,
        source=seqio.FunctionDataSource(dataset_fn, splits=["validation"]),
        preprocessors=[seqio.preprocessors.tokenize],
        output_features={"inputs": feature, "targets": feature},
        metric_fns=[],
    )
    if info is not None:
        task_metadata.record(name, info)


def _choice_examples(n, prefix="pick one"):
    out = []
    for i in range(n):
        choices = list(OTHERS)
        label = i % 3
        choices.insert(label, PLANTED)
        out.append(
            {
                "inputs": f"{prefix} {WORDS[i % len(WORDS)]}",
                "targets": PLANTED,
                "answer_choices": choices,
                "answers": [],
                "label": label,
                "example_id": f"ex{i}",
            }
        )
    return out


@pytest.fixture(scope="module")
def tasks(vocab):
    _register("fixture_planted", _choice_examples(6), vocab)
    copa = task_metadata.TaskInfo(zero_shot_set="copa", matcher="copa")
    _register("zeroshot_copa_fixture", _choice_examples(3), vocab, info=copa)
    long_prompt = " ".join(WORDS * 12)
    _register("fixture_long", _choice_examples(1, prefix=long_prompt), vocab)
    _register("fixture_missing", [], vocab, missing="/data/eval/missing-dev.json")
    seqio.MixtureRegistry.remove("fixture_mix")
    seqio.MixtureRegistry.add(
        "fixture_mix", ["fixture_planted", "fixture_missing"], default_rate=1.0
    )


@pytest.fixture(scope="module")
def planted_params(vocab):
    """A model whose every next-token distribution favours the planted answer's pieces.

    Attention and MLP outputs are zeroed, so the last hidden state is the input
    embedding; every embedding shares a large first component, which the LM head
    maps onto the planted pieces' logits (its first piece highest).
    """
    model = MODEL
    params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
    params = jax.tree.map(np.array, params)
    params["layers"]["attention"]["o_proj"]["kernel"][:] = 0
    params["layers"]["mlp"]["down_proj"]["kernel"][:] = 0
    params["embed"]["embedding"][:, 0] = 3.0
    pieces = list(vocab.encode(PLANTED))
    params["lm_head"]["kernel"][0, pieces] = 2.0
    params["lm_head"]["kernel"][0, pieces[0]] = 2.5  # greedy text: "riverriver..."
    return params


OPTIONS = evaluation.EvalOptions(batch_size=4, max_new_tokens=4)


@pytest.fixture(scope="module")
def decoder():
    """One decoder for the module: its compiled functions are reused across tests."""
    return decoding.Decoder(MODEL, length_bucket=32)


def test_rank_and_generate_pick_the_planted_answer(tasks, planted_params, vocab, decoder):
    results = evaluation.evaluate(
        planted_params,
        MODEL,
        vocab,
        ["fixture_planted", "zeroshot_copa_fixture"],
        OPTIONS,
        decoder=decoder,
    )
    planted = results["tasks"]["fixture_planted"]
    assert planted["examples"] == 6 and planted["without_gold"] == 0
    assert planted["rank"] == {"accuracy": 100.0, "accuracy_norm": 100.0}
    copa = results["tasks"]["zeroshot_copa_fixture"]
    assert copa["set"] == "copa"
    assert copa["generate"]["accuracy_original"] == 100.0  # quick_ratio to the planted pieces


def test_rank_accuracy_counts_picks_that_equal_labels(tasks, vocab, decoder):
    params = nn.unbox(MODEL.init(jax.random.key(1), jnp.zeros((1, 8), jnp.int32))["params"])
    options = evaluation.EvalOptions(
        batch_size=4, max_new_tokens=4, keep_predictions=True, protocols=("rank",)
    )
    result = evaluation.evaluate(
        params, MODEL, vocab, ["fixture_planted"], options, decoder=decoder
    )
    task = result["tasks"]["fixture_planted"]
    preds = task["predictions"]
    assert [p["label"] for p in preds] == [0, 1, 2, 0, 1, 2]
    picks = [p["rank"] for p in preds]
    assert task["rank"]["accuracy"] == pytest.approx(
        100 * np.mean([p == q for p, q in zip(picks, [0, 1, 2, 0, 1, 2])])
    )
    assert all(len(p["loglik"]) == 3 for p in preds)


def test_missing_set_is_skipped_with_its_reason_or_raises(tasks, planted_params, vocab, decoder):
    results = evaluation.evaluate(
        planted_params, MODEL, vocab, ["fixture_mix"], OPTIONS, decoder=decoder
    )
    assert set(results["tasks"]) == {"fixture_planted"}
    assert "missing-dev.json" in results["skipped"]["fixture_missing"]
    strict = evaluation.EvalOptions(batch_size=4, max_new_tokens=4, fail_on_missing=True)
    with pytest.raises(evaluation.MissingData, match="fixture_missing.*missing-dev.json"):
        evaluation.evaluate(planted_params, MODEL, vocab, ["fixture_mix"], strict, decoder=decoder)


def test_long_prompts_are_cut_and_counted(tasks, planted_params, vocab, decoder):
    results = evaluation.evaluate(
        planted_params, MODEL, vocab, ["fixture_long"], OPTIONS, decoder=decoder
    )
    task = results["tasks"]["fixture_long"]
    assert task["truncated_prompts"] == 1
    assert task["rank"]["accuracy"] == 100.0


def test_unknown_task_name_says_how_to_register(vocab):
    with pytest.raises(ValueError, match="no seqio task or mixture named 'nope'"):
        evaluation.task_names(["nope"])


@pytest.mark.parametrize(
    "output, golds, f1, em",
    [
        ("the Denver Broncos", ["Denver Broncos"], 100.0, 100.0),  # article and case dropped
        ("Broncos!", ["Denver Broncos", "Broncos"], 100.0, 100.0),  # max over golds
        ("Denver won", ["Denver Broncos"], 50.0, 0.0),  # P = R = 1/2
        ("in the year 1990", ["1990 season"], 2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2) * 100, 0.0),
        ("None of them", ["Denver"], 0.0, 0.0),  # contains "None": empty answer
    ],
)
def test_squad_f1_em_hand_computed(output, golds, f1, em):
    scores = evaluation.qa_scores([output], [golds])
    assert scores["f1"] == pytest.approx(f1) and scores["em"] == pytest.approx(em)


def test_t0_median_over_prompts():
    for t in ("gpt3", "mnli_crowdsource", "does_it_follow"):
        info = task_metadata.TaskInfo(t0_dataset="super_glue_rte")
        task_metadata.record(f"super_glue_rte_{t}_score_eval", info)
    task_metadata.record("anli_claim_r2_score_eval", task_metadata.TaskInfo(t0_dataset="anli_r2"))
    tasks = {
        f"super_glue_rte_{t}_score_eval": {"set": None, "rank": {"accuracy": a}}
        for t, a in (("gpt3", 50.0), ("mnli_crowdsource", 70.0), ("does_it_follow", 60.0))
    }
    tasks["anli_claim_r2_score_eval"] = {"set": None, "rank": {"accuracy": 40.0}}
    tasks["zeroshot_rte"] = {"set": "rte", "rank": {"accuracy": 99.0}}
    medians = evaluation.t0_medians(tasks)
    assert medians == {
        "super_glue_rte": {"rank/accuracy": 60.0, "prompts": 3},
        "anli_r2": {"rank/accuracy": 40.0, "prompts": 1},
    }


def test_train_hook_returns_flat_metrics(tasks, planted_params, vocab):
    layout = partitioning.Layout.create(1, 2, 1, "fsdp", jax.devices()[:2])
    hook = evaluation.train_hook(
        ["fixture_planted"],
        vocab,
        evaluation.EvalOptions(batch_size=4, max_new_tokens=2, protocols=("rank",)),
    )
    metrics = hook(planted_params, 10, MODEL, layout)
    assert metrics == {
        "fixture_planted/rank/accuracy": 100.0,
        "fixture_planted/rank/accuracy_norm": 100.0,
    }


def test_bad_protocol_is_named():
    with pytest.raises(ValueError, match="protocols=.*choose from"):
        functools.partial(evaluation.EvalOptions, protocols=("beam",))()


def test_report_tables_and_chart_put_published_rows_beside_ours(tmp_path):
    from mtllama_jax import reports

    run = {
        "tasks": {
            "zeroshot_rte": {
                "set": "rte",
                "examples": 4,
                "generate": {"accuracy_original": 75.0, "accuracy_strict": 50.0},
                "rank": {"accuracy": 100.0, "accuracy_norm": 75.0},
            },
            "zeroshot_squad": {"set": "squad", "examples": 2, "generate": {"f1": 62.5, "em": 50.0}},
            "synthetic_topic": {"set": None, "examples": 3, "rank": {"accuracy": 33.3}},
        },
        "skipped": {"zeroshot_wic": "FileNotFoundError: wic/val.jsonl"},
        "t0_median": {},
    }
    table = reports.markdown_report({"before": run})
    assert "| MT-LLaMA-7b (published) | 42.3 / 31.1 |" in table
    assert "| before (generate, original matcher) | – | – | – | 62.5 / 50.0 | – | – |" in table
    assert "| before (rank) | – | – | – | – | 100.0 |" in table
    assert "| before (rank, length-normalised) | – | – | – | – | 75.0 |" in table
    assert "| before | synthetic_topic | 3 | – | – | 33.3 | – |" in table
    assert "`zeroshot_wic`: FileNotFoundError: wic/val.jsonl" in table
    reports.bar_chart({"before": run}, str(tmp_path / "chart.png"))
    assert (tmp_path / "chart.png").read_bytes()[:4] == b"\x89PNG"


# Crafted pairs where the official SQuAD v1.1 script (ASCII punctuation) and the official
# MLQA script (lang en: every Unicode punctuation character) disagree.
@pytest.mark.parametrize(
    "output, gold, squad_f1_em, mlqa_f1_em",
    [
        ("Hamlet", "“Hamlet”", (0.0, 0.0), (100.0, 100.0)),  # curly quotes
        ("1990-1995", "1990–1995", (0.0, 0.0), (100.0, 100.0)),  # ASCII hyphen vs en dash
        ("Les Misérables", "«Les Misérables»", (0.0, 0.0), (100.0, 100.0)),  # guillemets
        ("and so on…", "and so on", (2 / 3 * 100, 0.0), (100.0, 100.0)),  # an ellipsis
        ("the «best» of times", "best of times", (2 / 3 * 100, 0.0), (100.0, 100.0)),
        ("€100", "100", (0.0, 0.0), (0.0, 0.0)),  # a currency sign is a symbol, kept by both
        ("$100", "100", (100.0, 100.0), (100.0, 100.0)),  # ASCII '$' is punctuation to both
    ],
)
def test_qa_scoring_follows_the_sets_official_script(output, gold, squad_f1_em, mlqa_f1_em):
    for scoring, (f1, em) in (("squad", squad_f1_em), ("mlqa", mlqa_f1_em)):
        scores = evaluation.qa_scores([output], [[gold]], scoring=scoring)
        assert (scores["f1"], scores["em"]) == (pytest.approx(f1), pytest.approx(em)), scoring


def test_mlqa_en_is_scored_by_mlqas_rules_and_squad_by_squads(vocab, planted_params, decoder):
    prompt = [1] + list(vocab.encode("question river"))
    text = decoder.generate(
        planted_params, [prompt], max_new_tokens=4, stop_strings=["\n"], detokenize=vocab.decode
    )[0].text.strip()
    example = {
        "inputs": "question river",
        "targets": "",
        "answer_choices": [],
        "answers": [f"“{text}”"],
        "label": -1,
        "example_id": "q0",
    }
    for name, qa_set in (
        ("zeroshot_mlqa_en_fixture", "mlqa_en"),
        ("zeroshot_squad_fixture", "squad"),
    ):
        _register(name, [example], vocab, info=task_metadata.TaskInfo(zero_shot_set=qa_set))
    results = evaluation.evaluate(
        planted_params,
        MODEL,
        vocab,
        ["zeroshot_mlqa_en_fixture", "zeroshot_squad_fixture"],
        OPTIONS,
        decoder=decoder,
    )["tasks"]
    mlqa, squad = results["zeroshot_mlqa_en_fixture"], results["zeroshot_squad_fixture"]
    assert (mlqa["qa_scoring"], squad["qa_scoring"]) == ("mlqa", "squad")
    assert mlqa["generate"] == {"f1": 100.0, "em": 100.0}
    assert squad["generate"]["em"] == 0.0


def test_unknown_qa_scoring_is_named():
    with pytest.raises(ValueError, match="scoring='tydi'"):
        evaluation.qa_scores(["a"], [["a"]], scoring="tydi")
