"""lm-evaluation-harness 0.4's model `mtllama_jax`: this project's sharded scoring and decoding.

    mtllama-lm-eval --model mtllama_jax --model_args checkpoint=/ckpt/run1 --tasks lamini

`MtllamaLM` implements `loglikelihood` (with is_greedy), `loglikelihood_rolling`
and `generate_until` on `decoding.Decoder` (one forward pass per batch of
pairs; the KV-cache decoder with stop strings), on any mesh. It reproduces
lm-eval's own Hugging Face model (`--model hf`) request by request:

* tokens: the checkpoint's SentencePiece `tokenizer.model`, BOS prepended
  as a LLaMA tokenizer does (`add_bos_token`, default from the folder's
  tokenizer_config.json, else True); lm-eval's context/continuation split and
  its BOS prefix for empty contexts (`TemplateLM`);
* long requests cut from the left as HFLM does: a scored pair keeps its last
  window + 1 tokens (`Decoder.loglikelihoods`), a prompt its last
  window - max_gen_toks; rolling log-likelihood uses lm-eval's own windows;
* generation stops at EOS, or at any `until` string (EOS's text included),
  found in the decoded text, so a stop string may span tokens.

Requests are sorted by length and run in batches of `batch_size` rows (a last
short batch padded to a power of two) and the decoder's length buckets, so few
shapes compile. An empty continuation scores 0.0 and counts as greedy (HFLM
refuses it).

It opens a training MODEL_DIR (latest step, or `step`), a converted checkpoint
folder, or a Hugging Face LLaMA folder (converted in memory).
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any

import jax
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
from tqdm import tqdm

from mtllama_jax import checkpoint_folder, decoding, partitioning

log = logging.getLogger(__name__)

NAME = "mtllama_jax"
# --model_args keys and what they do (lm-eval adds batch_size, max_batch_size, device).
MODEL_ARGS = {
    "checkpoint": "MODEL_DIR, converted checkpoint folder, or Hugging Face LLaMA folder",
    "step": "training step of a MODEL_DIR (default: the latest)",
    "dtype": "compute dtype: float32, bfloat16 or float16 (default: the checkpoint's)",
    "mesh": "DATAxFSDPxTENSOR device counts, one may be -1 (default 1x1x1: one device)",
    "rules": "logical axis rules: data, fsdp or fsdp_tp (default data)",
    "batch_size": "rows per forward pass or generation batch (default 16; 'auto' is 16)",
    "max_length": "window in tokens (default: the model's max_position_embeddings)",
    "max_gen_toks": "new tokens when a task sets none (default 256, as HFLM)",
    "add_bos_token": "prepend BOS to encoded text (default: tokenizer_config.json, else True)",
    "length_bucket": "pad lengths to multiples of this, to bound compiles (default 64)",
    "seed": "PRNG seed of sampled generation (default 0)",
    "max_batch_size": "accepted from lm-eval's CLI and ignored",
    "device": "accepted from lm-eval's CLI and ignored: JAX places work on the mesh",
}
SAMPLING_KEYS = ("do_sample", "temperature", "top_k", "top_p")


def open_model(path: str, layout: partitioning.Layout, step: int | None = None):
    """(model, params on the layout's mesh, tokenizer.model path) of any folder that holds one."""
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"--model_args checkpoint={path}: no such folder; " + _expected(path)
        )
    if checkpoint_folder.is_model_dir(path) or os.path.isdir(
        os.path.join(path, checkpoint_folder.PARAMS)
    ):
        return checkpoint_folder.open_checkpoint(path, layout, step)
    weights = [
        n
        for n in os.listdir(path)
        if n.endswith(".safetensors") or (n.startswith("pytorch_model") and n.endswith(".bin"))
    ]
    if not weights or not os.path.exists(os.path.join(path, checkpoint_folder.CONFIG)):
        raise FileNotFoundError(
            f"--model_args checkpoint={path} does not hold a model: " + _expected(path)
        )
    from mtllama_jax import models
    from mtllama_jax.convert import hf_files, hf_params

    config = models.config_from_hf(path, cpu_forms=jax.default_backend() == "cpu")
    tokenizer = checkpoint_folder.tokenizer_path(path)
    hf = hf_files.HFWeights(path)
    tensors = {name: hf.get(name) for name in hf.names()}
    params = hf_params.hf_to_params(tensors, config, path)
    del tensors
    model = models.build_module(config.replace(param_dtype=str(params["embed"]["embedding"].dtype)))
    params = jax.device_put(params, layout.param_shardings(partitioning.abstract_params(model)))
    return model, params, tokenizer


def _expected(path: str) -> str:
    return (
        "expected a training MODEL_DIR (config.json, tokenizer.model, "
        "checkpoints/<step>/params), a checkpoint folder (config.json, tokenizer.model, "
        "params/; `mtllama-convert hf-to-jax` writes one) or a Hugging Face LLaMA folder "
        f"(config.json, *.safetensors or pytorch_model*.bin, tokenizer.model); {path} "
        f"holds {sorted(os.listdir(path))[:8] if os.path.isdir(path) else 'nothing'}"
    )


def _parse_mesh(mesh) -> tuple[int, int, int]:
    if isinstance(mesh, str):
        parts = mesh.lower().replace(",", "x").split("x")
    else:
        parts = list(mesh) if isinstance(mesh, (list, tuple)) else [mesh]
    try:
        sizes = tuple(int(p) for p in parts)
    except ValueError:
        sizes = ()
    if len(sizes) != 3:
        raise ValueError(f"--model_args mesh={mesh!r}: give DATAxFSDPxTENSOR, e.g. 1x-1x1")
    return sizes


def _bos_default(folder: str) -> bool:
    path = os.path.join(folder, "tokenizer_config.json")
    if os.path.exists(path):
        with open(path) as f:
            return bool(json.load(f).get("add_bos_token", True))
    return True


@register_model(NAME)
class MtllamaLM(TemplateLM):
    """lm-eval model over a checkpoint of this project (see the module doc)."""

    def __init__(self, **model_args: Any):
        unknown = sorted(set(model_args) - set(MODEL_ARGS))
        if unknown:
            valid = "\n".join(f"  {k}: {v}" for k, v in MODEL_ARGS.items())
            raise ValueError(
                f"--model_args: unknown key(s) {unknown} for --model {NAME}; valid keys:\n{valid}"
            )
        if "checkpoint" not in model_args:
            raise ValueError(f"--model_args checkpoint=... is required: {MODEL_ARGS['checkpoint']}")
        super().__init__()
        import sentencepiece as spm

        args = dict(model_args)
        sizes = _parse_mesh(args.get("mesh", "1x1x1"))
        devices = jax.devices() if -1 in sizes else jax.devices()[: math.prod(sizes)]
        layout = partitioning.Layout.create(
            *sizes, rules=args.get("rules", "data"), devices=devices
        )
        path = str(args["checkpoint"])
        model, self.params, tokenizer = open_model(path, layout, args.get("step"))
        config = model.config
        if args.get("dtype"):
            config = config.replace(dtype=str(args["dtype"]))
        if args.get("max_length"):
            config = config.replace(max_position_embeddings=int(args["max_length"]))
        self.config = config
        self.decoder = decoding.Decoder(
            model.clone(config=config), layout, length_bucket=int(args.get("length_bucket", 64))
        )
        self.sp = spm.SentencePieceProcessor(model_file=tokenizer)
        add_bos = args.get("add_bos_token")
        self.add_bos_token = _bos_default(path) if add_bos is None else bool(add_bos)
        batch = args.get("batch_size", 16)
        self.batch_size = 16 if str(batch).startswith("auto") else int(batch)
        if self.batch_size < 1:
            raise ValueError(f"--batch_size {batch}: must be >= 1")
        self._max_gen_toks = int(args.get("max_gen_toks", 256))
        self.seed = int(args.get("seed", 0))

    # ---- what TemplateLM asks for ------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.config.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        return self.config.bos_token_id

    @property
    def max_length(self) -> int:
        return self.config.max_position_embeddings

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs):
        """Token ids as lm-eval's HF model gets them: BOS first (unless told not), then text."""
        bos_text = self.sp.id_to_piece(self.prefix_token_id)
        if add_special_tokens is None and string.startswith(bos_text):
            return [self.prefix_token_id] + self.sp.encode(string[len(bos_text) :])
        bos = self.add_bos_token if add_special_tokens is None else add_special_tokens
        return ([self.prefix_token_id] if bos else []) + self.sp.encode(string)

    def tok_decode(self, tokens) -> str:
        return self.sp.decode([int(t) for t in tokens])

    # ---- requests ----------------------------------------------------------------------

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(log p, is_greedy) per (context, continuation); an empty continuation is (0.0, True)."""
        scored = [i for i, req in enumerate(requests) if req.args[1] != ""]
        results = [(0.0, True)] * len(requests)
        for i, result in zip(
            scored, super().loglikelihood([requests[i] for i in scored], disable_tqdm)
        ):
            results[i] = result
        return results

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        """(log p, is_greedy) of (key, context ids, continuation ids) triples, in order."""
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        todo = []
        for i, (_, ctx, cont) in enumerate(requests):
            if cont:
                todo.append(i)
            else:  # nothing to predict: log 1, trivially greedy
                results[i] = (0.0, True)
        todo.sort(key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
        truncated = 0
        for chunk in tqdm(list(self._chunks(todo)), desc="loglikelihood", disable=disable_tqdm):
            rows = chunk + [chunk[-1]] * (self._rows(len(chunk)) - len(chunk))
            sums, greedy, cut = self.decoder.loglikelihoods(
                self.params, [requests[i][1] for i in rows], [requests[i][2] for i in rows]
            )
            for k, i in enumerate(chunk):
                results[i] = (float(sums[k]), bool(greedy[k]))
                if requests[i][0] is not None:  # rolling windows are cached per text
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], results[i])
            truncated += int(cut[: len(chunk)].sum())
        if truncated:
            log.warning(
                "%d of %d requests were longer than the window of %d tokens: cut from "
                "the left, as lm-eval's HF model cuts them",
                truncated,
                len(requests),
                self.max_length,
            )
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Summed log p of each whole text, in lm-eval's disjoint windows of the context."""
        windows, owners = [], []
        for r, (string,) in enumerate(req.args for req in requests):
            for ctx, cont in map(
                lm_utils.make_disjoint_window,
                lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            ):
                windows.append((None, ctx, cont))
                owners.append(r)
        totals = [0.0] * len(requests)
        for r, (ll, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm)):
            totals[r] += ll
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy or sampled text after each context, cut at its `until` strings."""
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        out: list[str | None] = [None] * len(requests)
        eos_text = self.sp.id_to_piece(self.eot_token_id)
        progress = tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm)
        for indices in groups.values():
            kwargs = normalize_gen_kwargs(dict(requests[indices[0]].args[1]), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            max_new = int(kwargs.pop("max_gen_toks"))
            sampling = _sampling(kwargs)
            encoded = {i: self.tok_encode(requests[i].args[0]) for i in indices}
            indices.sort(key=lambda i: -len(encoded[i]))
            for n, chunk in enumerate(self._chunks(indices)):
                rows = chunk + [chunk[-1]] * (self._rows(len(chunk)) - len(chunk))
                gens = self.decoder.generate(
                    self.params,
                    [encoded[i] for i in rows],
                    max_new_tokens=max_new,
                    sampling=sampling,
                    stop_token_ids=[self.eot_token_id],
                    stop_strings=until,
                    detokenize=self.tok_decode,
                    rng=jax.random.fold_in(jax.random.key(self.seed), n),
                )
                for i, gen in zip(chunk, gens):
                    out[i] = gen.text
                    self.cache_hook.add_partial("generate_until", requests[i].args, gen.text)
                progress.update(len(chunk))
        progress.close()
        return out

    def _chunks(self, items):
        for start in range(0, len(items), self.batch_size):
            yield items[start : start + self.batch_size]

    def _rows(self, n: int) -> int:
        """Rows to pad a chunk of n to: a power of two, or the batch size (few shapes)."""
        return min(self.batch_size, 1 << (n - 1).bit_length())


def _sampling(kwargs: dict) -> decoding.Sampling:
    """decoding.Sampling of lm-eval's normalised gen_kwargs (greedy unless do_sample)."""
    unknown = sorted(set(kwargs) - set(SAMPLING_KEYS))
    if unknown:
        raise ValueError(
            f"gen_kwargs {unknown} are not supported by --model {NAME}; it takes "
            f"until, max_gen_toks and {', '.join(SAMPLING_KEYS)}"
        )
    if not kwargs.get("do_sample"):
        return decoding.Sampling()
    return decoding.Sampling(
        temperature=float(kwargs.get("temperature") or 1.0),
        top_k=int(kwargs.get("top_k") or 0),
        top_p=float(kwargs.get("top_p") or 1.0),
    )
