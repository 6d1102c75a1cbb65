"""Plain helpers shared by several test modules (fixtures are in conftest.py).

Small LLaMA-style SentencePiece models, Hugging Face LLaMA folders, tiny training
runs and their subprocesses, P3 fixture folders and a chat MODEL_DIR. torch,
transformers, the model and the training modules are imported inside the helpers
that use them; importing this module starts no JAX backend, so a subprocess may
call `jax.distributed.initialize` after it.
"""

import io
import itertools
import json
import os
import random
import signal
import socket
import time

import jax
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import sentencepiece as spm

from mtllama_jax.models.llama.config import LlamaConfig

# ---- LLaMA-style SentencePiece models (the vocabulary and data tests) -------------------

WORDS = (
    "the a question answer context premise hypothesis yes no maybe review product movie "
    "sentence because consequence option choice human assistant user response instruction "
    "chat curious artificial intelligence helpful detailed polite summary article title"
).split()


def train_llama_spm(path, *, ids=(0, 1, 2), vocab_size=512) -> str:
    """Train a small BPE model with byte fallback and LLaMA's unk/bos/eos ids."""
    rng = random.Random(0)
    lines = [
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 24)))
        + " ### Human: ### Assistant: ### USER: ### ASSISTANT: ### Response: 0123456789."
        for _ in range(400)
    ]
    out = io.BytesIO()
    unk, bos, eos = ids
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=out,
        vocab_size=vocab_size,
        model_type="bpe",
        unk_id=unk,
        bos_id=bos,
        eos_id=eos,
        pad_id=-1,
        byte_fallback=True,
        hard_vocab_limit=False,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        minloglevel=2,
    )
    path.write_bytes(out.getvalue())
    return str(path)


def train_bpe_spm(lines, model_prefix, vocab_size: int, **options) -> str:
    """A BPE SentencePiece model trained on `lines`, with LLaMA's ids (unk 0, bos 1,
    eos 2, no pad); `options` are SentencePieceTrainer's. Returns the .model path."""
    corpus = f"{model_prefix}.corpus.txt"
    with open(corpus, "w") as f:
        f.write("\n".join(lines))
    spm.SentencePieceTrainer.train(
        input=corpus,
        model_prefix=str(model_prefix),
        vocab_size=vocab_size,
        model_type="bpe",
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
        **options,
    )
    return f"{model_prefix}.model"


def session_spm(tmp_path_factory) -> str:
    """One tokenizer.model per test session, shared by the data test modules."""
    path = tmp_path_factory.getbasetemp() / "llama_tokenizer.model"
    return str(path) if path.exists() else train_llama_spm(path)


# ---- Hugging Face LLaMA folders (the converter and delta tests) ---------------------------

HF_CONFIG = dict(
    vocab_size=32000,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


def make_hf(folder, tokenizer_model, *, dtype=None, seed=0, shard=None, **overrides):
    """Saves a random HF LlamaForCausalLM (+ tokenizer files) to `folder` (fp32 by default)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**HF_CONFIG, **overrides}))
    model.to(dtype or torch.float32).save_pretrained(
        folder, **({"max_shard_size": shard} if shard else {})
    )
    with (
        open(tokenizer_model, "rb") as src,
        open(os.path.join(folder, "tokenizer.model"), "wb") as dst,
    ):
        dst.write(src.read())
    with open(os.path.join(folder, "special_tokens_map.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, f)
    return str(folder)


def read_all(folder):
    """Every tensor of an HF folder, by name."""
    from mtllama_jax.convert import hf_files

    weights = hf_files.HFWeights(folder)
    return {n: weights.get(n) for n in weights.names()}


def assert_bitwise(a, b):
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert a[name].tobytes() == b[name].tobytes(), name


def convert(*argv):
    """Runs `mtllama-convert` in this process."""
    from mtllama_jax.main import convert_cli

    convert_cli.main([str(a) for a in argv])


# ---- tiny training runs (resume, multi-host, reliability) -------------------------------

NUM_STEPS = 7


def synthetic_batches(seed: int, rows: int, length: int, vocab: int):
    """Packed-looking batches, a function of (seed, step); each process takes its rows."""

    def batches(start: int):
        for step in itertools.count(start):
            rng = np.random.default_rng([seed, step])
            tokens = rng.integers(3, vocab, (rows, length + 1)).astype(np.int32)
            cut = rng.integers(2, length - 2, rows)
            index = np.arange(length)
            segment = np.where(index[None] < cut[:, None], 1, 2).astype(np.int32)
            segment[:, -2:] = 0  # trailing padding
            positions = np.where(segment == 1, index, index - cut[:, None]).astype(np.int32)
            weights = ((positions > 2) & (segment > 0)).astype(np.float32)
            batch = dict(
                input_tokens=tokens[:, :-1],
                target_tokens=tokens[:, 1:],
                positions=np.where(segment > 0, positions, 0),
                segment_ids=segment,
                loss_weights=weights,
            )
            per = rows // jax.process_count()
            lo = jax.process_index() * per
            yield {k: v[lo : lo + per] for k, v in batch.items()}

    return batches


def run_tiny(model_dir: str, kill_at: int | None = None, sig=signal.SIGKILL, **kw):
    """The run under test: tiny LLaMA, FSDP over 8 devices, checkpoint every 3 steps.

    Sends itself `sig` when asked for the batch of step `kill_at`.
    """
    from mtllama_jax import models, optim, partitioning, training
    from mtllama_jax.train_options import CheckpointPolicy, LoopPeriods

    config = LlamaConfig.tiny()
    layout = partitioning.Layout.create(1, -1, 1, "fsdp")
    schedule = optim.learning_rate_schedule(3e-3, NUM_STEPS, "cosine", warmup_steps=2)
    tx = optim.make_optimizer(schedule, weight_decay=0.1)
    source = synthetic_batches(seed=1, rows=16, length=32, vocab=config.vocab_size)

    def batches(start):
        for step, batch in zip(itertools.count(start), source(start)):
            if step == kill_at and sig == signal.SIGKILL:
                # once step 3's async save is committed, so that restore is tested
                committed = os.path.join(model_dir, "checkpoints", "3")
                deadline = time.time() + 120
                while not os.path.isdir(committed) and time.time() < deadline:
                    time.sleep(0.05)
            if step == kill_at:
                os.kill(os.getpid(), sig)
            yield batch

    kw.setdefault("checkpointing", CheckpointPolicy(every_steps=3))
    return training.run(
        models.build_module(config),
        layout,
        (tx, schedule),
        model_dir,
        kw.pop("num_steps", NUM_STEPS),
        batches,
        seed=3,
        microbatches=2,
        periods=LoopPeriods(log_every_steps=1),
        progress=False,
        **kw,
    )


def worker_env(extra=None):
    """The environment for a test's subprocess: CPU, eight devices, the repository importable."""
    env = dict(os.environ)
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
    env["PYTHONPATH"] = os.pathsep.join(
        [os.path.dirname(os.path.dirname(__file__))] + [p for p in [env.get("PYTHONPATH")] if p]
    )
    env.update(extra or {})
    return env


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a jax.distributed coordinator)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- P3 fixture folders ---------------------------------------------------------------

PARQUET_TASK = "glue_mrpc_equivalent"


def p3_rows(n, prefix):
    """`n` P3 records (pretokenized text and answer choices) whose text starts with `prefix`."""
    return [
        {
            "inputs_pretokenized": f"{prefix} question {i} because the premise ",
            "targets_pretokenized": " yes" if i % 2 else "no maybe answer",
            "answer_choices": ["no", "yes"],
        }
        for i in range(n)
    ]


def write_parquet(folder, split, records, shards=1):
    """`records` as a P3 split in the Parquet layout, in `shards` files."""
    os.makedirs(folder, exist_ok=True)
    for s in range(shards):
        part = records[s::shards]
        pq.write_table(
            pa.Table.from_pylist(part),
            os.path.join(folder, f"{split}-{s:05d}-of-{shards:05d}.parquet"),
        )


# ---- a chat MODEL_DIR (chat and eval-error tests) ------------------------------------------


def chat_config() -> LlamaConfig:
    """The chat tests' tiny model (a function: `LlamaConfig.tiny` asks JAX for its backend,
    which a two-process test must not start before `jax.distributed.initialize`)."""
    return LlamaConfig.tiny(vocab_size=320, initializer_range=0.3, max_position_embeddings=384)


CHAT_WORDS = ["hello", "world", "river", "stone", "cloud", "answer", "question", "human"]


def write_chat_model_dir(folder):
    """(MODEL_DIR, params): a training MODEL_DIR under `folder` with `chat_config()`'s params.

    Random params saved at step 3, config.json and a tokenizer.model trained on CHAT_WORDS.
    """
    import flax.linen as nn
    import jax.numpy as jnp
    import optax

    from mtllama_jax import checkpoints, train_state
    from mtllama_jax.models.llama.model import LlamaForCausalLM
    from mtllama_jax.train_options import CheckpointPolicy

    lines = [
        " ".join(CHAT_WORDS[(i + j * j) % len(CHAT_WORDS)] for j in range(9)) for i in range(300)
    ]
    config = chat_config()
    tokenizer = train_bpe_spm(lines, folder / "sp", config.vocab_size, byte_fallback=True)
    variables = LlamaForCausalLM(config).init(jax.random.key(5), jnp.zeros((1, 8), jnp.int32))
    params = nn.unbox(variables["params"])
    out = str(folder / "model")
    checkpoints.write_model_dir_files(out, config, [tokenizer])
    ckpt = checkpoints.TrainCheckpoints(out, CheckpointPolicy(async_save=False))
    ckpt.save(3, train_state.create(params, optax.sgd(0.1), jax.random.key(0)))
    ckpt.wait()
    ckpt.close()
    return out, params
