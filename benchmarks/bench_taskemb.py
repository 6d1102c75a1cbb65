"""Task embeddings on the synthetic world: clusters, prompt selection, mixture selection.

Per seed, on the local devices (a 2-core CPU is enough):

1. A demo-sized LLaMA (gin/runs/demo.gin's shape, `raw` prompts) trains on
   `synthetic_train` for `--surrogate-steps`; it is the surrogate of every
   embedding and the model whose answers make the model embeddings.
2. Clusters: data (Fisher) and baseline (mean hidden state) embeddings of all 30
   synthetic tasks (8 clusters x their templates), average-linkage clusters of
   their cosine distances, adjusted Rand index against the true clusters; the
   data embedding of the untrained (step-0) surrogate beside them.
3. Prompt selection: per cluster, the template whose model embedding lies
   nearest its data embedding, against the mean, a random and the best template
   by rank accuracy on the validation split (the six trained clusters, whose
   last template was never trained on, and the two held-out clusters).
4. Mixture selection: for each held-out cluster, the `--k` training tasks nearest
   its first template's data embedding vs `--k` random ones; a fresh model trains
   `--mixture-steps` on each pick (same steps, same seed) and is scored (rank
   accuracy) on every template of the target cluster.

Prints one table per figure, mean and each seed; writes results_seed<N>.json
per seed and the seed-0 heatmaps to --out (seeds may run in separate processes
on one --out; `--tables-only` prints the tables of every seed found there).

    python benchmarks/bench_taskemb.py --seeds 0 1 2 [--surrogate-steps 300] \
        [--mixture-steps 200] [--num-examples 32] [--out runs/bench_taskemb]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import gin
import jax
import seqio

from mtllama_jax import (
    atomic,
    data,
    decoding,
    evaluation,
    optim,
    partitioning,
    taskemb,
    taskemb_analysis,
    trainer,
)
from mtllama_jax.main import launch
from mtllama_jax.models.llama.config import LlamaConfig
from mtllama_jax.models.llama.model import LlamaForCausalLM
from mtllama_jax.tasks import synthetic

# gin/runs/demo.gin's model; tiny.gin's length.
CONFIG = LlamaConfig(
    vocab_size=1024,
    hidden_size=128,
    intermediate_size=384,
    num_layers=4,
    num_heads=4,
    num_kv_heads=2,
    head_dim=32,
    max_position_embeddings=256,
    dtype="float32",
    cpu_forms=jax.default_backend() == "cpu",
)
MODEL = LlamaForCausalLM(CONFIG)
LENGTH, BATCH = 256, 8


def all_tasks() -> list[str]:
    return [
        synthetic.task_name(c, t)
        for c in synthetic.CLUSTERS
        for t in range(synthetic.num_templates(c))
    ]


def make_trainer(layout, steps: int) -> trainer.Trainer:
    """The demo's optimizer: AdamW 3e-3, cosine with 5% warmup, no weight decay."""
    schedule = optim.learning_rate_schedule(3e-3, steps, "cosine", warmup_fraction=0.05)
    return trainer.Trainer(MODEL, layout, optim.make_optimizer(schedule, 0.0), schedule=schedule)


def train(step_fn: trainer.Trainer, mixture: str, steps: int, seed: int):
    """Params after `steps` from a fresh init (seed) on `mixture`."""
    state = step_fn.init_state(jax.random.key(seed))
    batches = data.batches(
        mixture, split="train", sequence_length=LENGTH, batch_size=BATCH, seed=seed
    )
    state, _ = trainer.train_loop(step_fn, state, batches, steps)
    return state.params


def mixture_of(name: str, tasks: list[str]) -> str:
    if name not in seqio.MixtureRegistry.names():
        seqio.MixtureRegistry.add(name, tasks, default_rate=1.0)
    return name


def clusters_figure(embedder, params, init_params, tasks, n, seed, out_dir):
    """ARI of data and baseline embeddings (trained surrogate) and of the untrained one."""
    emb = taskemb.embed_tasks(
        embedder,
        params,
        tasks,
        methods=("data", "baseline"),
        num_examples=n,
        seed=seed,
        progress=False,
    )
    emb["data (untrained surrogate)"] = taskemb.embed_tasks(
        embedder, init_params, tasks, methods=("data",), num_examples=n, seed=seed, progress=False
    )["data"]
    truth = taskemb_analysis.true_clusters(tasks)
    out = {}
    for method, by_task in emb.items():
        names, sim = taskemb_analysis.cosine_similarity({t: e.vector for t, e in by_task.items()})
        labels = taskemb_analysis.cluster(sim, len(set(truth.values())))
        out[method] = taskemb_analysis.adjusted_rand([truth[t] for t in names], labels)
        if out_dir:
            slug = method.split(" ")[0] + ("_untrained" if "untrained" in method else "")
            taskemb_analysis.heatmap(
                names,
                sim,
                truth,
                os.path.join(out_dir, f"similarity_{slug}.png"),
                f"{method} embedding (seed {seed})",
            )
    return out, emb


def prompts_figure(embedder, model, params, tasks, n, seed):
    """Per cluster: chosen, mean, random, oracle template accuracy."""
    emb = taskemb.embed_tasks(
        embedder,
        params,
        tasks,
        methods=("data", "model"),
        num_examples=n,
        seed=seed,
        answer=model.answer,
        progress=False,
    )
    accuracy = model.accuracy(tasks, "validation")
    return taskemb_analysis.prompt_selection(emb, accuracy, seed)


def mixture_figure(step_fn, data_emb, k, steps, seed, model_for, save):
    """Per held-out cluster: target accuracy after training on k nearest vs k random tasks."""
    candidates = evaluation.task_names(["synthetic_train"])
    vectors = {t: e.vector for t, e in data_emb.items()}
    out = {}
    for cluster in synthetic.HELD_OUT_CLUSTERS:
        target = synthetic.task_name(cluster, 0)
        picks = taskemb_analysis.select_mixture(target, vectors, candidates, k, seed)
        templates = [
            synthetic.task_name(cluster, t) for t in range(synthetic.num_templates(cluster))
        ]
        row = {"picks": picks}
        for kind, tasks in picks.items():
            mixture = mixture_of(f"bench_taskemb_{cluster}_{kind}_{seed}", tasks)
            started = time.perf_counter()
            params = train(step_fn, mixture, steps, seed)
            accuracy = model_for(params).accuracy(templates, "validation")
            row[kind] = statistics.fmean(accuracy.values())
            print(
                f"  mixture {cluster} {kind} {tasks}: {row[kind]:.1f} "
                f"({time.perf_counter() - started:.0f} s)",
                flush=True,
            )
            out[cluster] = row
            save()
    return out


def chance(cluster: str) -> float:
    examples = synthetic.generate(cluster, 0, "validation", 1)
    return 100.0 / len(examples[0].choices)


def run_seed(seed, args, layout, step_fns, decoder, vocabulary):
    """Every figure of one seed; results_seed<N>.json is rewritten after each part."""
    started = time.perf_counter()
    result: dict = {"mixture": {}}

    def save():
        result["seconds"] = time.perf_counter() - started
        atomic.write_text(
            os.path.join(args.out, f"results_seed{seed}.json"),
            json.dumps({str(seed): result}, indent=1) + "\n",
        )

    surrogate = train(step_fns["surrogate"], "synthetic_train", args.surrogate_steps, seed)
    init = partitioning.init_params(MODEL, layout, jax.random.key(seed))
    print(f"seed {seed}: surrogate trained ({time.perf_counter() - started:.0f} s)", flush=True)
    embedder = taskemb.Embedder(MODEL, layout, batch_size=16, max_length=LENGTH)
    tasks = all_tasks()
    ari, emb = clusters_figure(
        embedder, surrogate, init, tasks, args.num_examples, seed, args.out if seed == 0 else None
    )
    result["ari"] = ari
    save()
    print(f"seed {seed}: ARI {ari} ({time.perf_counter() - started:.0f} s)", flush=True)

    def model_for(params):
        return taskemb.AnswerModel(decoder, params, vocabulary, batch_size=32, max_new_tokens=16)

    result["prompts"] = prompts_figure(
        embedder, model_for(surrogate), surrogate, tasks, args.num_examples, seed
    )
    save()
    print(f"seed {seed}: prompts done ({time.perf_counter() - started:.0f} s)", flush=True)
    result["mixture"] = mixture_figure(
        step_fns["mixture"], emb["data"], args.k, args.mixture_steps, seed, model_for, save
    )
    save()
    return result


def tables(results: dict) -> str:
    """The three figures over the seeds that have them (a seed may still be running)."""
    mean = statistics.fmean

    def having(part):
        return sorted((s for s in results if part in results[s]), key=int)

    seeds = having("ari")
    lines = [
        "Clustering: adjusted Rand index against the 8 true clusters (30 tasks)",
        "",
        "| embedding | mean | " + " | ".join(f"seed {s}" for s in seeds) + " |",
        "|---" * (2 + len(seeds)) + "|",
    ]
    for method in results[seeds[0]]["ari"] if seeds else []:
        values = [results[s]["ari"][method] for s in seeds]
        lines.append(
            f"| {method} | {mean(values):.3f} | " + " | ".join(f"{v:.3f}" for v in values) + " |"
        )
    seeds = having("prompts")
    lines += [
        "",
        f"Prompt selection: rank accuracy (%) of the template picked, mean over seeds "
        f"{', '.join(seeds)}",
        "",
        "| cluster | chosen | mean template | random | oracle |",
        "|---|---|---|---|---|",
    ]
    groups = {
        "trained clusters (6)": list(synthetic.TRAINING_CLUSTERS),
        "held-out clusters (2)": list(synthetic.HELD_OUT_CLUSTERS),
    }
    groups |= {c: [c] for c in synthetic.CLUSTERS}
    for title, clusters in groups.items() if seeds else []:
        cells = [
            mean(results[s]["prompts"][c][f"{key}_accuracy"] for s in seeds for c in clusters)
            for key in ("chosen", "mean", "random", "oracle")
        ]
        lines.append(f"| {title} | " + " | ".join(f"{v:.1f}" for v in cells) + " |")
    lines += [
        "",
        "Mixture selection: target-cluster rank accuracy (%) after training on k "
        "nearest vs k random training tasks",
        "",
        "| target | chance | seeds | nearest (mean) | random (mean) | per seed nearest / random |",
        "|---|---|---|---|---|---|",
    ]
    picks = []
    for cluster in synthetic.HELD_OUT_CLUSTERS:
        rows = [
            (s, results[s]["mixture"][cluster])
            for s in sorted(results, key=int)
            if {"nearest", "random"} <= set(results[s].get("mixture", {}).get(cluster, {}))
        ]
        if not rows:
            continue
        near, rand = [r["nearest"] for _, r in rows], [r["random"] for _, r in rows]
        lines.append(
            f"| {cluster} | {chance(cluster):.1f} | {len(rows)} | {mean(near):.1f} | "
            f"{mean(rand):.1f} | "
            + ", ".join(f"{a:.1f} / {b:.1f}" for a, b in zip(near, rand))
            + " |"
        )
        picks += [
            f"seed {s} {cluster}: nearest {', '.join(r['picks']['nearest'])}; random "
            f"{', '.join(r['picks']['random'])}"
            for s, r in rows
        ]
    return "\n".join(lines + ["", *picks])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--surrogate-steps", type=int, default=300)
    parser.add_argument("--mixture-steps", type=int, default=200)
    parser.add_argument("--num-examples", type=int, default=32)
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--out", default="runs/bench_taskemb")
    parser.add_argument(
        "--tables-only", action="store_true", help="print the tables of --out/results.json and exit"
    )
    args = parser.parse_args()
    launch.hide_gpus_from_tensorflow()  # TF reads the data; JAX keeps the accelerators
    results = {}
    for name in sorted(os.listdir(args.out)) if os.path.isdir(args.out) else []:
        if name.startswith("results_seed") and name.endswith(".json"):
            with open(os.path.join(args.out, name)) as f:
                results |= json.load(f)
    if args.tables_only:
        print(tables(results))
        return
    gin.bind_parameter("synthetic_wrapper.name", "raw")  # the demo's prompts
    os.makedirs(args.out, exist_ok=True)
    layout = partitioning.Layout.create(1, -1, 1, "fsdp")
    step_fns = {
        "surrogate": make_trainer(layout, args.surrogate_steps),
        "mixture": make_trainer(layout, args.mixture_steps),
    }
    decoder = decoding.Decoder(MODEL, layout)
    for seed in args.seeds:
        if "seconds" in results.get(str(seed), {}) and len(results[str(seed)]["mixture"]) == len(
            synthetic.HELD_OUT_CLUSTERS
        ):
            continue
        results[str(seed)] = run_seed(seed, args, layout, step_fns, decoder, synthetic.vocabulary())
    print(tables(results))


if __name__ == "__main__":
    main()
