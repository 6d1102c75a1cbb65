"""mtllama-chat: one-shot `--prompt` in a subprocess, REPL history, a bad checkpoint folder."""

import io
import os
import subprocess
import sys

import jax.numpy as jnp
import pytest
from helpers import chat_config

from mtllama_jax import decoding, models
from mtllama_jax.formats import MTLLAMA_SYSTEM
from mtllama_jax.main import chat
from mtllama_jax.main.chat import Conversation
from mtllama_jax.vocab import LlamaVocabulary

CHAT_CONFIG = chat_config()


def run_chat(*args, stdin=""):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    return subprocess.run(
        [sys.executable, "-m", "mtllama_jax.main.chat", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_one_shot_prompt_prints_the_greedy_reply(model_dir):
    folder, params = model_dir
    vocab = LlamaVocabulary(os.path.join(folder, "tokenizer.model"))
    prompt = [1] + list(vocab.encode(MTLLAMA_SYSTEM + "### Human: hello river### Assistant:"))
    expect = (
        decoding.Decoder(models.build_module(CHAT_CONFIG))
        .generate(
            params,
            [prompt],
            max_new_tokens=8,
            stop_token_ids=[2],
            stop_strings=["###"],
            detokenize=vocab.decode,
        )[0]
        .text
    )
    proc = run_chat("--checkpoint", folder, "--prompt", "hello river", "--max_new_tokens", "8")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == expect + "\n"
    assert "outgrew the context" not in proc.stderr
    assert expect.strip()


def test_repl_answers_each_line_and_stops_at_end_of_input(model_dir, monkeypatch, capsys):
    folder, _ = model_dir
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n/reset\nworld\n"))
    code = chat.main(
        ["--checkpoint", folder, "--max_new_tokens", "4", "--temperature", "0.8", "--top_k", "20"]
    )
    assert code == 0
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) == 2
    assert "outgrew the context" not in captured.err


def test_missing_tokenizer_is_named(model_dir, tmp_path, capsys):
    folder, _ = model_dir
    bad = tmp_path / "ckpt"
    bad.mkdir()
    (bad / "config.json").write_text(open(os.path.join(folder, "config.json")).read())
    assert chat.main(["--checkpoint", str(bad), "--prompt", "hi"]) == 2
    assert f"{bad}/tokenizer.model is missing" in capsys.readouterr().err


def test_bad_sampling_flag_is_named(capsys):
    with pytest.raises(SystemExit) as exit_:
        chat.main(["--checkpoint", "x", "--top_p", "0"])
    assert exit_.value.code == 2 and "top_p=0.0" in capsys.readouterr().err


def test_history_follows_the_wrapper_layout():
    conv = Conversation("mtllama")
    first = conv.prompt("Hi")
    assert first == MTLLAMA_SYSTEM + "### Human: Hi### Assistant:"
    conv.add("Hi", " Hello! ")
    assert conv.prompt("Bye") == first + " Hello!### Human: Bye### Assistant:"
    user = Conversation("mtllama_user")
    user.add("Hi", "Hello")
    assert user.prompt("Bye").endswith("### ASSISTANT: Hello\n### USER: Bye\n### ASSISTANT:")
    assert Conversation("raw").stop_strings == ()


def test_other_libraries_are_quiet_unless_verbose(model_dir):
    folder, _ = model_dir
    args = ("--checkpoint", folder, "--prompt", "hello", "--max_new_tokens", "2")
    quiet = run_chat(*args)
    assert quiet.returncode == 0 and quiet.stderr == ""  # TF, XLA, absl, Orbax, t5: nothing
    verbose = run_chat(*args, "--verbose")
    assert verbose.returncode == 0 and "CheckpointManagerOptions" in verbose.stderr
    assert verbose.stdout == quiet.stdout


@pytest.mark.parametrize(
    "requested, prompt_length, budget",
    [
        (None, 100, 284),  # what the context of 384 leaves
        (None, 380, 96),  # at least a quarter of it (the prompt's start is cut)
        (64, 380, 64),  # a request that fits is kept
        (384, 10, 374),  # one the context can never hold is cut
        (256, 200, 256),
    ],
)
def test_reply_budget(requested, prompt_length, budget):
    assert chat.reply_budget(requested, prompt_length, 384) == budget


def test_a_max_new_tokens_the_context_cannot_hold_is_cut_and_said(model_dir, capsys):
    folder, _ = model_dir
    assert (
        chat.main(
            [
                "--checkpoint",
                folder,
                "--prompt",
                "hello",
                "--max_new_tokens",
                str(CHAT_CONFIG.max_position_embeddings),
            ]
        )
        == 0
    )
    err = capsys.readouterr().err
    assert "--max_new_tokens=384 does not fit the model's context of 384 tokens" in err


def test_dtype_flag_replaces_the_checkpoints_compute_dtype(model_dir, capsys):
    folder, _ = model_dir
    assert CHAT_CONFIG.dtype == "float32"
    talk = chat.Chat(folder, dtype="float16")
    assert talk.config.dtype == talk.decoder.config.dtype == "float16"
    assert talk.params["embed"]["embedding"].dtype == jnp.float32  # stored weights unchanged
    assert (
        chat.main(
            [
                "--checkpoint",
                folder,
                "--prompt",
                "hi",
                "--max_new_tokens",
                "2",
                "--dtype",
                "bfloat16",
            ]
        )
        == 0
    )
    with pytest.raises(SystemExit):
        chat.main(["--checkpoint", folder, "--dtype", "int8"])
    assert "--dtype: invalid choice: 'int8'" in capsys.readouterr().err
