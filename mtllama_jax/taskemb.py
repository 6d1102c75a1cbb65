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
import math
import os
import warnings
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mtllama_jax import losses, partitioning
from mtllama_jax.models.llama.config import LlamaConfig

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


def subset_paths(abstract_params, subset: str) -> tuple[str, ...]:
    """The param paths of a named subset (checked against the model's abstract params)."""
    if subset not in PARAM_SUBSETS:
        raise ValueError(f"taskemb subset={subset!r}: choose one of {tuple(PARAM_SUBSETS)}")
    names = {
        "/".join(_names(p))
        for p, _ in jax.tree_util.tree_leaves_with_path(nn.unbox(abstract_params))
    }
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


class Embedder:
    """Compiled Fisher and hidden-state passes of one surrogate model on one layout."""

    def __init__(
        self,
        model: nn.Module,
        layout: partitioning.Layout | None = None,
        *,
        subset: str = "norms",
        batch_size: int = 16,
        max_length: int | None = None,
        length_bucket: int = 64,
    ):
        """`model`: the flax language model (carries `.config`); no layout: one device."""
        self.model, self.config = model, model.config
        self.layout = partitioning.Layout.one_device() if layout is None else layout
        abstract = partitioning.abstract_params(model)
        self.paths = subset_paths(abstract, subset)
        self.param_shardings = self.layout.param_shardings(abstract)
        self.batch_sharding = self.layout.batch_sharding()
        self.row_axes = self.layout.batch_axes
        multiple = self.layout.batch_shards
        if batch_size < 1:
            raise ValueError(f"taskemb batch_size={batch_size}: must be >= 1")
        self.batch_size = multiple * math.ceil(batch_size / multiple)
        self.max_length = max_length or self.config.max_position_embeddings
        self.length_bucket = length_bucket
        self.cut_prompts = 0
        self._compiled: dict = {}

    # ---- public ----------------------------------------------------------------------------

    def fisher(
        self,
        params,
        pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
        progress: str | None = None,
    ) -> tuple[np.ndarray, int]:
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
                params, *(self._rows(batch[k]) for k in _FEATURES)
            )
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
            inputs, targets = list(inputs), list(targets)[: self.max_length]
            excess = len(inputs) + len(targets) - self.max_length
            if excess > 0:
                inputs = inputs[excess:]
                self.cut_prompts += 1
            fitted.append((np.asarray(inputs, np.int32), np.asarray(targets, np.int32)))
        chunks = [fitted[i : i + self.batch_size] for i in range(0, len(fitted), self.batch_size)]
        for chunk in tqdm(chunks, desc=f"{what} {progress}", disable=progress is None):
            longest = max(len(i) + len(t) for i, t in chunk)
            length = min(
                self.max_length, self.length_bucket * math.ceil(longest / self.length_bucket)
            )
            rows = [[pair] for pair in chunk] + [[]] * (self.batch_size - len(chunk))
            yield data.rows_to_batch(rows, length, self.config.bos_token_id), len(chunk)

    def _put(self, params):
        return jax.device_put(params, self.param_shardings)

    def _rows(self, array: np.ndarray) -> jax.Array:
        return jax.make_array_from_callback(
            array.shape, self.batch_sharding, lambda index: array[index]
        )

    # ---- compiled --------------------------------------------------------------------------

    def _fn(self, kind: str, shape: tuple[int, int]):
        key = (kind, shape)
        if key not in self._compiled:
            body = self._fisher_body if kind == "fisher" else self._hidden_body
            b = self.batch_sharding
            fn = jax.jit(
                body,
                in_shardings=(self.param_shardings, b, b, b, b, b),
                out_shardings=self.layout.replicated(),
            )
            self._compiled[key] = _in_context(fn, self.layout)
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
        per_example = jax.vmap(
            jax.grad(loglik), in_axes=(None, 0), spmd_axis_name=self.row_axes or None
        )
        with nn.logical_axis_rules(_unbatched(self.layout.rules, self.row_axes)):
            grads = per_example(leaves, (tokens, targets, positions, segments, weights))
        return jnp.concatenate(
            [jnp.sum(jnp.square(g.astype(jnp.float32)), axis=0).reshape(-1) for g in grads]
        )

    def _hidden_body(self, params, tokens, targets, positions, segments, weights):
        del targets
        _, state = self.model.apply(
            {"params": params},
            tokens,
            positions=positions,
            segment_ids=segments,
            capture_intermediates=lambda module, method: module.name == "final_norm",
            mutable=["intermediates"],
        )
        hidden = state["intermediates"]["final_norm"]["__call__"][0].astype(jnp.float32)
        prompt = ((segments != 0) & (weights == 0)).astype(jnp.float32)  # BOS + prompt
        per_row = (
            jnp.sum(hidden * prompt[..., None], axis=1)
            / jnp.maximum(jnp.sum(prompt, axis=1), 1.0)[:, None]
        )
        return jnp.sum(per_row, axis=0)


_FEATURES = ("input_tokens", "target_tokens", "positions", "segment_ids", "loss_weights")


def _unbatched(rules, row_axes: tuple[str, ...]):
    """The rules inside the per-example vmap: no logical axis on the rows' mesh axes."""

    def keep(axes):
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        left = tuple(a for a in axes if a not in row_axes)
        return left[0] if len(left) == 1 else (left or None)

    return tuple((name, None if name == "batch" else keep(axes)) for name, axes in rules)


def _in_context(fn, layout: partitioning.Layout):
    def call(*args):
        with layout.context():
            return fn(*args)

    return call


# ---- tasks -> pairs ----------------------------------------------------------------------


def load_pairs(
    task: str, split: str, num_examples: int, seed: int = 0
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
            "the task with a 'targets' feature"
        )
    ds = provider.get_dataset(
        sequence_length=None, split=split, shuffle=True, seed=seed, num_epochs=1
    )
    pairs = [
        (ex["inputs"].tolist() if "inputs" in ex else [], ex["targets"].tolist())
        for ex in ds.take(num_examples).as_numpy_iterator()
    ]
    if not pairs:
        raise NoExamples(f"task {task!r}: split {split!r} has no examples")
    notes = []
    if len(pairs) < num_examples:
        note = (
            f"task {task!r}: split {split!r} has {len(pairs)} examples, fewer than "
            f"num_examples={num_examples}; its embeddings average the {len(pairs)} there are"
        )
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
            "trained with the task's tokenizer, or register the task with the checkpoint's"
        )
    mine = getattr(vocab, "sentencepiece_model_file", None)
    if tokenizer and mine and os.path.exists(mine):
        with open(tokenizer, "rb") as f, open(mine, "rb") as g:
            same = f.read() == g.read()
        if not same:
            raise VocabularyMismatch(
                f"task {task!r} is tokenised with {mine}, but the checkpoint's tokenizer is "
                f"{tokenizer} (another file): use a checkpoint trained with the task's "
                "tokenizer, or point tokenizer_settings.path at the checkpoint's"
            )


# ---- model answers -----------------------------------------------------------------------


def model_answers(
    decoder,
    params,
    vocabulary,
    prompts: Sequence[Sequence[int]],
    *,
    batch_size: int = 16,
    max_new_tokens: int = 32,
    stop_strings: Sequence[str] = ("\n",),
    progress: str | None = None,
) -> list[list[int]]:
    """A model's greedy answers to prompts (ids without BOS) as response ids ending in EOS.

    The answer stops at EOS or a stop string (MT-LLaMA's protocol: a newline);
    an answer cut at a stop string is its text re-encoded.
    """
    from tqdm import tqdm

    bos, eos = decoder.config.bos_token_id, decoder.config.eos_token_id
    out = []
    chunks = [prompts[i : i + batch_size] for i in range(0, len(prompts), batch_size)]
    for chunk in tqdm(chunks, desc=f"answers {progress}", disable=progress is None):
        gens = decoder.generate(
            params,
            [[bos] + list(p) for p in chunk],
            max_new_tokens=max_new_tokens,
            stop_token_ids=[eos],
            stop_strings=stop_strings,
            detokenize=vocabulary.decode,
        )
        for g in gens:
            ids = list(vocabulary.encode(g.text)) if g.finish_reason == "stop" else g.tokens
            out.append(ids + [eos])
    return out


class AnswerModel:
    """A model that answers prompts greedily (for model embeddings) and is scored on tasks."""

    def __init__(
        self, decoder, params, vocabulary, *, batch_size: int = 16, max_new_tokens: int = 32
    ):
        self.decoder, self.params, self.vocabulary = decoder, params, vocabulary
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens

    def answer(self, prompts: Sequence[Sequence[int]]) -> list[list[int]]:
        """Greedy answers (ids ending in EOS) to prompts (ids without BOS)."""
        return model_answers(
            self.decoder,
            self.params,
            self.vocabulary,
            prompts,
            batch_size=self.batch_size,
            max_new_tokens=self.max_new_tokens,
        )

    def accuracy(
        self, tasks: Sequence[str], split: str, max_examples: int | None = None
    ) -> dict[str, float]:
        """Rank-classification accuracy (%, T0's protocol) of each task on `split`."""
        from mtllama_jax import evaluation

        options = evaluation.EvalOptions(
            protocols=("rank",), split=split, batch_size=self.batch_size, max_examples=max_examples
        )
        results = evaluation.evaluate(
            self.params, self.decoder.model, self.vocabulary, tasks, options, decoder=self.decoder
        )
        return {t: r["rank"]["accuracy"] for t, r in results["tasks"].items() if "rank" in r}


def data_embedding(embedder: Embedder, params, pairs, progress: str | None = None) -> Embedding:
    """The normalised Fisher of the gold responses."""
    fisher, used = embedder.fisher(params, pairs, progress)
    return Embedding(normalise(fisher), used)


def model_embedding(
    embedder: Embedder,
    surrogate_params,
    pairs,
    answers: Sequence[Sequence[int]],
    progress: str | None = None,
) -> Embedding:
    """The normalised Fisher (surrogate) of the same prompts with a model's answers as labels."""
    if len(answers) != len(pairs):
        raise ValueError(f"{len(answers)} answers for {len(pairs)} examples; give one each")
    relabelled = [(inputs, list(a)) for (inputs, _), a in zip(pairs, answers)]
    fisher, used = embedder.fisher(surrogate_params, relabelled, progress)
    return Embedding(normalise(fisher), used)


def baseline_embedding(embedder: Embedder, params, pairs, progress: str | None = None) -> Embedding:
    """The normalised mean final hidden state over the prompts."""
    mean, used = embedder.hidden_mean(params, pairs, progress)
    return Embedding(normalise(mean), used)


def embed_tasks(
    embedder: Embedder,
    params,
    tasks: Sequence[str],
    *,
    methods: Sequence[str] = ("data", "baseline"),
    split: str = "train",
    num_examples: int = 64,
    seed: int = 0,
    answer=None,
    progress: bool = True,
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
            notes.append(
                f"task {task!r}: {cut} prompts cut from the left to fit "
                f"max_length={embedder.max_length}"
            )
        for method in methods:
            out[method][task].notes = list(notes)
    return out
