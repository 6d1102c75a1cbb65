"""MT-LLaMA weight deltas (FastChat semantics), streamed tensor by tensor.

The arithmetic, element by element, in IEEE fp16 as the published delta:

* Both operands are first rounded to fp16 (round to nearest even).
* The base is resized to the delta's vocabulary: when the delta has one row
  more (LLaMA's 32000 -> 32001 for `[PAD]`), the new row of
  `model.embed_tokens.weight` and of `lm_head.weight` is zero. Any other
  vocabulary difference is refused.
* apply-delta: `target = fp16(base16 + delta16)`, the correctly rounded sum
  (what `param.data += delta` gives on fp16 torch tensors).
* make-delta: `delta = fp16(target16 - base16)`; where that difference would
  not give the target back under apply-delta's rounding, the nearest fp16
  value (up to 2 ulps away) that does is stored instead, so apply(make) gives
  the fp16 target bitwise. Some elements have no such delta (base16 + d lies
  on base16's grid, too coarse when |target| << |base|); they keep the plain
  difference (off by at most one ulp) and are counted on stderr.

config.json and the tokenizer come from the delta (apply) or the target (make).
A delta saved by FastChat 0.2 under transformers 5 has `tokenizer.json` but no
`tokenizer.model`; the base's `tokenizer.model` is then taken, when its pieces
are the tokenizer.json's, id for id, up to an added `[PAD]` right after them
(said on stderr), and any other vocabulary is refused.

FastChat versions: 0.1.x's `apply_delta` resizes the base to the delta's
vocabulary as MT-LLaMA's 32001-row delta needs, and this tool does the same;
0.2.x has no `[PAD]` resize, so it cannot apply MT-LLaMA's delta at all, but
its deltas of same-vocabulary models (and their tokenizer.json-only folders)
apply here.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import numpy as np
import sentencepiece as spm

from mtllama_jax import checkpoint_folder, models
from mtllama_jax.convert import hf_files, hf_params, manifest, orbax_hf

VOCAB_ROWS = ("model.embed_tokens.weight", "lm_head.weight")
F16 = np.dtype(np.float16)


def apply_delta(base, delta, out, *, max_shard_size="5GB", overwrite=False) -> None:
    """Writes `base + delta` (fp16) as an HF folder with the delta's config and tokenizer."""
    _stream(base, delta, out, _add, max_shard_size, overwrite, role="delta")


def make_delta(base, target, out, *, max_shard_size="5GB", overwrite=False) -> None:
    """Writes `target - base` (fp16) as an HF folder with the target's config and tokenizer."""
    _stream(base, target, out, _subtract, max_shard_size, overwrite, role="target")


def _add(base16: np.ndarray, delta16: np.ndarray, name: str) -> np.ndarray:
    return np.add(base16, delta16, out=base16)


def _subtract(base16: np.ndarray, target16: np.ndarray, name: str) -> np.ndarray:
    delta = target16 - base16
    bad = np.flatnonzero(_bits(base16 + delta) != _bits(target16))
    if bad.size:
        b, t, d = base16.ravel()[bad], target16.ravel()[bad], delta.ravel()[bad]
        fixed = np.zeros(bad.size, bool)
        for steps, direction in ((1, np.inf), (1, -np.inf), (2, np.inf), (2, -np.inf)):
            cand = d.copy()
            for _ in range(steps):
                cand = np.nextafter(cand, np.array(direction, F16))
            ok = ~fixed & (_bits(b + cand) == _bits(t))
            d[ok], fixed = cand[ok], fixed | ok
        delta.ravel()[bad] = d
        if not fixed.all():
            print(
                f"make-delta: {int((~fixed).sum())} element(s) of {name} cannot be "
                "reproduced exactly in fp16 (base + delta rounds elsewhere); the plain "
                "difference is kept",
                file=sys.stderr,
            )
    return delta


def _bits(a: np.ndarray) -> np.ndarray:
    return a.view(np.uint16)


def _stream(base, other, out, op, max_shard_size, overwrite, role: str) -> None:
    """out = op(base16 resized, other16) tensor by tensor, with `other`'s config and tokenizer."""
    base, other = os.fspath(base), os.fspath(other)
    checkpoint_folder.check_writable(out, overwrite=overwrite)
    base_config, config = models.config_from_hf(base), models.config_from_hf(other)
    base_tokenizer = _base_tokenizer_for(base, other, role)  # checked before any work
    _check_same_architecture(base, base_config, other, config, role)
    if config.vocab_size not in (base_config.vocab_size, base_config.vocab_size + 1):
        raise ValueError(
            f"{role} {other} has vocab_size {config.vocab_size} but base {base} has "
            f"{base_config.vocab_size}: only the same vocabulary or one added token "
            "([PAD], 32000 -> 32001) is supported; use the base model the delta was made from"
        )
    base_w, other_w = hf_files.HFWeights(base), hf_files.HFWeights(other)
    hf_params.check_hf_names(other_w.names(), config, other)
    hf_params.check_hf_names(base_w.names(), base_config, base)
    for t in hf_params.tensor_mappings(base_config):
        hf_params.check_hf_shape(t, base_w.shape(t.hf_name), base)
    mappings = hf_params.tensor_mappings(config)
    base_names = set(base_w.names())
    for t in mappings:
        hf_params.check_hf_shape(t, other_w.shape(t.hf_name), other)
        if t.hf_name not in base_names:
            raise ValueError(
                f"base {base} has no tensor {t.hf_name} (the {role} has); use "
                "the base model the delta was made from"
            )
        want = _resized(base_w.shape(t.hf_name), t.hf_name, config.vocab_size)
        if want != t.hf_shape:
            raise ValueError(
                f"tensor {t.hf_name}: {role} has shape {t.hf_shape}, base has "
                f"{base_w.shape(t.hf_name)}; the {role} is of another architecture or size "
                "than the base"
            )

    def tensors():
        for t in mappings:
            b = _to_vocab(base_w.get(t.hf_name).astype(F16), t.hf_name, config.vocab_size)
            yield t.hf_name, op(b, other_w.get(t.hf_name).astype(F16, copy=False), t.hf_name)

    specs = [(t.hf_name, t.hf_shape, F16) for t in mappings]
    with checkpoint_folder.staged(out, overwrite=overwrite) as tmp:
        hf_files.write_safetensors(tmp, specs, tensors(), hf_files.parse_size(max_shard_size))
        orbax_hf.write_hf_config(tmp, config.replace(param_dtype="float16"), "float16")
        orbax_hf.copy_tokenizer(other, tmp)
        if base_tokenizer:
            shutil.copyfile(base_tokenizer, os.path.join(tmp, checkpoint_folder.TOKENIZER))
        manifest.write(tmp)


def _base_tokenizer_for(base: str, other: str, role: str) -> str | None:
    """None when `other` has a tokenizer.model; the base's when it has an agreeing tokenizer.json.

    Raises naming the missing file, or the first piece where the vocabularies differ.
    """
    tokenizer_json = os.path.join(other, "tokenizer.json")
    if os.path.exists(os.path.join(other, checkpoint_folder.TOKENIZER)) or not os.path.exists(
        tokenizer_json
    ):
        checkpoint_folder.tokenizer_path(other)  # raises naming tokenizer.model when missing
        return None
    taken = checkpoint_folder.tokenizer_path(base)
    processor = spm.SentencePieceProcessor(model_file=taken)
    pieces = [processor.id_to_piece(i) for i in range(processor.get_piece_size())]
    with open(tokenizer_json) as f:
        spec = json.load(f)
    ids = {i: piece for piece, i in spec.get("model", {}).get("vocab", {}).items()}
    ids.update({t["id"]: t["content"] for t in spec.get("added_tokens", [])})
    added = {i: piece for i, piece in ids.items() if i >= len(pieces)}
    differ = [i for i, piece in enumerate(pieces) if ids.get(i) != piece]
    if differ or added not in ({}, {len(pieces): "[PAD]"}):
        what = (
            f"id {differ[0]} is {ids.get(differ[0])!r} there but {pieces[differ[0]]!r} in the base"
            if differ
            else f"it adds {sorted(added.items())[:3]} after the base's {len(pieces)} pieces"
        )
        raise ValueError(
            f"{role} {other} has no {checkpoint_folder.TOKENIZER} and its tokenizer.json is not "
            f"the base's vocabulary ({what}); copy the tokenizer.model the {role} was made with "
            f"into {other}"
        )
    extra = f", plus [PAD] {len(pieces)}" if added else ""
    print(
        f"{role} {other} has no {checkpoint_folder.TOKENIZER} (tokenizer.json only, as "
        f"FastChat 0.2 saves under transformers 5): took {taken}, whose {len(pieces)} pieces "
        f"are tokenizer.json's{extra}",
        file=sys.stderr,
    )
    return taken


# The config fields that fix the tensors' number and shapes (the vocabulary is checked apart).
_SHAPE_FIELDS = (
    "num_layers",
    "hidden_size",
    "intermediate_size",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "tie_word_embeddings",
)


def _check_same_architecture(base, base_config, other, config, role: str) -> None:
    """Refuses a base and delta/target that differ in any shape field, in either direction.

    Only the other's tensors are streamed, so a base deeper or wider than them
    would otherwise be silently cut.
    """
    differ = [
        f"{k}: base {getattr(base_config, k)!r}, {role} {getattr(config, k)!r}"
        for k in _SHAPE_FIELDS
        if getattr(base_config, k) != getattr(config, k)
    ]
    if differ:
        raise ValueError(
            f"base {base} and {role} {other} are different architectures ("
            + "; ".join(differ)
            + f"); use the base model the {role} was made from"
        )


def _resized(shape, name: str, vocab: int) -> tuple[int, ...]:
    if name in VOCAB_ROWS:
        return (vocab,) + tuple(shape[1:])
    return tuple(shape)


def _to_vocab(array: np.ndarray, name: str, vocab: int) -> np.ndarray:
    """The base tensor with zero rows appended up to `vocab` (the [PAD] rule)."""
    if name not in VOCAB_ROWS or array.shape[0] == vocab:
        return array
    padded = np.zeros((vocab,) + array.shape[1:], F16)
    padded[: array.shape[0]] = array
    return padded
