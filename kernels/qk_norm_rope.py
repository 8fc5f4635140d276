"""Fused QK-norm + RoPE (Qwen3 / MiniMind-3): RMSNorm over head_dim, scale by weight, rotate; forward and backward.

For one head vector ``x`` (``D = head_dim``, halves ``x1``/``x2``) at position ``p``, with the
layer's norm weight ``w`` and table rows ``cos[p] = [c1, c2]``, ``sin[p] = [s1, s2]``:

    rstd = 1 / sqrt(mean(x^2) + eps),   n = w * round(x * rstd),   round(n)
    y1 = n1*c1 - n2*s1,                  y2 = n2*c2 + n1*s2

``round`` is the cast to the input dtype that the eager module does (HF Qwen3 RMSNorm: fp32
statistics, ``weight * normed.to(dtype)``; no-op for fp32), so the kernel equals
``qk_norm_rope_reference`` (``rms_norm_reference`` then ``apply_rope_reference``). One kernel
pass replaces two RMSNorm launches and two RoPE launches per layer, and q and k are read and
written once instead of twice.

Backward (recomputes ``rstd`` from ``x``; nothing but the inputs is saved): the rotation's
transpose ``dn1 = dy1*c1 + dy2*s2``, ``dn2 = dy2*c2 - dy1*s1``; then RMSNorm's backward with
``xhat = x * rstd`` and ``g = dn * w``: ``dx = rstd * (g - xhat * mean(g * xhat))``, and
``dw = sum over tokens and heads of dn * round(xhat)``. dW is reduced without atomics: each
program writes one fp32 partial row, torch sums them in fp32 (deterministic).

Layout: one program handles a block of tokens and all heads of q (or k), so each table row and
the weight are loaded once per program and reused across heads; one kernel serves both directions
(``BACKWARD``), and the block's loads and the rotation are ``llmcore.kernels.rope``'s
(``rope_block``, ``rotate``). Math in fp32; outputs keep the
inputs' dtypes. ``cos``/``sin`` are constants (no gradient).

Registered with torch as ``torch.ops.llmcore.qk_norm_rope`` and
``torch.ops.llmcore.qk_norm_rope_backward`` with fake (shape) functions and the gradient, so
``torch.compile(fullgraph=True)`` traces through :func:`qk_norm_rope` (the package docstring says
why ``custom_op``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmcore.kernels._runtime import cast_rtne, check_device, needs_bf16_fix
from llmcore.kernels.rope import check_positions, rope_args, rope_block, rotate, token_blocks

# The plain-PyTorch side lives in llmcore.reference (one copy, shared with the model's eager path).
from llmcore.reference import qk_norm_rope_reference

__all__ = ["qk_norm_rope", "qk_norm_rope_reference"]


@triton.jit
def _rstd(x1, x2, half_dim, eps):
    """Inverse RMS over head_dim per (token, head), broadcastable over the half-dim axis; padding
    loads as 0, so the sum is exact, divided by the true width."""
    mean_sq = tl.sum(x1 * x1 + x2 * x2, axis=2) / (2 * half_dim)
    return (1.0 / tl.sqrt(mean_sq + eps))[:, :, None]


@triton.jit
def _qk_norm_rope_kernel(
    X,
    W,
    Y,
    DY,
    DW_PARTIAL,
    COS,
    SIN,
    POS,
    n_tokens,
    seq_len,
    n_heads,
    half_dim,
    stride_table,
    eps,
    HAS_POS: tl.constexpr,
    BACKWARD: tl.constexpr,
    ROUND_N: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    FIX_BF16: tl.constexpr,
):
    """Forward: Y = X normalised, weighted and rotated (DY and DW_PARTIAL are not read). BACKWARD:
    Y = dX for the upstream gradient DY, and this program's row of dW partial sums in DW_PARTIAL."""
    pid = tl.program_id(0)
    offs, mask, x1, x2, c1, c2, s1, s2 = rope_block(
        X, COS, SIN, POS, pid, n_tokens, seq_len, n_heads, half_dim, stride_table, HAS_POS, BLOCK_T, BLOCK_H, BLOCK_HALF
    )
    # The weight is shared by all heads: loaded once per program, broadcast over tokens and heads.
    d = tl.arange(0, BLOCK_HALF)
    d_ok = d < half_dim
    w1 = tl.load(W + d, mask=d_ok, other=0.0).to(tl.float32)[None, None, :]
    w2 = tl.load(W + half_dim + d, mask=d_ok, other=0.0).to(tl.float32)[None, None, :]
    rstd = _rstd(x1, x2, half_dim, eps)
    if BACKWARD:
        dy1 = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        dy2 = tl.load(DY + offs + half_dim, mask=mask, other=0.0).to(tl.float32)
        # Transposed rotation: the gradient reaching the normalised, weighted vector.
        dn1, dn2 = rotate(dy1, dy2, c1, c2, s1, s2, True)
        xhat1 = x1 * rstd
        xhat2 = x2 * rstd
        # The weight multiplied the rounded normalised vector in the forward; its gradient uses it too.
        xr1 = cast_rtne(xhat1, X.dtype.element_ty, FIX_BF16).to(tl.float32)
        xr2 = cast_rtne(xhat2, X.dtype.element_ty, FIX_BF16).to(tl.float32)
        dw1 = tl.sum(tl.sum(dn1 * xr1, axis=1), axis=0)
        dw2 = tl.sum(tl.sum(dn2 * xr2, axis=1), axis=0)
        g1 = dn1 * w1
        g2 = dn2 * w2
        # d/dx of x*rstd(x): the mean term is the projection through rstd's dependence on x.
        proj = (tl.sum(g1 * xhat1 + g2 * xhat2, axis=2) / (2 * half_dim))[:, :, None]
        dx1 = rstd * (g1 - xhat1 * proj)
        dx2 = rstd * (g2 - xhat2 * proj)
        tl.store(Y + offs, cast_rtne(dx1, Y.dtype.element_ty, FIX_BF16), mask=mask)
        tl.store(Y + offs + half_dim, cast_rtne(dx2, Y.dtype.element_ty, FIX_BF16), mask=mask)
        row = DW_PARTIAL + pid.to(tl.int64) * (2 * half_dim)
        tl.store(row + d, dw1, mask=d_ok)
        tl.store(row + half_dim + d, dw2, mask=d_ok)
    else:
        # The normalised vector is rounded to the input dtype before the weight, and the weighted one
        # again when the weight has that dtype too (the product is then computed in it), as eager does.
        n1 = cast_rtne(x1 * rstd, Y.dtype.element_ty, FIX_BF16).to(tl.float32) * w1
        n2 = cast_rtne(x2 * rstd, Y.dtype.element_ty, FIX_BF16).to(tl.float32) * w2
        if ROUND_N:
            n1 = cast_rtne(n1, Y.dtype.element_ty, FIX_BF16).to(tl.float32)
            n2 = cast_rtne(n2, Y.dtype.element_ty, FIX_BF16).to(tl.float32)
        y1, y2 = rotate(n1, n2, c1, c2, s1, s2, False)
        tl.store(Y + offs, cast_rtne(y1, Y.dtype.element_ty, FIX_BF16), mask=mask)
        tl.store(Y + offs + half_dim, cast_rtne(y2, Y.dtype.element_ty, FIX_BF16), mask=mask)


def _launch(
    x: torch.Tensor,
    weight: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    pos: torch.Tensor | None,
    eps: float,
    interpreted: bool,
    dy: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Forward (``dy`` None): the normalised, rotated x. Backward: ``(dx, dweight)``."""
    batch, seq_len, n_heads, head_dim = x.shape
    n_tokens = batch * seq_len
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    block_t, block_h, block_half = token_blocks(n_heads, head_dim, interpreted)
    n_programs = triton.cdiv(n_tokens, block_t)
    backward = dy is not None
    dw_partial = torch.zeros((max(n_programs, 1), head_dim), dtype=torch.float32, device=x.device) if backward else x
    if n_tokens:
        # The forward reads neither DY nor DW_PARTIAL: x stands in for both pointers (as for POS).
        _qk_norm_rope_kernel[(n_programs,)](
            x,
            weight,
            out,
            dy if dy is not None else x,
            dw_partial,
            cos,
            sin,
            pos if pos is not None else x,
            n_tokens,
            seq_len,
            n_heads,
            head_dim // 2,
            cos.stride(0),
            float(eps),
            HAS_POS=pos is not None,
            BACKWARD=backward,
            ROUND_N=not backward and weight.dtype == x.dtype,
            BLOCK_T=block_t,
            BLOCK_H=block_h,
            BLOCK_HALF=block_half,
            FIX_BF16=needs_bf16_fix(interpreted, x.dtype),
            num_warps=4,
        )
    if not backward:
        return out, None
    return out, dw_partial.sum(dim=0).to(weight.dtype)


# Two custom ops (forward; backward returning the four gradients) with fake (shape) functions and
# the gradient registered between them: one opaque node each under torch.compile.


@torch.library.custom_op("llmcore::qk_norm_rope", mutates_args=())
def _qk_norm_rope_op(
    q: torch.Tensor,
    k: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    position_ids: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalise and rotate q and k; new contiguous tensors in their dtypes."""
    interpreted = check_device(_qk_norm_rope_kernel, q, k, q_weight, k_weight, cos, sin)
    check_positions(position_ids, cos.shape[0], "qk_norm_rope")
    cos, sin = cos.contiguous(), sin.contiguous()
    q_out, _ = _launch(q.contiguous(), q_weight.contiguous(), cos, sin, position_ids, eps, interpreted)
    k_out, _ = _launch(k.contiguous(), k_weight.contiguous(), cos, sin, position_ids, eps, interpreted)
    return q_out, k_out


@_qk_norm_rope_op.register_fake
def _(q, k, q_weight, k_weight, cos, sin, position_ids, eps):
    return q.new_empty(q.shape), k.new_empty(k.shape)


@torch.library.custom_op("llmcore::qk_norm_rope_backward", mutates_args=())
def _qk_norm_rope_bwd(
    dq: torch.Tensor,
    dk: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    position_ids: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dq_weight, dk_weight)`` in the inputs' shapes and dtypes (recomputes the norms)."""
    interpreted = check_device(_qk_norm_rope_kernel, dq, dk, q, k, q_weight, k_weight, cos, sin)
    cos, sin = cos.contiguous(), sin.contiguous()
    dq_in, dqw = _launch(
        q.contiguous(), q_weight.contiguous(), cos, sin, position_ids, eps, interpreted, dy=dq.contiguous()
    )
    dk_in, dkw = _launch(
        k.contiguous(), k_weight.contiguous(), cos, sin, position_ids, eps, interpreted, dy=dk.contiguous()
    )
    return dq_in, dk_in, dqw, dkw


@_qk_norm_rope_bwd.register_fake
def _(dq, dk, q, k, q_weight, k_weight, cos, sin, position_ids, eps):
    return (
        q.new_empty(q.shape),
        k.new_empty(k.shape),
        q_weight.new_empty(q_weight.shape),
        k_weight.new_empty(k_weight.shape),
    )


def _setup_context(ctx, inputs, output) -> None:
    q, k, q_weight, k_weight, cos, sin, position_ids, eps = inputs
    ctx.save_for_backward(q, k, q_weight, k_weight, cos, sin, position_ids)
    ctx.eps = eps


def _backward(ctx, dq, dk):
    q, k, q_weight, k_weight, cos, sin, position_ids = ctx.saved_tensors
    dq_in, dk_in, dqw, dkw = torch.ops.llmcore.qk_norm_rope_backward(
        dq, dk, q, k, q_weight, k_weight, cos, sin, position_ids, ctx.eps
    )
    return dq_in, dk_in, dqw, dkw, None, None, None, None


_qk_norm_rope_op.register_autograd(_backward, setup_context=_setup_context)


def qk_norm_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """QK-norm then RoPE in one Triton pass (differentiable in q, k and both weights).

    q ``(B, T, H, D)``, k ``(B, T, Hkv, D)`` (any even D); ``q_weight``/``k_weight`` ``(D,)``, the
    layer's RMSNorm weights shared by all heads; ``eps`` the RMSNorm epsilon. Tables and positions
    as :func:`apply_rope`. Returns new tensors in q's and k's dtypes, equal to
    ``qk_norm_rope_reference``. Runs as the custom op ``torch.ops.llmcore.qk_norm_rope``.
    """
    pos = rope_args("qk_norm_rope", q, k, cos, sin, position_ids)
    head_dim = q.shape[3]
    for name, w in (("q_weight", q_weight), ("k_weight", k_weight)):
        if tuple(w.shape) != (head_dim,):
            raise ValueError(f"qk_norm_rope: {name} must have shape ({head_dim},), got {tuple(w.shape)}")
    return torch.ops.llmcore.qk_norm_rope(q, k, q_weight, k_weight, cos, sin, pos, float(eps))
