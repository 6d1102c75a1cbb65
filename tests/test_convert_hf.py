"""HF <-> Orbax conversion: bitwise round trips, transformers parity, MODEL_DIR, .bin, bad input."""

import os

import jax
import numpy as np
import pytest
import torch
import transformers
from helpers import assert_bitwise, convert, make_hf, read_all
from safetensors.torch import save_file

from mtllama_jax import checkpoint_folder, checkpoints
from mtllama_jax.convert import hf_files, hf_params, manifest
from mtllama_jax.models.llama.config import LlamaConfig
from mtllama_jax.models.llama.model import LlamaForCausalLM
from mtllama_jax.train_options import CheckpointPolicy
from mtllama_jax.train_state import TrainState


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_round_trip_is_bitwise(tmp_path, tokenizer_model, dtype):
    hf = make_hf(tmp_path / "hf", tokenizer_model, dtype=dtype, shard="300KB")
    assert os.path.exists(os.path.join(hf, "model.safetensors.index.json"))  # sharded input
    convert("hf-to-jax", "--hf", hf, "--out", tmp_path / "ckpt", "--check")
    config = checkpoint_folder.load_config(tmp_path / "ckpt")
    assert config.param_dtype == ("float32" if dtype == torch.float32 else "bfloat16")
    assert sorted(os.listdir(tmp_path / "ckpt")) == [
        "config.json",
        "manifest.json",
        "params",
        "special_tokens_map.json",
        "tokenizer.model",
    ]
    convert(
        "jax-to-hf",
        "--ckpt",
        tmp_path / "ckpt",
        "--out",
        tmp_path / "back",
        "--max-shard-size",
        "200KB",
        "--check",
    )
    back = str(tmp_path / "back")
    assert len([n for n in os.listdir(back) if n.endswith(".safetensors")]) > 1
    assert_bitwise(read_all(back), read_all(hf))
    for name in ("tokenizer.model", "special_tokens_map.json", "generation_config.json"):
        assert os.path.exists(os.path.join(back, name)), name
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no staging left


def test_exported_folder_loads_in_transformers_and_logits_match(tmp_path, tokenizer_model):
    hf = make_hf(tmp_path / "hf", tokenizer_model, seed=1)
    convert("hf-to-jax", "--hf", hf, "--out", tmp_path / "ckpt", "--mesh", "1,-1,1")
    convert("jax-to-hf", "--ckpt", tmp_path / "ckpt", "--out", tmp_path / "back")
    theirs = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "back").eval()
    assert theirs.dtype == torch.float32
    tokens = np.random.default_rng(0).integers(0, 32000, (2, 12))
    with torch.no_grad():
        expected = theirs(torch.tensor(tokens)).logits.numpy()
    config = checkpoint_folder.load_config(tmp_path / "ckpt").replace(dtype="float32")
    params = checkpoint_folder.load_params(tmp_path / "ckpt")
    ours = LlamaForCausalLM(config).apply({"params": params}, jax.numpy.asarray(tokens))
    np.testing.assert_allclose(np.asarray(ours), expected, atol=2e-5, rtol=1e-4)


def test_training_model_dir_exports_its_latest_step(tmp_path, tokenizer_model):
    hf = make_hf(tmp_path / "hf", tokenizer_model, seed=2)
    config = LlamaConfig.from_hf(hf)
    params = hf_params.hf_to_params(read_all(hf), config)
    model_dir = tmp_path / "run"
    ckpt = checkpoints.TrainCheckpoints(
        str(model_dir), CheckpointPolicy(every_steps=None, async_save=False)
    )
    state = TrainState(
        params=params,
        step=np.int32(7),
        opt_state={},
        rng=np.zeros(2, np.uint32),
        skipped=np.int32(0),
    )
    ckpt.save(1, state.replace(params=jax.tree.map(np.zeros_like, params)))
    ckpt.save(7, state)
    ckpt.close()
    checkpoints.write_model_dir_files(str(model_dir), config, [tokenizer_model])
    convert("jax-to-hf", "--ckpt", model_dir, "--out", tmp_path / "back")
    assert_bitwise(read_all(tmp_path / "back"), read_all(hf))


class _RunsCode:
    def __reduce__(self):
        return (os.mkdir, (os.environ["PWNED_DIR"],))


def test_bin_whose_pickle_would_run_code_is_refused(tmp_path, tokenizer_model, monkeypatch, capsys):
    hf = make_hf(tmp_path / "hf", tokenizer_model, seed=3)
    tensors = {n: torch.from_numpy(np.array(a)) for n, a in read_all(hf).items()}
    safe = tmp_path / "bin"
    safe.mkdir()
    for name in ("config.json", "tokenizer.model"):
        (safe / name).write_bytes((tmp_path / "hf" / name).read_bytes())
    torch.save(tensors, safe / "pytorch_model.bin")
    convert("hf-to-jax", "--hf", safe, "--out", tmp_path / "ok")  # plain tensors: accepted
    assert_bitwise(read_all(safe), read_all(hf))

    marker = tmp_path / "pwned"
    monkeypatch.setenv("PWNED_DIR", str(marker))
    torch.save({**tensors, "evil": _RunsCode()}, safe / "pytorch_model.bin")
    with pytest.raises(SystemExit) as exit_info:
        convert("hf-to-jax", "--hf", safe, "--out", tmp_path / "bad")
    assert exit_info.value.code == 2
    assert "pytorch_model.bin was refused" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "bad").exists()


def test_bad_inputs_name_the_file_and_the_fix(tmp_path, tokenizer_model, capsys):
    hf = make_hf(tmp_path / "hf", tokenizer_model, seed=4)
    weights = read_all(hf)
    convert("hf-to-jax", "--hf", hf, "--out", tmp_path / "ckpt")
    with pytest.raises(SystemExit):  # an existing output needs --overwrite
        convert("hf-to-jax", "--hf", hf, "--out", tmp_path / "ckpt")
    assert "already exists; pass --overwrite" in capsys.readouterr().err

    st = os.path.join(hf, "model.safetensors")
    missing = {
        n: torch.from_numpy(np.array(a))
        for n, a in weights.items()
        if n != "model.layers.1.mlp.up_proj.weight"
    }
    save_file(missing, st)
    with pytest.raises(ValueError, match=r"missing tensor\(s\) \['model.layers.1.mlp.up_proj"):
        hf_files_to_jax(hf, tmp_path / "x")
    save_file({n: torch.from_numpy(np.array(a)) for n, a in weights.items()}, st)
    with open(st, "r+b") as f:
        f.truncate(os.path.getsize(st) - 64)
    with pytest.raises(ValueError, match=r"model.safetensors is not a complete.*truncated"):
        hf_files_to_jax(hf, tmp_path / "x")
    os.remove(st)
    with pytest.raises(FileNotFoundError, match=r"holds no weights: expected model.safetensors"):
        hf_files_to_jax(hf, tmp_path / "x")
    assert not (tmp_path / "x").exists()
    with pytest.raises(ValueError, match=r"does not match its manifest.json:\n  params/"):
        victim = next(
            p
            for p in (tmp_path / "ckpt" / "params").rglob("*")
            if p.is_file() and p.stat().st_size > 100
        )
        victim.write_bytes(victim.read_bytes()[:-1] + b"\0")
        manifest.check(str(tmp_path / "ckpt"))


def hf_files_to_jax(hf, out):
    from mtllama_jax.convert import orbax_hf

    orbax_hf.hf_to_jax(hf, out)


def test_interrupted_conversion_leaves_no_half_written_folder(
    tmp_path, tokenizer_model, monkeypatch
):
    hf = make_hf(tmp_path / "hf", tokenizer_model, seed=5)
    convert("hf-to-jax", "--hf", hf, "--out", tmp_path / "ckpt")
    before = manifest.compute(str(tmp_path / "ckpt"))
    reads = []

    def interrupted(self, name):  # a Ctrl-C after a few tensors were written
        reads.append(name)
        if len(reads) == 6:
            raise KeyboardInterrupt
        return original(self, name)

    original = hf_files.HFWeights.get
    monkeypatch.setattr(hf_files.HFWeights, "get", interrupted)
    with pytest.raises(SystemExit) as exit_:
        convert("hf-to-jax", "--hf", hf, "--out", tmp_path / "ckpt", "--overwrite")
    assert exit_.value.code == 130 and len(reads) == 6  # "interrupted", as a shell reports it
    assert manifest.compute(str(tmp_path / "ckpt")) == before  # the old output is intact
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "hf"]


def test_vocab_size_appends_zero_rows_for_mtllama_pad(tmp_path, tokenizer_model, capsys):
    hf = make_hf(tmp_path / "hf", tokenizer_model, seed=2)
    convert("hf-to-jax", "--hf", hf, "--out", tmp_path / "ckpt", "--vocab-size", "32001")
    config = checkpoint_folder.load_config(tmp_path / "ckpt")
    params = checkpoint_folder.load_params(tmp_path / "ckpt")
    original = read_all(hf)
    embedding, head = (
        np.asarray(params["embed"]["embedding"]),
        np.asarray(params["lm_head"]["kernel"]),
    )
    assert config.vocab_size == 32001 and embedding.shape[0] == 32001 and head.shape[1] == 32001
    np.testing.assert_array_equal(embedding[:32000], original["model.embed_tokens.weight"])
    np.testing.assert_array_equal(head[:, :32000], original["lm_head.weight"].T)
    assert not embedding[32000].any() and not head[:, 32000].any()
    with pytest.raises(SystemExit):
        convert("hf-to-jax", "--hf", hf, "--out", tmp_path / "smaller", "--vocab-size", "100")
    assert "--vocab-size 100 is smaller" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "smaller")
