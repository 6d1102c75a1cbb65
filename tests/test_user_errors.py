"""A user's mistakes end in one named error and a distinct exit code, never a traceback.

One test (at least) per class of issue 16: the jobs' shared error handler,
cheap checks first, gin values, config.json fields, JSONL files, damaged
latest checkpoints in eval/chat, chat's stdin and stdout, eval's output folder
and its all-skipped exit code.
"""

import io
import json
import os
import sys

import pytest

from mtllama_jax import checkpoint_folder, exits
from mtllama_jax.main import chat, train, train_job
from mtllama_jax.models.llama.config import LlamaConfig


def test_run_main_prints_one_line_and_the_exit_code(capsys):
    def missing():
        open("/nonexistent/init/config.json")

    assert exits.run_main("mtllama-x", missing) == exits.ERROR
    assert capsys.readouterr().err == (
        "mtllama-x: error: [Errno 2] No such file or directory: '/nonexistent/init/config.json'\n"
    )

    def full():
        raise OSError(28, "No space left on device", "/ckpt/x")

    assert exits.run_main("mtllama-x", full) == exits.ERROR
    assert "error: the disk is full: free space" in capsys.readouterr().err
    assert (
        len(
            {
                exits.OK,
                exits.ERROR,
                exits.NONFINITE,
                exits.PREEMPTED,
                exits.ALL_SKIPPED,
                exits.MODEL_DIR_BUSY,
                exits.INTERRUPTED,
                exits.BROKEN_PIPE,
            }
        )
        == 8
    )


def test_train_refuses_a_bad_batch_and_a_gin_typo_before_writing_anything(tmp_path, capsys):
    model_dir = tmp_path / "run"
    common = [
        "--gin_file=models/tiny.gin",
        "--gin_file=mesh/fsdp.gin",
        "--gin_file=runs/finetune.gin",
        f"--gin.MODEL_DIR='{model_dir}'",
    ]
    assert train.main(common + ["--gin.train.batch_size=3"]) == exits.ERROR
    err = capsys.readouterr().err
    assert "train.batch_size=3 does not split over 1 process(es) and 8 batch shard(s)" in err
    assert "use a multiple of 8" in err and not model_dir.exists()
    assert train.main(common + ["--gin.train.batch_size='two'"]) == exits.ERROR
    assert "gin binding train.batch_size='two' (str): train.batch_size takes int" in (
        capsys.readouterr().err
    )
    assert train.main(common + ["--gin.NonfinitePolicy.action=skip"]) == exits.ERROR
    assert "a string value is quoted" in capsys.readouterr().err
    assert not model_dir.exists()


@pytest.mark.parametrize(
    "field, value, says",
    [
        (
            "num_attention_heads",
            0,
            "field 'num_attention_heads' is 0; it must be a positive integer",
        ),
        ("hidden_size", None, "field 'hidden_size' is None"),
        ("vocab_size", "32000", "field 'vocab_size' is '32000'"),
        ("rms_norm_eps", "small", "field 'rms_norm_eps' is 'small'; it must be a number"),
    ],
)
def test_config_json_fields_of_the_wrong_type_name_file_and_field(tmp_path, field, value, says):
    hf = dict(LlamaConfig.tiny().to_hf(), **{field: value})
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ValueError, match=f"{tmp_path}/config.json: {says}".replace("(", r"\(")):
        LlamaConfig.from_hf(tmp_path)


def test_invalid_config_json_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text('{"vocab_size": 32000,')
    with pytest.raises(ValueError, match=f"{tmp_path}/config.json is not valid JSON"):
        LlamaConfig.from_hf(tmp_path)


def test_non_utf8_jsonl_names_file_and_line_and_an_empty_task_names_itself(tmp_path):
    from mtllama_jax.tasks import user_data

    path = tmp_path / "mine.jsonl"
    path.write_bytes(b'{"instruction": "a", "response": "b"}\n{"instruction": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"mine.jsonl:2: not UTF-8 \(byte 0xe9 at column 21\)"):
        user_data.read_records(str(path))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    name = user_data.register_user_task("empty_fixture", train_file=str(empty))
    message = train_job._no_data_message(name, "train")  # a Task, not a Mixture
    assert f"'{name}' yielded no train examples" in message and "empty_fixture" in message


def test_eval_and_chat_skip_a_damaged_latest_step_and_name_a_damaged_requested_one(
    model_dir, tmp_path, capsys
):
    import shutil

    folder = str(tmp_path / "model")
    shutil.copytree(model_dir[0], folder)
    step3 = os.path.join(folder, "checkpoints", "3")
    shutil.copytree(step3, os.path.join(folder, "checkpoints", "4"))
    checkpoint_folder.write_step_manifest(os.path.join(folder, "checkpoints", "4"))
    chunks = [
        os.path.join(r, n)
        for r, _, ns in os.walk(os.path.join(folder, "checkpoints", "4"))
        for n in ns
        if "/d/" in os.path.join(r, n)
    ]
    with open(max(chunks, key=os.path.getsize), "r+b") as f:
        f.truncate(10)  # a truncated copy of the latest step
    assert chat.main(["--checkpoint", folder, "--prompt", "hello", "--max_new_tokens", "2"]) == 0
    assert "checkpoint step 4 of" in capsys.readouterr().err
    from mtllama_jax import partitioning
    from mtllama_jax.main import eval as eval_job

    layout = partitioning.Layout.one_device()
    with pytest.raises(ValueError, match=r"step 4: files differ from .*manifest.json"):
        eval_job.open_checkpoint(folder, layout, step=4)


def test_chat_keeps_the_conversation_past_a_non_utf8_line(model_dir, monkeypatch, capsys):
    stdin = io.TextIOWrapper(io.BytesIO(b"hello\n\xff\xfe river\nworld\n"), encoding="utf-8")
    monkeypatch.setattr(sys, "stdin", stdin)
    assert chat.main(["--checkpoint", model_dir[0], "--max_new_tokens", "2"]) == exits.OK
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) == 2  # both UTF-8 lines answered
    assert "that line is not UTF-8 (byte 0xff at column 1)" in captured.err


def test_chat_with_a_closed_stdin_or_a_closed_stdout_exits_cleanly(model_dir, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", None)  # `mtllama-chat <&-`
    assert chat.main(["--checkpoint", model_dir[0]]) == exits.ERROR
    assert "stdin is closed; give the message with --prompt" in capsys.readouterr().err
    read, write = os.pipe()
    os.close(read)  # the reader went away, as `mtllama-chat ... | head -c 1` does
    with os.fdopen(write, "w") as out:
        monkeypatch.setattr(sys, "stdout", out)
        code = chat.main(
            ["--checkpoint", model_dir[0], "--prompt", "hello", "--max_new_tokens", "2"]
        )
    assert code == exits.BROKEN_PIPE


def test_eval_checks_its_output_folder_first_and_all_skipped_has_its_own_code(
    model_dir, tmp_path, capsys, monkeypatch
):
    from mtllama_jax.main import eval as eval_job

    (tmp_path / "file").write_text("")
    base = [
        "--gin_file=mesh/fsdp.gin",
        "--gin_file=runs/eval.gin",
        f"--gin.CHECKPOINT='{model_dir[0]}'",
        "--gin.EVAL_TASKS=['zeroshot_rte']",
    ]
    assert eval_job.main(base + [f"--gin.EVAL_OUTPUT_DIR='{tmp_path / 'file' / 'out'}'"]) == 2
    assert f"{tmp_path / 'file'} is a file, not a folder" in capsys.readouterr().err
    monkeypatch.setenv("MTLLAMA_EVAL_DIR", str(tmp_path / "no_data"))
    code = eval_job.main(base + [f"--gin.EVAL_OUTPUT_DIR='{tmp_path / 'out'}'"])
    assert code == exits.ALL_SKIPPED
    assert "every set was skipped" in capsys.readouterr().err
    assert json.loads((tmp_path / "out" / "results.json").read_text())["skipped"]
