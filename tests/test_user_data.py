"""A user's JSON/JSONL instruction data as a task, mixed with P3 from gin."""

import json
import os

import gin
import pytest
from helpers import PARQUET_TASK, p3_rows, session_spm, write_parquet

import mtllama_jax.tasks  # noqa: F401
from mtllama_jax import data, formats, vocab
from mtllama_jax.tasks import mixing, p3, user_data


@pytest.fixture(scope="module", autouse=True)
def tokenizer(tmp_path_factory):
    os.environ[vocab.TOKENIZER_ENV] = session_spm(tmp_path_factory)


def segments(batch):
    v = vocab.configured_vocabulary()
    out = []
    for r in range(batch["segment_ids"].shape[0]):
        for s in range(1, batch["segment_ids"][r].max() + 1):
            m = batch["segment_ids"][r] == s
            t, w = batch["target_tokens"][r][m], batch["loss_weights"][r][m]
            out.append((v.decode(t[w == 0].tolist()), v.decode(t[w == 1].tolist())))
    return out


def test_lamini_jsonl_and_alpaca_json_layouts(tmp_path):
    lamini = tmp_path / "lamini.jsonl"
    lamini.write_text(
        "\n".join(
            json.dumps(
                {"instruction": f"the question {i}", "response": "yes", "instruction_source": "x"}
            )
            for i in range(5)
        )
        + "\n"
    )
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(
        json.dumps(
            [
                {"instruction": "the summary", "input": "the article", "output": "no maybe"},
                {"instruction": "the title", "input": "", "output": ""},
            ]
        )
    )
    a = user_data.register_user_task("lamini_fixture", train_file=str(lamini))
    b = user_data.register_user_task("alpaca_fixture", train_file=str(alpaca), wrapper="raw")
    got = segments(next(data.batches(a, sequence_length=512, batch_size=1, seed=0, num_epochs=1)))
    assert sorted(got) == [
        (formats.get_wrapper("alpaca")(f"the question {i}"), "yes") for i in range(5)
    ]
    it = data.batches(b, sequence_length=512, batch_size=1, seed=0, num_epochs=1)
    assert segments(next(it)) == [("the summary\n\n### Input:\nthe article", "no maybe")]
    assert it.stats.dropped_empty_target == 1


def test_named_fields(tmp_path):
    path = tmp_path / "custom.jsonl"
    path.write_text(json.dumps({"q": "the premise", "a": "because"}) + "\n")
    name = user_data.register_user_task(
        "custom_fixture",
        train_file=str(path),
        instruction_field="q",
        response_field="a",
        wrapper="mtllama",
    )
    batch = next(data.batches(name, sequence_length=256, batch_size=1, seed=0, num_epochs=1))
    assert segments(batch) == [(formats.get_wrapper("mtllama")("the premise"), "because")]


def test_bad_json_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "a", "response": "b"}\n{"instruction": "c", \n')
    with pytest.raises(ValueError, match=rf"{path}:2: not valid JSON"):
        user_data.read_records(str(path))
    listed = tmp_path / "bad.json"
    listed.write_text('[\n{"instruction": "a",\n "response": }\n]')
    with pytest.raises(ValueError, match=rf"{listed}:3: not valid JSON"):
        user_data.read_records(str(listed))
    odd = tmp_path / "odd.jsonl"
    odd.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    name = user_data.register_user_task("odd_fixture", train_file=str(odd))
    with pytest.raises(ValueError, match=r"odd.jsonl: fields \['completion', 'prompt'\]"):
        data.batches(name, sequence_length=64, batch_size=1, seed=0)


def test_gin_mixes_user_data_with_p3(tmp_path, monkeypatch):
    write_parquet(str(tmp_path / "p3" / PARQUET_TASK), "train", p3_rows(10, "mrpc"))
    monkeypatch.setenv(p3.P3_DIR_ENV, str(tmp_path / "p3"))
    mine = tmp_path / "mine.jsonl"
    mine.write_text(
        "\n".join(json.dumps({"instruction": f"mine {i}", "response": "yes"}) for i in range(20))
    )
    gin.parse_config(f"""
        register_user_task.name = "gin_user_fixture"
        register_user_task.train_file = "{mine}"
        register_mixture.name = "gin_mix_fixture"
        register_mixture.tasks = ["{PARQUET_TASK}", @register_user_task()]
        examples_proportional.cap = 10
        register_mixture.rate = @examples_proportional
    """)
    try:
        name = mixing.register_mixture()
    finally:
        gin.clear_config()
    assert name == "gin_mix_fixture"
    batch = next(data.batches(name, sequence_length=2048, batch_size=1, seed=0))
    prompts = [p for p, _ in segments(batch)]
    assert any("mine" in p for p in prompts) and any("mrpc" in p for p in prompts)
