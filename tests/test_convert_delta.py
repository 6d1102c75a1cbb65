"""MT-LLaMA deltas: make then apply is bitwise, fp16 arithmetic, the [PAD] row rule, bad deltas."""

import json
import os

import numpy as np
import pytest
import torch
from helpers import assert_bitwise, convert, make_hf, read_all, train_bpe_spm
from safetensors.numpy import save_file

from mtllama_jax.convert import delta, manifest

F16 = np.float16


def write_hf(folder, tensors, like, tokenizer_from, **config_changes):
    """An HF folder of `tensors` with `like`'s config.json (changed) and tokenizer."""
    os.makedirs(folder)
    with open(os.path.join(like, "config.json")) as f:
        config = json.load(f)
    config.update(config_changes)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    save_file(tensors, os.path.join(folder, "model.safetensors"))
    for name in ("tokenizer.model", "added_tokens.json"):
        src = os.path.join(tokenizer_from, name)
        if os.path.exists(src):
            with open(src, "rb") as a, open(os.path.join(folder, name), "wb") as b:
                b.write(a.read())
    return str(folder)


def fine_tune(base, rng, *, reachable):
    """Target tensors: base + noise, one more vocabulary row ([PAD]), stored as fp32.

    `reachable`: the target is itself base16 + an fp16 delta (as a delta's user gets),
    so an fp16 delta that reproduces it exists for every element.
    """
    target = {}
    for name, w in read_all(base).items():
        noise = rng.normal(0, 1e-3, w.shape).astype(F16 if reachable else w.dtype)
        t = (w.astype(F16) + noise if reachable else w + noise).astype(np.float32)
        if name in delta.VOCAB_ROWS:
            t = np.concatenate([t, rng.normal(0, 0.02, (1, w.shape[1])).astype(F16)])
        target[name] = t.astype(np.float32)
    return target


@pytest.fixture
def base_and_target(tmp_path, tokenizer_model):
    """A 32000-token fp32 base and its fine-tuned 32001-token ([PAD]) target."""
    base = make_hf(tmp_path / "base", tokenizer_model, seed=10)
    (tmp_path / "base" / "added_tokens.json").write_text(json.dumps({"[PAD]": 32000}))
    target = fine_tune(base, np.random.default_rng(1), reachable=True)
    target = write_hf(tmp_path / "target", target, base, base, vocab_size=32001, pad_token_id=32000)
    os.remove(tmp_path / "base" / "added_tokens.json")
    return base, target


def test_make_then_apply_gives_the_fp16_target_bitwise(tmp_path, base_and_target):
    base, target = base_and_target
    convert("make-delta", "--base", base, "--target", target, "--out", tmp_path / "delta")
    deltas = read_all(tmp_path / "delta")
    assert {a.dtype for a in deltas.values()} == {np.dtype(F16)}
    assert os.path.exists(tmp_path / "delta" / "added_tokens.json")  # tokenizer of the target
    t16 = {n: a.astype(F16) for n, a in read_all(target).items()}
    # The [PAD] rule: the base's new row is zero, so the delta's row is the target's.
    for name in delta.VOCAB_ROWS:
        assert deltas[name].shape == (32001, 32)
        assert deltas[name][32000].tobytes() == t16[name][32000].tobytes()
    convert(
        "apply-delta",
        "--base",
        base,
        "--delta",
        tmp_path / "delta",
        "--out",
        tmp_path / "applied",
        "--max-shard-size",
        "100KB",
        "--check",
    )
    assert_bitwise(read_all(tmp_path / "applied"), t16)
    config = json.loads((tmp_path / "applied" / "config.json").read_text())
    assert (config["vocab_size"], config["torch_dtype"]) == (32001, "float16")
    convert("verify", tmp_path / "applied")


def test_unreachable_elements_are_counted_and_off_by_at_most_an_ulp(
    tmp_path, base_and_target, capsys
):
    """Not every fp32 target has an fp16 delta: base16 + d lies on base16's grid when
    |target| << |base|. make-delta reports exactly the elements it cannot reproduce."""
    base, reachable = base_and_target
    target = write_hf(
        tmp_path / "noisy",
        fine_tune(base, np.random.default_rng(3), reachable=False),
        reachable,
        reachable,
    )
    delta.make_delta(base, target, tmp_path / "delta")
    reported = sum(
        int(line.split()[1])
        for line in capsys.readouterr().err.splitlines()
        if line.startswith("make-delta:")
    )
    delta.apply_delta(base, tmp_path / "delta", tmp_path / "applied")
    applied, wanted = read_all(tmp_path / "applied"), read_all(target)
    base16 = {
        n: np.pad(w.astype(F16), ((0, wanted[n].shape[0] - w.shape[0]),) + ((0, 0),) * (w.ndim - 1))
        for n, w in read_all(base).items()
    }
    differ = 0
    for name, a in applied.items():
        t16 = wanted[name].astype(F16)
        wrong = a.view(np.uint16) != t16.view(np.uint16)
        differ += int(wrong.sum())
        ulp = np.spacing(np.maximum(np.abs(base16[name][wrong]), np.abs(t16[wrong])))
        assert np.all(np.abs(a[wrong].astype(np.float32) - t16[wrong]) <= ulp), name
    assert 0 < differ == reported


def test_apply_delta_is_fp16_arithmetic_as_fastchat(tmp_path, base_and_target, tokenizer_model):
    base, target = base_and_target
    rng = np.random.default_rng(2)
    deltas = {n: rng.normal(0, 0.05, a.shape).astype(F16) for n, a in read_all(target).items()}
    delta_dir = write_hf(tmp_path / "delta", deltas, target, target)
    delta.apply_delta(base, delta_dir, tmp_path / "out")
    out = read_all(tmp_path / "out")
    for name, b in read_all(base).items():
        # FastChat: fp16 model, embeddings resized with zero rows, then param.data += delta.
        resized = torch.zeros(deltas[name].shape, dtype=torch.float16)
        resized[: b.shape[0]] = torch.from_numpy(b).half()
        resized += torch.from_numpy(deltas[name])
        assert out[name].tobytes() == resized.numpy().tobytes(), name
        padded = np.zeros(deltas[name].shape, F16)
        padded[: b.shape[0]] = b.astype(F16)
        assert out[name].tobytes() == (padded + deltas[name]).tobytes(), name


def test_bad_deltas_are_refused_naming_what_differs(
    tmp_path, base_and_target, tokenizer_model, capsys
):
    base, target = base_and_target
    other = make_hf(tmp_path / "wide", tokenizer_model, hidden_size=48, vocab_size=32001)
    with pytest.raises(
        ValueError,
        match=r"different architectures \(hidden_size: base 32, "
        r"delta 48; head_dim: base 8, delta 12\)",
    ):
        delta.apply_delta(base, other, tmp_path / "out")
    weights = read_all(target)
    two = {
        n: (np.concatenate([w, w[:1]]) if n in delta.VOCAB_ROWS else w) for n, w in weights.items()
    }
    two_dir = write_hf(tmp_path / "two", two, target, target, vocab_size=32002)
    with pytest.raises(
        ValueError,
        match=r"vocab_size 32002 but base .* has 32000: only the "
        r"same vocabulary or one added token",
    ):
        delta.apply_delta(base, two_dir, tmp_path / "out")
    lacking = {n: w for n, w in weights.items() if n != "model.layers.0.self_attn.v_proj.weight"}
    lacking_dir = write_hf(tmp_path / "lacking", lacking, target, target)
    with pytest.raises(ValueError, match=r"missing tensor\(s\) \['model.layers.0.self_attn.v_"):
        delta.apply_delta(base, lacking_dir, tmp_path / "out")
    st = os.path.join(target, "model.safetensors")
    with open(st, "r+b") as f:
        f.truncate(os.path.getsize(st) // 2)
    with pytest.raises(SystemExit):
        convert("apply-delta", "--base", base, "--delta", target, "--out", tmp_path / "out")
    assert "is not a complete safetensors file" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    with pytest.raises(FileNotFoundError, match="manifest.json is missing"):
        manifest.check(base)


def fastchat_02_tokenizer(folder, spm_model):
    """What FastChat 0.2 saves under transformers 5: tokenizer.json (+ config), no .model.

    Its make_delta saves the tokenizer through transformers, which writes only the
    `tokenizers` files; MT-LLaMA's [PAD] is added as its training script does.
    """
    import transformers

    source = folder.parent / f"{folder.name}-source"
    source.mkdir()
    with open(spm_model, "rb") as src:
        (source / "tokenizer.model").write_bytes(src.read())
    tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    for name in ("tokenizer.model", "special_tokens_map.json", "added_tokens.json", manifest.NAME):
        if (folder / name).exists():
            os.remove(folder / name)
    tokenizer.save_pretrained(folder)
    assert not (folder / "tokenizer.model").exists() and (folder / "tokenizer.json").exists()


def test_a_fastchat_02_delta_with_tokenizer_json_only_applies(tmp_path, base_and_target, capsys):
    base, target = base_and_target
    convert("make-delta", "--base", base, "--target", target, "--out", tmp_path / "delta")
    fastchat_02_tokenizer(tmp_path / "delta", os.path.join(base, "tokenizer.model"))
    capsys.readouterr()
    convert(
        "apply-delta", "--base", base, "--delta", tmp_path / "delta", "--out", tmp_path / "applied"
    )
    err = capsys.readouterr().err
    assert "has no tokenizer.model (tokenizer.json only" in err and "plus [PAD] 64" in err
    applied = tmp_path / "applied"
    assert_bitwise(read_all(applied), {n: a.astype(F16) for n, a in read_all(target).items()})
    with open(os.path.join(base, "tokenizer.model"), "rb") as f:
        assert (applied / "tokenizer.model").read_bytes() == f.read()  # taken from the base
    assert (applied / "tokenizer.json").read_bytes() == (
        tmp_path / "delta" / "tokenizer.json"
    ).read_bytes()
    convert("verify", applied)


def test_a_tokenizer_json_of_another_vocabulary_is_refused(tmp_path, base_and_target, capsys):

    base, target = base_and_target
    convert("make-delta", "--base", base, "--target", target, "--out", tmp_path / "delta")
    lines = [f"river stone cloud {i} lorem ipsum" for i in range(200)]
    other = train_bpe_spm(lines, tmp_path / "other", 64)
    fastchat_02_tokenizer(tmp_path / "delta", other)
    with pytest.raises(SystemExit):
        convert(
            "apply-delta",
            "--base",
            base,
            "--delta",
            tmp_path / "delta",
            "--out",
            tmp_path / "applied",
        )
    err = capsys.readouterr().err
    assert "has no tokenizer.model and its tokenizer.json is not the base's vocabulary" in err
    assert "copy the tokenizer.model the delta was made with" in err
    assert not (tmp_path / "applied").exists()
