"""Triton kernels (installed as ``llmcore.kernels``): fused RMSNorm, RoPE and FlashAttention-2.

Each op has a differentiable public function (Triton forward and backward) and a plain-PyTorch
``*_reference`` the tests compare against, re-exported from ``llmcore.reference`` (the single copy
that the model's eager backend also runs; ``flash_attention_reference`` is its
``attention_reference``). They run on CUDA tensors, or on CPU tensors through
Triton's interpreter when ``TRITON_INTERPRET=1`` was set before this package was imported; a CPU
tensor without it raises ``KernelDeviceError`` (no silent fallback).
"""

from llmcore.kernels._runtime import KernelDeviceError
from llmcore.kernels.flash_attention import (
    cu_seqlens_from_position_ids,
    flash_attention,
    flash_attention_reference,
)
from llmcore.kernels.rmsnorm import rms_norm, rms_norm_reference
from llmcore.kernels.rope import apply_rope, apply_rope_reference, rope_tables

__all__ = [
    "KernelDeviceError",
    "apply_rope",
    "apply_rope_reference",
    "cu_seqlens_from_position_ids",
    "flash_attention",
    "flash_attention_reference",
    "rms_norm",
    "rms_norm_reference",
    "rope_tables",
]
