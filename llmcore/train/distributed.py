"""The process group's lifecycle: joining it, its timeout, turning a lost peer into one error line,
and leaving it.

Invariants:
- `init_distributed(device)` joins torch.distributed through DeepSpeed (NCCL on CUDA, gloo on CPU).
  Under a launcher (deepspeed, torchrun) the rendezvous env is already set; a one-process run started
  without one sets it itself (a free port) and is "standalone": its group is destroyed by
  `release_standalone` at interpreter exit, while the interpreter is healthy (torch 2.13's gloo
  teardown at exit can abort a finished process).
- Under a launcher the CLI ends the group with `shutdown_distributed()` and then `os._exit`; after a
  lost peer there is nobody left to meet, so the group is left for `os._exit` to drop.
- Every collective waits at most `dist_timeout_s()` (LLMCORE_DIST_TIMEOUT, `llmcore launch --timeout`)
  and runs inside `peer_errors(what)`, so a dead or silent peer is one LLMCoreError line that says
  to resume, never a gloo/NCCL traceback or a hang.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import os
import re
import socket
from typing import Any, Iterator

import torch
import torch.distributed as dist

from llmcore.errors import LLMCoreError, install_hint

DEFAULT_DIST_TIMEOUT_S = 600.0
_STANDALONE_KEYS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# Set once a collective of this process failed because another process is gone: then
# shutdown_distributed must not wait at a barrier nobody else reaches.
_PEER_LOST = False


def active_dist() -> Any:
    """`torch.distributed` when a process group is up, else None."""
    return dist if dist.is_available() and dist.is_initialized() else None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a rendezvous this process starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def init_distributed(device: torch.device) -> tuple[int, int, bool]:
    """Join torch.distributed through DeepSpeed (NCCL on CUDA, gloo on CPU); returns (rank,
    world_size, standalone).

    Under a launcher (deepspeed, torchrun) the rendezvous env is set. A one-process run started
    without one still needs it: then this process sets it (with a free port) and destroys the
    group at interpreter exit, before gloo's own teardown."""
    try:
        import deepspeed
    except ImportError as err:
        raise LLMCoreError("--deepspeed needs the deepspeed package: " + install_hint("deepspeed")) from err

    if device.type != "cuda":
        # Without CUDA DeepSpeed would probe for other accelerators; on CPU it uses gloo + shared memory.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    else:
        torch.cuda.set_device(device)
    standalone = False
    if not dist.is_initialized():
        if "WORLD_SIZE" not in os.environ and "RANK" not in os.environ:
            standalone = True
            os.environ.update(
                RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())
            )
            atexit.register(release_standalone)
        deepspeed.init_distributed(
            dist_backend="nccl" if device.type == "cuda" else "gloo",
            verbose=False,
            timeout=datetime.timedelta(seconds=dist_timeout_s()),
        )
    return dist.get_rank(), dist.get_world_size(), standalone


def dist_timeout_s() -> float:
    """How long a collective waits for the other processes before failing: LLMCORE_DIST_TIMEOUT
    seconds (`llmcore launch --timeout`), default 600. A node that dies makes its peers fail at
    once (connection closed); one that hangs makes them fail after this long, never wait forever."""
    raw = os.environ.get("LLMCORE_DIST_TIMEOUT", "")
    if not raw:
        return DEFAULT_DIST_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        raise LLMCoreError(f"LLMCORE_DIST_TIMEOUT={raw!r}: expected seconds, e.g. 600") from None
    if value <= 0:
        raise LLMCoreError(f"LLMCORE_DIST_TIMEOUT={raw!r}: must be positive")
    return value


def _first_sentence(text: str) -> str:
    """`[.../pair.cc:553] Connection closed by peer [127.0.0.1]:64170. This is ...` -> the part
    that says what happened."""
    line = text.strip().splitlines()[0] if text.strip() else "no detail"
    line = re.sub(r"^\[[^\]]*\.(cc|cpp|h|py):\d+\]\s*", "", line)
    return re.split(r"\.\s+(?=[A-Z])", line, maxsplit=1)[0].rstrip(".")[:160]


# What a collective's error says when another process died or stopped answering.
_PEER_MARKERS = (
    "connection closed",
    "connection reset",
    "timed out",
    "timeout",
    "gloo",
    "nccl",
    "broken pipe",
    "socket",
    "peer",
)


@contextlib.contextmanager
def peer_errors(what: str) -> Iterator[None]:
    """Turn the error a collective raises when another process died or stopped answering (gloo:
    "Connection closed by peer", "Timed out"; NCCL: watchdog errors) into one LLMCoreError line."""
    global _PEER_LOST
    try:
        yield
    except LLMCoreError:
        raise
    except RuntimeError as err:
        text = str(err)
        if not (isinstance(err, getattr(dist, "DistError", ())) or any(m in text.lower() for m in _PEER_MARKERS)):
            raise
        _PEER_LOST = True
        raise LLMCoreError(
            f"lost contact with another process of this run during {what} (a node died, was "
            f"killed or stopped answering within {dist_timeout_s():g}s): {_first_sentence(text)}; "
            "restart the run "
            "with --resume to continue from its last checkpoint"
        ) from None


def release_standalone() -> None:
    """End the one-process group `init_distributed` made, while the interpreter is healthy: gloo's
    teardown at interpreter exit aborts some processes (SIGABRT)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    for k in _STANDALONE_KEYS:
        os.environ.pop(k, None)


def shutdown_distributed() -> None:
    """Destroy the process group if one is up (call before exiting a DeepSpeed run). After a lost
    peer there is nobody to meet: the group is left for os._exit to drop."""
    d = active_dist()
    if d is not None and _PEER_LOST:
        return
    if d is not None:
        try:
            d.barrier()
        except Exception:  # a peer already gone: tearing down is all that is left to do
            pass
        d.destroy_process_group()


__all__ = [
    "DEFAULT_DIST_TIMEOUT_S",
    "active_dist",
    "dist_timeout_s",
    "free_port",
    "init_distributed",
    "peer_errors",
    "release_standalone",
    "shutdown_distributed",
]
