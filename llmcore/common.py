"""Device resolution: the one place llmcore decides where a model runs and with which attention backend
(the process group is `llmcore.train.distributed`'s).

Invariants:
- `resolve_device("auto")` is the local rank's GPU under a launcher (LOCAL_RANK set), else `cuda:0`
  when CUDA is there, else the CPU. An explicit `cuda`/`cuda:N` without CUDA (or past the device
  count) is an LLMCoreError naming the flag, never a traceback. `check_device_spec` checks the
  spelling only and asks the machine nothing (what settings validation may use).
- Every command that runs a model (train, eval, generate, chat, serve, rag --answer, bench) resolves
  its `--device` here, so they all agree on what `auto` means.
- `default_attn_backend(device)` is `triton` on CUDA (our kernels) and `sdpa` elsewhere;
  `resolve_attn_backend(backend, device, strict=)` is the one resolver of `--attn-backend`: `auto`
  becomes that default, and triton off CUDA without the Triton interpreter is refused (`strict`,
  training) or replaced by sdpa (loading a checkpoint: the backend is how the math runs, not weights).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from llmcore.errors import LLMCoreError

DEVICE_HELP = "auto (the local rank's GPU, else cuda:0 when CUDA is there, else cpu), cpu, cuda or cuda:N."


def local_rank() -> int:
    """This process's rank on its node (0 without a launcher)."""
    try:
        return int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        raise LLMCoreError(f"LOCAL_RANK={os.environ['LOCAL_RANK']!r} is not an integer") from None


def check_device_spec(spec: str | None, flag: str = "--device") -> str:
    """`spec` in its normal form (`auto`, `cpu`, `cuda` or `cuda:N`), or LLMCoreError naming `flag`. A
    check of the value only: the machine is not asked, so a GPU run's flags can be checked on a
    machine without one (`llmcore launch` on a login node)."""
    text = (spec or "auto").strip().lower()
    if text in ("auto", "cpu", "cuda"):
        return text
    if text.startswith("cuda:"):
        if not text.split(":", 1)[1].isdigit():
            raise LLMCoreError(f"{flag} {spec}: expected cuda:N with N a GPU index")
        return text
    raise LLMCoreError(f"{flag} {spec!r}: expected auto, cpu, cuda or cuda:N")


def resolve_device(spec: str | torch.device | None = "auto", flag: str = "--device") -> torch.device:
    """The torch.device a command runs on; raises LLMCoreError for a device that is not there."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    text = check_device_spec(spec, flag)
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank() % max(torch.cuda.device_count(), 1))
        return torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise LLMCoreError(f"{flag} {spec}: CUDA is not available on this machine (use --device cpu or auto)")
    if text == "cuda":
        return torch.device("cuda", local_rank() % torch.cuda.device_count())
    index = int(text.split(":", 1)[1])
    if index >= torch.cuda.device_count():
        raise LLMCoreError(f"{flag} {spec}: this machine has {torch.cuda.device_count()} GPU(s)")
    return torch.device("cuda", index)


def to_device(batch: dict[str, Any], device: torch.device | str | None) -> dict[str, Any]:
    """The batch's tensors on `device` (non-blocking from pinned memory); other entries as they are."""
    if device is None or str(device) == "cpu":
        return batch
    return {k: (v.to(device, non_blocking=True) if hasattr(v, "to") else v) for k, v in batch.items()}


def default_attn_backend(device: torch.device) -> str:
    """The attention backend `auto` means on a device: our Triton kernels on CUDA, SDPA elsewhere."""
    return "triton" if device.type == "cuda" else "sdpa"


def resolve_attn_backend(backend: str, device: torch.device, *, strict: bool) -> str:
    """The attention backend a model runs with on `device`. `auto` is `default_attn_backend(device)`.
    `triton` needs CUDA or the Triton interpreter (TRITON_INTERPRET=1, tests): otherwise `strict`
    raises LLMCoreError (a training run asked for it), and not strict gives `sdpa` (a checkpoint
    trained with triton on a GPU runs on a CPU)."""
    if backend == "auto":
        return default_attn_backend(device)
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        if strict:
            raise LLMCoreError(
                f"--attn-backend triton runs our Triton kernels, which need a CUDA device (this run "
                f"is on {device}); use --attn-backend sdpa or --device cuda"
            )
        return "sdpa"
    return backend


def device_name(device: torch.device) -> str:
    """A human name for reports: the GPU's name, or `cpu`."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


__all__ = [
    "DEVICE_HELP",
    "local_rank",
    "check_device_spec",
    "resolve_device",
    "to_device",
    "default_attn_backend",
    "resolve_attn_backend",
    "device_name",
]
