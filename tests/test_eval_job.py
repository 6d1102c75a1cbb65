"""mtllama-eval end to end in a subprocess: the compute dtype flag, recorded in results.json."""

import json
import os
import shutil
import stat
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtllama_jax import checkpoint_folder
from mtllama_jax.models.llama.config import LlamaConfig
from mtllama_jax.models.llama.model import LlamaForCausalLM
from mtllama_jax.tasks import synthetic

CONFIG = LlamaConfig.tiny(vocab_size=1024)  # the synthetic tasks' vocabulary


def run_eval(*bindings):
    # A process of its own: the job points the registered tasks' tokenizer at the checkpoint's.
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "mtllama_jax.main.eval",
            "--gin_file=mesh/single.gin",
            "--gin_file=runs/eval.gin",
            *(f"--gin.{b}" for b in bindings),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


def test_eval_computes_in_the_dtype_asked_and_records_it(tmp_path):
    tokenizer = tmp_path / "tokenizer.model"
    shutil.copyfile(synthetic.SPM_MODEL, tokenizer)
    params = nn.unbox(
        LlamaForCausalLM(CONFIG).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    )
    checkpoint_folder.save_params(
        tmp_path / "ckpt", params, CONFIG, tokenizer_files=[str(tokenizer)]
    )
    common = (
        f"CHECKPOINT='{tmp_path / 'ckpt'}'",
        "EVAL_TASKS=['synthetic_nli_t0']",
        "evaluate_checkpoint.protocols=['rank']",
        "evaluate_checkpoint.max_examples=2",
    )
    proc = run_eval(
        *common, f"EVAL_OUTPUT_DIR='{tmp_path / 'out'}'", "evaluate_checkpoint.dtype='float16'"
    )
    assert proc.returncode == 0, proc.stderr
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert CONFIG.dtype == "float32" and results["dtype"] == "float16"
    assert results["tasks"]["synthetic_nli_t0"]["examples"] == 2
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(tmp_path / "out" / "results.md").st_mode) == 0o666 & ~umask
    bad = run_eval(
        *common, f"EVAL_OUTPUT_DIR='{tmp_path / 'bad'}'", "evaluate_checkpoint.dtype='int8'"
    )
    assert bad.returncode != 0
    assert "evaluate_checkpoint.dtype='int8': choose one of" in bad.stderr
