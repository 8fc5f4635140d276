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
import triton.language as tl

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


@triton.jit
def cast_rtne(x, dtype: tl.constexpr, FIX_BF16: tl.constexpr):
    """``x.to(dtype)`` with round-to-nearest-even everywhere.

    Triton's interpreter converts fp32 to bf16 by truncation (compiled CUDA code rounds to
    nearest even), which would bias CPU results by up to one bf16 ulp. With ``FIX_BF16`` the
    fp32 value is first rounded to the nearest bf16-representable fp32 by integer arithmetic,
    so the (truncating) conversion is exact. Pass ``FIX_BF16`` only in the interpreter.
    """
    if FIX_BF16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        return bits.to(tl.float32, bitcast=True).to(dtype)
    else:
        return x.to(dtype)


def needs_bf16_fix(interpreted: bool, dtype: torch.dtype) -> bool:
    """True when stores of ``dtype`` must round by hand (interpreter + bf16)."""
    return interpreted and dtype == torch.bfloat16


def compile_for_cuda(
    kernel: object, args: dict, constexprs: dict, num_warps: int = 4, num_stages: int = 3, arch: int = 90
) -> dict:
    """Compile a ``@triton.jit`` kernel to a CUDA binary without a GPU (Triton ships ptxas).

    Lets CPU-only CI catch errors that only compiled mode reports (types, layouts, shared
    memory). ``args`` maps runtime parameter names to a Triton type string (``"*bf16"``,
    ``"i32"``, ``"fp32"``) or a Python int/float; ``constexprs`` gives the compile-time values.
    The kernel must have been decorated without ``TRITON_INTERPRET``. Returns
    ``{"shared": bytes of shared memory, "cubin": size of the binary}``.
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if is_interpreted(kernel):
        raise KernelDeviceError("compile_for_cuda needs a kernel imported without TRITON_INTERPRET=1")
    signature = {}
    for name in kernel.arg_names:  # type: ignore[attr-defined]
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        value = args[name]
        if isinstance(value, str):
            signature[name] = value
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"compile_for_cuda: give a Triton type string for {name!r}")
        else:
            signature[name] = "i32" if isinstance(value, int) else "fp32"
    source = ASTSource(kernel, signature, constexprs)
    compiled = triton.compile(
        source, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps, "num_stages": num_stages}
    )
    return {"shared": int(compiled.metadata.shared), "cubin": len(compiled.asm["cubin"])}
