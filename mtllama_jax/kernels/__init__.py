"""Flash attention in Pallas (GPU Triton, TPU Mosaic, CPU interpret) and its plain-JAX reference."""

from mtllama_jax.kernels.attention import BlockSizes, flash_attention, pick_backend
from mtllama_jax.kernels.reference import reference_attention

__all__ = ["BlockSizes", "flash_attention", "pick_backend", "reference_attention"]
