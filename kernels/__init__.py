"""Triton kernels (installed as ``llmcore.kernels``): fused RMSNorm, RoPE, QK-norm + RoPE and FlashAttention-2.

Each op has a differentiable public function (Triton forward and backward) and a plain-PyTorch
``*_reference`` the tests compare against, re-exported from ``llmcore.reference`` (the single copy
that the model's eager backend also runs; ``flash_attention_reference`` is its
``attention_reference``). They run on CUDA tensors, or on CPU tensors through
Triton's interpreter when ``TRITON_INTERPRET=1`` was set before this package was imported; a CPU
tensor without it raises ``KernelDeviceError`` (no silent fallback).

torch.compile. Every kernel launch sits inside a ``torch.library.custom_op`` (``llmcore::rms_norm``,
``llmcore::rope``, ``llmcore::qk_norm_rope``, ``llmcore::flash_attention`` and the ``*_backward`` ops) with ``register_fake``
(output shapes, dtypes and strides, for tracing with fake tensors) and ``register_autograd`` (the
backward op as its gradient), so ``torch.compile(fullgraph=True)`` traces a whole triton-backend
model, forward and backward, as one graph; the public functions keep only shape checks and
fixed-shape tensor code in front of the ops. Eager calls go through the same ops, and the ops run
the same launch code as before, so results without compile are bit-identical. Packed documents
reach flash attention as per-token document bounds computed from ``position_ids`` with fixed
shapes (``document_bounds``), not as ``cu_seqlens``, whose length needs a data-dependent
``nonzero`` (a graph break, or a dynamic shape and a host sync).

Why ``custom_op`` and not ``torch.library.triton_op`` + ``wrap_triton`` (torch 2.13, Triton 3.7):
``triton_op`` makes the op body traceable so Inductor can emit the launches itself, but then all
of the host code runs on fake tensors: the interpreter/CUDA decision, the SM count, the off-GPU
checks that read data (position range, ``cu_seqlens``), ``triton.autotune`` with
``prune_configs_by``. And under ``TRITON_INTERPRET=1`` it does not work at all: tracing calls the
interpreted kernel with fake tensors ("Cannot access data pointer of Tensor"), so CPU tests could
not run it. An opaque ``custom_op`` runs the unchanged launch code with real tensors in eager mode,
under ``aot_eager`` and under Inductor alike, which is what the CPU tests check; Inductor
calls it as an extern kernel. What it gives up is little here: Inductor cannot fuse into
user-written Triton kernels either way, and each op is one to three large launches.
"""

from llmcore.kernels._runtime import KernelDeviceError
from llmcore.kernels.flash_attention import (
    cu_seqlens_from_position_ids,
    document_bounds,
    flash_attention,
    flash_attention_reference,
)
from llmcore.kernels.qk_norm_rope import qk_norm_rope, qk_norm_rope_reference
from llmcore.kernels.rmsnorm import rms_norm, rms_norm_reference
from llmcore.kernels.rope import apply_rope, apply_rope_reference, rope_tables

__all__ = [
    "KernelDeviceError",
    "apply_rope",
    "apply_rope_reference",
    "cu_seqlens_from_position_ids",
    "document_bounds",
    "flash_attention",
    "flash_attention_reference",
    "qk_norm_rope",
    "qk_norm_rope_reference",
    "rms_norm",
    "rms_norm_reference",
    "rope_tables",
]
