"""KV-cache decoding against full recomputation, sampling, stops, truncation, scoring."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sentencepiece as spm
from helpers import train_bpe_spm

from mtllama_jax import decoding, partitioning
from mtllama_jax.models.llama.config import LlamaConfig
from mtllama_jax.models.llama.model import LlamaForCausalLM

# A wide init makes logits far apart, so greedy choices are not near-ties.
CONFIG = LlamaConfig.tiny(vocab_size=320, initializer_range=0.3, max_position_embeddings=64)
PROMPTS = [[1, 5, 6, 7], [1, 9, 10, 11, 12, 13, 14, 15, 16, 17], [1, 40]]


@pytest.fixture(scope="module")
def params():
    model = LlamaForCausalLM(CONFIG)
    return nn.unbox(model.init(jax.random.key(3), jnp.zeros((1, 8), jnp.int32))["params"])


@pytest.fixture(scope="module")
def decoder():
    return decoding.Decoder(LlamaForCausalLM(CONFIG), length_bucket=8)


@pytest.fixture(scope="module")
def sp(tmp_path_factory):
    """A real 320-piece SentencePiece model (LLaMA's special ids) trained on a small corpus."""
    folder = tmp_path_factory.mktemp("spm")
    words = ["alpha", "beta", "gamma", "delta", "lorem", "ipsum", "river", "stone", "cloud"]
    lines = [" ".join(words[(i * j) % len(words)] for j in range(1, 9)) for i in range(300)]
    path = train_bpe_spm(lines, folder / "sp", CONFIG.vocab_size, byte_fallback=True)
    return spm.SentencePieceProcessor(model_file=path)


@jax.jit
def _forward(params, tokens):
    return LlamaForCausalLM(CONFIG).apply({"params": params}, tokens)


def greedy_by_recomputation(params, prompt, n):
    """Greedy tokens and logits with a full forward pass per new token (no cache)."""
    seq, tokens, logits = list(prompt), [], []
    for _ in range(n):
        padded = np.zeros((1, CONFIG.max_position_embeddings), np.int32)
        padded[0, : len(seq)] = seq  # right padding: causal, so earlier slots are unchanged
        last = _forward(params, padded)[0, len(seq) - 1]
        tokens.append(int(jnp.argmax(last)))
        logits.append(np.asarray(last))
        seq.append(tokens[-1])
    return tokens, np.stack(logits)


def test_cached_decoding_equals_full_recomputation(params, decoder):
    gens = decoder.generate(params, PROMPTS, max_new_tokens=10, return_logits=True)
    for prompt, gen in zip(PROMPTS, gens):
        tokens, logits = greedy_by_recomputation(params, prompt, 10)
        assert gen.tokens == tokens
        np.testing.assert_allclose(gen.logits, logits, atol=1e-4, rtol=0)
        assert gen.finish_reason == "length" and not gen.prompt_truncated


def test_sharded_decoding_matches_one_device(params, decoder):
    sharded = decoding.Decoder(
        LlamaForCausalLM(CONFIG), partitioning.Layout.create(2, 2, 2, "fsdp_tp"), length_bucket=8
    )
    expect = [g.tokens for g in decoder.generate(params, PROMPTS, max_new_tokens=6)]
    assert [g.tokens for g in sharded.generate(params, PROMPTS, max_new_tokens=6)] == expect


def test_stop_token_ids_and_stop_strings_end_generation(params, decoder, sp):
    free = decoder.generate(params, PROMPTS[:1], max_new_tokens=16, detokenize=sp.decode)[0]
    stop_id = free.tokens[3]
    eos = decoder.generate(params, PROMPTS[:1], max_new_tokens=16, stop_token_ids=[stop_id])[0]
    assert eos.tokens == free.tokens[: free.tokens.index(stop_id)]
    assert eos.finish_reason == "eos"

    text = free.text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    assert stop.strip(), f"pick a visible stop string from {text!r}"
    cut = decoder.generate(
        params, PROMPTS[:1], max_new_tokens=16, stop_strings=[stop], detokenize=sp.decode
    )[0]
    assert cut.finish_reason == "stop"
    assert cut.text == text[: text.find(stop)]
    assert len(cut.tokens) < len(free.tokens)


def test_streamed_text_adds_up_and_holds_back_stop_prefixes(params, decoder, sp):
    free = decoder.generate(params, PROMPTS[:1], max_new_tokens=16, detokenize=sp.decode)[0]
    pieces = []
    stop = free.text[-3:] + "never-produced"
    gen = decoder.generate(
        params,
        PROMPTS[:1],
        max_new_tokens=16,
        detokenize=sp.decode,
        stop_strings=[stop],
        stream=lambda row, text: pieces.append(text),
    )[0]
    assert "".join(pieces) == gen.text == free.text
    assert len(pieces) > 1


def test_sampling(params, decoder):
    greedy = [g.tokens for g in decoder.generate(params, PROMPTS, max_new_tokens=6)]
    for sampling in (
        decoding.Sampling(temperature=1.0, top_k=1),
        decoding.Sampling(temperature=1.0, top_p=1e-6),
    ):
        assert [
            g.tokens for g in decoder.generate(params, PROMPTS, max_new_tokens=6, sampling=sampling)
        ] == greedy
    hot = decoding.Sampling(temperature=5.0)
    a = decoder.generate(params, PROMPTS, max_new_tokens=6, sampling=hot, rng=jax.random.key(1))
    b = decoder.generate(params, PROMPTS, max_new_tokens=6, sampling=hot, rng=jax.random.key(1))
    c = decoder.generate(params, PROMPTS, max_new_tokens=6, sampling=hot, rng=jax.random.key(2))
    assert [g.tokens for g in a] == [g.tokens for g in b] != [g.tokens for g in c]


def test_top_k_and_top_p_keep_only_the_allowed_tokens():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 4000))
    keys = jax.random.key(0)
    k2 = decoding.sample_tokens(logits, keys, decoding.Sampling(temperature=1.0, top_k=2))
    assert set(np.asarray(k2).tolist()) == {0, 1}
    p = decoding.sample_tokens(logits, keys, decoding.Sampling(temperature=1.0, top_p=0.9))
    assert set(np.asarray(p).tolist()) == {0, 1, 2}  # 0.5 + 0.3 < 0.9 needs the third


def test_prompts_longer_than_the_context_are_cut_from_the_left(params, decoder):
    long_prompt = [1] + list(range(3, 100))
    gen = decoder.generate(params, [long_prompt], max_new_tokens=4)[0]
    kept = long_prompt[-(CONFIG.max_position_embeddings - 4) :]
    assert gen.prompt_truncated
    assert gen.tokens == greedy_by_recomputation(params, kept, 4)[0]
    with pytest.raises(ValueError, match="max_new_tokens=64 leaves no room"):
        decoder.generate(params, PROMPTS, max_new_tokens=64)


def test_score_equals_log_softmax_of_a_full_forward_pass(params, decoder):
    contexts, continuations = [[1, 5, 6], [1, 7], [1, 8, 9, 10]], [[7], [8, 9, 11], [12, 13]]
    sums, counts, truncated = decoder.score(params, contexts, continuations)
    for ctx, cont, got in zip(contexts, continuations, sums):
        seq = np.zeros((1, CONFIG.max_position_embeddings), np.int32)
        seq[0, : len(ctx) + len(cont)] = ctx + cont
        logp = jax.nn.log_softmax(_forward(params, seq)[0])
        want = sum(float(logp[len(ctx) - 1 + k, t]) for k, t in enumerate(cont))
        assert got == pytest.approx(want, abs=1e-4)
    assert counts.tolist() == [1, 3, 2] and not truncated.any()


def test_long_pairs_are_cut_as_lm_evaluation_harness_cuts_them(params, decoder):
    window = CONFIG.max_position_embeddings
    rng = np.random.default_rng(5)
    cont = rng.integers(3, CONFIG.vocab_size, 5).tolist()
    for total in (window, window + 1, window + 30):  # fits; one over (still whole); longer
        ctx = [1] + rng.integers(3, CONFIG.vocab_size, total - len(cont) - 1).tolist()
        (got,), (greedy,), (cut,) = decoder.loglikelihoods(params, [ctx], [cont])
        read = (ctx + cont)[-(window + 1) :][:-1]  # lm-eval's HFLM `_loglikelihood_tokens`
        seq = np.zeros((1, window), np.int32)
        seq[0, : len(read)] = read
        logits = _forward(params, seq)[0]
        logp = jax.nn.log_softmax(logits)
        slots = [len(read) - len(cont) + k for k in range(len(cont))]
        assert got == pytest.approx(sum(float(logp[j, t]) for j, t in zip(slots, cont)), abs=1e-4)
        assert greedy == all(int(jnp.argmax(logits[j])) == t for j, t in zip(slots, cont))
        assert cut == (total > window + 1)
    greedy_cont = greedy_by_recomputation(params, [1, 5], 3)[0]
    assert decoder.loglikelihoods(params, [[1, 5]], [greedy_cont])[1].tolist() == [True]
    decoder.loglikelihoods(params, [[1, 5, 6]], [[7] * window])  # one context token is kept
    with pytest.raises(ValueError, match=f"more than the model's context of {window}"):
        decoder.loglikelihoods(params, [[1]], [[7] * (window + 1)])
