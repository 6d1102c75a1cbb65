"""What task embeddings are for: similar tasks, clusters, prompt and mixture choice, reports.

`mtllama_jax.taskemb` computes the embeddings; this module compares them
(cosine similarity and distance), clusters them against the true task clusters
(adjusted Rand index), picks prompts and mixtures by distance, and writes the
reports, the `.npz`, the similarity TSV and the heatmap (atomically).
"""

from __future__ import annotations

import io
import random
from typing import Any, Mapping, Sequence

import numpy as np

from mtllama_jax import atomic
from mtllama_jax.taskemb import Embedding, normalise


def cosine_similarity(embeddings: Mapping[str, np.ndarray]) -> tuple[list[str], np.ndarray]:
    """(task names, [n, n] cosine similarities) of a dict of embeddings."""
    names = list(embeddings)
    if not names:
        return names, np.zeros((0, 0))
    m = np.stack([normalise(embeddings[n]) for n in names])
    return names, np.clip(m @ m.T, -1.0, 1.0)


def distance(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine distance 1 - cos(a, b): 0 for the same direction."""
    return float(1.0 - np.dot(normalise(a), normalise(b)))


# ---- uses --------------------------------------------------------------------------------


def nearest(
    names: Sequence[str], similarity: np.ndarray, k: int = 3
) -> dict[str, list[tuple[str, float]]]:
    """Each task's k most similar other tasks, with their similarities."""
    out = {}
    for i, name in enumerate(names):
        order = [j for j in np.argsort(-similarity[i], kind="stable") if j != i][:k]
        out[name] = [(names[j], float(similarity[i, j])) for j in order]
    return out


def cluster(similarity: np.ndarray, num_clusters: int) -> np.ndarray:
    """Average-linkage agglomerative clusters of the cosine distances (labels [n])."""
    from sklearn.cluster import AgglomerativeClustering

    if len(similarity) < 2:
        return np.zeros(len(similarity), int)
    model = AgglomerativeClustering(
        n_clusters=min(num_clusters, len(similarity)), metric="precomputed", linkage="average"
    )
    return model.fit_predict(np.clip(1.0 - similarity, 0.0, None))


def adjusted_rand(true_labels: Sequence[str], predicted: Sequence[int]) -> float:
    """Adjusted Rand index of predicted clusters against the true ones (1: the same)."""
    from sklearn.metrics import adjusted_rand_score

    return float(adjusted_rand_score(list(true_labels), list(predicted)))


def select_mixture(
    target: str,
    embeddings: Mapping[str, np.ndarray],
    candidates: Sequence[str],
    k: int,
    seed: int = 0,
) -> dict[str, list[str]]:
    """The k candidate tasks nearest the target's embedding, and k drawn at random by `seed`."""
    pool = [c for c in candidates if c != target]
    if k > len(pool):
        raise ValueError(f"k={k} but only {len(pool)} candidate tasks besides {target!r}")
    ranked = sorted(pool, key=lambda c: distance(embeddings[target], embeddings[c]))
    return {"nearest": ranked[:k], "random": random.Random(seed).sample(pool, k)}


def select_prompt(
    distances: Mapping[str, float], accuracy: Mapping[str, float], seed: int = 0
) -> dict[str, Any]:
    """The template nearest its data embedding vs the mean, a random pick and the best one."""
    templates = list(distances)
    chosen = min(templates, key=lambda t: distances[t])
    picked = random.Random(seed).choice(templates)
    best = max(templates, key=lambda t: accuracy[t])
    return {
        "chosen": chosen,
        "chosen_accuracy": accuracy[chosen],
        "mean_accuracy": float(np.mean([accuracy[t] for t in templates])),
        "random": picked,
        "random_accuracy": accuracy[picked],
        "oracle": best,
        "oracle_accuracy": accuracy[best],
    }


def prompt_selection(
    embeddings: Mapping[str, Mapping[str, Embedding]], accuracy: Mapping[str, float], seed: int = 0
) -> dict[str, dict]:
    """Per cluster of template tasks: `select_prompt` on model-to-data distances."""
    tasks = [t for t in embeddings["data"] if t in accuracy]
    clusters = true_clusters(tasks)
    groups: dict[str, list[str]] = {}
    for t in tasks:
        groups.setdefault(clusters.get(t, "tasks"), []).append(t)
    out = {}
    for group, names in groups.items():
        dist = {
            t: distance(embeddings["model"][t].vector, embeddings["data"][t].vector) for t in names
        }
        out[group] = select_prompt(dist, {t: accuracy[t] for t in names}, seed) | {
            "distances": dist,
            "accuracy": {t: accuracy[t] for t in names},
        }
    return out


def markdown(report: Mapping[str, Any]) -> str:
    """The report of any mode as Markdown."""
    lines = [
        f"# Task embeddings: {report['mode']}",
        "",
        f"Surrogate {report['checkpoint']}; Fisher over {report['subset']} "
        f"({', '.join(report['parameters'])}); {report['num_examples']} examples per task "
        f"of split {report['split']!r}, seed {report['seed']}.",
        "",
    ]
    lines += [f"* note: {n}" for n in report["notes"]]
    if report["mode"] == "similarity":
        for method, result in report["methods"].items():
            lines += ["", f"## {method} embedding", ""]
            if "ari" in result:
                lines += [
                    f"Adjusted Rand index against the true clusters: {result['ari']:.3f} "
                    f"({result['clustered_tasks']} tasks).",
                    "",
                ]
            lines += ["| task | nearest tasks (cosine similarity) |", "|---|---|"]
            lines += [
                f"| {t} | " + ", ".join(f"{n} ({s:.3f})" for n, s in near) + " |"
                for t, near in result["nearest"].items()
            ]
    elif report["mode"] == "prompts":
        lines += [
            "",
            "| cluster | chosen (acc) | mean | random (acc) | oracle (acc) |",
            "|---|---|---|---|---|",
        ]
        for group, r in report["prompts"].items():
            lines.append(
                f"| {group} | {r['chosen']} ({r['chosen_accuracy']:.1f}) | "
                f"{r['mean_accuracy']:.1f} | {r['random']} ({r['random_accuracy']:.1f}) "
                f"| {r['oracle']} ({r['oracle_accuracy']:.1f}) |"
            )
        lines += ["", "| template | model-to-data distance | rank accuracy (%) |", "|---|---|---|"]
        for r in report["prompts"].values():
            lines += [
                f"| {t} | {d:.4f} | {r['accuracy'][t]:.1f} |"
                for t, d in sorted(r["distances"].items(), key=lambda kv: kv[1])
            ]
    else:
        lines += [
            "",
            f"Target {report['target']}; k = {report['k']}.",
            "",
            "| pick | tasks |",
            "|---|---|",
            f"| nearest | {', '.join(report['nearest'])} |",
            f"| random | {', '.join(report['random'])} |",
            "",
            "| candidate | distance to the target |",
            "|---|---|",
        ]
        lines += [
            f"| {t} | {d:.4f} |"
            for t, d in sorted(report["distances"].items(), key=lambda kv: kv[1])
        ]
    return "\n".join(lines) + "\n"


# ---- outputs -----------------------------------------------------------------------------


def write_npz(path: str, arrays: Mapping[str, np.ndarray]) -> None:
    """An .npz of named arrays (task name -> embedding), written atomically."""
    buffer = io.BytesIO()
    np.savez(buffer, **{k: np.asarray(v) for k, v in arrays.items()})
    atomic.write_bytes(path, buffer.getvalue())


def similarity_tsv(names: Sequence[str], similarity: np.ndarray) -> str:
    """The similarity matrix as tab-separated text with task names on both axes."""
    lines = ["task\t" + "\t".join(names)]
    lines += [
        names[i] + "\t" + "\t".join(f"{v:.4f}" for v in row) for i, row in enumerate(similarity)
    ]
    return "\n".join(lines) + "\n"


def heatmap(
    names: Sequence[str], similarity: np.ndarray, clusters: Mapping[str, str], path: str, title: str
) -> None:
    """A PNG of the similarity matrix, tasks ordered by cluster, lines between clusters."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = sorted(range(len(names)), key=lambda i: (clusters.get(names[i], ""), names[i]))
    m = similarity[np.ix_(order, order)]
    labels = [names[i] for i in order]
    size = max(4.0, 0.25 * len(names) + 2)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    image = ax.imshow(m, cmap="viridis", vmin=float(np.min(m)), vmax=1.0)
    groups = [clusters.get(n, "") for n in labels]
    for i in range(1, len(groups)):
        if groups[i] != groups[i - 1]:
            ax.axhline(i - 0.5, color="white", lw=1)
            ax.axvline(i - 0.5, color="white", lw=1)
    ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=6)
    ax.set_yticks(range(len(labels)), labels, fontsize=6)
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="cosine similarity")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    atomic.write_bytes(path, buffer.getvalue())


def true_clusters(names: Sequence[str]) -> dict[str, str]:
    """The true cluster of each task: the synthetic world's, or t0_train_tasks.tsv's."""
    from mtllama_jax.tasks import p3, synthetic

    by_name = {
        synthetic.task_name(c, t): c
        for c in synthetic.CLUSTERS
        for t in range(synthetic.num_templates(c))
    }
    by_name.update({row["task"]: row["task_cluster"] for row in p3.t0_train_table()})
    return {n: by_name[n] for n in names if n in by_name}
