"""Task embeddings: which tasks are alike, which prompt suits a model, which tasks help a target.

Three embeddings of a task, all computed with one fixed *surrogate* checkpoint so
they live in one space:

* **data embedding** (TaskEmb's FIM method): the diagonal of the empirical
  Fisher information of the response log-likelihood, E[(d log p(y|x) / d theta)^2]
  over N examples (x the prompt, y the gold response and its EOS), for a small
  fixed subset of the parameters (`PARAM_SUBSETS`), normalised to unit length;
* **model embedding** (FUTE's unification): the same Fisher, with y replaced by a
  model's own greedy answer to x. A model that answers every example as the
  data does gets exactly the data embedding; the further its answers are from
  the gold ones, the further its embedding is;
* **baseline**: the surrogate's mean final hidden state (after the last RMSNorm)
  over the prompt tokens, normalised.

The parameter subset is the RMSNorm gains by default (`norms`: every layer's
attention and MLP norm plus the final norm, 2 * layers * embed + embed values,
266,240 for LLaMA-7B). Each gain scales one feature of the residual stream, so
the gradient on it says how much the task's loss leans on that feature, layer by
layer; the subset is small enough that a per-example gradient costs little
beyond the backward pass, and its size depends on neither the vocabulary nor the
MLP width. `final_norm` keeps only the last layer's gain (embed values).

Per-example gradients are `jax.vmap` of `jax.grad` over the rows of a batch,
one example per row (batches built by `mtllama_jax.data`), sharded like
evaluation: params on the mesh by the logical rules, the vmapped rows over the
batch mesh axes (`spmd_axis_name`). Distances are cosine distances (1 - cos).
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import random
import warnings
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from mtllama_jax import losses, partitioning
from mtllama_jax.config import LlamaConfig
from mtllama_jax.model import LlamaForCausalLM

# Which parameters the Fisher is taken over: param paths ("/"-joined) of the model.
PARAM_SUBSETS = {
    "norms": ("layers/attention_norm/scale", "layers/mlp_norm/scale", "final_norm/scale"),
    "final_norm": ("final_norm/scale",),
}
METHODS = ("data", "model", "baseline")


class MissingTargets(ValueError):
    """A task has no `targets` feature, so it has no responses to take a Fisher of."""


class NoExamples(ValueError):
    """A task's split yielded no usable example."""


class VocabularyMismatch(ValueError):
    """The checkpoint's vocabulary is not the one the task's tokens come from."""


class FewerExamples(UserWarning):
    """A task has fewer examples than asked for; the embedding uses those there are."""


@dataclasses.dataclass
class Embedding:
    """One task's embedding: the unit vector, how many examples it averages, and notes."""

    vector: np.ndarray
    examples: int
    notes: list[str] = dataclasses.field(default_factory=list)


def subset_paths(config: LlamaConfig, subset: str) -> tuple[str, ...]:
    """The param paths of a named subset (checked against the model's tree)."""
    if subset not in PARAM_SUBSETS:
        raise ValueError(f"taskemb subset={subset!r}: choose one of {tuple(PARAM_SUBSETS)}")
    names = {"/".join(_names(p)) for p, _ in jax.tree_util.tree_leaves_with_path(
        nn.unbox(partitioning.abstract_params(config)))}
    missing = [p for p in PARAM_SUBSETS[subset] if p not in names]
    if missing:
        raise ValueError(f"subset {subset!r}: the model has no parameter(s) {missing}")
    return PARAM_SUBSETS[subset]


def _names(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", k)) for k in path)


def _split(params, paths: Sequence[str]):
    """(subset leaves in `paths` order, a function putting new leaves back into `params`)."""
    def get(tree, path):
        for key in path.split("/"):
            tree = tree[key]
        return tree

    def put(tree, path, value):
        head, *rest = path.split("/")
        out = dict(tree)
        out[head] = value if not rest else put(tree[head], "/".join(rest), value)
        return out

    def merge(leaves):
        tree = params
        for path, leaf in zip(paths, leaves):
            tree = put(tree, path, leaf)
        return tree

    return [get(params, p) for p in paths], merge


def normalise(vector: np.ndarray) -> np.ndarray:
    """`vector` / its L2 norm (a zero vector stays zero)."""
    norm = float(np.linalg.norm(vector))
    return np.asarray(vector, np.float64) / norm if norm > 0 else np.asarray(vector, np.float64)


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


class Embedder:
    """Compiled Fisher and hidden-state passes of one surrogate model on one mesh."""

    def __init__(self, config: LlamaConfig, mesh=None, rules=None, *, subset: str = "norms",
                 batch_size: int = 16, max_length: int | None = None, length_bucket: int = 64):
        if mesh is None:
            mesh = partitioning.make_mesh(1, 1, 1, devices=jax.devices()[:1])
        self.config, self.mesh = config, mesh
        self.rules = partitioning.logical_axis_rules("data") if rules is None else rules
        self.paths = subset_paths(config, subset)
        self.model = LlamaForCausalLM(config)
        self.param_shardings = partitioning.param_shardings(config, mesh, self.rules)
        self.batch_sharding = partitioning.batch_sharding(mesh, self.rules)
        spec = self.batch_sharding.spec[0] if self.batch_sharding.spec else None
        self.row_axes = (spec,) if isinstance(spec, str) else tuple(spec or ())
        multiple = math.prod(mesh.shape[a] for a in self.row_axes)
        if batch_size < 1:
            raise ValueError(f"taskemb batch_size={batch_size}: must be >= 1")
        self.batch_size = multiple * math.ceil(batch_size / multiple)
        self.max_length = max_length or config.max_position_embeddings
        self.length_bucket = length_bucket
        self.cut_prompts = 0
        self._compiled: dict = {}

    # ---- public ----------------------------------------------------------------------------

    def fisher(self, params, pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
               progress: str | None = None) -> tuple[np.ndarray, int]:
        """(mean squared per-example gradient, flattened over the subset; examples used).

        `pairs` are (prompt ids without BOS, response ids with EOS). The
        gradient is of the summed log-likelihood of the response tokens.
        """
        return self._mean("fisher", params, pairs, progress)

    def hidden_mean(self, params, pairs, progress: str | None = None) -> tuple[np.ndarray, int]:
        """(mean over examples of the mean final hidden state over prompt tokens; examples)."""
        return self._mean("hidden", params, pairs, progress)

    def _mean(self, kind, params, pairs, progress):
        total, used = None, 0
        params = self._put(params)
        for batch, rows in self._batches(pairs, progress, kind):
            out = self._fn(kind, batch["input_tokens"].shape)(
                params, *(self._rows(batch[k]) for k in _FEATURES))
            out = np.asarray(jax.device_get(out), np.float64)
            total = out if total is None else total + out
            used += rows
        if not used:
            raise NoExamples("no example to embed: the task gave no (prompt, response) pair")
        return total / used, used

    # ---- batching --------------------------------------------------------------------------

    def _batches(self, pairs, progress, what):
        """One example per row (`data.rows_to_batch`); too long: the prompt's start is cut.

        An empty response (EOS alone, a model that says nothing) is kept: it is
        an answer. Cut prompts are counted in `self.cut_prompts`.
        """
        from tqdm import tqdm

        from mtllama_jax import data

        fitted = []
        for inputs, targets in pairs:
            inputs, targets = list(inputs), list(targets)[:self.max_length]
            excess = len(inputs) + len(targets) - self.max_length
            if excess > 0:
                inputs = inputs[excess:]
                self.cut_prompts += 1
            fitted.append((np.asarray(inputs, np.int32), np.asarray(targets, np.int32)))
        chunks = [fitted[i:i + self.batch_size] for i in range(0, len(fitted), self.batch_size)]
        for chunk in tqdm(chunks, desc=f"{what} {progress}", disable=progress is None):
            longest = max(len(i) + len(t) for i, t in chunk)
            length = min(self.max_length,
                         self.length_bucket * math.ceil(longest / self.length_bucket))
            rows = [[pair] for pair in chunk] + [[]] * (self.batch_size - len(chunk))
            yield data.rows_to_batch(rows, length, self.config.bos_token_id), len(chunk)

    def _put(self, params):
        return jax.device_put(params, self.param_shardings)

    def _rows(self, array: np.ndarray) -> jax.Array:
        return jax.make_array_from_callback(array.shape, self.batch_sharding,
                                            lambda index: array[index])

    # ---- compiled --------------------------------------------------------------------------

    def _fn(self, kind: str, shape: tuple[int, int]):
        key = (kind, shape)
        if key not in self._compiled:
            body = self._fisher_body if kind == "fisher" else self._hidden_body
            b = self.batch_sharding
            fn = jax.jit(body, in_shardings=(self.param_shardings, b, b, b, b, b),
                         out_shardings=NamedSharding(self.mesh, PartitionSpec()))
            self._compiled[key] = _in_context(fn, self.mesh, self.rules)
        return self._compiled[key]

    def _fisher_body(self, params, tokens, targets, positions, segments, weights):
        leaves, merge = _split(params, self.paths)
        model = self.model

        def loglik(leaves, row):
            tok, tgt, pos, seg, w = (x[None] for x in row)
            logits = model.apply({"params": merge(leaves)}, tok, positions=pos, segment_ids=seg)
            return -losses.cross_entropy_sums(logits, tgt, w, seg)["nll"]

        # Rows are examples: the vmapped axis is split over the batch mesh axes and
        # the model sees a batch of one, so its own batch axis must stay unsharded.
        per_example = jax.vmap(jax.grad(loglik), in_axes=(None, 0),
                               spmd_axis_name=self.row_axes or None)
        with nn.logical_axis_rules(_unbatched(self.rules, self.row_axes)):
            grads = per_example(leaves, (tokens, targets, positions, segments, weights))
        return jnp.concatenate([jnp.sum(jnp.square(g.astype(jnp.float32)), axis=0).reshape(-1)
                                for g in grads])

    def _hidden_body(self, params, tokens, targets, positions, segments, weights):
        del targets
        _, state = self.model.apply(
            {"params": params}, tokens, positions=positions, segment_ids=segments,
            capture_intermediates=lambda module, method: module.name == "final_norm",
            mutable=["intermediates"])
        hidden = state["intermediates"]["final_norm"]["__call__"][0].astype(jnp.float32)
        prompt = ((segments != 0) & (weights == 0)).astype(jnp.float32)  # BOS + prompt
        per_row = jnp.sum(hidden * prompt[..., None], axis=1) / jnp.maximum(
            jnp.sum(prompt, axis=1), 1.0)[:, None]
        return jnp.sum(per_row, axis=0)


_FEATURES = ("input_tokens", "target_tokens", "positions", "segment_ids", "loss_weights")


def _unbatched(rules, row_axes: tuple[str, ...]):
    """The rules inside the per-example vmap: no logical axis on the rows' mesh axes."""
    def keep(axes):
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        left = tuple(a for a in axes if a not in row_axes)
        return left[0] if len(left) == 1 else (left or None)

    return tuple((name, None if name == "batch" else keep(axes)) for name, axes in rules)


def _in_context(fn, mesh, rules):
    def call(*args):
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            return fn(*args)

    return call


# ---- tasks -> pairs ----------------------------------------------------------------------


def load_pairs(task: str, split: str, num_examples: int, seed: int = 0
               ) -> tuple[list[tuple[list[int], list[int]]], list[str]]:
    """Up to `num_examples` (inputs, targets) of a seqio task, and notes (fewer than asked).

    The examples are the first `num_examples` of the split after a shuffle by
    `seed` (seqio's, so the same examples for every method and model).
    """
    import seqio

    provider = seqio.get_mixture_or_task(task)
    if "targets" not in provider.output_features:
        raise MissingTargets(
            f"task {task!r} has no 'targets' output feature (it has "
            f"{sorted(provider.output_features)}); a task embedding needs responses: register "
            "the task with a 'targets' feature")
    ds = provider.get_dataset(sequence_length=None, split=split, shuffle=True, seed=seed,
                              num_epochs=1)
    pairs = [(ex["inputs"].tolist() if "inputs" in ex else [], ex["targets"].tolist())
             for ex in ds.take(num_examples).as_numpy_iterator()]
    if not pairs:
        raise NoExamples(f"task {task!r}: split {split!r} has no examples")
    notes = []
    if len(pairs) < num_examples:
        note = (f"task {task!r}: split {split!r} has {len(pairs)} examples, fewer than "
                f"num_examples={num_examples}; its embeddings average the {len(pairs)} there are")
        warnings.warn(note, FewerExamples, stacklevel=2)
        notes.append(note)
    return pairs, notes


def check_vocabulary(config: LlamaConfig, tokenizer: str | None, task: str) -> None:
    """VocabularyMismatch when the checkpoint cannot read the task's token ids.

    The task's targets vocabulary must have no more pieces than the model has
    rows, and, when the checkpoint folder has a tokenizer.model, be that file.
    """
    import seqio

    vocab = seqio.get_mixture_or_task(task).output_features["targets"].vocabulary
    size = int(vocab.vocab_size)
    if size > config.vocab_size:
        raise VocabularyMismatch(
            f"task {task!r} is tokenised with a {size}-piece vocabulary ({vocab}), but the "
            f"checkpoint's config.json has vocab_size {config.vocab_size}: use a checkpoint "
            "trained with the task's tokenizer, or register the task with the checkpoint's")
    mine = getattr(vocab, "sentencepiece_model_file", None)
    if tokenizer and mine and os.path.exists(mine):
        with open(tokenizer, "rb") as f, open(mine, "rb") as g:
            same = f.read() == g.read()
        if not same:
            raise VocabularyMismatch(
                f"task {task!r} is tokenised with {mine}, but the checkpoint's tokenizer is "
                f"{tokenizer} (another file): use a checkpoint trained with the task's "
                "tokenizer, or point tokenizer_settings.path at the checkpoint's")


# ---- model answers -----------------------------------------------------------------------


def model_answers(decoder, params, vocabulary, prompts: Sequence[Sequence[int]], *,
                  batch_size: int = 16, max_new_tokens: int = 32,
                  stop_strings: Sequence[str] = ("\n",), progress: str | None = None
                  ) -> list[list[int]]:
    """A model's greedy answers to prompts (ids without BOS) as response ids ending in EOS.

    The answer stops at EOS or a stop string (MT-LLaMA's protocol: a newline);
    an answer cut at a stop string is its text re-encoded.
    """
    from tqdm import tqdm

    bos, eos = decoder.config.bos_token_id, decoder.config.eos_token_id
    out = []
    chunks = [prompts[i:i + batch_size] for i in range(0, len(prompts), batch_size)]
    for chunk in tqdm(chunks, desc=f"answers {progress}", disable=progress is None):
        gens = decoder.generate(params, [[bos] + list(p) for p in chunk],
                                max_new_tokens=max_new_tokens, stop_token_ids=[eos],
                                stop_strings=stop_strings, detokenize=vocabulary.decode)
        for g in gens:
            ids = list(vocabulary.encode(g.text)) if g.finish_reason == "stop" else g.tokens
            out.append(ids + [eos])
    return out


class AnswerModel:
    """A model that answers prompts greedily (for model embeddings) and is scored on tasks."""

    def __init__(self, decoder, params, vocabulary, *, batch_size: int = 16,
                 max_new_tokens: int = 32):
        self.decoder, self.params, self.vocabulary = decoder, params, vocabulary
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens

    def answer(self, prompts: Sequence[Sequence[int]]) -> list[list[int]]:
        """Greedy answers (ids ending in EOS) to prompts (ids without BOS)."""
        return model_answers(self.decoder, self.params, self.vocabulary, prompts,
                             batch_size=self.batch_size, max_new_tokens=self.max_new_tokens)

    def accuracy(self, tasks: Sequence[str], split: str, max_examples: int | None = None
                 ) -> dict[str, float]:
        """Rank-classification accuracy (%, T0's protocol) of each task on `split`."""
        from mtllama_jax import evaluation

        options = evaluation.EvalOptions(protocols=("rank",), split=split,
                                         batch_size=self.batch_size, max_examples=max_examples)
        results = evaluation.evaluate(self.params, self.decoder.config, self.vocabulary, tasks,
                                      options, decoder=self.decoder)
        return {t: r["rank"]["accuracy"] for t, r in results["tasks"].items() if "rank" in r}


def data_embedding(embedder: Embedder, params, pairs, progress: str | None = None) -> Embedding:
    """The normalised Fisher of the gold responses."""
    fisher, used = embedder.fisher(params, pairs, progress)
    return Embedding(normalise(fisher), used)


def model_embedding(embedder: Embedder, surrogate_params, pairs, answers: Sequence[Sequence[int]],
                    progress: str | None = None) -> Embedding:
    """The normalised Fisher (surrogate) of the same prompts with a model's answers as labels."""
    if len(answers) != len(pairs):
        raise ValueError(f"{len(answers)} answers for {len(pairs)} examples; give one each")
    relabelled = [(inputs, list(a)) for (inputs, _), a in zip(pairs, answers)]
    fisher, used = embedder.fisher(surrogate_params, relabelled, progress)
    return Embedding(normalise(fisher), used)


def baseline_embedding(embedder: Embedder, params, pairs, progress: str | None = None
                       ) -> Embedding:
    """The normalised mean final hidden state over the prompts."""
    mean, used = embedder.hidden_mean(params, pairs, progress)
    return Embedding(normalise(mean), used)


def embed_tasks(embedder: Embedder, params, tasks: Sequence[str], *,
                methods: Sequence[str] = ("data", "baseline"), split: str = "train",
                num_examples: int = 64, seed: int = 0, answer=None, progress: bool = True
                ) -> dict[str, dict[str, Embedding]]:
    """{method: {task: Embedding}} for seqio tasks, all from the same N examples per task.

    `answer(prompts) -> responses` (e.g. `model_answers` bound to a model) gives
    the labels of the `model` method; the surrogate is `params` for every method.
    """
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise ValueError(f"taskemb methods={tuple(methods)!r}: choose from {METHODS}")
    if "model" in methods and answer is None:
        raise ValueError("the 'model' method needs a model to answer the prompts")
    out: dict[str, dict[str, Embedding]] = {m: {} for m in methods}
    for task in tasks:
        pairs, notes = load_pairs(task, split, num_examples, seed)
        show = task if progress else None
        cut_before = embedder.cut_prompts
        for method in methods:
            if method == "data":
                emb = data_embedding(embedder, params, pairs, show)
            elif method == "baseline":
                emb = baseline_embedding(embedder, params, pairs, show)
            else:
                emb = model_embedding(embedder, params, pairs, answer([p for p, _ in pairs]), show)
            out[method][task] = emb
        cut = embedder.cut_prompts - cut_before
        if cut:
            notes.append(f"task {task!r}: {cut} prompts cut from the left to fit "
                         f"max_length={embedder.max_length}")
        for method in methods:
            out[method][task].notes = list(notes)
    return out


# ---- uses --------------------------------------------------------------------------------


def nearest(names: Sequence[str], similarity: np.ndarray, k: int = 3
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
    model = AgglomerativeClustering(n_clusters=min(num_clusters, len(similarity)),
                                    metric="precomputed", linkage="average")
    return model.fit_predict(np.clip(1.0 - similarity, 0.0, None))


def adjusted_rand(true_labels: Sequence[str], predicted: Sequence[int]) -> float:
    """Adjusted Rand index of predicted clusters against the true ones (1: the same)."""
    from sklearn.metrics import adjusted_rand_score

    return float(adjusted_rand_score(list(true_labels), list(predicted)))


def select_mixture(target: str, embeddings: Mapping[str, np.ndarray], candidates: Sequence[str],
                   k: int, seed: int = 0) -> dict[str, list[str]]:
    """The k candidate tasks nearest the target's embedding, and k drawn at random by `seed`."""
    pool = [c for c in candidates if c != target]
    if k > len(pool):
        raise ValueError(f"k={k} but only {len(pool)} candidate tasks besides {target!r}")
    ranked = sorted(pool, key=lambda c: distance(embeddings[target], embeddings[c]))
    return {"nearest": ranked[:k], "random": random.Random(seed).sample(pool, k)}


def select_prompt(distances: Mapping[str, float], accuracy: Mapping[str, float], seed: int = 0
                  ) -> dict[str, Any]:
    """The template nearest its data embedding vs the mean, a random pick and the best one."""
    templates = list(distances)
    chosen = min(templates, key=lambda t: distances[t])
    picked = random.Random(seed).choice(templates)
    best = max(templates, key=lambda t: accuracy[t])
    return {
        "chosen": chosen, "chosen_accuracy": accuracy[chosen],
        "mean_accuracy": float(np.mean([accuracy[t] for t in templates])),
        "random": picked, "random_accuracy": accuracy[picked],
        "oracle": best, "oracle_accuracy": accuracy[best],
    }


def prompt_selection(embeddings: Mapping[str, Mapping[str, Embedding]],
                     accuracy: Mapping[str, float], seed: int = 0) -> dict[str, dict]:
    """Per cluster of template tasks: `select_prompt` on model-to-data distances."""
    tasks = [t for t in embeddings["data"] if t in accuracy]
    clusters = true_clusters(tasks)
    groups: dict[str, list[str]] = {}
    for t in tasks:
        groups.setdefault(clusters.get(t, "tasks"), []).append(t)
    out = {}
    for group, names in groups.items():
        dist = {t: distance(embeddings["model"][t].vector, embeddings["data"][t].vector)
                for t in names}
        out[group] = select_prompt(dist, {t: accuracy[t] for t in names}, seed) | {
            "distances": dist, "accuracy": {t: accuracy[t] for t in names}}
    return out


def markdown(report: Mapping[str, Any]) -> str:
    """The report of any mode as Markdown."""
    lines = [f"# Task embeddings: {report['mode']}", "",
             f"Surrogate {report['checkpoint']}; Fisher over {report['subset']} "
             f"({', '.join(report['parameters'])}); {report['num_examples']} examples per task "
             f"of split {report['split']!r}, seed {report['seed']}.", ""]
    lines += [f"* note: {n}" for n in report["notes"]]
    if report["mode"] == "similarity":
        for method, result in report["methods"].items():
            lines += ["", f"## {method} embedding", ""]
            if "ari" in result:
                lines += [f"Adjusted Rand index against the true clusters: {result['ari']:.3f} "
                          f"({result['clustered_tasks']} tasks).", ""]
            lines += ["| task | nearest tasks (cosine similarity) |", "|---|---|"]
            lines += [f"| {t} | " + ", ".join(f"{n} ({s:.3f})" for n, s in near) + " |"
                      for t, near in result["nearest"].items()]
    elif report["mode"] == "prompts":
        lines += ["", "| cluster | chosen (acc) | mean | random (acc) | oracle (acc) |",
                  "|---|---|---|---|---|"]
        for group, r in report["prompts"].items():
            lines.append(f"| {group} | {r['chosen']} ({r['chosen_accuracy']:.1f}) | "
                         f"{r['mean_accuracy']:.1f} | {r['random']} ({r['random_accuracy']:.1f}) "
                         f"| {r['oracle']} ({r['oracle_accuracy']:.1f}) |")
        lines += ["", "| template | model-to-data distance | rank accuracy (%) |", "|---|---|---|"]
        for r in report["prompts"].values():
            lines += [f"| {t} | {d:.4f} | {r['accuracy'][t]:.1f} |"
                      for t, d in sorted(r["distances"].items(), key=lambda kv: kv[1])]
    else:
        lines += ["", f"Target {report['target']}; k = {report['k']}.", "",
                  "| pick | tasks |", "|---|---|",
                  f"| nearest | {', '.join(report['nearest'])} |",
                  f"| random | {', '.join(report['random'])} |", "",
                  "| candidate | distance to the target |", "|---|---|"]
        lines += [f"| {t} | {d:.4f} |"
                  for t, d in sorted(report["distances"].items(), key=lambda kv: kv[1])]
    return "\n".join(lines) + "\n"


# ---- outputs -----------------------------------------------------------------------------


def write_atomic(path: str, content: str | bytes) -> None:
    """Writes a file under a temporary name beside it, then renames (the user's umask holds)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    data = content.encode("utf-8") if isinstance(content, str) else content
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_npz(path: str, arrays: Mapping[str, np.ndarray]) -> None:
    """An .npz of named arrays (task name -> embedding), written atomically."""
    buffer = io.BytesIO()
    np.savez(buffer, **{k: np.asarray(v) for k, v in arrays.items()})
    write_atomic(path, buffer.getvalue())


def similarity_tsv(names: Sequence[str], similarity: np.ndarray) -> str:
    """The similarity matrix as tab-separated text with task names on both axes."""
    lines = ["task\t" + "\t".join(names)]
    lines += [names[i] + "\t" + "\t".join(f"{v:.4f}" for v in row)
              for i, row in enumerate(similarity)]
    return "\n".join(lines) + "\n"


def heatmap(names: Sequence[str], similarity: np.ndarray, clusters: Mapping[str, str],
            path: str, title: str) -> None:
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
    write_atomic(path, buffer.getvalue())


def true_clusters(names: Sequence[str]) -> dict[str, str]:
    """The true cluster of each task: the synthetic world's, or t0_train_tasks.tsv's."""
    from mtllama_jax.tasks import p3, synthetic

    by_name = {synthetic.task_name(c, t): c for c in synthetic.CLUSTERS
               for t in range(synthetic.num_templates(c))}
    by_name.update({row["task"]: row["task_cluster"] for row in p3.t0_train_table()})
    return {n: by_name[n] for n in names if n in by_name}
