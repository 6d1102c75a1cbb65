"""Flash attention in Pallas (GPU Triton, TPU Mosaic, CPU interpret), its plain-JAX reference,
and the registry of attention backends the model picks from by name."""

from mtllama_jax.kernels.attention import BlockSizes, flash_attention, pick_backend
from mtllama_jax.kernels.reference import attention_mask, dot_product_attention, reference_attention
from mtllama_jax.kernels.registry import ATTENTION, attention_fn

__all__ = [
    "ATTENTION",
    "BlockSizes",
    "attention_fn",
    "attention_mask",
    "dot_product_attention",
    "flash_attention",
    "pick_backend",
    "reference_attention",
]
