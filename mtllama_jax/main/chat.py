"""`mtllama-chat`: talk to a checkpoint, tokens streamed as they are produced.

    mtllama-chat --checkpoint /ckpt/mt-llama-7b                      # REPL with history
    mtllama-chat --checkpoint /ckpt/mt-llama-7b --prompt "Hi" --temperature 0.7 --top_p 0.9

The REPL keeps the conversation: each turn is appended to the transcript in
the wrapper's own layout (`mtllama`: `SYSTEM### Human: ...### Assistant: ...`),
and the whole transcript is the next prompt (cut from the left when it outgrows
the context). `/reset` starts over, `/quit` or end of input leaves. A reply
ends at EOS, at the wrapper's next turn tag (`###`), or at `--max_new_tokens`:
by default what the model's context leaves after the prompt (at least a quarter
of the context; the transcript's start is cut for it), and a larger request is
cut to that, saying so. `--dtype` computes in another dtype than config.json's.
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Sequence

import jax

from mtllama_jax import decoding, exits, partitioning
from mtllama_jax.main import launch
from mtllama_jax.models.llama.config import COMPUTE_DTYPES


class Conversation:
    """A transcript in one prompt wrapper's layout, one (message, reply) turn at a time."""

    def __init__(self, wrapper: str = "mtllama"):
        from mtllama_jax import formats

        self.wrapper = formats.get_wrapper(wrapper)
        prefix, suffix = self.wrapper.prefix, self.wrapper.suffix
        tag = prefix.rfind("###")
        # Later turns repeat the turn tag without the system text; the whitespace the
        # wrapper puts before its response tag also separates a reply from the next turn.
        self.turn_prefix = prefix[tag:] if tag >= 0 else prefix
        self.separator = suffix[: len(suffix) - len(suffix.lstrip())] if "###" in suffix else "\n"
        self.stop_strings = ("###",) if tag >= 0 else ()
        self.transcript = ""

    def prompt(self, message: str) -> str:
        """The text the model reads before replying to `message`."""
        if not self.transcript:
            return self.wrapper(message)
        return self.transcript + self.separator + self.turn_prefix + message + self.wrapper.suffix

    def add(self, message: str, reply: str) -> None:
        self.transcript = self.prompt(message) + " " + reply.strip()

    def reset(self) -> None:
        self.transcript = ""


class Chat:
    """A loaded checkpoint, its tokenizer and a decoder; `reply` streams one turn."""

    def __init__(
        self,
        checkpoint: str,
        *,
        mesh=(1, 1, 1),
        rules: str = "data",
        mtllama_quirks: bool = False,
        dtype: str | None = None,
    ):
        from mtllama_jax.checkpoint_folder import open_checkpoint
        from mtllama_jax.vocab import LlamaVocabulary

        devices = jax.devices() if -1 in mesh else jax.devices()[: math.prod(mesh)]
        self.layout = partitioning.Layout.create(*mesh, rules=rules, devices=devices)
        model, self.params, tokenizer = open_checkpoint(checkpoint, self.layout, dtype=dtype)
        self.config = model.config
        self.vocab = LlamaVocabulary(tokenizer, mtllama_quirks=mtllama_quirks)
        self.decoder = decoding.Decoder(model, self.layout)
        self._cut_said = False

    def reply(
        self,
        prompt: str,
        sampling: decoding.Sampling,
        max_new_tokens: int | None,
        stop_strings: Sequence[str],
        rng: jax.Array,
        out=None,
    ) -> str:
        """Streams the reply to `prompt` to `out` (stdout) and returns its text.

        `max_new_tokens` None: what the context leaves (`reply_budget`).
        """
        out = out or sys.stdout
        ids = [self.vocab.bos_id] + list(self.vocab.encode(prompt))
        eos = {self.config.eos_token_id, self.vocab.eos_id}
        context = self.config.max_position_embeddings
        budget = reply_budget(max_new_tokens, len(ids), context)
        if max_new_tokens is not None and budget != max_new_tokens and not self._cut_said:
            print(
                f"[--max_new_tokens={max_new_tokens} does not fit the model's context of "
                f"{context} tokens: a reply gets what the context leaves after the prompt, "
                f"{budget} tokens here]",
                file=sys.stderr,
            )
            self._cut_said = True

        def stream(row, text):
            out.write(text)
            out.flush()

        gen = self.decoder.generate(
            self.params,
            [ids],
            max_new_tokens=budget,
            sampling=sampling,
            stop_token_ids=sorted(eos),
            stop_strings=stop_strings,
            detokenize=self.vocab.decode,
            rng=rng,
            stream=stream,
        )[0]
        out.write("\n")
        out.flush()
        if gen.prompt_truncated:
            print("[the conversation outgrew the context: its start was cut]", file=sys.stderr)
        return gen.text


def reply_budget(requested: int | None, prompt_length: int, context: int) -> int:
    """New tokens for one reply: `requested`, else what the context leaves after the prompt.

    What is left is at least a quarter of the context (the decoder then cuts the
    prompt's start); a request the context can never hold is cut to what is left.
    """
    left = max(context - prompt_length, context // 4, 1)
    return left if requested is None or requested >= context else requested


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mtllama-chat", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--checkpoint", required=True, help="folder with config.json, tokenizer.model and params"
    )
    parser.add_argument("--prompt", help="answer this one message and exit")
    parser.add_argument(
        "--wrapper", default="mtllama", help="prompt wrapper: mtllama, mtllama_user, alpaca, raw"
    )
    parser.add_argument(
        "--max_new_tokens",
        type=int,
        help="reply length limit (default: what the model's context leaves)",
    )
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    parser.add_argument("--top_k", type=int, default=0, help="0: off")
    parser.add_argument("--top_p", type=float, default=1.0, help="1: off")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--mesh", default="1,1,1", help="data,fsdp,tensor sizes (-1 once: the remaining devices)"
    )
    parser.add_argument("--rules", default="data", help="logical axis rules: data, fsdp, fsdp_tp")
    parser.add_argument(
        "--dtype",
        choices=COMPUTE_DTYPES,
        help="compute dtype (default: the checkpoint's config.json)",
    )
    parser.add_argument(
        "--mtllama_quirks",
        action="store_true",
        help="MT-LLaMA's tokenizer: [PAD] 32000 and BOS written as </s>",
    )
    launch.add_verbose_flag(parser)
    args = parser.parse_args(argv)
    launch.configure_logs(args.verbose)
    try:
        args.mesh = tuple(int(x) for x in args.mesh.split(","))
        assert len(args.mesh) == 3
    except (ValueError, AssertionError):
        parser.error(f"--mesh={args.mesh!r}: give three sizes data,fsdp,tensor, e.g. 1,-1,1")
    try:
        args.sampling = decoding.Sampling(args.temperature, args.top_k, args.top_p)
    except ValueError as e:
        parser.error(str(e))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.prompt is None and sys.stdin is None:
        print(
            "mtllama-chat: error: stdin is closed; give the message with --prompt", file=sys.stderr
        )
        return exits.ERROR
    return exits.run_main("mtllama-chat", lambda: _session(args))


def _session(args) -> int:
    """Loads the checkpoint, then answers --prompt or each line of stdin."""
    conversation = Conversation(args.wrapper)
    chat = Chat(
        args.checkpoint,
        mesh=args.mesh,
        rules=args.rules,
        mtllama_quirks=args.mtllama_quirks,
        dtype=args.dtype,
    )
    rng = jax.random.key(args.seed)
    if args.prompt is not None:
        chat.reply(
            conversation.prompt(args.prompt),
            args.sampling,
            args.max_new_tokens,
            conversation.stop_strings,
            rng,
        )
        return exits.OK
    interactive = sys.stdin.isatty()
    turn = 0
    while True:
        if interactive:
            print("Human: ", end="", flush=True)
        line = read_line(sys.stdin)
        if line is None or line.strip() == "/quit":
            return exits.OK
        message = line.rstrip("\n")
        if message.strip() == "/reset":
            conversation.reset()
            continue
        if not message.strip():
            continue
        if interactive:
            print("MT-LLaMA: ", end="", flush=True)
        turn += 1
        reply = chat.reply(
            conversation.prompt(message),
            args.sampling,
            args.max_new_tokens,
            conversation.stop_strings,
            jax.random.fold_in(rng, turn),
        )
        conversation.add(message, reply)


def read_line(stream) -> str | None:
    """The next line of `stream` (None at its end); a line that is not UTF-8 is replaced
    by an empty one, with a notice, so the conversation goes on."""
    raw = stream.buffer.readline() if hasattr(stream, "buffer") else stream.readline()
    if not raw:
        return None
    if isinstance(raw, str):
        return raw
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        print(
            f"[that line is not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
            "it was skipped, the conversation goes on]",
            file=sys.stderr,
        )
        return "\n"


if __name__ == "__main__":
    sys.exit(main())
