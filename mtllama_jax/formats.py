"""Prompt wrappers: the text a model reads around an instruction, by name.

The strings are MT-LLaMA's (https://github.com/DAMO-NLP-SG/MT-LLaMA):

* `mtllama`: FastChat "single" style of its CLI and evaluation, the wrapper behind
  the published zero-shot numbers where a wrapper was used (the QA sets and SST-2
  were scored without one). `SYSTEM### Human: {instruction}### Assistant:`.
* `mtllama_user`: the vicuna_v1.1 roles of its training script,
  `SYSTEM\\n\\n### USER: {instruction}\\n### ASSISTANT:`. The script trained on
  `... ### ASSISTANT: {response}\\n`; here the response follows the tag directly.
* `alpaca`: the Alpaca/LaMini instruction layout ending in `### Response:`.
* `raw`: the instruction alone.

A wrapped prompt ends right before the response. Responses are tokenised on
their own, so SentencePiece's dummy prefix gives the space between the tag and
the response, exactly as generation after the prompt produces it. Loss falls only
on the response and its EOS: `mtllama_jax.data` weights the `targets` feature and
never the `inputs` one.
"""

from __future__ import annotations

import dataclasses

import seqio
import tensorflow as tf

MTLLAMA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
MTLLAMA_USER_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
ALPACA_HEADER = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n### Instruction:\n"
)


@dataclasses.dataclass(frozen=True)
class Wrapper:
    """`prefix + instruction + suffix` is what the model reads before the response."""

    name: str
    prefix: str
    suffix: str

    def __call__(self, instruction: str) -> str:
        return self.prefix + instruction + self.suffix


WRAPPERS: dict[str, Wrapper] = {
    w.name: w
    for w in (
        Wrapper("mtllama", MTLLAMA_SYSTEM + "### Human: ", "### Assistant:"),
        Wrapper("mtllama_user", MTLLAMA_USER_SYSTEM + "\n\n### USER: ", "\n### ASSISTANT:"),
        Wrapper("alpaca", ALPACA_HEADER, "\n\n### Response:"),
        Wrapper("raw", "", ""),
    )
}


def get_wrapper(name: str) -> Wrapper:
    """The wrapper called `name`; a ValueError lists the known names otherwise."""
    try:
        return WRAPPERS[name]
    except KeyError:
        raise ValueError(
            f"unknown prompt wrapper {name!r}; choose one of {sorted(WRAPPERS)}"
        ) from None


def wrap_preprocessor(
    dataset: tf.data.Dataset, wrapper: str = "mtllama", feature: str = "inputs"
) -> tf.data.Dataset:
    """seqio preprocessor: rewrite the text feature `inputs` with a wrapper.

    Runs before tokenisation; `targets` and any other feature pass unchanged.
    Use as `functools.partial(wrap_preprocessor, wrapper="alpaca")` in a task.
    """
    w = get_wrapper(wrapper)

    @seqio.map_over_dataset
    def wrap(example):
        example = dict(example)
        example[feature] = tf.strings.join([w.prefix, example[feature], w.suffix])
        return example

    return wrap(dataset)
