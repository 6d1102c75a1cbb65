"""mtllama-convert on a user's mistakes: other architectures, damaged inputs, unwritable outputs."""

import json
import os
import subprocess

import pytest
import torch
from helpers import make_hf
from safetensors.torch import load_file

from mtllama_jax.convert import delta
from mtllama_jax.main import convert_cli


def convert_fails(capsys, *argv) -> str:
    """Runs mtllama-convert expecting exit code 2; returns its stderr."""
    with pytest.raises(SystemExit) as exit_:
        convert_cli.main([str(a) for a in argv])
    assert exit_.value.code == 2
    return capsys.readouterr().err


def test_a_base_of_another_depth_than_the_delta_is_refused_both_ways(tmp_path, tokenizer_model):
    deep = make_hf(tmp_path / "deep", tokenizer_model, num_hidden_layers=3)
    shallow = make_hf(tmp_path / "shallow", tokenizer_model, num_hidden_layers=2)
    with pytest.raises(
        ValueError,
        match=r"different architectures \(num_layers: base 3, "
        r"delta 2\)",
    ):
        delta.apply_delta(deep, shallow, tmp_path / "out")
    with pytest.raises(ValueError, match=r"num_layers: base 3, target 2"):
        delta.make_delta(deep, shallow, tmp_path / "out")
    with pytest.raises(ValueError, match=r"num_layers: base 2, delta 3"):
        delta.apply_delta(shallow, deep, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_legacy_bin_converts_and_a_truncated_one_is_named(tmp_path, tokenizer_model, capsys):
    hf = make_hf(tmp_path / "hf", tokenizer_model)
    weights = load_file(os.path.join(hf, "model.safetensors"))
    os.remove(os.path.join(hf, "model.safetensors"))
    legacy = os.path.join(hf, "pytorch_model.bin")
    torch.save(weights, legacy, _use_new_zipfile_serialization=False)  # torch < 1.6 format
    convert_cli.main(["hf-to-jax", "--hf", hf, "--out", str(tmp_path / "ckpt")])
    assert os.path.isdir(tmp_path / "ckpt" / "params")
    with open(legacy, "r+b") as f:
        f.truncate(os.path.getsize(legacy) // 2)
    err = convert_fails(capsys, "hf-to-jax", "--hf", hf, "--out", tmp_path / "again")
    assert "pytorch_model.bin cannot be read as a PyTorch weights file" in err
    assert "truncated or damaged" in err and "Traceback" not in err


def test_an_unwritable_out_is_refused_before_the_model_is_read(tmp_path, tokenizer_model, capsys):
    hf = make_hf(tmp_path / "hf", tokenizer_model)
    with open(os.path.join(hf, "model.safetensors"), "r+b") as f:
        f.truncate(100)  # reading it would fail: the output's check must come first
    (tmp_path / "file").write_text("")
    err = convert_fails(capsys, "hf-to-jax", "--hf", hf, "--out", tmp_path / "file" / "ckpt")
    assert f"{tmp_path / 'file'} is a file, not a folder" in err


def test_hf_to_jax_without_tokenizer_model_is_refused_unless_asked(
    tmp_path, tokenizer_model, capsys
):
    hf = make_hf(tmp_path / "hf", tokenizer_model)
    os.remove(os.path.join(hf, "tokenizer.model"))
    err = convert_fails(capsys, "hf-to-jax", "--hf", hf, "--out", tmp_path / "ckpt")
    assert "has no tokenizer.model" in err and "--no-tokenizer" in err
    convert_cli.main(["hf-to-jax", "--hf", hf, "--out", str(tmp_path / "ckpt"), "--no-tokenizer"])
    assert "warning" in capsys.readouterr().err and os.path.isdir(tmp_path / "ckpt" / "params")


def test_jax_to_hf_verifies_its_input_manifest_unless_no_check(tmp_path, tokenizer_model, capsys):
    hf = make_hf(tmp_path / "hf", tokenizer_model)
    convert_cli.main(["hf-to-jax", "--hf", hf, "--out", str(tmp_path / "ckpt")])
    config = tmp_path / "ckpt" / "config.json"
    config.write_text(json.dumps(dict(json.loads(config.read_text()), rms_norm_eps=1e-3)))
    err = convert_fails(
        capsys, "jax-to-hf", "--ckpt", tmp_path / "ckpt", "--out", tmp_path / "back"
    )
    assert "does not match its manifest.json" in err and "config.json: sha256 differs" in err
    assert not (tmp_path / "back").exists()
    convert_cli.main(
        [
            "jax-to-hf",
            "--ckpt",
            str(tmp_path / "ckpt"),
            "--out",
            str(tmp_path / "back"),
            "--no-check",
        ]
    )
    assert os.path.exists(tmp_path / "back" / "model.safetensors")


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_a_full_disk_ends_in_one_message_and_leaves_nothing_behind(
    tmp_path, tokenizer_model, capsys
):
    hf = make_hf(tmp_path / "hf", tokenizer_model)  # about 8.5 MB of float32 weights
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(small)]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        err = convert_fails(capsys, "hf-to-jax", "--hf", hf, "--out", small / "ckpt")
        last = err.strip().splitlines()[-1]
        assert last.startswith("mtllama-convert hf-to-jax: error: the disk is full"), err
        assert "No space left on device" in last
        assert os.listdir(small) == []  # no .ckpt.partial left
    finally:
        subprocess.run(["umount", "-l", str(small)], check=True)
