"""`LlamaConfig`: the architecture and numerics of a LLaMA model, and its HF config.json.

The architecture fields mirror Hugging Face's `config.json` (LLaMA-1, LLaMA-2
with grouped-query attention, LLaMA-3/3.1 with `llama3` rope scaling, tied or
untied embeddings); `from_hf`/`to_hf` read and write it, checking what a LLaMA
must state. `dtype`, `param_dtype`, `attention`, `remat` and `cpu_forms` are this
project's own (`cpu_forms` is never written to config.json: whoever builds the config
chooses it for the machine it runs on).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from mtllama_jax.kernels.registry import ATTENTION
from mtllama_jax.models.hf import read_hf_config

# Compute dtypes eval and chat take instead of config.json's (hf-to-jax writes bfloat16;
# MT-LLaMA's released evaluation ran in float16).
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
ROPE_TYPES = ("default", "linear", "llama3")
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # As "dots", plus the flash-attention output and log-sum-exp (the Pallas kernel's
    # residuals), so the backward pass does not rerun the attention forward kernel.
    "dots_attention": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.checkpoint_dots,
        jax.checkpoint_policies.save_only_these_names("flash_out", "flash_lse"),
    ),
    "qkv_proj": jax.checkpoint_policies.save_only_these_names(
        "query_proj", "key_proj", "value_proj"
    ),
}

# Hugging Face config.json fields every LLaMA config must state.
_REQUIRED_HF_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
)


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Architecture and numerics of a LLaMA model.

    The architecture fields mirror Hugging Face's `config.json`; `dtype`
    (activations), `param_dtype` (stored weights), `attention` (backend),
    `remat` (rematerialisation policy by name) are this project's own, and
    `cpu_forms` picks the model's CPU spellings (see `models/llama/model.py`):
    the jobs set it when JAX's default backend is the CPU.
    """

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: int = 128
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Mapping[str, Any] | None = None
    tie_word_embeddings: bool = False
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int | None = None
    initializer_range: float = 0.02
    dtype: str = "bfloat16"
    param_dtype: str = "float32"
    attention: str = "xla"
    remat: str = "none"
    cpu_forms: bool = False

    def __post_init__(self):
        def fail(field, value, fix):
            raise ValueError(f"LlamaConfig.{field}={value!r}: {fix}")

        for field in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                fail(field, value, "must be a positive integer")
        if self.num_heads % self.num_kv_heads:
            fail(
                "num_kv_heads",
                self.num_kv_heads,
                f"num_heads ({self.num_heads}) must be a multiple of it",
            )
        if self.attention not in ATTENTION:
            fail("attention", self.attention, f"choose one of {tuple(ATTENTION)}")
        if self.remat not in REMAT_POLICIES:
            fail("remat", self.remat, f"choose one of {tuple(REMAT_POLICIES)}")
        for field in ("dtype", "param_dtype"):
            try:
                jnp.dtype(getattr(self, field))
            except TypeError:
                fail(
                    field, getattr(self, field), "use a dtype name such as 'bfloat16' or 'float32'"
                )
        rope_type(self.rope_scaling)  # validates

    def __hash__(self):
        return hash(json.dumps(dataclasses.asdict(self), sort_keys=True))

    def replace(self, **changes) -> "LlamaConfig":
        return dataclasses.replace(self, **changes)

    @property
    def matmul_params(self) -> int:
        """Weights that multiply activations: every projection and the LM head (tied or not).

        The embedding lookup and the norm scales are not products; training FLOPs count these.
        """
        e, m, d = self.hidden_size, self.intermediate_size, self.head_dim
        attn = e * d * (2 * self.num_heads + 2 * self.num_kv_heads)
        return self.num_layers * (attn + 3 * e * m) + e * self.vocab_size

    @property
    def num_params(self) -> int:
        """Parameter count of the initialised model (embeddings and LM head included)."""
        table = 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size
        norms = (2 * self.num_layers + 1) * self.hidden_size
        return self.matmul_params + table + norms

    @classmethod
    def tiny(cls, **overrides) -> "LlamaConfig":
        """A config small enough for CPU tests and the demo (CPU forms on a CPU backend)."""
        base = dict(
            vocab_size=512,
            hidden_size=64,
            intermediate_size=192,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            head_dim=16,
            max_position_embeddings=256,
            dtype="float32",
            cpu_forms=jax.default_backend() == "cpu",
        )
        base.update(overrides)
        return cls(**base)

    @classmethod
    def from_hf(
        cls,
        path_or_dict: str | os.PathLike | Mapping[str, Any],
        *,
        source: str | None = None,
        **overrides,
    ) -> "LlamaConfig":
        """Reads a Hugging Face LLaMA `config.json` (a path, its folder, or the dict).

        Accepts both the `rope_theta`/`rope_scaling` keys of transformers 4 and the
        `rope_parameters` key of transformers 5. `overrides` set this project's
        own fields (dtype, attention, cpu_forms, ...); `source` names a dict's file in
        errors. `mtllama_jax.models.config_from_hf` reaches it by `model_type`.
        """
        hf, read_from = read_hf_config(path_or_dict)
        source = source or read_from
        missing = [k for k in _REQUIRED_HF_FIELDS if k not in hf]
        if missing:
            raise ValueError(
                f"{source}: missing field(s) {missing}; a LLaMA config.json states "
                f"all of {list(_REQUIRED_HF_FIELDS)}"
            )
        model_type = hf.get("model_type", "llama")
        if model_type != "llama":
            raise ValueError(f"{source}: model_type={model_type!r}, expected 'llama'")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{source}: hidden_act={hf['hidden_act']!r}; LLaMA uses 'silu'")
        for flag in ("attention_bias", "mlp_bias"):
            if hf.get(flag):
                raise ValueError(f"{source}: {flag}=true is not a LLaMA layout (no biases)")
        rope = dict(hf.get("rope_parameters") or {})
        legacy = hf.get("rope_scaling") or {}
        theta = float(rope.pop("rope_theta", hf.get("rope_theta", 10000.0)))
        if not rope:
            rope = dict(legacy)
        kind = rope.pop("rope_type", rope.pop("type", "default"))
        scaling = None if kind == "default" else {"rope_type": kind, **rope}
        try:
            rope_type(scaling)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None

        def size(key, default=None):
            value = hf.get(key, default) if default is not None else hf[key]
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(
                    f"{source}: field {key!r} is {value!r}; it must be a positive integer"
                )
            return value

        def number(key, default):
            value = hf.get(key, default)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{source}: field {key!r} is {value!r}; it must be a number")
            return float(value)

        def token_id(key, default):
            value = hf.get(key, default)
            try:
                return None if value is None and key == "pad_token_id" else _single_id(value)
            except (TypeError, ValueError, IndexError):
                raise ValueError(
                    f"{source}: field {key!r} is {value!r}; it must be a token id (an integer)"
                ) from None

        heads = size("num_attention_heads")
        fields = dict(
            vocab_size=size("vocab_size"),
            hidden_size=size("hidden_size"),
            intermediate_size=size("intermediate_size"),
            num_layers=size("num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=size("num_key_value_heads")
            if "num_key_value_heads" in hf and hf["num_key_value_heads"] is not None
            else heads,
            head_dim=size("head_dim")
            if hf.get("head_dim") is not None
            else size("hidden_size") // heads,
            max_position_embeddings=size("max_position_embeddings", 2048),
            rms_norm_eps=number("rms_norm_eps", 1e-6),
            rope_theta=theta,
            rope_scaling=scaling,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            bos_token_id=token_id("bos_token_id", 1),
            eos_token_id=token_id("eos_token_id", 2),
            pad_token_id=token_id("pad_token_id", None),
            initializer_range=number("initializer_range", 0.02),
        )
        fields.update(overrides)
        return cls(**fields)

    def to_hf(self) -> dict[str, Any]:
        """The Hugging Face `config.json` dict (both rope spellings, for old and new loaders)."""
        rope_parameters = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling:
            rope_parameters.update(self.rope_scaling)
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": dict(self.rope_scaling) if self.rope_scaling else None,
            "rope_parameters": rope_parameters,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "initializer_range": self.initializer_range,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "torch_dtype": self.param_dtype,
        }


def _single_id(value):
    """LLaMA-3 configs may list several EOS ids; the first is the canonical one."""
    return int(value[0]) if isinstance(value, (list, tuple)) else int(value)


def rope_type(scaling: Mapping[str, Any] | None) -> str:
    """The rope scaling type of a `rope_scaling` dict, checked to be complete and supported."""
    if not scaling:
        return "default"
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise ValueError(f"rope scaling type {kind!r} is not supported; supported: {ROPE_TYPES}")
    needed = {
        "linear": ("factor",),
        "llama3": (
            "factor",
            "low_freq_factor",
            "high_freq_factor",
            "original_max_position_embeddings",
        ),
    }.get(kind, ())
    missing = [k for k in needed if k not in scaling]
    if missing:
        raise ValueError(f"rope scaling {kind!r} needs field(s) {missing}")
    return kind
