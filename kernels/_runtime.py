"""Where the Triton kernels may run, decided once per call so a CPU tensor never reaches compiled code.

Triton reads ``TRITON_INTERPRET`` when a ``@triton.jit`` function is *decorated*, i.e. when the
kernel modules are imported. A kernel decorated without it can only run on CUDA; a kernel
decorated with it runs on CPU tensors through the interpreter (about 100x slower than torch).
Policy: a CPU tensor reaching a compiled kernel raises :class:`KernelDeviceError` (a clear
error, never a silent fallback); pick the ``eager``/``sdpa`` model backend instead, or set
``TRITON_INTERPRET=1`` before importing ``llmcore.kernels``.
"""

from __future__ import annotations

import torch
import triton

try:  # the interpreter class lives here in every Triton 3.x release
    from triton.runtime.interpreter import InterpretedFunction as _Interpreted
except ImportError:  # pragma: no cover - very old or very new Triton
    _Interpreted = ()  # type: ignore[assignment]


class KernelDeviceError(RuntimeError):
    """A kernel was called on a device it cannot run on (CPU tensor, kernel compiled for CUDA)."""


def is_interpreted(kernel: object) -> bool:
    """True when ``kernel`` was decorated under ``TRITON_INTERPRET=1`` (runs on CPU tensors)."""
    return bool(_Interpreted) and isinstance(kernel, _Interpreted)


def check_device(kernel: object, *tensors: torch.Tensor) -> bool:
    """Validate that ``tensors`` can go to ``kernel``; returns True when running in the interpreter.

    All tensors must share one device. CUDA tensors always work (the interpreter also accepts
    them, slowly); CPU tensors need an interpreted kernel.
    """
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise KernelDeviceError(f"llmcore.kernels: all inputs must be on one device, got {sorted(map(str, devices))}")
    device = devices.pop()
    interpreted = is_interpreted(kernel)
    if device.type != "cuda" and not interpreted:
        raise KernelDeviceError(
            f"llmcore.kernels: got {device.type} tensors but Triton kernels were compiled for CUDA. "
            "Use the 'eager' or 'sdpa' attention backend on CPU, or set TRITON_INTERPRET=1 in the "
            "environment before importing llmcore.kernels to run them in Triton's (slow) interpreter."
        )
    return interpreted or device.type != "cuda"


def next_pow2(n: int) -> int:
    """Triton block shapes must be powers of two; masks cover the padding."""
    return triton.next_power_of_2(max(int(n), 1))
