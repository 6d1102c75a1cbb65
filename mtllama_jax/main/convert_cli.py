"""`mtllama-convert`: Hugging Face <-> Orbax checkpoints and MT-LLaMA weight deltas.

    mtllama-convert hf-to-jax   --hf llama-7b-hf --out ckpt/llama-7b \
        [--dtype bfloat16] [--vocab-size 32001]
    mtllama-convert jax-to-hf   --ckpt ckpt/llama-7b --out llama-7b-hf [--max-shard-size 5GB]
    mtllama-convert apply-delta --base llama-7b-hf --delta mt-llama-7b-delta --out mt-llama-7b
    mtllama-convert make-delta  --base llama-7b-hf --target mt-llama-7b --out delta
    mtllama-convert verify      mt-llama-7b            # recompute the manifest's sha256

Every output is written beside its destination and renamed when complete; an
existing output needs --overwrite. --check verifies input manifests (when
present) before, and the output's manifest after, writing.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import ml_dtypes
import numpy as np

from mtllama_jax import exits
from mtllama_jax.convert import delta, manifest, orbax_hf
from mtllama_jax.main import launch

DTYPES = {
    "float32": np.dtype(np.float32),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mtllama-convert",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name, help, **folders):
        p = sub.add_parser(name, help=help)
        for flag, what in folders.items():
            p.add_argument(f"--{flag}", required=True, help=what)
        p.add_argument("--out", required=True, help="output folder (written atomically)")
        p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
        p.add_argument(
            "--check",
            action="store_true",
            help="verify input manifests before and the output's after writing",
        )
        launch.add_verbose_flag(p)
        return p

    p = command("hf-to-jax", "HF LLaMA folder -> checkpoint folder", hf="HF LLaMA folder")
    p.add_argument("--dtype", choices=DTYPES, help="cast the params (default: as stored)")
    p.add_argument("--mesh", help="DATA,FSDP,TENSOR sizes to write the sharded layout, e.g. 1,-1,1")
    p.add_argument("--rules", default="fsdp_tp", help="logical axis rules for --mesh")
    p.add_argument(
        "--vocab-size",
        type=int,
        help="append zero rows to the embedding and LM head up to this size "
        "(32001: MT-LLaMA's [PAD] on LLaMA's 32000)",
    )
    p.add_argument(
        "--no-tokenizer",
        action="store_true",
        help="convert a folder without tokenizer.model (eval and chat need one)",
    )
    p = command(
        "jax-to-hf",
        "checkpoint folder or training MODEL_DIR -> HF folder",
        ckpt="checkpoint folder, or MODEL_DIR (its latest step)",
    )
    p.add_argument(
        "--no-check",
        action="store_true",
        help="skip verifying --ckpt against its manifest (checked by default)",
    )
    p.add_argument("--dtype", choices=DTYPES, help="cast the weights (default: as stored)")
    p.add_argument("--max-shard-size", default="5GB", help="per safetensors file (default 5GB)")
    for name, other in (("apply-delta", "delta"), ("make-delta", "target")):
        p = command(
            name,
            f"{'base + delta' if other == 'delta' else 'target - base'} in fp16",
            base="base HF LLaMA folder",
            **{other: f"{other} HF folder"},
        )
        p.add_argument("--max-shard-size", default="5GB", help="per safetensors file")
    p = sub.add_parser("verify", help="recompute an output folder's manifest")
    p.add_argument("folder")
    launch.add_verbose_flag(p)
    return parser


def _check_inputs(*folders) -> None:
    for folder in folders:
        if os.path.exists(os.path.join(folder, manifest.NAME)):
            manifest.check(folder)


def _check_checkpoint(folder) -> None:
    """A converted folder against its manifest.json, a MODEL_DIR's latest step against its own."""
    from mtllama_jax import checkpoint_folder

    _check_inputs(folder)
    params = checkpoint_folder.params_dir(folder)
    step_dir = os.path.dirname(params)
    if checkpoint_folder.is_model_dir(folder):
        checkpoint_folder.verify_step(os.path.dirname(step_dir), int(os.path.basename(step_dir)))


def run(args) -> str:
    """Runs one parsed command; returns what to print."""
    if args.command == "verify":
        return f"{args.folder}: {manifest.check(args.folder)} files match {manifest.NAME}"
    dtype = DTYPES.get(getattr(args, "dtype", None) or "")
    if args.command == "hf-to-jax":
        inputs = [args.hf]
        layout = None
        if args.mesh:
            from mtllama_jax import partitioning

            try:
                sizes = [int(s) for s in args.mesh.split(",")]
            except ValueError:
                raise ValueError(
                    f"--mesh {args.mesh!r}: give DATA,FSDP,TENSOR, e.g. 1,-1,1"
                ) from None
            layout = partitioning.Layout.create(*sizes, rules=args.rules)
        action = functools.partial(
            orbax_hf.hf_to_jax,
            args.hf,
            args.out,
            dtype=dtype,
            layout=layout,
            overwrite=args.overwrite,
            vocab_size=args.vocab_size,
            allow_no_tokenizer=args.no_tokenizer,
        )
    elif args.command == "jax-to-hf":
        inputs = [args.ckpt]
        if not args.no_check:
            _check_checkpoint(args.ckpt)
        action = functools.partial(
            orbax_hf.jax_to_hf,
            args.ckpt,
            args.out,
            dtype=dtype,
            max_shard_size=args.max_shard_size,
            overwrite=args.overwrite,
        )
    else:
        other = args.delta if args.command == "apply-delta" else args.target
        fn = delta.apply_delta if args.command == "apply-delta" else delta.make_delta
        inputs = [args.base, other]
        action = functools.partial(
            fn,
            args.base,
            other,
            args.out,
            max_shard_size=args.max_shard_size,
            overwrite=args.overwrite,
        )
    if args.check:
        _check_inputs(*inputs)
    action()
    if args.check:
        return f"{args.out}: written; {manifest.check(args.out)} files match {manifest.NAME}"
    return f"{args.out}: written"


def main(argv=None) -> None:
    args = _parser().parse_args(argv)
    launch.configure_logs(args.verbose, uses_tensorflow=False)
    code = exits.run_main(f"mtllama-convert {args.command}", lambda: print(run(args)))
    if code:
        sys.exit(code)


if __name__ == "__main__":
    sys.exit(main())
