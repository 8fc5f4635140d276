"""RMSNorm kernel vs its plain-PyTorch reference: outputs and the gradients of x and weight.

Runs on CUDA when present (bf16/fp16 too), else on CPU through Triton's interpreter
(tests/conftest.py sets TRITON_INTERPRET=1 before triton is imported).
"""

from __future__ import annotations

import pytest
import torch

from llmcore.kernels import rms_norm, rms_norm_reference

from _kernel_helpers import DEVICE, assert_compiles_for_sm90, assert_refuses_cpu_tensors, cpu_only, needs_ptxas

LOW_PRECISION = [torch.bfloat16, torch.float16] if DEVICE == "cuda" else [torch.bfloat16]
# (abs, rel) tolerances: fp32 to ~1e-5; half precision to a couple of ulps of the output.
TOL = {torch.float32: (2e-5, 1e-5), torch.bfloat16: (3e-2, 2e-2), torch.float16: (4e-3, 4e-3)}


def _inputs(shape, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen) * 3.0 + 0.5
    w = 1.0 + 0.3 * torch.randn(shape[-1], generator=gen)
    dy = torch.randn(shape, generator=gen)
    return (x.to(DEVICE, dtype), w.to(DEVICE, dtype), dy.to(DEVICE, dtype))


def _run(fn, x, w, dy, eps):
    x = x.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    y = fn(x, w, eps)
    y.backward(dy)
    return y.detach(), x.grad, w.grad


def _close(actual, expected, dtype, what, scale=1.0):
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(
        actual.float(), expected.float(), atol=atol * scale, rtol=rtol, msg=lambda m: f"{what}: {m}"
    )


@pytest.mark.parametrize("shape", [(3, 37, 123), (2, 5, 512), (4, 768), (1, 1, 1000), (65, 64)])
def test_rms_norm_fp32_matches_reference(shape):
    x, w, dy = _inputs(shape, torch.float32)
    y, dx, dw = _run(rms_norm, x, w, dy, 1e-5)
    yr, dxr, dwr = _run(rms_norm_reference, x, w, dy, 1e-5)
    assert y.dtype == torch.float32 and y.shape == x.shape
    _close(y, yr, torch.float32, "y")
    _close(dx, dxr, torch.float32, "dx")
    # dW sums over every row: its error grows with the row count.
    _close(dw, dwr, torch.float32, "dweight", scale=x.numel() / shape[-1])


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("shape", [(3, 37, 123), (2, 8, 768)])
def test_rms_norm_low_precision_matches_fp32_reference(dtype, shape):
    x, w, dy = _inputs(shape, dtype, seed=1)
    y, dx, dw = _run(rms_norm, x, w, dy, 1e-5)
    assert y.dtype == dtype and dx.dtype == dtype and dw.dtype == dtype
    # The forward reference in the same dtype rounds exactly like the kernel (fp32 stats, round, scale).
    yr = rms_norm_reference(x, w, 1e-5)
    _close(y, yr, dtype, "y")
    # Same rounding steps, so all but a few elements (fp32 rsqrt ulps flipping a rounding) agree bit for bit.
    assert (y != yr).float().mean() < 0.01
    # Gradients: against fp32 math on the same (rounded) inputs.
    _, dxr, dwr = _run(rms_norm_reference, x.float(), w.float(), dy.float(), 1e-5)
    _close(dx, dxr, dtype, "dx", scale=2.0)
    _close(dw, dwr, dtype, "dweight", scale=4.0)


def test_rms_norm_eps_and_noncontiguous_input():
    # A strided view (every other column block) and a large eps that visibly changes the result.
    base, w, _ = _inputs((6, 2 * 123), torch.float32, seed=2)
    x = base[:, ::2]
    assert not x.is_contiguous()
    w = w[:123].contiguous()
    dy = torch.randn(x.shape, device=DEVICE)
    for eps in (1e-5, 10.0):
        y, dx, dw = _run(rms_norm, x, w, dy, eps)
        yr, dxr, dwr = _run(rms_norm_reference, x, w, dy, eps)
        _close(y, yr, torch.float32, f"y eps={eps}")
        _close(dx, dxr, torch.float32, f"dx eps={eps}")
        _close(dw, dwr, torch.float32, f"dweight eps={eps}", scale=6)


def test_rms_norm_reference_is_hf_llama_formula():
    # Independent spelling of the HF Llama / MiniMind module: normalise in fp32, cast, times weight.
    x, w, _ = _inputs((4, 9, 64), torch.bfloat16, seed=3)
    hidden = x.to(torch.float32)
    variance = hidden.pow(2).mean(-1, keepdim=True)
    expected = w * (hidden * torch.rsqrt(variance + 1e-5)).to(torch.bfloat16)
    torch.testing.assert_close(rms_norm_reference(x, w, 1e-5), expected, atol=0, rtol=0)


def test_rms_norm_rejects_bad_weight():
    x, w, _ = _inputs((2, 16), torch.float32)
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, w[:8], 1e-5)


@cpu_only
def test_rms_norm_cpu_without_interpreter_raises_clearly():
    assert_refuses_cpu_tensors("rms_norm", "rms_norm(torch.randn(2, 8), torch.ones(8), 1e-5)")


@needs_ptxas
def test_rms_norm_compiles_for_sm90():
    assert_compiles_for_sm90("""
        from llmcore.kernels.rmsnorm import _rms_norm_bwd_kernel, _rms_norm_fwd_kernel
        common = dict(n_rows=1000, n_cols=768)
        fwd = dict(X="*bf16", W="*bf16", Y="*bf16", RSTD="*fp32", stride_x=768, stride_y=768, eps=1e-5, **common)
        bwd = dict(DY="*bf16", X="*bf16", W="*bf16", RSTD="*fp32", DX="*bf16", DW_PARTIAL="*fp32",
                   rows_per_program=64, stride_dy=768, stride_x=768, stride_dx=768, **common)
        tiles = dict(BLOCK_ROWS=4, BLOCK_N=1024, FIX_BF16=False)
        print(compile_for_cuda(_rms_norm_fwd_kernel, fwd, tiles, num_warps=8))
        print(compile_for_cuda(_rms_norm_bwd_kernel, bwd, tiles, num_warps=8))
    """)
