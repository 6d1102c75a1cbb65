"""Inference with a KV cache: batched generation and log-likelihood scoring.

`Decoder` compiles three functions for one model on one mesh, sharded by the
training rules (params by `partitioning.Layout.param_shardings`, the cache and every
[batch, length] array over `batch`), so a 7B model decodes on the mesh it trained on:

* prefill: the left-padded prompts in one call (pad slots are segment 0, real
  tokens segment 1, positions 0 at each row's first real token), sampling the
  first new token from the last slot;
* step: one token per row, appended at the cache index (the cache is donated,
  so a step writes in place and its cost does not grow with the tokens made);
* score: summed log-probabilities of continuations given contexts (rank
  classification), and whether each continuation is the greedy one, in one
  forward pass without a cache.

The host loop dispatches step i+1 before reading the token of step i, so the
device never waits on Python; it stops rows at stop token ids (EOS) or at stop
strings (newline, ...) found in the detokenised text, and streams text deltas.
Prompts longer than the context are cut from the left and counted; scoring cuts
as lm-evaluation-harness does (`(context + continuation)[-(window + 1):][:-1]`
is the input: the last token is only a target, so one more context token fits).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mtllama_jax import partitioning


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is drawn: temperature 0 is greedy; top_k 0 and top_p 1 are off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature}: must be >= 0 (0 is greedy)")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k}: must be >= 0 (0 turns it off)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p}: must be in (0, 1] (1 turns it off)")


def sample_tokens(logits: jax.Array, rng: jax.Array, sampling: Sampling) -> jax.Array:
    """Next token ids [batch] from fp32 logits [batch, vocab]."""
    if sampling.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / sampling.temperature
    neg = jnp.finfo(logits.dtype).min
    if sampling.top_k:
        kth = jax.lax.top_k(logits, min(sampling.top_k, logits.shape[-1]))[0][:, -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if sampling.top_p < 1:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the tokens ranked above
        cut = jnp.where(before >= sampling.top_p, neg, sorted_logits)
        logits = jnp.full_like(logits, neg).at[jnp.arange(logits.shape[0])[:, None], order].set(cut)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@dataclasses.dataclass
class Generation:
    """One row's output: new token ids (stop token excluded), text, why it ended."""

    tokens: list[int]
    text: str | None
    finish_reason: str  # "eos" (a stop token id), "stop" (a stop string) or "length"
    prompt_truncated: bool
    logits: np.ndarray | None = None  # [new tokens, vocab] when asked for


def fit_prompt(ids: Sequence[int], limit: int) -> tuple[list[int], bool]:
    """The last `limit` ids of a prompt (cut from the left) and whether it was cut."""
    ids = list(ids)
    return (ids[-limit:], True) if len(ids) > limit else (ids, False)


def _bucket(n: int, bucket: int, cap: int) -> int:
    return min(cap, bucket * math.ceil(n / bucket))


class Decoder:
    """Compiled prefill / step / score for one model on one layout."""

    def __init__(
        self,
        model: nn.Module,
        layout: partitioning.Layout | None = None,
        *,
        length_bucket: int = 64,
    ):
        """`model`: the flax language model (carries `.config`); no layout: one device."""
        self.model, self.config = model, model.config
        self.layout = partitioning.Layout.one_device() if layout is None else layout
        self.length_bucket = length_bucket
        self.param_shardings = self.layout.param_shardings(partitioning.abstract_params(model))
        self.row_sharding = self.layout.logical_sharding(("batch",))
        self.batch_sharding = self.layout.batch_sharding()
        self.batch_multiple = self.layout.batch_shards
        self._replicated = self.layout.replicated()
        self._compiled: dict = {}

    # ---- public API ----------------------------------------------------------------------

    def put_params(self, params):
        """Params placed on this decoder's shardings (a no-op when they already are)."""
        return jax.device_put(params, self.param_shardings)

    def generate(
        self,
        params,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int = 64,
        sampling: Sampling = Sampling(),
        stop_token_ids: Sequence[int] = (),
        stop_strings: Sequence[str] = (),
        detokenize: Callable[[Sequence[int]], str] | None = None,
        rng: jax.Array | None = None,
        stream: Callable[[int, str], None] | None = None,
        return_logits: bool = False,
    ) -> list[Generation]:
        """Continues every prompt (token ids, BOS included) by up to `max_new_tokens`.

        A row ends at the first of `stop_token_ids` (not kept), or when its text
        contains one of `stop_strings` (the text is cut before it), or at the
        length limit. `stream(row, text_delta)` receives text as it is produced,
        holding back what might still become a stop string.
        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens}: must be >= 1")
        if (stop_strings or stream) and detokenize is None:
            raise ValueError("stop_strings and stream need `detokenize` (ids -> text)")
        if not prompts:
            return []
        limit = self.config.max_position_embeddings - max_new_tokens
        if limit < 1:
            raise ValueError(
                f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's "
                f"context of {self.config.max_position_embeddings} tokens; lower it"
            )
        fitted = [fit_prompt(p, limit) for p in prompts]
        for i, (ids, _) in enumerate(fitted):
            if not ids:
                raise ValueError(f"prompt {i} is empty; give at least one token (BOS)")
        rows = len(fitted)
        batch = self.batch_multiple * math.ceil(rows / self.batch_multiple)
        length = _bucket(max(len(ids) for ids, _ in fitted), self.length_bucket, limit)
        tokens = np.zeros((batch, length), np.int32)
        segments = np.zeros((batch, length), np.int32)
        positions = np.zeros((batch, length), np.int32)
        lengths = np.ones((batch,), np.int32)
        for i in range(batch):
            ids = fitted[i][0] if i < rows else [self.config.bos_token_id]
            n = len(ids)
            tokens[i, length - n :] = ids
            segments[i, length - n :] = 1
            positions[i, length - n :] = np.arange(n)
            lengths[i] = n
        rng = jax.random.key(0) if rng is None else rng
        prefill, step = self._generation_fns(batch, length, length + max_new_tokens, sampling)

        params = self.put_params(params)
        put = self._put_rows
        with self.layout.context():
            cache, token, logits = prefill(params, put(tokens), put(positions), put(segments), rng)
            start = put(lengths)
            out = [[] for _ in range(rows)]
            kept_logits = [[] for _ in range(rows)]
            reasons: list[str | None] = [None] * rows
            texts = [""] * rows
            streamed = [0] * rows
            stops = set(int(t) for t in stop_token_ids)
            for i in range(max_new_tokens):
                nxt = None
                if i + 1 < max_new_tokens:  # queue the next step before reading this one
                    nxt = step(params, cache, token, start, jnp.int32(i), rng)
                host_tokens = np.asarray(token)
                host_logits = np.asarray(logits) if return_logits else None
                for r in range(rows):
                    if reasons[r] is not None:
                        continue
                    t = int(host_tokens[r])
                    if t in stops:
                        reasons[r] = "eos"
                    else:
                        out[r].append(t)
                        if host_logits is not None:
                            kept_logits[r].append(host_logits[r])
                        if detokenize is not None:
                            texts[r], hit = _cut_at_stop(detokenize(out[r]), stop_strings)
                            if hit:
                                reasons[r] = "stop"
                    if stream is not None:
                        final = reasons[r] is not None or i + 1 == max_new_tokens
                        safe = len(texts[r]) if final else _safe_length(texts[r], stop_strings)
                        if safe > streamed[r]:
                            stream(r, texts[r][streamed[r] : safe])
                            streamed[r] = safe
                if all(reason is not None for reason in reasons) or nxt is None:
                    break
                cache, token, logits = nxt
        return [
            Generation(
                tokens=out[r],
                text=texts[r] if detokenize is not None else None,
                finish_reason=reasons[r] or "length",
                prompt_truncated=fitted[r][1],
                logits=np.stack(kept_logits[r]) if return_logits and kept_logits[r] else None,
            )
            for r in range(rows)
        ]

    def score(
        self,
        params,
        contexts: Sequence[Sequence[int]],
        continuations: Sequence[Sequence[int]],
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Summed log p(continuation | context) per pair, its token count, and truncation.

        Returns (log_likelihood [n] float64, num_tokens [n] int, truncated [n] bool);
        see `loglikelihoods` for how long pairs are cut.
        """
        sums, _, truncated = self.loglikelihoods(params, contexts, continuations)
        return sums, np.array([len(c) for c in continuations]), truncated

    def loglikelihoods(
        self,
        params,
        contexts: Sequence[Sequence[int]],
        continuations: Sequence[Sequence[int]],
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Summed log p(continuation | context), is-greedy and truncation, per pair.

        A pair is cut as lm-evaluation-harness' Hugging Face model cuts it: the
        model reads `(context + continuation)[-(window + 1):][:-1]` (the last
        token is only predicted, never read), so a pair is truncated only when
        longer than window + 1, from the left, keeping the continuation whole.
        `is_greedy` says every continuation token is the argmax of its position.
        Returns (log_likelihood [n] float64, is_greedy [n] bool, truncated [n] bool).
        """
        if len(contexts) != len(continuations):
            raise ValueError(
                f"{len(contexts)} contexts but {len(continuations)} continuations; pass pairs"
            )
        limit = self.config.max_position_embeddings
        rows = len(contexts)
        seqs, starts, truncated = [], [], np.zeros(rows, bool)
        for i, (ctx, cont) in enumerate(zip(contexts, continuations)):
            cont = list(cont)
            if not cont:
                raise ValueError(f"continuation {i} is empty; score at least one token")
            if len(cont) > limit:
                raise ValueError(
                    f"continuation {i} has {len(cont)} tokens, more than the model's "
                    f"context of {limit}"
                )
            ctx, truncated[i] = fit_prompt(ctx, limit + 1 - len(cont))
            if not ctx:
                raise ValueError(f"context {i} is empty; give at least one token (BOS)")
            seqs.append(ctx + cont)
            starts.append(len(ctx))
        batch = self.batch_multiple * math.ceil(rows / self.batch_multiple)
        length = _bucket(max(len(s) for s in seqs) - 1, self.length_bucket, limit)
        tokens = np.zeros((batch, length), np.int32)
        targets = np.zeros((batch, length), np.int32)
        weights = np.zeros((batch, length), np.float32)
        segments = np.zeros((batch, length), np.int32)
        for i, (seq, start) in enumerate(zip(seqs, starts)):
            n = len(seq) - 1  # slots read; slot j predicts seq[j + 1]
            tokens[i, :n] = seq[:-1]
            segments[i, :n] = 1
            targets[i, :n] = seq[1:]
            weights[i, start - 1 : n] = 1.0
        fn = self._score_fn(batch, length)
        put = self._put_rows
        with self.layout.context():
            sums, greedy = fn(
                self.put_params(params), put(tokens), put(segments), put(targets), put(weights)
            )
        return (np.asarray(sums, np.float64)[:rows], np.asarray(greedy, bool)[:rows], truncated)

    # ---- compiled pieces -----------------------------------------------------------------

    def _put_rows(self, array: np.ndarray) -> jax.Array:
        sharding = self.row_sharding if array.ndim == 1 else self.batch_sharding
        return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])

    def _cache_shardings(self, batch: int, max_length: int):
        tokens = jnp.zeros((batch, max_length), jnp.int32)
        boxed = jax.eval_shape(
            lambda: self.model.init(jax.random.key(0), tokens, decode=True)["cache"]
        )
        return self.layout.param_shardings(boxed), nn.unbox(boxed)

    def _generation_fns(self, batch: int, length: int, max_length: int, sampling: Sampling):
        key = ("generate", batch, length, max_length, sampling)
        if key in self._compiled:
            return self._compiled[key]
        model = self.model
        cache_shardings, cache_shapes = self._cache_shardings(batch, max_length)
        rows, repl = self.row_sharding, self._replicated

        def prefill(params, tokens, positions, segments, rng):
            cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), cache_shapes)
            cache = jax.lax.with_sharding_constraint(cache, cache_shardings)
            logits, variables = model.apply(
                {"params": params, "cache": cache},
                tokens,
                positions=positions,
                segment_ids=segments,
                decode=True,
                mutable=["cache"],
            )
            last = logits[:, -1]
            return (
                variables["cache"],
                sample_tokens(last, jax.random.fold_in(rng, 0), sampling),
                last,
            )

        def step(params, cache, token, start, i, rng):
            logits, variables = model.apply(
                {"params": params, "cache": cache},
                token[:, None],
                positions=(start + i)[:, None],
                segment_ids=jnp.ones_like(token)[:, None],
                decode=True,
                mutable=["cache"],
            )
            last = logits[:, -1]
            return (
                variables["cache"],
                sample_tokens(last, jax.random.fold_in(rng, i + 1), sampling),
                last,
            )

        p, b = self.param_shardings, self.batch_sharding
        prefill_jit = jax.jit(
            prefill,
            in_shardings=(p, b, b, b, repl),
            out_shardings=(cache_shardings, rows, rows),
        )
        step_jit = jax.jit(
            step,
            in_shardings=(p, cache_shardings, rows, rows, repl, repl),
            out_shardings=(cache_shardings, rows, rows),
            donate_argnums=1,
        )
        self._compiled[key] = (prefill_jit, step_jit)
        return prefill_jit, step_jit

    def _score_fn(self, batch: int, length: int):
        key = ("score", batch, length)
        if key in self._compiled:
            return self._compiled[key]
        model = self.model

        def score(params, tokens, segments, targets, weights):
            logits = model.apply({"params": params}, tokens, segment_ids=segments)
            logp = jax.nn.log_softmax(logits, axis=-1)
            picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
            hit = (jnp.argmax(logits, axis=-1) == targets) | (weights == 0)
            return jnp.sum(picked * weights, axis=-1), jnp.all(hit, axis=-1)

        b = self.batch_sharding
        fn = jax.jit(
            score, in_shardings=(self.param_shardings, b, b, b, b), out_shardings=self._replicated
        )
        self._compiled[key] = fn
        return fn


def _cut_at_stop(text: str, stop_strings: Sequence[str]) -> tuple[str, bool]:
    """`text` cut before the earliest stop string in it, and whether one was found."""
    hits = [text.find(s) for s in stop_strings if s and s in text]
    return (text[: min(hits)], True) if hits else (text, False)


def _safe_length(text: str, stop_strings: Sequence[str]) -> int:
    """How much of `text` can be shown: not a tail that may grow into a stop string,
    nor a trailing replacement character of a half-decoded UTF-8 byte sequence."""
    end = len(text.rstrip("\ufffd"))
    for k in range(min(end, max((len(s) for s in stop_strings), default=1) - 1), 0, -1):
        if any(s.startswith(text[end - k : end]) for s in stop_strings):
            return end - k
    return end
