"""Procedurally generated instruction tasks: the embedded default that `make demo` runs.

A small world of people, cities, colours, pets, foods and moods, asked about in
clusters shaped like P3's, each with several prompt templates:

| cluster | like P3's | answer |
|---|---|---|
| sentiment | sentiment (IMDB, Yelp) | positive / negative |
| topic | topic classification (AG News) | sports / food / music / weather |
| extractive_qa | extractive QA (SQuAD) | the passage's value of the asked kind |
| summary | summarisation (XSum, Gigaword) | the passage's sentence about someone |
| closed_book | multiple-choice QA (CommonsenseQA) | the option of the asked category |
| paraphrase | paraphrase identification (MRPC, PAWS) | yes / no |
| nli | natural language inference (RTE, ANLI) — held out | the entailed one of two hypotheses |
| completion | sentence completion (COPA, StoryCloze) — held out | the ending the passage states |

As in T0, training sees the first six clusters through all but their last
template; evaluation asks about (a) those clusters through the template never
trained on (`synthetic_heldout_templates`) and (b) the two clusters never
trained on at all (`synthetic_heldout_clusters`). Nothing about the held-out
prompts is seen in training, and every split is drawn from its own seed.

What transfers is skill, not answers. A passage states one to three facts, each
about a different person and of a different kind ("Tom lives in Paris. Anna has
a pet cat."). Extractive QA (answer with the value) and summary (state the
fact as a sentence) teach reading the passage for the value of the asked kind;
the held-out clusters need that skill under instructions never trained on,
asking something no trained cluster asks: which of two hypotheses about
someone the passage entails, how a sentence about someone ends. Their choices
differ only in the value; the wrong ones are values of the same kind that the
passage does not state.

One kind per passage is deliberate. With several facts of one kind ("Tom lives
in Paris. Anna lives in Rome."), finding Anna's city means binding values to
names, two attention steps that must be learned together; the demo's model
stayed at chance on it after 4,000 steps of 32 extractive-QA and summary
examples, while it learns to read off the value of a kind in a few hundred.
Passages of one or two facts make that skill quicker still to pick up.

Examples follow the evaluation feature contract of `mtllama_jax.evaluation`:
`inputs` (the wrapped prompt, tokenised), `targets` (the answer + EOS), and the
text features `answers`, `answer_choices`, `label` (index of the answer among
the choices), `example_id`. The vocabulary is the small SentencePiece model in
`tasks/assets/`, trained on this corpus by `scripts/train_synthetic_spm.py`.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import random
import zlib
from typing import Callable, Sequence

import gin
import sentencepiece
import seqio
import tensorflow as tf
from t5.evaluation import metrics as t5_metrics

from mtllama_jax import formats
from mtllama_jax.vocab import LlamaVocabulary

SPM_MODEL = os.path.join(os.path.dirname(__file__), "assets", "synthetic_spm.model")

NAMES = ("Tom", "Anna", "Bob", "Lisa", "Sam", "Mia", "Max", "Eva", "Leo", "Zoe", "Ben", "Ada")
VALUES = {
    "city": (
        "Paris",
        "Rome",
        "Oslo",
        "Lima",
        "Cairo",
        "Delhi",
        "Tokyo",
        "Berlin",
        "Madrid",
        "Dublin",
    ),
    "color": ("red", "blue", "green", "yellow", "black", "white", "pink", "brown"),
    "pet": ("cat", "dog", "horse", "bird", "fox", "rabbit", "frog", "mouse"),
    "food": ("apple", "bread", "rice", "cheese", "soup", "cake", "fish", "pear"),
}
# How each kind of fact is stated, and how two templates paraphrase it.
STATEMENTS = {
    "city": ("{n} lives in {v}.", "The home of {n} is {v}."),
    "color": ("{n} likes the color {v}.", "The favorite color of {n} is {v}."),
    "pet": ("{n} has a pet {v}.", "The pet of {n} is a {v}."),
    "food": ("{n} eats {v} every day.", "The daily food of {n} is {v}."),
}
QUESTIONS = {
    "city": (
        "Where does {n} live?",
        "In which city does {n} live?",
        "what is the home city of {n}?",
        "Tell me where {n} lives.",
    ),
    "color": (
        "Which color does {n} like?",
        "What is the favorite color of {n}?",
        "what color does {n} like?",
        "Tell me the color {n} likes.",
    ),
    "pet": (
        "What pet does {n} have?",
        "Which animal is the pet of {n}?",
        "what pet does {n} own?",
        "Tell me the pet of {n}.",
    ),
    "food": (
        "What does {n} eat every day?",
        "Which food does {n} eat daily?",
        "what is the daily food of {n}?",
        "Tell me what {n} eats every day.",
    ),
}
CATEGORY_NOUN = {"city": "city", "color": "color", "pet": "animal", "food": "food"}
COMPLETION_STEMS = {
    "city": "{n} lives in",
    "color": "{n} likes the color",
    "pet": "{n} has a pet",
    "food": "{n} eats",
}
THINGS = ("movie", "book", "meal", "trip", "song", "game", "show", "party")
POSITIVE = ("good", "great", "wonderful", "lovely", "happy", "nice", "excellent", "fun")
NEGATIVE = ("bad", "awful", "terrible", "sad", "boring", "poor", "ugly", "dull")
TOPIC_WORDS = {
    "sports": ("ball", "goal", "team", "match", "coach", "race"),
    "food": ("soup", "bread", "cake", "rice", "cheese", "dinner"),
    "music": ("song", "guitar", "drum", "piano", "band", "concert"),
    "weather": ("rain", "snow", "wind", "sun", "storm", "cloud"),
}
YES_NO = ("yes", "no")
SENTIMENTS = ("positive", "negative")
TOPICS = tuple(TOPIC_WORDS)
MAX_FACTS = 3  # a passage states 1..MAX_FACTS facts


@dataclasses.dataclass(frozen=True)
class Example:
    prompt: str
    choices: tuple[str, ...]
    label: int


def _options(choices: Sequence[str]) -> str:
    return ", ".join(choices)


@dataclasses.dataclass(frozen=True)
class Passage:
    """A few facts, each about a different person and of a different kind."""

    kinds: tuple[str, ...]
    people: tuple[str, ...]
    values: tuple[str, ...]

    @property
    def sentences(self) -> tuple[str, ...]:
        return tuple(
            STATEMENTS[k][0].format(n=n, v=v)
            for k, n, v in zip(self.kinds, self.people, self.values)
        )

    @property
    def text(self) -> str:
        return " ".join(self.sentences)


def _passage(rng: random.Random) -> Passage:
    """One to three facts: one kind per fact, so a question's kind names its fact."""
    count = rng.randint(1, MAX_FACTS)
    kinds = rng.sample(tuple(VALUES), count)
    people = rng.sample(NAMES, count)
    return Passage(tuple(kinds), tuple(people), tuple(rng.choice(VALUES[k]) for k in kinds))


def _other_values(rng: random.Random, kind: str, value: str, count: int) -> list[str]:
    """`count` values of `kind` other than `value` (so none of them is in the passage)."""
    return rng.sample([v for v in VALUES[kind] if v != value], count)


def _value_choices(rng: random.Random, passage: Passage, fact: int) -> tuple[list[str], int]:
    """The fact's value and two others of its kind, shuffled; and the value's index."""
    kind, value = passage.kinds[fact], passage.values[fact]
    values = [value] + _other_values(rng, kind, value, 2)
    rng.shuffle(values)
    return values, values.index(value)


# Each cluster: (draw the facts, [template -> Example, ...]); the last template is held out.
def _sentiment(rng: random.Random):
    label = rng.randrange(2)
    words = rng.sample(POSITIVE if label == 0 else NEGATIVE, 2)
    thing = rng.choice(THINGS)
    text = f"The {thing} was {words[0]} and {words[1]}."
    templates = (
        f"Review: {text} Is this review positive or negative?",
        f"{text} How did the writer feel about the {thing}? Options: positive, negative",
        f"Text: {text} Sentiment (positive or negative):",
        f"Did the author enjoy the {thing}? {text} Answer positive or negative.",
    )
    return [Example(t, SENTIMENTS, label) for t in templates]


def _topic(rng: random.Random):
    label = rng.randrange(len(TOPICS))
    words = rng.sample(TOPIC_WORDS[TOPICS[label]], 2)
    text = f"{rng.choice(NAMES)} talked about the {words[0]} and the {words[1]}."
    options = _options(TOPICS)
    templates = (
        f"Sentence: {text} What is the topic? Options: {options}",
        f"{text} Which topic is this about: {options}?",
        f"Classify the topic of this sentence: {text} Options: {options}",
        f"Pick the subject of the sentence from {options}. {text}",
    )
    return [Example(t, TOPICS, label) for t in templates]


def _extractive_qa(rng: random.Random):
    passage = _passage(rng)
    fact = rng.randrange(len(passage.kinds))
    choices, label = _value_choices(rng, passage, fact)
    text = passage.text
    q = [question.format(n=passage.people[fact]) for question in QUESTIONS[passage.kinds[fact]]]
    templates = (
        f"Context: {text} Question: {q[0]}",
        f"{text} {q[1]}",
        f"Read this: {text} Now answer: {q[2]}",
        f"{text} {q[3]}",
    )
    return [Example(t, tuple(choices), label) for t in templates]


def _summary(rng: random.Random):
    passage = _passage(rng)
    text = passage.text
    fact = rng.randrange(len(passage.kinds))
    n = passage.people[fact]
    templates = (
        f"Passage: {text} Summarize what the passage says about {n}.",
        f"{text} Repeat the sentence that mentions {n}.",
        f"Read: {text} What does it say about {n}?",
        f"{text} Quote the fact about {n}.",
    )
    return [Example(t, passage.sentences, fact) for t in templates]


def _closed_book(rng: random.Random):
    kinds = rng.sample(tuple(VALUES), 3)
    options = tuple(rng.choice(VALUES[k]) for k in kinds)
    noun = CATEGORY_NOUN[kinds[0]]
    order = list(range(3))
    rng.shuffle(order)
    choices = tuple(options[i] for i in order)
    label = order.index(0)
    listed = _options(choices)
    templates = (
        f"Question: Which of these is a {noun}? Options: {listed}",
        f"Pick the {noun} from this list: {listed}.",
        f"{listed}. Which one is a {noun}?",
        f"Among {listed}, name the {noun}.",
    )
    return [Example(t, choices, label) for t in templates]


def _paraphrase(rng: random.Random):
    kind = rng.choice(tuple(VALUES))
    n, value = rng.choice(NAMES), rng.choice(VALUES[kind])
    label = rng.randrange(2)
    other = value if label == 0 else _other_values(rng, kind, value, 1)[0]
    first = STATEMENTS[kind][0].format(n=n, v=value)
    second = STATEMENTS[kind][rng.randrange(2)].format(n=n, v=other)
    templates = (
        f"Sentence 1: {first} Sentence 2: {second} Do these sentences mean the same thing? "
        "Options: yes, no",
        f"{first} {second} Are these two sentences paraphrases? yes or no?",
        f'Is "{second}" a paraphrase of "{first}"? Options: yes, no',
        f"First: {first} Second: {second} Same meaning? Answer yes or no.",
    )
    return [Example(t, YES_NO, label) for t in templates]


def _nli(rng: random.Random):
    """Which of two hypotheses about one person the premise entails (the other is false)."""
    passage = _passage(rng)
    text = passage.text
    fact = rng.randrange(len(passage.kinds))
    kind, n = passage.kinds[fact], passage.people[fact]
    false = _other_values(rng, kind, passage.values[fact], 1)[0]
    hypotheses = (passage.sentences[fact], STATEMENTS[kind][0].format(n=n, v=false))
    label = rng.randrange(2)
    choices = hypotheses if label == 0 else hypotheses[::-1]
    templates = (
        f"Premise: {text} Which hypothesis about {n} does the premise entail?",
        f"{text} Based on this passage, what must be true of {n}?",
        f"Given that {text} What follows about {n}?",
    )
    return [Example(t, choices, label) for t in templates]


def _completion(rng: random.Random):
    """How a sentence about one person ends: the passage's value or two others of its kind."""
    passage = _passage(rng)
    text = passage.text
    fact = rng.randrange(len(passage.kinds))
    kind, n = passage.kinds[fact], passage.people[fact]
    values, label = _value_choices(rng, passage, fact)
    stem = COMPLETION_STEMS[kind].format(n=n)
    endings = tuple(_ending(kind, n, v) for v in values)
    templates = (
        f"{text} Complete the sentence: {stem} ...",
        f'Story: {text} How should "{stem}" end?',
        f"{text} Finish this sentence: {stem}",
    )
    return [Example(t, endings, label) for t in templates]


def _ending(kind: str, n: str, value: str) -> str:
    """What follows the completion stem in the statement: 'Rome', 'cheese every day'."""
    stem = COMPLETION_STEMS[kind].format(n=n)
    return STATEMENTS[kind][0].format(n=n, v=value)[len(stem) :].strip().rstrip(".")


CLUSTERS: dict[str, Callable[[random.Random], list[Example]]] = {
    "sentiment": _sentiment,
    "topic": _topic,
    "extractive_qa": _extractive_qa,
    "summary": _summary,
    "closed_book": _closed_book,
    "paraphrase": _paraphrase,
    "nli": _nli,
    "completion": _completion,
}
HELD_OUT_CLUSTERS = ("nli", "completion")
TRAINING_CLUSTERS = tuple(c for c in CLUSTERS if c not in HELD_OUT_CLUSTERS)


def num_templates(cluster: str) -> int:
    return len(CLUSTERS[cluster](random.Random(0)))


def generate(cluster: str, template: int, split: str, count: int, seed: int = 0) -> list[Example]:
    """`count` examples of one template; each (cluster, template, split, seed) its own stream."""
    key = zlib.crc32(f"{cluster}/{template}/{split}/{seed}".encode())
    rng = random.Random(key)
    return [CLUSTERS[cluster](rng)[template] for _ in range(count)]


@gin.configurable
def synthetic_sizes(train: int = 4000, validation: int = 64) -> dict[str, int]:
    """Examples per task and split (gin: `synthetic_sizes.train`, `.validation`)."""
    return {"train": train, "validation": validation}


@gin.configurable
def synthetic_rates(
    rates: dict[str, float] | None = None,
) -> dict[str, float]:
    """Mixing rate of each training cluster's tasks in `synthetic_train` (default 1).

    Stating the passage's fact as a sentence (summary) carries the reading
    skill the held-out clusters need into sentence answers, and it is the
    slowest of the clusters to learn, so by default it is sampled three times
    as often (in one comparison, equal rates cost the demo about 15 points of
    held-out accuracy).
    """
    return {"summary": 3.0} if rates is None else rates


def _rate(task: seqio.Task) -> float:
    cluster = task.name[len("synthetic_") :].rsplit("_t", 1)[0]
    return float(synthetic_rates().get(cluster, 1.0))


@gin.configurable
def synthetic_wrapper(name: str = "mtllama") -> str:
    """Prompt wrapper of the synthetic tasks (MT-LLaMA's CLI/evaluation wrapper by default)."""
    return name


def _dataset_fn(
    cluster: str, template: int, split: str, shuffle_files: bool, seed: int | None = None
) -> tf.data.Dataset:
    del shuffle_files, seed  # the examples are generated in a fixed order; seqio shuffles them
    examples = generate(cluster, template, split, synthetic_sizes()[split])
    wrapper = formats.get_wrapper(synthetic_wrapper())
    return tf.data.Dataset.from_tensor_slices(
        {
            "inputs": [wrapper(e.prompt) for e in examples],
            "targets": [e.choices[e.label] for e in examples],
            "answers": [[e.choices[e.label]] for e in examples],
            "answer_choices": tf.ragged.constant([list(e.choices) for e in examples]),
            "label": [e.label for e in examples],
            "example_id": [f"{cluster}_t{template}_{split}_{i}" for i in range(len(examples))],
        }
    )


@functools.cache
def vocabulary() -> LlamaVocabulary:
    """The synthetic corpus' SentencePiece vocabulary (unk 0, bos 1, eos 2, like LLaMA's)."""
    sentencepiece.set_min_log_level(1)  # its identity normaliser logs on every load otherwise
    return LlamaVocabulary(SPM_MODEL)


def task_name(cluster: str, template: int) -> str:
    return f"synthetic_{cluster}_t{template}"


def register() -> None:
    """Registers one task per (cluster, template) and the train / held-out mixtures."""
    features = {
        "inputs": seqio.Feature(vocabulary(), add_eos=False),
        "targets": seqio.Feature(vocabulary(), add_eos=True),
    }
    seen, held_templates, held_clusters = [], [], []
    for cluster in CLUSTERS:
        count = num_templates(cluster)
        for template in range(count):
            name = task_name(cluster, template)
            if name in seqio.TaskRegistry.names():
                continue
            source = seqio.FunctionDataSource(
                functools.partial(_dataset_fn, cluster, template),
                splits=("train", "validation"),
            )
            source.prompt_wrapper = synthetic_wrapper  # recorded by the tokenized cache
            seqio.TaskRegistry.add(
                name,
                source=source,
                preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos],
                output_features=features,
                metric_fns=[t5_metrics.accuracy],
            )
        names = [task_name(cluster, t) for t in range(count)]
        if cluster in HELD_OUT_CLUSTERS:
            held_clusters += names
        else:
            seen += names[:-1]
            held_templates.append(names[-1])
    for mixture, tasks, rate in (
        ("synthetic_train", seen, _rate),
        ("synthetic_heldout_templates", held_templates, 1.0),
        ("synthetic_heldout_clusters", held_clusters, 1.0),
    ):
        if mixture not in seqio.MixtureRegistry.names():
            seqio.MixtureRegistry.add(mixture, tasks, default_rate=rate)


register()
