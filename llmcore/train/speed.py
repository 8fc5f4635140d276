"""Speed accounting shared by training and the benchmarks: FLOPs per token, model FLOPs
utilisation (MFU), peak memory, and host/device synchronisation at measurement points only.

FLOPs per token: 6N for the weight matmuls (forward + backward), N the parameter count (tied
embedding counted once; MoE models count the parameters active per token), plus the attention
scores and values. PaLM appendix B / nanoGPT count those as 12·L·H·Q·T (L layers, H query heads,
Q head dim, T the sequence length), every query against all T keys; a causal model computes only
the keys at or before each query, about half, so the default here is 6·L·H·Q·T (`causal=False`
gives the PaLM figure, which overstates MFU by about 7% at minimind2-small, T 512, and more at
longer T). Packed rows of several documents do even less attention work (each document attends
only within itself); the count still charges full causal rows, so MFU stays an upper bound there.
MFU = achieved FLOP/s over the device's dense bf16 peak.
"""

from __future__ import annotations

import resource
import sys
import time
from typing import Any

import torch

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s from the vendors' data sheets. Matched by
# substring of torch.cuda.get_device_name(); the first match wins, so specific names come first.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.0),
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("H800", 989.0),
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("A10G", 70.0),
    ("A10", 125.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("RTX 4090", 165.0),
    ("RTX 3090", 71.0),
    ("RTX 6000 Ada", 364.0),
    ("A6000", 155.0),
    ("V100", 125.0),
    ("T4", 65.0),
)


def peak_tflops(device: torch.device, override: float | None = None) -> tuple[float | None, str]:
    """(dense bf16 peak in TFLOP/s or None when unknown, the name it was looked up by)."""
    if device.type != "cuda":
        return override, "cpu"
    name = torch.cuda.get_device_name(device)
    if override is not None:
        return override, name
    for key, value in PEAK_BF16_TFLOPS:
        if key in name:
            return value, name
    return None, name


def flops_per_token(config: Any, seq_len: int, causal: bool = True) -> float:
    """6N + 6·L·H·Q·T (causal attention, the default) or 6N + 12·L·H·Q·T (PaLM's count, `causal=False`)
    for a model config (an `llmcore.model.ModelConfig`); see the module docstring."""
    from llmcore.model import param_report

    report = param_report(config)
    n = report.get("active_per_token", report["total"])
    attn = 6.0 if causal else 12.0
    return 6.0 * n + attn * config.num_hidden_layers * config.num_attention_heads * config.head_dim * seq_len


def synchronize(device: torch.device) -> None:
    """Wait for queued device work: call only where a time or a value is read (log points)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory so far: allocated GPU memory on CUDA, the process's max resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**30 if sys.platform == "darwin" else rss / 2**20


class Throughput:
    """Tokens per second and step time over the interval since the last log point; the device is
    synchronised only when a rate is taken."""

    def __init__(self, device: torch.device | None = None) -> None:
        self.device = device or torch.device("cpu")
        self.t0 = time.perf_counter()
        self.tokens = 0
        self.steps = 0

    def add(self, tokens: int, steps: int = 1) -> None:
        self.tokens += tokens
        self.steps += steps

    def take(self) -> tuple[float, float]:
        """(tokens per second, seconds per step) since the last call."""
        synchronize(self.device)
        now = time.perf_counter()
        dt = max(now - self.t0, 1e-9)
        rate, step_s = self.tokens / dt, dt / max(self.steps, 1)
        self.t0, self.tokens, self.steps = now, 0, 0
        return rate, step_s


__all__ = ["PEAK_BF16_TFLOPS", "peak_tflops", "flops_per_token", "synchronize", "peak_memory_gb", "Throughput"]
