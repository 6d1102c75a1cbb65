"""Zero-shot sets from fixture files in each public format: prompts, choices, bad input."""

import json
import logging
import os

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import session_spm

import mtllama_jax.tasks  # noqa: F401  registers the tasks
from mtllama_jax import decoding, evaluation, formats, reports, task_metadata, vocab
from mtllama_jax.models.llama.config import LlamaConfig
from mtllama_jax.models.llama.model import LlamaForCausalLM
from mtllama_jax.tasks import zeroshot

SQUAD = {
    "version": "1.1",
    "data": [
        {
            "title": "t",
            "paragraphs": [
                {
                    "context": "Paris is  the capital\nof France.",
                    "qas": [
                        {
                            "id": "q1",
                            "question": "What is the capital of France?",
                            "answers": [{"text": "Paris", "answer_start": 0}],
                        },
                        {
                            "id": "english-2",
                            "question": "Which country?",
                            "answers": [{"text": "France", "answer_start": 25}],
                        },
                    ],
                }
            ],
        }
    ],
}


def write(root, rel, text):
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def jsonl(records):
    return "".join(json.dumps(r) + "\n" for r in records)


@pytest.fixture()
def eval_dir(tmp_path, tmp_path_factory, monkeypatch):
    """Every set in its public format, one or two examples each."""
    root = str(tmp_path)
    for rel in (
        "squad/dev-v1.1.json",
        "xquad/xquad.en.json",
        "tydiqa/tydiqa-goldp-v1.1-dev.json",
        "mlqa/dev-context-en-question-en.json",
    ):
        write(root, rel, json.dumps(SQUAD))
    write(root, "glue/SST-2/dev.tsv", "sentence\tlabel\nit 's a charming journey . \t1\n")
    write(
        root,
        "glue/MNLI/dev_matched.tsv",
        "index\tsentence1\tsentence2\tgold_label\n0\tA man sleeps.\tA person rests.\tneutral\n",
    )
    write(
        root,
        "superglue/RTE/val.jsonl",
        jsonl(
            [
                {
                    "premise": "Dogs bark.",
                    "hypothesis": "Dogs are silent.",
                    "label": "not_entailment",
                    "idx": 0,
                }
            ]
        ),
    )
    write(
        root,
        "superglue/COPA/val.jsonl",
        jsonl(
            [
                {
                    "premise": "The man broke his toe.",
                    "choice1": "He dropped a hammer on his foot",
                    "choice2": "He got a hole in his sock",
                    "question": "cause",
                    "label": 0,
                    "idx": 0,
                },
                {
                    "premise": "I lit the candle.",
                    "choice1": "Wax dripped",
                    "choice2": "It froze",
                    "question": "effect",
                    "label": 0,
                    "idx": 1,
                },
            ]
        ),
    )
    write(
        root,
        "superglue/WiC/val.jsonl",
        jsonl(
            [
                {
                    "word": "bank",
                    "sentence1": "The river bank.",
                    "sentence2": "The bank closed.",
                    "label": False,
                    "idx": 0,
                },
                {"word": "run", "sentence1": "I run.", "sentence2": "They run.", "idx": 1},
            ]
        ),
    )  # no label
    write(
        root,
        "openbookqa/Main/dev.jsonl",
        jsonl(
            [
                {
                    "id": "7-980",
                    "question": {
                        "stem": "The sun is responsible for",
                        "choices": [
                            {"text": "puppies learning new tricks", "label": "A"},
                            {"text": "plants sprouting, blooming and wilting", "label": "B"},
                            {"text": "children growing up", "label": "C"},
                            {"text": "flowers wilting in a vase", "label": "D"},
                        ],
                    },
                    "answerKey": "B",
                }
            ]
        ),
    )
    write(
        root,
        "winogrande/dev.jsonl",
        jsonl(
            [
                {
                    "qID": "w1",
                    "sentence": "Sarah was a much better surgeon than Maria so _ always got "
                    "the harder cases.",
                    "option1": "Sarah",
                    "option2": "Maria",
                    "answer": "1",
                }
            ]
        ),
    )
    monkeypatch.setenv(zeroshot.EVAL_DIR_ENV, root)
    os.environ[vocab.TOKENIZER_ENV] = session_spm(tmp_path_factory)  # as the data tests
    gin.clear_config()
    yield root
    gin.clear_config()


def by_set(name):
    return zeroshot.examples(name, "validation")


def test_code_prompts_choices_and_gold(eval_dir):
    wrap = formats.get_wrapper("mtllama")
    squad = by_set("squad")
    assert squad[0]["inputs"] == (  # no chat wrapper; context re-joined on single spaces
        "Answer the question according to the context. Question: What is the capital of "
        "France?. Context: Paris is the capital of France.. Answer:"
    )
    assert squad[0]["answers"] == ["Paris"] and squad[0]["answer_choices"] == []
    assert [e["example_id"] for e in by_set("tydiqa_en")] == ["english-2"]  # English only
    sst2 = by_set("sst2")[0]
    assert sst2["inputs"] == (
        "it 's a charming journey .  Based on this review, would the "
        "user recommend this product? No or Yes?"
    )
    assert (sst2["answer_choices"], sst2["label"]) == (["No", "Yes"], 1)
    cause, effect = by_set("copa")
    assert cause["inputs"] == wrap(
        "The man broke his toe. This happened because... Help me pick the more plausible "
        "option: - He dropped a hammer on his foot. - He got a hole in his sock"
    )
    assert "As a consequence..." in effect["inputs"] and effect["targets"] == "Wax dripped"
    obqa = by_set("openbookqa")[0]
    assert obqa["inputs"] == wrap(
        "The sun is responsible for Which is the correct answer? - (A) puppies learning new "
        "tricks - (B) plants sprouting, blooming and wilting - (C) children growing up - (D) "
        "flowers wilting in a vase"
    )
    assert obqa["label"] == 1
    wino = by_set("winogrande")[0]
    assert wino["inputs"].endswith("does _ refer to Sarah or Maria?### Assistant:")
    assert (wino["answer_choices"], wino["label"]) == (["Sarah", "Maria"], 0)
    mnli = by_set("mnli")[0]
    assert mnli["inputs"] == wrap(
        "A man sleeps. Question: Does this imply that A person "
        "rests.? Please response with 'Yes', 'No', or 'Maybe'."
    )
    assert (mnli["answer_choices"], mnli["label"]) == (["Yes", "Maybe", "No"], 1)
    rte = by_set("rte")[0]
    assert rte["inputs"] == wrap(
        'Given Dogs bark. Is it guaranteed true that "Dogs are silent."? Yes or no?'
    )
    assert (rte["answer_choices"], rte["label"]) == (["Yes", "No"], 1)
    wic = by_set("wic")[0]
    assert wic["inputs"] == wrap(
        'Does the word "bank" have the same meaning in these two '
        "sentences? Yes, No? The river bank. The bank closed."
    )
    assert (wic["answer_choices"], wic["label"]) == (["No", "Yes"], 0)


def test_card_style_wraps_every_prompt_and_drops_copas_extra_dot(eval_dir):
    gin.bind_parameter("zeroshot_prompt_style.style", "card")
    wrap = formats.get_wrapper("mtllama")
    assert by_set("sst2")[0]["inputs"].startswith(wrap.prefix)
    assert by_set("squad")[0]["inputs"].startswith(wrap.prefix)
    assert by_set("copa")[0]["inputs"].endswith(
        "- He dropped a hammer on his foot - He got a hole in his sock### Assistant:"
    )


@pytest.mark.parametrize(
    "task, expect",
    [
        ("zeroshot_squad", ("squad", None)),
        ("zeroshot_xquad_en", ("xquad_en", None)),
        ("zeroshot_rte", ("rte", "rte")),
        ("zeroshot_sst2", ("sst2", "sst2")),
        ("zeroshot_copa", ("copa", "copa")),
        ("synthetic_topic_t0", (None, None)),
    ],
)
def test_registration_records_the_set_and_matcher(task, expect):
    info = task_metadata.task_info(task)
    assert (info.zero_shot_set, info.matcher, info.t0_dataset) == (*expect, None)


def test_the_reports_columns_are_the_registered_sets():
    columns = [s for _, s in reports.UNSEEN_DATASETS + reports.UNSEEN_TASKS]
    recorded = [task_metadata.task_info(f"zeroshot_{s}").zero_shot_set for s in zeroshot.SETS]
    assert sorted(columns) == sorted(recorded) == sorted(reports.PUBLISHED["MT-LLaMA-7b"])


def test_tasks_tokenise_the_prompts_and_the_mixture_has_every_set(eval_dir):
    mixture = evaluation.task_names(["zeroshot_all"])
    assert sorted(mixture) == sorted(f"zeroshot_{s}" for s in zeroshot.SETS) and len(mixture) == 11
    loaded = evaluation.load_examples("zeroshot_rte", "validation")
    v = vocab.configured_vocabulary()
    assert v.decode(loaded[0]["inputs"]) == by_set("rte")[0]["inputs"]
    assert loaded[0]["answer_choices"] == ["Yes", "No"] and loaded[0]["label"] == 1


def test_examples_without_gold_are_kept_counted_and_logged(eval_dir, caplog):
    with caplog.at_level(logging.WARNING):
        wic = by_set("wic")
    assert [e["label"] for e in wic] == [0, -1]
    assert "1 of 2 examples have no gold answer or label" in caplog.text


def test_missing_set_names_the_file_and_where_to_get_it(eval_dir):
    os.remove(os.path.join(eval_dir, "superglue/RTE/val.jsonl"))
    with pytest.raises(evaluation.MissingData) as e:
        evaluation.load_examples("zeroshot_rte", "validation")
    message = str(e.value)
    assert "'rte'" in message and "superglue/RTE/val.jsonl" in message
    assert "https://dl.fbaipublicfiles.com/glue/superglue/data/v2/RTE.zip" in message


def test_wrong_format_names_the_file_and_line(eval_dir):
    path = os.path.join(eval_dir, "superglue/COPA/val.jsonl")
    with open(path, "a") as f:
        f.write("{not json\n")
    with pytest.raises(ValueError, match=r"COPA/val.jsonl, line 3: not a JSON object"):
        by_set("copa")
    write(eval_dir, "squad/dev-v1.1.json", json.dumps([1, 2]))
    with pytest.raises(ValueError, match=r"dev-v1.1.json: no top-level 'data' list"):
        by_set("squad")
    write(eval_dir, "glue/SST-2/dev.tsv", "sentence\tlabel\ngood\t1\textra\n")
    with pytest.raises(ValueError, match=r"SST-2/dev.tsv, line 2: 3 tab-separated fields"):
        by_set("sst2")


def test_no_evaluation_folder_says_how_to_set_one(monkeypatch):
    monkeypatch.delenv(zeroshot.EVAL_DIR_ENV, raising=False)
    with pytest.raises(FileNotFoundError, match="MTLLAMA_EVAL_DIR"):
        zeroshot.set_files("squad", "validation")
    monkeypatch.setenv(zeroshot.EVAL_DIR_ENV, "/nonexistent")
    with pytest.raises(FileNotFoundError, match="'rte' has no 'test' split"):
        zeroshot.set_files("rte", "test")


def test_a_record_without_a_prompt_field_names_file_and_line(eval_dir):
    write(
        eval_dir,
        "superglue/COPA/val.jsonl",
        jsonl(
            [
                {"premise": "p", "choice1": "a", "choice2": "b", "question": "cause", "label": 0},
                {"premise": "p", "choice1": "a", "question": "effect", "label": 1},
            ]
        ),
    )
    with pytest.raises(ValueError, match=r"COPA/val.jsonl, line 2: no field\(s\) \['choice2'\]"):
        by_set("copa")


def write_parquet(root, rel, rows):
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def hub_copies(root):
    """The same examples as `eval_dir`'s, in the hub's parquet (both branch layouts)."""
    paragraph = SQUAD["data"][0]["paragraphs"][0]
    write_parquet(
        root,
        "hub/rajpurkar/squad/plain_text/validation-00000-of-00001.parquet",
        [
            {
                "id": qa["id"],
                "title": "t",
                "context": paragraph["context"],
                "question": qa["question"],
                "answers": {
                    "text": [a["text"] for a in qa["answers"]],
                    "answer_start": [a["answer_start"] for a in qa["answers"]],
                },
            }
            for qa in paragraph["qas"]
        ],
    )
    write_parquet(
        root,
        "hub/nyu-mll/glue/mnli/validation_matched-00000-of-00001.parquet",
        [{"premise": "A man sleeps.", "hypothesis": "A person rests.", "label": 1, "idx": 0}],
    )
    write_parquet(
        root,
        "hub/allenai/openbookqa/main/validation-00000-of-00001.parquet",
        [
            {
                "id": "7-980",
                "question_stem": "The sun is responsible for",
                "choices": {
                    "text": [
                        "puppies learning new tricks",
                        "plants sprouting, blooming and wilting",
                        "children growing up",
                        "flowers wilting in a vase",
                    ],
                    "label": ["A", "B", "C", "D"],
                },
                "answerKey": "B",
            }
        ],
    )
    write_parquet(
        root,
        "hub/aps/super_glue/copa/validation/0000.parquet",
        [
            {
                "premise": "The man broke his toe.",
                "choice1": "He dropped a hammer on his foot",
                "choice2": "He got a hole in his sock",
                "question": "cause",
                "idx": 0,
                "label": 0,
            },
            {
                "premise": "I lit the candle.",
                "choice1": "Wax dripped",
                "choice2": "It froze",
                "question": "effect",
                "idx": 1,
                "label": 0,
            },
        ],
    )


def test_the_hubs_parquet_gives_the_same_examples(eval_dir, tmp_path, monkeypatch):
    sets = ("squad", "mnli", "openbookqa", "copa")
    public = {name: by_set(name) for name in sets}
    hub_root = str(tmp_path / "hub_only")
    hub_copies(hub_root)
    monkeypatch.setenv(zeroshot.EVAL_DIR_ENV, hub_root)
    keys = ("inputs", "targets", "answers", "answer_choices", "label")
    for name in sets:
        assert zeroshot.set_files(name, "validation")[0] == "hub"
        assert [{k: e[k] for k in keys} for e in by_set(name)] == [
            {k: e[k] for k in keys} for e in public[name]
        ], name
    write_parquet(
        hub_root,
        "hub/nyu-mll/glue/mnli/validation_matched-00000-of-00001.parquet",
        [{"sentence1": "a", "sentence2": "b", "gold_label": "neutral"}],
    )
    bad = r"validation_matched-00000-of-00001.parquet: no column\(s\) \['premise', 'hypothesis'"
    with pytest.raises(ValueError, match=bad):
        by_set("mnli")


def test_a_long_qa_context_is_cut_to_fit_1024_tokens(eval_dir, caplog):
    squad = json.loads(json.dumps(SQUAD))
    squad["data"][0]["paragraphs"][0]["context"] = " ".join(["river stone cloud"] * 1500)
    write(eval_dir, "squad/dev-v1.1.json", json.dumps(squad))
    with caplog.at_level(logging.WARNING):
        first = by_set("squad")[0]
    n = len(vocab.configured_vocabulary().encode(first["inputs"]))
    assert 1000 < n + 1 <= zeroshot.QA_MAX_TOKENS  # BOS + prompt, nearly all of the room used
    assert first["inputs"].startswith(
        "Answer the question according to the context. Question: "
        "What is the capital of France?. Context: river stone"
    )
    assert first["inputs"].endswith(". Answer:")
    assert "2 of 2 contexts cut to fit 1024 tokens" in caplog.text


def test_evaluate_skips_a_missing_set_and_runs_the_others(eval_dir):
    os.remove(os.path.join(eval_dir, "superglue/RTE/val.jsonl"))
    v = vocab.configured_vocabulary()
    model = LlamaForCausalLM(
        LlamaConfig.tiny(vocab_size=v.vocab_size, max_position_embeddings=128, num_layers=1)
    )
    params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
    results = evaluation.evaluate(
        params,
        model,
        v,
        ["zeroshot_rte", "zeroshot_wic"],
        evaluation.EvalOptions(protocols=("rank",), batch_size=4),
        decoder=decoding.Decoder(model, length_bucket=128),
    )
    assert list(results["skipped"]) == ["zeroshot_rte"]
    assert "superglue/RTE/val.jsonl" in results["skipped"]["zeroshot_rte"]
    assert f"{zeroshot.SUPERGLUE}/RTE.zip" in results["skipped"]["zeroshot_rte"]
    wic = results["tasks"]["zeroshot_wic"]
    assert (wic["set"], wic["examples"], wic["without_gold"]) == ("wic", 2, 1)
    assert wic["rank"]["accuracy"] in (0.0, 100.0)  # one graded example


def test_eval_data_md_lists_the_table_of_the_code():
    path = os.path.join(os.path.dirname(zeroshot.__file__), "EVAL_DATA.md")
    with open(path) as f:
        assert zeroshot.data_table() in f.read()
