"""Trains the SentencePiece model of the synthetic tasks (`tasks/assets/synthetic_spm.model`).

The corpus is every synthetic template's text under every prompt wrapper, from
seeds the tasks themselves never use, so the vocabulary covers the world's words
without being fitted to any evaluation example. Settings follow LLaMA's
tokenizer: unk 0, bos 1, eos 2, no pad, byte fallback, no text normalisation.

    .venv/bin/python scripts/train_synthetic_spm.py [--vocab-size 1024]
"""

import argparse
import io
import os

import sentencepiece as spm

from mtllama_jax import atomic, formats
from mtllama_jax.tasks import synthetic

CORPUS_SEED = 12345  # the tasks use seed 0


def corpus(examples_per_template: int) -> list[str]:
    lines = []
    for cluster in synthetic.CLUSTERS:
        for template in range(synthetic.num_templates(cluster)):
            for ex in synthetic.generate(
                cluster, template, "corpus", examples_per_template, seed=CORPUS_SEED
            ):
                for wrapper in formats.WRAPPERS.values():
                    lines.append(wrapper(ex.prompt) + " " + ex.choices[ex.label])
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--examples-per-template", type=int, default=200)
    parser.add_argument("--out", default=synthetic.SPM_MODEL)
    args = parser.parse_args()
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus(args.examples_per_template)),
        model_writer=model,
        vocab_size=args.vocab_size,
        model_type="bpe",
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        character_coverage=1.0,
        num_threads=2,
        minloglevel=2,
    )
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    atomic.write_bytes(args.out, model.getvalue())
    print(f"wrote {args.out} ({len(model.getvalue())} bytes, vocab {args.vocab_size})")


if __name__ == "__main__":
    main()
