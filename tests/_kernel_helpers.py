"""Shared checks for the Triton kernel tests: compiled kernels refuse CPU tensors, and the kernels build for sm_90.

Both run Python in a subprocess without ``TRITON_INTERPRET`` (tests/conftest.py sets it for this
process), since the interpreter accepts code that the real compiler rejects.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The dtypes below fp32 the kernels are checked in here (fp16 only where the compiled kernels run).
LOW_PRECISION = [torch.bfloat16, torch.float16] if DEVICE == "cuda" else [torch.bfloat16]
_TRITON_PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"

cpu_only = pytest.mark.skipif(DEVICE == "cuda", reason="on CUDA the compiled kernels run; the error is for CPU tensors")
needs_ptxas = pytest.mark.skipif(
    shutil.which("ptxas") is None and not _TRITON_PTXAS.exists(), reason="Triton's bundled ptxas not found"
)


def packed_positions(batch: int, seq: int, doc_lengths: list[int]) -> torch.Tensor:
    """Per-document positions restarting at 0, as the packed loader yields them: each row holds
    documents of `doc_lengths`, then one running to the row's end."""
    rows = []
    for _ in range(batch):
        pos, lengths = [], list(doc_lengths)
        while len(pos) < seq:
            n = lengths.pop(0) if lengths else seq
            pos.extend(range(n))
        rows.append(pos[:seq])
    return torch.tensor(rows, device=DEVICE)


def _run_compiled(code: str, timeout: int, **env_overrides: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(env_overrides)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)


def assert_refuses_cpu_tensors(imports: str, call: str) -> None:
    """Compiled (non-interpreted) kernels must refuse CPU tensors with a clear error, never compute garbage.

    ``imports``: what to import from ``llmcore.kernels``; ``call``: one expression that launches the kernel.
    """
    code = (
        "import torch\n"
        f"from llmcore.kernels import KernelDeviceError, {imports}\n"
        "try:\n"
        f"    {call}\n"
        "except KernelDeviceError as e:\n"
        "    print('REFUSED', e)\n"
    )
    out = _run_compiled(code, 120, CUDA_VISIBLE_DEVICES="")
    assert "REFUSED" in out.stdout and "TRITON_INTERPRET=1" in out.stdout, out.stdout + out.stderr


def assert_compiles_for_sm90(code: str) -> None:
    """Run ``code`` (which builds kernels with ``compile_for_cuda``) for an H100 without a GPU; it must print COMPILED."""
    code = "from llmcore.kernels._runtime import compile_for_cuda\n" + textwrap.dedent(code) + '\nprint("COMPILED")\n'
    out = _run_compiled(code, 600)
    assert out.returncode == 0 and "COMPILED" in out.stdout, out.stdout + out.stderr[-3000:]
