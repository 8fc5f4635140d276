"""Fused RMSNorm: ``y = weight * (x * rsqrt(mean(x^2) + eps))``, forward and backward in Triton.

Numerics follow the HF Llama / MiniMind eager module exactly: the row is normalised in fp32,
rounded to the input dtype, then multiplied by ``weight`` (``weight * normed.type_as(x)``). All
reductions accumulate in fp32 whatever the input dtype. The output has the input's dtype.

Forward: each program normalises ``BLOCK_ROWS`` whole rows (one pass: load, reduce, scale,
store) and saves the per-row inverse RMS in fp32 for the backward.
Backward: with ``xhat = x * rstd`` and ``g = dy * weight``,
``dx = rstd * (g - xhat * mean(g * xhat))`` and ``dweight = sum_rows(dy * round(xhat))``. dW is
reduced without atomics: each program owns a contiguous slice of rows and writes one fp32
partial row; torch sums the few partial rows in fp32 afterwards, deterministically.
The reference (``rms_norm_reference``) is re-exported from ``llmcore.reference``.

Registered with torch as ``torch.ops.llmcore.rms_norm`` (returns ``(y, rstd)``) and
``torch.ops.llmcore.rms_norm_backward``, with fake (shape) functions and the gradient formula, so
``torch.compile(fullgraph=True)`` traces through :func:`rms_norm`; the package docstring says why.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmcore.kernels._runtime import cast_rtne, check_device, needs_bf16_fix, next_pow2

# The plain-PyTorch formula lives in llmcore.reference (one copy, shared with the model's eager path).
from llmcore.reference import rms_norm_reference

__all__ = ["rms_norm", "rms_norm_reference"]


@triton.jit
def _rms_norm_fwd_kernel(
    X,
    W,
    Y,
    RSTD,
    n_rows,
    n_cols,
    stride_x,
    stride_y,
    eps,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    FIX_BF16: tl.constexpr,
):
    pid = tl.program_id(0)
    # int64 row offsets: rows * stride can pass 2**31 for large batches of long sequences.
    rows = (pid * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    col_ok = cols < n_cols
    mask = row_ok[:, None] & col_ok[None, :]

    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    # Padding columns load as 0, so the sum is exact; divide by the true width.
    mean_sq = tl.sum(x * x, axis=1) / n_cols
    rstd = 1.0 / tl.sqrt(mean_sq + eps)
    # Round the normalised row to the input dtype before the weight, as the eager module does.
    xhat = cast_rtne(x * rstd[:, None], Y.dtype.element_ty, FIX_BF16).to(tl.float32)
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    y = xhat * w[None, :]
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], cast_rtne(y, Y.dtype.element_ty, FIX_BF16), mask=mask)
    tl.store(RSTD + rows, rstd, mask=row_ok)


@triton.jit
def _rms_norm_bwd_kernel(
    DY,
    X,
    W,
    RSTD,
    DX,
    DW_PARTIAL,
    n_rows,
    n_cols,
    rows_per_program,
    stride_dy,
    stride_x,
    stride_dx,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    FIX_BF16: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK_N], dtype=tl.float32)

    row_begin = pid * rows_per_program
    row_end = tl.minimum(row_begin + rows_per_program, n_rows)
    for r0 in range(row_begin, row_end, BLOCK_ROWS):
        rows = (r0 + tl.arange(0, BLOCK_ROWS)).to(tl.int64)
        row_ok = rows < row_end
        mask = row_ok[:, None] & col_ok[None, :]
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)

        xhat = x * rstd[:, None]
        # The weight multiplied the *rounded* normalised row in the forward; its gradient uses it too.
        dw_acc += tl.sum(dy * cast_rtne(xhat, X.dtype.element_ty, FIX_BF16).to(tl.float32), axis=0)
        g = dy * w[None, :]
        # d/dx of x*rstd(x): the mean term is the projection through rstd's dependence on x.
        proj = tl.sum(g * xhat, axis=1) / n_cols
        dx = rstd[:, None] * (g - xhat * proj[:, None])
        tl.store(
            DX + rows[:, None] * stride_dx + cols[None, :], cast_rtne(dx, DX.dtype.element_ty, FIX_BF16), mask=mask
        )

    tl.store(DW_PARTIAL + pid * n_cols + cols, dw_acc, mask=col_ok)


def _launch_config(n_cols: int, interpreted: bool) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_ROWS, num_warps): several short rows per program keep every lane busy.

    The interpreter pays per program, not per element, so it gets bigger tiles.
    """
    block_n = next_pow2(n_cols)
    tile = 16384 if interpreted else 4096
    block_rows = max(1, min(64, tile // block_n))
    num_warps = 8 if block_n * block_rows >= 4096 else 4
    return block_n, block_rows, num_warps


def _as_rows(t: torch.Tensor, n_cols: int) -> torch.Tensor:
    """2-D view (rows, hidden) with unit column stride; copies only when the layout needs it."""
    t2 = t.reshape(-1, n_cols)
    if n_cols > 1 and t2.stride(1) != 1:
        t2 = t2.contiguous()
    return t2


def _check_weight(x: torch.Tensor, weight: torch.Tensor) -> int:
    n_cols = x.shape[-1]
    if weight.shape != (n_cols,):
        raise ValueError(f"rms_norm: weight must have shape ({n_cols},), got {tuple(weight.shape)}")
    return n_cols


# torch.compile sees the two ops below as opaque calls with known output shapes (register_fake)
# and a registered gradient, so a compiled model keeps one graph around them (see the package
# docstring for why custom_op and not triton_op). Eager calls run the very same functions.


@torch.library.custom_op("llmcore::rms_norm", mutates_args=())
def _rms_norm_fwd(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, rstd)``: y with x's shape and dtype (contiguous), rstd fp32 ``(rows,)`` for the backward."""
    n_cols = _check_weight(x, weight)
    interpreted = check_device(_rms_norm_fwd_kernel, x, weight)
    x2 = _as_rows(x, n_cols)
    w = weight.contiguous()
    n_rows = x2.shape[0]
    y = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    rstd = torch.empty((n_rows,), dtype=torch.float32, device=x.device)
    block_n, block_rows, num_warps = _launch_config(n_cols, interpreted)
    if n_rows > 0:
        grid = (triton.cdiv(n_rows, block_rows),)
        _rms_norm_fwd_kernel[grid](
            x2,
            w,
            y,
            rstd,
            n_rows,
            n_cols,
            x2.stride(0),
            y.stride(0),
            float(eps),
            BLOCK_ROWS=block_rows,
            BLOCK_N=block_n,
            FIX_BF16=needs_bf16_fix(interpreted, x.dtype),
            num_warps=num_warps,
        )
    return y.view(x.shape), rstd


@_rms_norm_fwd.register_fake
def _(x, weight, eps):
    n_rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return x.new_empty(x.shape), x.new_empty((n_rows,), dtype=torch.float32)


@torch.library.custom_op("llmcore::rms_norm_backward", mutates_args=())
def _rms_norm_bwd(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dx, dweight)`` in x's and weight's shapes and dtypes."""
    n_cols = x.shape[-1]
    interpreted = check_device(_rms_norm_fwd_kernel, dy, x, weight, rstd)
    x2 = _as_rows(x, n_cols)
    w = weight.contiguous()
    n_rows = x2.shape[0]
    dy2 = _as_rows(dy, n_cols)
    dx = torch.empty((n_rows, n_cols), dtype=x2.dtype, device=x2.device)
    block_n, block_rows, num_warps = _launch_config(n_cols, interpreted)
    if interpreted:
        n_programs = max(1, min(4, triton.cdiv(n_rows, block_rows)))
    else:
        # A few programs per SM: enough parallelism, few partial rows to reduce.
        sms = torch.cuda.get_device_properties(x2.device).multi_processor_count
        n_programs = max(1, min(4 * sms, triton.cdiv(n_rows, block_rows)))
    rows_per_program = triton.cdiv(max(n_rows, 1), n_programs)
    # Whole tiles per program: only the very last tile of the last program is partial.
    rows_per_program = triton.cdiv(rows_per_program, block_rows) * block_rows
    n_programs = max(1, triton.cdiv(n_rows, rows_per_program))
    dw_partial = torch.zeros((n_programs, n_cols), dtype=torch.float32, device=x2.device)
    if n_rows > 0:
        _rms_norm_bwd_kernel[(n_programs,)](
            dy2,
            x2,
            w,
            rstd,
            dx,
            dw_partial,
            n_rows,
            n_cols,
            rows_per_program,
            dy2.stride(0),
            x2.stride(0),
            dx.stride(0),
            BLOCK_ROWS=block_rows,
            BLOCK_N=block_n,
            FIX_BF16=needs_bf16_fix(interpreted, x2.dtype),
            num_warps=num_warps,
        )
    dw = dw_partial.sum(dim=0).to(w.dtype)
    return dx.view(x.shape), dw


@_rms_norm_bwd.register_fake
def _(dy, x, weight, rstd):
    return x.new_empty(x.shape), weight.new_empty(weight.shape)


def _setup_context(ctx, inputs, output) -> None:
    x, weight, _ = inputs
    _, rstd = output
    ctx.mark_non_differentiable(rstd)
    ctx.save_for_backward(x, weight, rstd)


def _backward(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    dx, dw = torch.ops.llmcore.rms_norm_backward(dy, x, weight, rstd)
    return dx, dw, None


_rms_norm_fwd.register_autograd(_backward, setup_context=_setup_context)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """RMS-normalise ``x`` over its last dim and scale by ``weight`` (Triton; differentiable in x and weight).

    ``x``: ``(..., hidden)`` in fp32/bf16/fp16, any hidden size; ``weight``: ``(hidden,)``.
    Returns a tensor of ``x``'s shape and dtype. CUDA tensors, or CPU tensors when
    ``TRITON_INTERPRET=1`` was set before import (otherwise ``KernelDeviceError``). Runs as the
    custom op ``torch.ops.llmcore.rms_norm`` (one node under torch.compile, no graph break).
    """
    _check_weight(x, weight)
    return torch.ops.llmcore.rms_norm(x, weight, float(eps))[0]
