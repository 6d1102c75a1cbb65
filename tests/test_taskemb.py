"""Task embeddings: Fisher vs direct per-example gradients, distances, FUTE, outputs, bad input."""

import functools
import os
import stat
import warnings

import gin
import jax
import numpy as np
import pytest
import seqio
import tensorflow as tf

from mtllama_jax import (
    atomic,
    checkpoint_folder,
    data,
    decoding,
    losses,
    partitioning,
    taskemb,
    taskemb_analysis,
)
from mtllama_jax.models.llama.config import LlamaConfig
from mtllama_jax.models.llama.model import LlamaForCausalLM
from mtllama_jax.tasks import synthetic

CONFIG = LlamaConfig(
    vocab_size=1024,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    max_position_embeddings=128,
    dtype="float32",
    cpu_forms=True,  # the tests run on CPU
)
MODEL = LlamaForCausalLM(CONFIG)


@functools.cache
def surrogate():
    layout = partitioning.Layout.create(1, -1, 1, "fsdp")  # fsdp over the 8 host devices
    params = partitioning.init_params(MODEL, layout, jax.random.key(0))
    return layout, params


def direct_fisher(params, pairs):
    """{param path: mean squared gradient}, one example at a time, no vmap: the definition."""
    model = MODEL
    params = jax.device_get(params)

    @jax.jit
    def grad(p, batch):
        def loglik(p):
            logits = model.apply(
                {"params": p},
                batch["input_tokens"],
                positions=batch["positions"],
                segment_ids=batch["segment_ids"],
            )
            return -losses.cross_entropy_sums(
                logits, batch["target_tokens"], batch["loss_weights"], batch["segment_ids"]
            )["nll"]

        return jax.grad(loglik)(p)

    total = None
    for inputs, targets in pairs:  # padded to one length: padding has no loss, no gradient
        batch = data.rows_to_batch([[(np.array(inputs), np.array(targets))]], 32, 1)
        square = jax.tree.map(lambda g: np.asarray(g, np.float64) ** 2, grad(params, batch))
        total = square if total is None else jax.tree.map(np.add, total, square)
    flat = {
        "/".join(str(k.key) for k in path): leaf / len(pairs)
        for path, leaf in jax.tree_util.tree_leaves_with_path(total)
    }
    return flat


def random_pairs(n, seed):
    rng = np.random.default_rng(seed)
    return [
        (
            rng.integers(3, 1024, rng.integers(3, 20)).tolist(),
            rng.integers(3, 1024, rng.integers(1, 5)).tolist() + [2],
        )
        for _ in range(n)
    ]


def test_fisher_equals_direct_per_example_gradients():
    layout, params = surrogate()
    pairs = random_pairs(11, 0)  # not a multiple of the batch: the last batch is padded
    direct = direct_fisher(params, pairs)
    for subset in taskemb.PARAM_SUBSETS:
        embedder = taskemb.Embedder(MODEL, layout, subset=subset, batch_size=8)
        fisher, used = embedder.fisher(params, pairs)
        assert used == 11
        want = np.concatenate([direct[p].reshape(-1) for p in embedder.paths])
        assert fisher.shape == want.shape
        np.testing.assert_allclose(fisher, want, rtol=2e-4, atol=1e-12)
    assert fisher.shape == (CONFIG.hidden_size,)  # final_norm: one gain per feature


def test_identical_tasks_distance_zero_relabelled_copy_nearer_than_other_task():
    layout, params = surrogate()
    embedder = taskemb.Embedder(MODEL, layout, batch_size=8)
    sentiment, _ = taskemb.load_pairs("synthetic_sentiment_t0", "validation", 32)
    topic, _ = taskemb.load_pairs("synthetic_topic_t0", "validation", 32)
    rng = np.random.default_rng(0)
    relabelled = [
        (x, sentiment[j][1]) for (x, _), j in zip(sentiment, rng.permutation(len(sentiment)))
    ]
    a = taskemb.data_embedding(embedder, params, sentiment).vector
    same = taskemb.data_embedding(embedder, params, list(sentiment)).vector
    copy = taskemb.data_embedding(embedder, params, relabelled).vector
    other = taskemb.data_embedding(embedder, params, topic).vector
    assert taskemb_analysis.distance(a, same) == pytest.approx(0.0, abs=1e-9)
    assert taskemb_analysis.distance(a, copy) < taskemb_analysis.distance(a, other)
    np.testing.assert_allclose(np.linalg.norm(a), 1.0)


def bigram_params(pairs_of_tokens):
    """A real LLaMA whose next token depends on the current one only: `u -> w` as given.

    Attention and MLP write nothing (zero output kernels), so the final hidden
    state is the token's own embedding; the LM head maps each `u` to its `w`.
    """
    params = jax.device_get(partitioning.init_params(MODEL, surrogate()[0], jax.random.key(1)))
    params = jax.tree.map(np.array, params)
    params["layers"]["attention"]["o_proj"]["kernel"][:] = 0
    params["layers"]["mlp"]["down_proj"]["kernel"][:] = 0
    embedding = params["embed"]["embedding"]
    head = np.zeros_like(params["lm_head"]["kernel"])
    for u, w in pairs_of_tokens:
        e = embedding[u] / np.linalg.norm(embedding[u])
        head[:, w] += 50.0 * e
    params["lm_head"]["kernel"] = head
    return params


def test_model_embedding_of_a_perfect_model_equals_data_embedding():
    layout, params = surrogate()
    pairs = [([10, 11, 12], [20, 21, 2]), ([13, 14], [22, 2]), ([15, 16, 17, 18], [23, 2])]
    chain = [(12, 20), (20, 21), (21, 2), (14, 22), (22, 2), (18, 23), (23, 2)]
    perfect = taskemb.AnswerModel(
        decoding.Decoder(MODEL, layout),
        bigram_params(chain),
        synthetic.vocabulary(),
        max_new_tokens=8,
    )
    answers = perfect.answer([x for x, _ in pairs])
    assert answers == [y for _, y in pairs]
    embedder = taskemb.Embedder(MODEL, layout, batch_size=8)
    data_emb = taskemb.data_embedding(embedder, params, pairs).vector
    model_emb = taskemb.model_embedding(embedder, params, pairs, answers).vector
    np.testing.assert_allclose(model_emb, data_emb, rtol=1e-6, atol=1e-9)
    wrong = taskemb.model_embedding(embedder, params, pairs, [[30, 2], [31, 2], [32, 2]]).vector
    assert taskemb_analysis.distance(wrong, data_emb) > 1e-4


def test_outputs_are_written_atomically_with_the_umask(tmp_path):
    names = ["synthetic_topic_t0", "synthetic_sentiment_t0", "synthetic_sentiment_t1"]
    sim = np.array([[1.0, 0.2, 0.3], [0.2, 1.0, 0.9], [0.3, 0.9, 1.0]])
    clusters = taskemb_analysis.true_clusters(names)
    assert clusters == {
        "synthetic_topic_t0": "topic",
        "synthetic_sentiment_t0": "sentiment",
        "synthetic_sentiment_t1": "sentiment",
    }
    png = tmp_path / "similarity.png"
    old = os.umask(0o027)
    try:
        taskemb_analysis.heatmap(names, sim, clusters, str(png), "test")
        atomic.write_text(str(tmp_path / "report.md"), "# report\n")
        taskemb_analysis.write_npz(
            str(tmp_path / "e.npz"), {n: sim[i] for i, n in enumerate(names)}
        )
    finally:
        os.umask(old)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in ("similarity.png", "report.md", "e.npz"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o640
    assert sorted(np.load(tmp_path / "e.npz").files) == sorted(names)
    before = png.read_bytes()
    with pytest.raises(IndexError):  # fails while drawing: the old file stays, no temp left
        taskemb_analysis.heatmap(names + ["synthetic_topic_t1"], sim, clusters, str(png), "test")
    assert png.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["e.npz", "report.md", "similarity.png"]


def test_uses_nearest_clusters_ari_mixture_and_prompt_selection():
    names = ["a0", "a1", "b0", "b1"]
    sim = np.array(
        [[1, 0.9, 0.1, 0.2], [0.9, 1, 0.2, 0.1], [0.1, 0.2, 1, 0.8], [0.2, 0.1, 0.8, 1.0]]
    )
    assert taskemb_analysis.nearest(names, sim, 1) == {
        "a0": [("a1", 0.9)],
        "a1": [("a0", 0.9)],
        "b0": [("b1", 0.8)],
        "b1": [("b0", 0.8)],
    }
    labels = taskemb_analysis.cluster(sim, 2)
    assert taskemb_analysis.adjusted_rand(["a", "a", "b", "b"], labels) == 1.0
    vectors = {
        "t": np.array([1.0, 0.0]),
        "near": np.array([0.9, 0.1]),
        "far": np.array([0.0, 1.0]),
        "mid": np.array([0.5, 0.5]),
    }
    picks = taskemb_analysis.select_mixture("t", vectors, list(vectors), 2, seed=0)
    assert picks["nearest"] == ["near", "mid"] and len(picks["random"]) == 2
    chosen = taskemb_analysis.select_prompt(
        {"p0": 0.3, "p1": 0.1, "p2": 0.2}, {"p0": 50.0, "p1": 70.0, "p2": 90.0}
    )
    assert (chosen["chosen"], chosen["oracle"]) == ("p1", "p2")
    assert chosen["mean_accuracy"] == pytest.approx(70.0)
    report = {
        "mode": "prompts",
        "checkpoint": "/c",
        "subset": "norms",
        "parameters": ["p"],
        "num_examples": 8,
        "split": "train",
        "seed": 0,
        "notes": ["few"],
        "prompts": {
            "nli": chosen
            | {
                "distances": {"p0": 0.3, "p1": 0.1, "p2": 0.2},
                "accuracy": {"p0": 50.0, "p1": 70.0, "p2": 90.0},
            }
        },
    }
    text = taskemb_analysis.markdown(report)
    assert "| nli | p1 (70.0) | 70.0 |" in text and "* note: few" in text
    assert text.index("| p1 | 0.1000 |") < text.index("| p2 | 0.2000 |")


def test_bad_input_named_errors():
    name = "taskemb_test_no_targets"
    if name not in seqio.TaskRegistry.names():
        seqio.TaskRegistry.add(
            name,
            source=seqio.FunctionDataSource(
                lambda split, shuffle_files: tf.data.Dataset.from_tensor_slices(
                    {"inputs": ["a b", "c d"]}
                ),
                splits=("train",),
            ),
            preprocessors=[seqio.preprocessors.tokenize],
            output_features={"inputs": seqio.Feature(synthetic.vocabulary())},
        )
    with pytest.raises(taskemb.MissingTargets, match="taskemb_test_no_targets.*no 'targets'"):
        taskemb.load_pairs(name, "train", 4)
    with pytest.warns(taskemb.FewerExamples, match="64 examples, fewer than num_examples=100"):
        pairs, notes = taskemb.load_pairs("synthetic_nli_t0", "validation", 100)
    assert len(pairs) == 64 and "fewer than" in notes[0]
    small = LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
    )
    with pytest.raises(taskemb.VocabularyMismatch, match="1024-piece vocabulary.*vocab_size 512"):
        taskemb.check_vocabulary(small, None, "synthetic_nli_t0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        taskemb.check_vocabulary(CONFIG, synthetic.SPM_MODEL, "synthetic_nli_t0")


def test_job_end_to_end_and_wrong_vocabulary_checkpoint(tmp_path):
    from mtllama_jax.main import launch, taskemb_job

    gin.clear_config()

    layout, params = surrogate()
    folder = tmp_path / "ckpt"
    checkpoint_folder.save_params(
        folder, jax.device_get(params), CONFIG, tokenizer_files=[synthetic.SPM_MODEL]
    )
    os.rename(folder / "synthetic_spm.model", folder / "tokenizer.model")
    tasks = [
        "synthetic_sentiment_t0",
        "synthetic_sentiment_t1",
        "synthetic_topic_t0",
        "synthetic_topic_t1",
    ]
    launch.parse_gin(
        ["mesh/fsdp.gin", "runs/taskemb.gin"],
        [
            f"CHECKPOINT = '{folder}'",
            f"TASKEMB_DIR = '{tmp_path / 'out'}'",
            f"TASKEMB_TASKS = {tasks}",
            "taskemb.num_examples = 8",
            "taskemb.batch_size = 8",
        ],
        [],
    )
    report = taskemb_job.job()
    assert set(report["methods"]) == {"data", "baseline"}
    assert -1.0 <= report["methods"]["data"]["ari"] <= 1.0
    out = sorted(os.listdir(tmp_path / "out"))
    assert out == [
        "embeddings_baseline.npz",
        "embeddings_data.npz",
        "report.json",
        "report.md",
        "similarity_baseline.png",
        "similarity_baseline.tsv",
        "similarity_data.png",
        "similarity_data.tsv",
    ]
    assert sorted(np.load(tmp_path / "out" / "embeddings_data.npz").files) == sorted(tasks)
    gin.bind_parameter("taskemb.mode", "mixture")
    gin.bind_parameter("taskemb.target", "synthetic_sentiment_t0")
    gin.bind_parameter("taskemb.k", 2)
    gin.bind_parameter("taskemb.output_dir", str(tmp_path / "mix"))
    report = taskemb_job.job()
    assert len(report["nearest"]) == 2 and "synthetic_sentiment_t0" not in report["nearest"]
    assert min(report["distances"], key=report["distances"].get) == report["nearest"][0]
    assert "| nearest |" in (tmp_path / "mix" / "report.md").read_text()
    other = tmp_path / "other"
    small = LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
    )
    checkpoint_folder.save_params(
        other,
        jax.device_get(
            partitioning.init_params(LlamaForCausalLM(small), layout, jax.random.key(0))
        ),
        small,
    )
    launch.parse_gin([], [f"CHECKPOINT = '{other}'"], [])
    try:
        with pytest.raises(taskemb.VocabularyMismatch, match="vocab_size 512"):
            taskemb_job.job()
        assert taskemb_job.main(["--gin_file=mesh/nope.gin"]) == 2
    finally:
        gin.clear_config()
