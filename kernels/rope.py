"""Fused rotary position embedding (rotate-half layout of HF Llama / MiniMind), forward and backward.

For a head vector ``x = [x1, x2]`` (halves of ``head_dim``) at position ``p`` with table rows
``cos[p] = [c1, c2]`` and ``sin[p] = [s1, s2]`` the eager formula
``x * cos + rotate_half(x) * sin`` with ``rotate_half(x) = [-x2, x1]`` is
``y1 = x1*c1 - x2*s1`` and ``y2 = x2*c2 + x1*s2``. The backward is the transposed map
(a rotation by the opposite angle when the halves of the tables are equal):
``dx1 = dy1*c1 + dy2*s2`` and ``dx2 = dy2*c2 - dy1*s1``. Both halves of the tables are read,
so the kernel equals the eager formula for any table, not only ones with repeated halves.

One program handles a block of tokens and all heads of q (or k), so each table row is loaded
once per token and reused across heads (GQA: q and k simply have different head counts).
Math in fp32; outputs keep the inputs' dtypes. ``cos``/``sin`` are constants (no gradient).
The tables (``rope_tables``) and the reference (``apply_rope_reference``) are re-exported from
``llmcore.reference``. ``rope_block`` (a block's token offsets, x halves and table rows) and
``rotate`` (the rotation or its transpose) are the one copy the fused QK-norm + RoPE kernel uses too.

Registered with torch as ``torch.ops.llmcore.rope(q, k, cos, sin, position_ids, backward)``, one
op for both directions whose gradient is itself with ``backward`` flipped, with a fake (shape)
function, so ``torch.compile(fullgraph=True)`` traces through :func:`apply_rope`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmcore.kernels._runtime import cast_rtne, check_device, needs_bf16_fix, next_pow2

# The plain-PyTorch side lives in llmcore.reference (one copy, shared with the model's eager path).
from llmcore.reference import apply_rope_reference, rope_tables, rotate_half

__all__ = ["apply_rope", "apply_rope_reference", "rope_tables", "rotate_half"]


@triton.jit
def rope_block(
    X,
    COS,
    SIN,
    POS,
    pid,
    n_tokens,
    seq_len,
    n_heads,
    half_dim,
    stride_table,
    HAS_POS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    """Program `pid`'s block of tokens: the element offsets and mask into the contiguous (tokens,
    heads, head_dim) tensors, both halves of X (fp32), and the table rows of the tokens' positions
    (fp32, broadcast over heads). Positions are POS's, else the index within the row (token %
    seq_len). Shared by the RoPE and the fused QK-norm + RoPE kernels."""
    tok = (pid * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    tok_ok = tok < n_tokens
    if HAS_POS:
        pos = tl.load(POS + tok, mask=tok_ok, other=0).to(tl.int64)
    else:
        pos = tok % seq_len
    d = tl.arange(0, BLOCK_HALF)
    d_ok = d < half_dim
    tab_mask = tok_ok[:, None] & d_ok[None, :]
    tab = pos[:, None] * stride_table + d[None, :]
    c1 = tl.load(COS + tab, mask=tab_mask, other=0.0).to(tl.float32)[:, None, :]
    c2 = tl.load(COS + tab + half_dim, mask=tab_mask, other=0.0).to(tl.float32)[:, None, :]
    s1 = tl.load(SIN + tab, mask=tab_mask, other=0.0).to(tl.float32)[:, None, :]
    s2 = tl.load(SIN + tab + half_dim, mask=tab_mask, other=0.0).to(tl.float32)[:, None, :]

    h = tl.arange(0, BLOCK_H)
    head_dim = 2 * half_dim
    offs = tok[:, None, None] * (n_heads * head_dim) + h[None, :, None] * head_dim + d[None, None, :]
    mask = tok_ok[:, None, None] & (h < n_heads)[None, :, None] & d_ok[None, None, :]
    x1 = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(X + offs + half_dim, mask=mask, other=0.0).to(tl.float32)
    return offs, mask, x1, x2, c1, c2, s1, s2


@triton.jit
def rotate(x1, x2, c1, c2, s1, s2, BACKWARD: tl.constexpr):
    """The rotate-half rotation of the halves (x1, x2) by the table halves, or (BACKWARD) its
    transpose, which carries a gradient back through it (the module docstring's formulas)."""
    if BACKWARD:
        y1 = x1 * c1 + x2 * s2
        y2 = x2 * c2 - x1 * s1
    else:
        y1 = x1 * c1 - x2 * s1
        y2 = x2 * c2 + x1 * s2
    return y1, y2


@triton.jit
def _rope_kernel(
    X,
    Y,
    COS,
    SIN,
    POS,
    n_tokens,
    seq_len,
    n_heads,
    half_dim,
    stride_table,
    HAS_POS: tl.constexpr,
    BACKWARD: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    FIX_BF16: tl.constexpr,
):
    # X and Y are contiguous (tokens, heads, head_dim) with head_dim = 2 * half_dim.
    pid = tl.program_id(0)
    offs, mask, x1, x2, c1, c2, s1, s2 = rope_block(
        X, COS, SIN, POS, pid, n_tokens, seq_len, n_heads, half_dim, stride_table, HAS_POS, BLOCK_T, BLOCK_H, BLOCK_HALF
    )
    y1, y2 = rotate(x1, x2, c1, c2, s1, s2, BACKWARD)
    tl.store(Y + offs, cast_rtne(y1, Y.dtype.element_ty, FIX_BF16), mask=mask)
    tl.store(Y + offs + half_dim, cast_rtne(y2, Y.dtype.element_ty, FIX_BF16), mask=mask)


def token_blocks(n_heads: int, head_dim: int, interpreted: bool) -> tuple[int, int, int]:
    """``(BLOCK_T, BLOCK_H, BLOCK_HALF)`` of a program that handles a block of tokens, all heads and
    both halves of head_dim (the RoPE and fused QK-norm + RoPE kernels)."""
    block_h = next_pow2(n_heads)
    block_half = next_pow2(head_dim // 2)
    # ~4K elements per half-tile on the GPU (enough bytes in flight per program); bigger in the interpreter.
    per_token = block_h * block_half
    block_t = max(1, min(256, (16384 if interpreted else 4096) // per_token))
    return block_t, block_h, block_half


def check_positions(position_ids: torch.Tensor | None, n_positions: int, name: str) -> None:
    """Off-GPU only (it reads the data, which would synchronise on CUDA): positions index the tables."""
    if position_ids is not None and position_ids.device.type != "cuda" and position_ids.numel():
        if int(position_ids.min()) < 0 or int(position_ids.max()) >= n_positions:
            raise ValueError(f"{name}: position_ids must lie in [0, {n_positions})")


def _rope_launch(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    pos: torch.Tensor | None,
    seq_len: int,
    backward: bool,
    interpreted: bool,
) -> torch.Tensor:
    """Rotate a contiguous (B, T, heads, D) tensor; returns a new tensor of the same dtype."""
    batch, _, n_heads, head_dim = x.shape
    n_tokens = batch * seq_len
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if n_tokens == 0:
        return y
    half = head_dim // 2
    block_t, block_h, block_half = token_blocks(n_heads, head_dim, interpreted)
    grid = (triton.cdiv(n_tokens, block_t),)
    _rope_kernel[grid](
        x,
        y,
        cos,
        sin,
        pos if pos is not None else x,
        n_tokens,
        seq_len,
        n_heads,
        half,
        cos.stride(0),
        HAS_POS=pos is not None,
        BACKWARD=backward,
        BLOCK_T=block_t,
        BLOCK_H=block_h,
        BLOCK_HALF=block_half,
        FIX_BF16=needs_bf16_fix(interpreted, x.dtype),
        num_warps=4,
    )
    return y


# One custom op serves both directions: the backward of the rotation is its transpose, which is the
# same kernel with BACKWARD flipped, so the op's gradient is the op itself (double backward works).
# torch.compile sees it as one opaque node with known output shapes (see the package docstring).


@torch.library.custom_op("llmcore::rope", mutates_args=())
def _rope_op(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    position_ids: torch.Tensor | None,
    backward: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k (``backward``: by the transposed map); new contiguous tensors in their dtypes."""
    interpreted = check_device(_rope_kernel, q, k, cos, sin)
    # Reads the data, so only here (with real tensors, not while tracing).
    check_positions(position_ids, cos.shape[0], "apply_rope")
    seq_len = q.shape[1]
    cos, sin = cos.contiguous(), sin.contiguous()
    q_out = _rope_launch(q.contiguous(), cos, sin, position_ids, seq_len, backward, interpreted)
    k_out = _rope_launch(k.contiguous(), cos, sin, position_ids, seq_len, backward, interpreted)
    return q_out, k_out


@_rope_op.register_fake
def _(q, k, cos, sin, position_ids, backward):
    return q.new_empty(q.shape), k.new_empty(k.shape)


def _setup_context(ctx, inputs, output) -> None:
    _, _, cos, sin, position_ids, backward = inputs
    ctx.save_for_backward(cos, sin, position_ids)
    ctx.backward = backward


def _backward(ctx, dq, dk):
    cos, sin, position_ids = ctx.saved_tensors
    dq_in, dk_in = torch.ops.llmcore.rope(dq, dk, cos, sin, position_ids, not ctx.backward)
    return dq_in, dk_in, None, None, None, None


_rope_op.register_autograd(_backward, setup_context=_setup_context)


def rope_args(
    name: str, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, position_ids: torch.Tensor | None
) -> torch.Tensor | None:
    """Check the shapes RoPE needs (errors start with ``name``); returns ``position_ids`` as
    contiguous int64 on q's device, or None (positions ``arange(T)``)."""
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(
            f"{name}: q and k must be (batch, seq, heads, head_dim), got {tuple(q.shape)}, {tuple(k.shape)}"
        )
    batch, seq_len, _, head_dim = q.shape
    if k.shape[0] != batch or k.shape[1] != seq_len or k.shape[3] != head_dim:
        raise ValueError(f"{name}: k {tuple(k.shape)} does not match q {tuple(q.shape)} in batch, seq or head_dim")
    if head_dim % 2:
        raise ValueError(f"{name}: head_dim must be even, got {head_dim}")
    if cos.dim() != 2 or cos.shape != sin.shape or cos.shape[1] != head_dim:
        raise ValueError(
            f"{name}: cos/sin must both be (max_positions, {head_dim}), got {tuple(cos.shape)}, {tuple(sin.shape)}"
        )
    pos = None
    if position_ids is not None:
        if position_ids.shape != (batch, seq_len):
            raise ValueError(f"{name}: position_ids must be ({batch}, {seq_len}), got {tuple(position_ids.shape)}")
        pos = position_ids.to(device=q.device, dtype=torch.int64).contiguous()
    elif seq_len > cos.shape[0]:
        raise ValueError(f"{name}: seq {seq_len} exceeds the tables' {cos.shape[0]} positions")
    return pos


def apply_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    position_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q ``(B, T, H, D)`` and k ``(B, T, Hkv, D)`` by RoPE (Triton; differentiable in q and k).

    ``cos``/``sin``: ``(max_positions, D)`` rotate-half tables; row ``p`` serves a token at
    position ``p``, taken from ``position_ids`` ``(B, T)`` (per-document positions of packed
    rows) or ``arange(T)``. Positions must lie in ``[0, max_positions)`` (checked off-GPU; on
    CUDA an out-of-range position reads outside the table, as an index would). Any input
    strides are accepted (copied to contiguous when needed). Returns new tensors in q's and
    k's dtypes. Runs as the custom op ``torch.ops.llmcore.rope`` (no graph break under torch.compile).
    """
    pos = rope_args("apply_rope", q, k, cos, sin, position_ids)
    return torch.ops.llmcore.rope(q, k, cos, sin, pos, False)
