"""FlashAttention-2 in Triton: causal / non-causal, GQA, packed documents, forward and backward.

Layout: q ``(B, T, H, D)``, k/v ``(B, T, Hkv, D)`` with ``H % Hkv == 0``; query head ``h`` reads
KV head ``h // (H // Hkv)`` through pointer arithmetic, so K/V are never repeated in memory.

Forward (grid: query blocks x batch*heads). Each program keeps its query tile in registers and
streams key/value tiles, maintaining the running row max ``m``, the running denominator ``l``
and the unnormalised output (online softmax); scores are scaled by ``softmax_scale * log2(e)``
so the exponentials are ``exp2``. It stores O and the log-sum-exp ``lse = m + log2(l)`` (base 2,
fp32, shape ``(B, H, T)``), which is all the backward needs.

Backward (recompute, no ``T x T`` matrix stored):
1. ``delta = rowsum(dO * O)`` per query (a small kernel).
2. dK/dV (grid: key blocks x batch*kv_heads). A program owns one key tile of one KV head and
   loops over every query head of its group and over the query tiles that can see the key
   tile, recomputing ``P^T = exp2(K Q^T * scale - lse)``, accumulating ``dV += P^T dO`` and
   ``dK += dS^T Q`` with ``dS = P * (dO V^T - delta)``. Owning the KV head's tile means the
   group's contributions are summed in registers: no atomics, no repeated K/V.
3. dQ (grid: query blocks x batch*heads): the forward's loop again, accumulating ``dQ += dS K``.

Masking. Causal: key ``j`` is visible to query ``i`` when ``j <= i``. Documents: ``position_ids``
(a document starts at each 0 and at every row start; ``document_bounds``, fixed shapes) or
``cu_seqlens`` (int32 offsets into the flattened ``B*T`` tokens, 0..B*T, containing every row
start; ``_segments``) are turned into per-token ``[doc_start, doc_end)`` positions within the row,
the only form the kernels see; a query sees only keys of its own document. Each program visits only the key (or query) range spanned by its tile's documents
and, when causal, below (above) the diagonal, so fully masked blocks are skipped. Blocks that are
known to be fully visible (below the diagonal, inside the sequence, no documents) run without
any mask arithmetic; the rest apply the element masks. Masked scores are a large finite negative
rather than -inf, so a row whose visible keys all lie in later tiles never produces NaN.

Head dim. Tiles are ``BLOCK_D`` wide, the next power of two of ``HEAD_DIM`` (at least 16): for a
head dim like 96 or 80 the padding columns load as zeros (they add nothing to ``Q K^T`` and give
zero output columns) and are never stored. Whether a column mask exists at all is decided at
compile time, so power-of-two head dims run the same code as before.

Numerics: fp32 accumulation always. On CUDA, bf16/fp16 tiles feed the tensor cores directly
(P and dS are rounded to the input dtype for their matmuls, as FlashAttention does); fp32
inputs use IEEE fp32 dots (no TF32), so fp32 results match the reference to ~1e-5. In the
interpreter every tile is converted to fp32 before ``tl.dot`` (its bf16 dot is not reliable).

The reference (``flash_attention_reference``, i.e. ``llmcore.reference.attention_reference``)
and ``cu_seqlens_from_position_ids`` are re-exported from ``llmcore.reference``.

Registered with torch as ``torch.ops.llmcore.flash_attention`` (returns ``(o, lse)``) and
``torch.ops.llmcore.flash_attention_backward``, with fake (shape) functions and the gradient, so
``torch.compile(fullgraph=True)`` traces through :func:`flash_attention`; documents enter as the
per-token bounds (static shapes), never as ``cu_seqlens`` (its length is data-dependent). The
package docstring says why ``custom_op`` rather than ``triton_op``.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from llmcore.kernels._runtime import cast_rtne, check_device, is_interpreted, needs_bf16_fix, next_pow2

# The plain-PyTorch side lives in llmcore.reference (one copy, shared with the model's eager path).
from llmcore.reference import attention_reference as flash_attention_reference
from llmcore.reference import cu_seqlens_from_position_ids

__all__ = ["cu_seqlens_from_position_ids", "document_bounds", "flash_attention", "flash_attention_reference"]

_LOG2E = 1.4426950408889634


@triton.jit
def _dot(a, b, F32: tl.constexpr):
    """Matmul with fp32 accumulation; F32 = exact fp32 inputs (no TF32 shortcut)."""
    if F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b)


# ----------------------------------------------------------------------------------------------
# shared by the kernels (Triton inlines these)
# ----------------------------------------------------------------------------------------------


@triton.jit
def _tile_mask(ok, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows ``ok`` and, when the head dim is padded to the power of two ``BLOCK_D``, its first
    ``HEAD_DIM`` columns (a compile-time choice: power-of-two head dims carry no column mask)."""
    if HEAD_DIM == BLOCK_D:
        return ok[:, None]
    else:
        return ok[:, None] & (tl.arange(0, BLOCK_D) < HEAD_DIM)[None, :]


@triton.jit
def _load_tile(base, offs, stride, ok, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows ``offs`` (row stride ``stride``) of one head's ``(seq, HEAD_DIM)`` slice as a
    ``(rows, BLOCK_D)`` tile; rows not ``ok`` and padding columns load as zeros."""
    offs_d = tl.arange(0, BLOCK_D)
    return tl.load(base + offs[:, None] * stride + offs_d[None, :], mask=_tile_mask(ok, HEAD_DIM, BLOCK_D), other=0.0)


@triton.jit
def _store_tile(base, offs, stride, ok, value, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Store ``value`` into rows ``offs`` of one head's slice (the rows that are ``ok``, the real columns)."""
    offs_d = tl.arange(0, BLOCK_D)
    tl.store(base + offs[:, None] * stride + offs_d[None, :], value, mask=_tile_mask(ok, HEAD_DIM, BLOCK_D))


@triton.jit
def _kv_tile(
    k_base,
    v_base,
    stride_kt,
    stride_vt,
    n0,
    seq_len,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """The key tile starting at ``n0`` (forward / dQ loops): its positions, which are inside the
    sequence, and its K and V rows (zeros past the sequence)."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_ok = offs_n < seq_len
    return (
        offs_n,
        n_ok,
        _load_tile(k_base, offs_n, stride_kt, n_ok, HEAD_DIM, BLOCK_D),
        _load_tile(v_base, offs_n, stride_vt, n_ok, HEAD_DIM, BLOCK_D),
    )


@triton.jit
def _visible(rows, cols, cols_ok, row_lo, row_hi, CAUSAL: tl.constexpr, HAS_SEG: tl.constexpr, KEY_ROWS: tl.constexpr):
    """Element mask of a score tile: ``cols`` inside the sequence, in causal order, and inside the
    row's document ``[row_lo, row_hi)``. Rows are queries and columns keys, or (KEY_ROWS, the
    transposed dK/dV tiles) rows are keys and columns queries."""
    keep = cols_ok[None, :]
    if CAUSAL:
        if KEY_ROWS:
            keep = keep & (cols[None, :] >= rows[:, None])
        else:
            keep = keep & (cols[None, :] <= rows[:, None])
    if HAS_SEG:
        keep = keep & (cols[None, :] >= row_lo[:, None]) & (cols[None, :] < row_hi[:, None])
    return keep


@triton.jit
def _doc_bounds(SEG_START, SEG_END, b, seq_len, offs, ok, first, last):
    """Per-token document bounds ``[lo, hi)`` of a tile's positions, and the span of the tile's
    documents: documents are contiguous, so the first position has the smallest document start
    and the last position the largest end."""
    seg_start = SEG_START + b * seq_len
    seg_end = SEG_END + b * seq_len
    tok_lo = tl.load(seg_start + offs, mask=ok, other=0)
    tok_hi = tl.load(seg_end + offs, mask=ok, other=0)
    return tok_lo, tok_hi, tl.load(seg_start + first), tl.load(seg_end + last)


@triton.jit
def _query_tile(seq_len, n_heads, group, BLOCK_M: tl.constexpr):
    """Forward / dQ program: its (batch, head, KV head) and query tile."""
    # Last query tiles first: under a causal mask they do the most work, so they should not start last.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // n_heads).to(tl.int64)
    h = pid_bh % n_heads
    m_start = pid_m * BLOCK_M
    offs_m = m_start + tl.arange(0, BLOCK_M)
    last_m = tl.minimum(m_start + BLOCK_M, seq_len) - 1
    return pid_bh, b, h, h // group, m_start, offs_m, offs_m < seq_len, last_m


@triton.jit
def _query_tile_keys(
    SEG_START,
    SEG_END,
    b,
    seq_len,
    m_start,
    offs_m,
    m_ok,
    last_m,
    CAUSAL: tl.constexpr,
    HAS_SEG: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Key ranges a query tile visits (forward / dQ): ``[0, full_end)`` needs no element mask,
    ``[full_end, tail_end)`` does. With documents only the masked range is visited: it spans the
    tile's documents, and ``q_lo``/``q_hi`` are each query's document bounds (without documents
    the query positions stand in for them, unused)."""
    if HAS_SEG:
        q_lo, q_hi, lo, hi = _doc_bounds(SEG_START, SEG_END, b, seq_len, offs_m, m_ok, m_start, last_m)
        if CAUSAL:
            hi = tl.minimum(hi, last_m + 1)
        return q_lo, q_hi, lo, hi
    else:
        if CAUSAL:
            # Keys before m_start (a multiple of BLOCK_N) are visible to the whole tile.
            full_end = m_start
            tail_end = last_m + 1
        else:
            full_end = (seq_len // BLOCK_N) * BLOCK_N
            tail_end = seq_len
        return offs_m, offs_m, full_end, tail_end


# ----------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------


@triton.jit
def _fwd_tiles(
    acc,
    m_i,
    l_i,
    q,
    k_base,
    v_base,
    stride_kt,
    stride_vt,
    start,
    end,
    offs_m,
    q_lo,
    q_hi,
    seq_len,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_SEG: tl.constexpr,
    F32: tl.constexpr,
):
    for n0 in range(start, end, BLOCK_N):
        offs_n, n_ok, k, v = _kv_tile(k_base, v_base, stride_kt, stride_vt, n0, seq_len, HEAD_DIM, BLOCK_D, BLOCK_N)
        s = _dot(q, tl.trans(k), F32) * qk_scale
        if MASKED:
            # Finite "minus infinity": exp2(-1e30 - m) == 0, and a row masked in this whole tile
            # gives exp2(-1e30 - (-1e30)) = 1 instead of NaN; its later rescale factor is 0.
            s = tl.where(_visible(offs_m, offs_n, n_ok, q_lo, q_hi, CAUSAL, HAS_SEG, False), s, -1.0e30)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None]
        if F32:
            acc += _dot(p, v, F32)
        else:
            acc += _dot(p.to(v.dtype), v, F32)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _fwd_kernel(
    Q,
    K,
    V,
    O,
    LSE,
    SEG_START,
    SEG_END,
    stride_qb,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_ob,
    stride_ot,
    stride_oh,
    seq_len,
    n_heads,
    group,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_SEG: tl.constexpr,
    F32: tl.constexpr,
    FIX_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_bh, b, h, hk, m_start, offs_m, m_ok, last_m = _query_tile(seq_len, n_heads, group, BLOCK_M)
    q = _load_tile(Q + b * stride_qb + h * stride_qh, offs_m, stride_qt, m_ok, HEAD_DIM, BLOCK_D)
    if F32:
        q = q.to(tl.float32)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    q_lo, q_hi, full_end, tail_end = _query_tile_keys(
        SEG_START, SEG_END, b, seq_len, m_start, offs_m, m_ok, last_m, CAUSAL, HAS_SEG, BLOCK_N
    )
    if not HAS_SEG:
        acc, m_i, l_i = _fwd_tiles(
            acc,
            m_i,
            l_i,
            q,
            k_base,
            v_base,
            stride_kt,
            stride_vt,
            0,
            full_end,
            offs_m,
            q_lo,
            q_hi,
            seq_len,
            qk_scale,
            HEAD_DIM,
            BLOCK_D,
            BLOCK_N,
            False,
            CAUSAL,
            HAS_SEG,
            F32,
        )
    acc, m_i, l_i = _fwd_tiles(
        acc,
        m_i,
        l_i,
        q,
        k_base,
        v_base,
        stride_kt,
        stride_vt,
        full_end,
        tail_end,
        offs_m,
        q_lo,
        q_hi,
        seq_len,
        qk_scale,
        HEAD_DIM,
        BLOCK_D,
        BLOCK_N,
        True,
        CAUSAL,
        HAS_SEG,
        F32,
    )

    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    out = acc / l_safe[:, None]
    _store_tile(
        O + b * stride_ob + h * stride_oh,
        offs_m,
        stride_ot,
        m_ok,
        cast_rtne(out, O.dtype.element_ty, FIX_BF16),
        HEAD_DIM,
        BLOCK_D,
    )
    tl.store(LSE + pid_bh.to(tl.int64) * seq_len + offs_m, m_i + tl.log2(l_safe), mask=m_ok)


# ----------------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------------


@triton.jit
def _bwd_delta_kernel(
    O,
    DO,
    DELTA,
    stride_ob,
    stride_ot,
    stride_oh,
    stride_db,
    stride_dt,
    stride_dh,
    seq_len,
    n_heads,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // n_heads).to(tl.int64)
    h = pid_bh % n_heads
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < seq_len
    o = _load_tile(O + b * stride_ob + h * stride_oh, offs_m, stride_ot, m_ok, HEAD_DIM, BLOCK_D).to(tl.float32)
    do = _load_tile(DO + b * stride_db + h * stride_dh, offs_m, stride_dt, m_ok, HEAD_DIM, BLOCK_D).to(tl.float32)
    tl.store(DELTA + pid_bh.to(tl.int64) * seq_len + offs_m, tl.sum(o * do, axis=1), mask=m_ok)


@triton.jit
def _bwd_dkdv_tiles(
    dk,
    dv,
    k,
    v,
    q_base,
    do_base,
    lse_base,
    delta_base,
    stride_qt,
    stride_dot,
    start,
    end,
    offs_n,
    k_lo,
    k_hi,
    seq_len,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    MASKED: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_SEG: tl.constexpr,
    F32: tl.constexpr,
):
    for m0 in range(start, end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_ok = offs_m < seq_len
        # Rows past the sequence load as zeros (q = dO = 0, lse = delta = 0): they add exactly 0.
        q = _load_tile(q_base, offs_m, stride_qt, m_ok, HEAD_DIM, BLOCK_D)
        do = _load_tile(do_base, offs_m, stride_dot, m_ok, HEAD_DIM, BLOCK_D)
        lse = tl.load(lse_base + offs_m, mask=m_ok, other=0.0)
        delta = tl.load(delta_base + offs_m, mask=m_ok, other=0.0)
        if F32:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        # Transposed scores (keys x queries) so dK and dV come out in their stored orientation.
        s_t = _dot(k, tl.trans(q), F32) * qk_scale
        p_t = tl.exp2(s_t - lse[None, :])
        if MASKED:
            p_t = tl.where(_visible(offs_n, offs_m, m_ok, k_lo, k_hi, CAUSAL, HAS_SEG, True), p_t, 0.0)
        dp_t = _dot(v, tl.trans(do), F32)
        ds_t = p_t * (dp_t - delta[None, :])
        if F32:
            dv += _dot(p_t, do, F32)
            dk += _dot(ds_t, q, F32)
        else:
            dv += _dot(p_t.to(do.dtype), do, F32)
            dk += _dot(ds_t.to(q.dtype), q, F32)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DK,
    DV,
    SEG_START,
    SEG_END,
    stride_qb,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_dob,
    stride_dot,
    stride_doh,
    stride_dkb,
    stride_dkt,
    stride_dkh,
    stride_dvb,
    stride_dvt,
    stride_dvh,
    seq_len,
    n_heads,
    n_kv_heads,
    group,
    qk_scale,
    sm_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_SEG: tl.constexpr,
    F32: tl.constexpr,
    FIX_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bk = tl.program_id(1)
    b = (pid_bk // n_kv_heads).to(tl.int64)
    hk = pid_bk % n_kv_heads
    n_start = pid_n * BLOCK_N
    offs_n = n_start + tl.arange(0, BLOCK_N)
    n_ok = offs_n < seq_len
    last_n = tl.minimum(n_start + BLOCK_N, seq_len) - 1

    k = _load_tile(K + b * stride_kb + hk * stride_kh, offs_n, stride_kt, n_ok, HEAD_DIM, BLOCK_D)
    v = _load_tile(V + b * stride_vb + hk * stride_vh, offs_n, stride_vt, n_ok, HEAD_DIM, BLOCK_D)
    if F32:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    if HAS_SEG:
        k_lo, k_hi, lo, hi = _doc_bounds(SEG_START, SEG_END, b, seq_len, offs_n, n_ok, n_start, last_n)
        if CAUSAL:
            lo = tl.maximum(lo, n_start)
    else:
        k_lo = offs_n
        k_hi = offs_n
        lo = 0
        hi = seq_len
    # Queries of a full causal tile start past this key tile (n_start + BLOCK_N is a multiple of
    # BLOCK_M); complete query tiles need no mask, the diagonal and the ragged tail do.
    diag_end = tl.minimum(n_start + BLOCK_N, seq_len)
    full_end = (seq_len // BLOCK_M) * BLOCK_M
    full_start = n_start * 0
    if CAUSAL:
        full_start = n_start + BLOCK_N
    tail_start = tl.maximum(full_start, full_end)

    for g in range(group):
        h = hk * group + g
        bh = b * n_heads + h
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_dob + h * stride_doh
        lse_base = LSE + bh * seq_len
        delta_base = DELTA + bh * seq_len
        if HAS_SEG:
            dk, dv = _bwd_dkdv_tiles(
                dk,
                dv,
                k,
                v,
                q_base,
                do_base,
                lse_base,
                delta_base,
                stride_qt,
                stride_dot,
                lo,
                hi,
                offs_n,
                k_lo,
                k_hi,
                seq_len,
                qk_scale,
                HEAD_DIM,
                BLOCK_D,
                BLOCK_M,
                True,
                CAUSAL,
                True,
                F32,
            )
        else:
            if CAUSAL:
                dk, dv = _bwd_dkdv_tiles(
                    dk,
                    dv,
                    k,
                    v,
                    q_base,
                    do_base,
                    lse_base,
                    delta_base,
                    stride_qt,
                    stride_dot,
                    n_start,
                    diag_end,
                    offs_n,
                    k_lo,
                    k_hi,
                    seq_len,
                    qk_scale,
                    HEAD_DIM,
                    BLOCK_D,
                    BLOCK_M,
                    True,
                    CAUSAL,
                    False,
                    F32,
                )
            dk, dv = _bwd_dkdv_tiles(
                dk,
                dv,
                k,
                v,
                q_base,
                do_base,
                lse_base,
                delta_base,
                stride_qt,
                stride_dot,
                full_start,
                full_end,
                offs_n,
                k_lo,
                k_hi,
                seq_len,
                qk_scale,
                HEAD_DIM,
                BLOCK_D,
                BLOCK_M,
                False,
                CAUSAL,
                False,
                F32,
            )
            dk, dv = _bwd_dkdv_tiles(
                dk,
                dv,
                k,
                v,
                q_base,
                do_base,
                lse_base,
                delta_base,
                stride_qt,
                stride_dot,
                tail_start,
                seq_len,
                offs_n,
                k_lo,
                k_hi,
                seq_len,
                qk_scale,
                HEAD_DIM,
                BLOCK_D,
                BLOCK_M,
                True,
                CAUSAL,
                False,
                F32,
            )

    dk = dk * sm_scale
    _store_tile(
        DK + b * stride_dkb + hk * stride_dkh,
        offs_n,
        stride_dkt,
        n_ok,
        cast_rtne(dk, DK.dtype.element_ty, FIX_BF16),
        HEAD_DIM,
        BLOCK_D,
    )
    _store_tile(
        DV + b * stride_dvb + hk * stride_dvh,
        offs_n,
        stride_dvt,
        n_ok,
        cast_rtne(dv, DV.dtype.element_ty, FIX_BF16),
        HEAD_DIM,
        BLOCK_D,
    )


@triton.jit
def _bwd_dq_tiles(
    dq,
    q,
    do,
    lse,
    delta,
    k_base,
    v_base,
    stride_kt,
    stride_vt,
    start,
    end,
    offs_m,
    q_lo,
    q_hi,
    seq_len,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_SEG: tl.constexpr,
    F32: tl.constexpr,
):
    for n0 in range(start, end, BLOCK_N):
        offs_n, n_ok, k, v = _kv_tile(k_base, v_base, stride_kt, stride_vt, n0, seq_len, HEAD_DIM, BLOCK_D, BLOCK_N)
        if F32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        p = tl.exp2(_dot(q, tl.trans(k), F32) * qk_scale - lse[:, None])
        if MASKED:
            p = tl.where(_visible(offs_m, offs_n, n_ok, q_lo, q_hi, CAUSAL, HAS_SEG, False), p, 0.0)
        dp = _dot(do, tl.trans(v), F32)
        ds = p * (dp - delta[:, None])
        if F32:
            dq += _dot(ds, k, F32)
        else:
            dq += _dot(ds.to(k.dtype), k, F32)
    return dq


@triton.jit
def _bwd_dq_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DQ,
    SEG_START,
    SEG_END,
    stride_qb,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_dob,
    stride_dot,
    stride_doh,
    stride_dqb,
    stride_dqt,
    stride_dqh,
    seq_len,
    n_heads,
    group,
    qk_scale,
    sm_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_SEG: tl.constexpr,
    F32: tl.constexpr,
    FIX_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_bh, b, h, hk, m_start, offs_m, m_ok, last_m = _query_tile(seq_len, n_heads, group, BLOCK_M)
    q = _load_tile(Q + b * stride_qb + h * stride_qh, offs_m, stride_qt, m_ok, HEAD_DIM, BLOCK_D)
    do = _load_tile(DO + b * stride_dob + h * stride_doh, offs_m, stride_dot, m_ok, HEAD_DIM, BLOCK_D)
    if F32:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse = tl.load(LSE + pid_bh.to(tl.int64) * seq_len + offs_m, mask=m_ok, other=0.0)
    delta = tl.load(DELTA + pid_bh.to(tl.int64) * seq_len + offs_m, mask=m_ok, other=0.0)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    q_lo, q_hi, full_end, tail_end = _query_tile_keys(
        SEG_START, SEG_END, b, seq_len, m_start, offs_m, m_ok, last_m, CAUSAL, HAS_SEG, BLOCK_N
    )
    if not HAS_SEG:
        dq = _bwd_dq_tiles(
            dq,
            q,
            do,
            lse,
            delta,
            k_base,
            v_base,
            stride_kt,
            stride_vt,
            0,
            full_end,
            offs_m,
            q_lo,
            q_hi,
            seq_len,
            qk_scale,
            HEAD_DIM,
            BLOCK_D,
            BLOCK_N,
            False,
            CAUSAL,
            HAS_SEG,
            F32,
        )
    dq = _bwd_dq_tiles(
        dq,
        q,
        do,
        lse,
        delta,
        k_base,
        v_base,
        stride_kt,
        stride_vt,
        full_end,
        tail_end,
        offs_m,
        q_lo,
        q_hi,
        seq_len,
        qk_scale,
        HEAD_DIM,
        BLOCK_D,
        BLOCK_N,
        True,
        CAUSAL,
        HAS_SEG,
        F32,
    )

    dq = dq * sm_scale
    _store_tile(
        DQ + b * stride_dqb + h * stride_dqh,
        offs_m,
        stride_dqt,
        m_ok,
        cast_rtne(dq, DQ.dtype.element_ty, FIX_BF16),
        HEAD_DIM,
        BLOCK_D,
    )


# ----------------------------------------------------------------------------------------------
# launch configuration
# ----------------------------------------------------------------------------------------------

# Interpreter: small tiles so short test sequences still span several tiles (ragged tails,
# diagonal and off-diagonal paths all run), with BLOCK_M != BLOCK_N to exercise the alignment
# rules: forward/dQ need BLOCK_M % BLOCK_N == 0, dK/dV needs BLOCK_N % BLOCK_M == 0.
_INTERP = {
    "fwd": dict(BLOCK_M=32, BLOCK_N=16, num_warps=4),
    "dkdv": dict(BLOCK_M=16, BLOCK_N=32, num_warps=4),
    "dq": dict(BLOCK_M=32, BLOCK_N=16, num_warps=4),
}

# CUDA candidates (BLOCK_M, BLOCK_N, num_warps, num_stages); the first of each list is the fixed
# choice when autotuning is off (LLMCORE_KERNELS_AUTOTUNE=0). Head dim 128 keeps smaller tiles:
# the dK/dV accumulators alone are 2 * BLOCK_N * 128 fp32 values.
_CUDA = {
    "fwd": [(128, 64, 4, 3), (128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3), (128, 128, 8, 3), (64, 32, 4, 4)],
    "dkdv": [(32, 128, 4, 3), (32, 128, 8, 3), (32, 64, 4, 3), (64, 64, 4, 3), (64, 128, 8, 3), (16, 64, 4, 3)],
    "dq": [(128, 32, 4, 3), (128, 32, 8, 3), (64, 32, 4, 3), (64, 64, 4, 3), (128, 64, 8, 3), (64, 16, 4, 4)],
}
_CUDA_D128 = {"fwd": (128, 64, 8, 3), "dkdv": (32, 64, 4, 3), "dq": (64, 32, 4, 3)}
# fp32 inputs (IEEE dots, twice the bytes per tile): small tiles that fit shared memory at head dim 128.
_CUDA_F32 = {"fwd": (64, 32, 4, 2), "dkdv": (32, 64, 4, 2), "dq": (64, 32, 4, 2)}

# Autotuning keys on what changes the best tile (not on seq_len: one tuning per model setup,
# not per batch shape); Triton adds the tensors' dtypes to the key itself.
_AUTOTUNE_KEY = ["HEAD_DIM", "CAUSAL", "HAS_SEG", "F32"]
_AUTOTUNE = os.environ.get("LLMCORE_KERNELS_AUTOTUNE", "1") != "0"


def _cuda_configs(pairs) -> list[triton.Config]:
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in pairs]


def _prune_head_dim(kind: str):
    """Autotune pruning for one kernel: drop tiles too big for the registers at a tile width of 128
    or more (they only spill); a padded head dim (96 -> 128) counts as its tile width. The dK/dV
    kernel keeps two ``BLOCK_N x BLOCK_D`` fp32 accumulators, so there the key tile is what counts."""

    def prune(configs, named_args, **kwargs):
        block_d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D", 64))
        if block_d < 128:
            return configs
        if kind == "dkdv":
            kept = [c for c in configs if c.kwargs["BLOCK_N"] * block_d <= 64 * 128]
        else:
            kept = [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 128 * 64]
        return kept or configs

    return prune


_PLAIN = {"fwd": _fwd_kernel, "dkdv": _bwd_dkdv_kernel, "dq": _bwd_dq_kernel}


def _build_launchers() -> dict:
    """Autotuned kernels on CUDA; plain ones in the interpreter (it cannot autotune several configs)."""
    if is_interpreted(_fwd_kernel) or not _AUTOTUNE:
        return dict(_PLAIN)
    return {
        kind: triton.autotune(
            configs=_cuda_configs(_CUDA[kind]),
            key=_AUTOTUNE_KEY,
            prune_configs_by={"early_config_prune": _prune_head_dim(kind)},
        )(kernel)
        for kind, kernel in _PLAIN.items()
    }


_LAUNCH = _build_launchers()


def _block_d(head_dim: int) -> int:
    """The tile width of the head dim: the next power of two, at least 16 (``tl.dot``'s minimum);
    columns past ``head_dim`` are masked to zero on load and never stored."""
    return max(16, next_pow2(head_dim))


def _tiles(kind: str, head_dim: int, interpreted: bool, f32: bool) -> dict:
    """Launch meta-parameters: none for an autotuned kernel (it picks its own), else a fixed tile.
    ``head_dim`` is the tile width (``_block_d``)."""
    if _LAUNCH[kind] is not _PLAIN[kind]:
        return {}
    if interpreted:
        return dict(_INTERP[kind])
    if f32:
        m, n, w, st = _CUDA_F32[kind]
        w = 8 if head_dim >= 128 else w
    else:
        m, n, w, st = _CUDA_D128[kind] if head_dim >= 128 else _CUDA[kind][0]
    return dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=st)


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    """Kernels index the head dim with stride 1; other strides are passed through as they are."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _segments(
    cu_seqlens: torch.Tensor, batch: int, seq_len: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token ``[doc_start, doc_end)`` positions inside its row, flattened to ``(B*T,)`` int32.

    Documents are also cut at row boundaries, so a ``cu_seqlens`` that omits a row start still
    never lets attention cross rows.
    """
    cu = cu_seqlens.to(device=device, dtype=torch.int64)
    total = batch * seq_len
    tok = torch.arange(total, device=device)
    doc = (torch.searchsorted(cu, tok, right=True) - 1).clamp(0, cu.numel() - 2)
    row_start = (tok // seq_len) * seq_len
    start = torch.maximum(cu[doc], row_start) - row_start
    end = torch.minimum(cu[doc + 1], row_start + seq_len) - row_start
    return start.to(torch.int32).contiguous(), end.to(torch.int32).contiguous()


def document_bounds(position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token ``[doc_start, doc_end)`` positions inside its row, flattened to ``(B*T,)`` int32.

    A document starts wherever ``position_ids == 0`` and at every row start (the rule of
    ``cu_seqlens_from_position_ids``, same result as going through it). Unlike ``cu_seqlens``,
    whose length is the number of documents (``nonzero``: a data-dependent shape and, on CUDA, a
    host sync), every shape here is fixed by ``(B, T)``, so under ``torch.compile`` the model
    stays one graph: a running max of the start positions seen so far gives each token's
    document start, a running min from the right of the next start gives its end.
    """
    batch, seq_len = position_ids.shape
    idx = torch.arange(seq_len, device=position_ids.device)
    starts = (position_ids == 0) | (idx == 0)
    start = torch.where(starts, idx, 0).cummax(dim=1).values
    # Token t is the last of its document when t + 1 starts one or ends the row.
    last = torch.cat((starts[:, 1:], torch.ones_like(starts[:, :1])), dim=1)
    end = torch.where(last, idx + 1, seq_len).flip(1).cummin(dim=1).values.flip(1)
    return start.reshape(-1).to(torch.int32), end.reshape(-1).to(torch.int32)


def _check_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> None:
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(
            f"flash_attention: cu_seqlens must be 1-D with at least 2 offsets, got shape {tuple(cu_seqlens.shape)}"
        )
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"flash_attention: cu_seqlens must be int32 (or int64), got {cu_seqlens.dtype}")
    ok = (cu_seqlens[0] == 0) & (cu_seqlens[-1] == total) & (cu_seqlens[1:] >= cu_seqlens[:-1]).all()
    if cu_seqlens.device.type == "cuda" or torch.compiler.is_compiling():
        # No host sync in the training step (and no data-dependent branch in a compiled graph):
        # the check fails asynchronously instead.
        torch._assert_async(ok, "flash_attention: cu_seqlens must rise from 0 to batch*seq")
    elif not bool(ok):
        raise ValueError(
            f"flash_attention: cu_seqlens must be non-decreasing from 0 to batch*seq={total}, got {cu_seqlens.tolist()}"
        )


# Two custom ops (forward returning O and the log-sum-exp, backward returning dQ, dK, dV) with fake
# (shape) functions and the gradient registered between them: torch.compile keeps them as opaque
# nodes of one graph. Documents reach them as per-token bounds, never as cu_seqlens (see
# document_bounds), so every shape in the graph is static.


@torch.library.custom_op("llmcore::flash_attention", mutates_args=())
def _flash_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seg_start: torch.Tensor | None,
    seg_end: torch.Tensor | None,
    causal: bool,
    softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(o, lse)``: o ``(B, T, H, D)`` contiguous in q's dtype, lse fp32 ``(B, H, T)`` (base 2)."""
    interpreted = check_device(_fwd_kernel, q, k, v)
    batch, seq_len, n_heads, head_dim = q.shape
    n_kv = k.shape[2]
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    has_seg = seg_start is not None
    if not has_seg:
        seg_start = seg_end = torch.empty(1, dtype=torch.int32, device=q.device)
    f32 = interpreted or q.dtype == torch.float32
    o = torch.empty((batch, seq_len, n_heads, head_dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, n_heads, seq_len), dtype=torch.float32, device=q.device)
    if batch * seq_len == 0:
        return o, lse
    qk_scale = softmax_scale * _LOG2E
    grid = lambda meta: (triton.cdiv(seq_len, meta["BLOCK_M"]), batch * n_heads)  # noqa: E731
    _LAUNCH["fwd"][grid](
        q,
        k,
        v,
        o,
        lse,
        seg_start,
        seg_end,
        *_strides(q),
        *_strides(k),
        *_strides(v),
        *_strides(o),
        seq_len,
        n_heads,
        n_heads // n_kv,
        qk_scale,
        HEAD_DIM=head_dim,
        BLOCK_D=_block_d(head_dim),
        CAUSAL=causal,
        HAS_SEG=has_seg,
        F32=f32,
        FIX_BF16=needs_bf16_fix(interpreted, q.dtype),
        **_tiles("fwd", _block_d(head_dim), interpreted, f32),
    )
    return o, lse


@_flash_fwd.register_fake
def _(q, k, v, seg_start, seg_end, causal, softmax_scale):
    batch, seq_len, n_heads, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((batch, n_heads, seq_len), dtype=torch.float32)


@torch.library.custom_op("llmcore::flash_attention_backward", mutates_args=())
def _flash_bwd(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    seg_start: torch.Tensor | None,
    seg_end: torch.Tensor | None,
    causal: bool,
    softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)``, contiguous, in the inputs' shapes and dtypes (recomputes the attention tiles)."""
    interpreted = check_device(_fwd_kernel, do, q, k, v, o, lse)
    batch, seq_len, n_heads, head_dim = q.shape
    n_kv = k.shape[2]
    q, k, v, do = _unit_last(q), _unit_last(k), _unit_last(v), _unit_last(do)
    has_seg = seg_start is not None
    if not has_seg:
        seg_start = seg_end = torch.empty(1, dtype=torch.int32, device=q.device)
    f32 = interpreted or q.dtype == torch.float32
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if batch * seq_len == 0:
        return dq, dk, dv
    delta = torch.empty_like(lse)
    block = 64
    _bwd_delta_kernel[(triton.cdiv(seq_len, block), batch * n_heads)](
        o,
        do,
        delta,
        *_strides(o),
        *_strides(do),
        seq_len,
        n_heads,
        HEAD_DIM=head_dim,
        BLOCK_D=_block_d(head_dim),
        BLOCK_M=block,
        num_warps=4,
    )
    qk_scale = softmax_scale * _LOG2E
    group = n_heads // n_kv
    common = dict(
        HEAD_DIM=head_dim,
        BLOCK_D=_block_d(head_dim),
        CAUSAL=causal,
        HAS_SEG=has_seg,
        F32=f32,
        FIX_BF16=needs_bf16_fix(interpreted, q.dtype),
    )
    grid_kv = lambda meta: (triton.cdiv(seq_len, meta["BLOCK_N"]), batch * n_kv)  # noqa: E731
    _LAUNCH["dkdv"][grid_kv](
        q,
        k,
        v,
        do,
        lse,
        delta,
        dk,
        dv,
        seg_start,
        seg_end,
        *_strides(q),
        *_strides(k),
        *_strides(v),
        *_strides(do),
        *_strides(dk),
        *_strides(dv),
        seq_len,
        n_heads,
        n_kv,
        group,
        qk_scale,
        softmax_scale,
        **common,
        **_tiles("dkdv", _block_d(head_dim), interpreted, f32),
    )
    grid_q = lambda meta: (triton.cdiv(seq_len, meta["BLOCK_M"]), batch * n_heads)  # noqa: E731
    _LAUNCH["dq"][grid_q](
        q,
        k,
        v,
        do,
        lse,
        delta,
        dq,
        seg_start,
        seg_end,
        *_strides(q),
        *_strides(k),
        *_strides(v),
        *_strides(do),
        *_strides(dq),
        seq_len,
        n_heads,
        group,
        qk_scale,
        softmax_scale,
        **common,
        **_tiles("dq", _block_d(head_dim), interpreted, f32),
    )
    return dq, dk, dv


@_flash_bwd.register_fake
def _(do, q, k, v, o, lse, seg_start, seg_end, causal, softmax_scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, seg_start, seg_end, causal, softmax_scale = inputs
    o, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, o, lse, seg_start, seg_end)
    ctx.causal, ctx.scale = causal, softmax_scale


def _backward(ctx, do, _dlse):
    q, k, v, o, lse, seg_start, seg_end = ctx.saved_tensors
    dq, dk, dv = torch.ops.llmcore.flash_attention_backward(
        do, q, k, v, o, lse, seg_start, seg_end, ctx.causal, ctx.scale
    )
    return dq, dk, dv, None, None, None, None


_flash_fwd.register_autograd(_backward, setup_context=_setup_context)


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    cu_seqlens: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    *,
    position_ids: torch.Tensor | None = None,
    doc_bounds: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Exact attention, FlashAttention-2 style (Triton; differentiable in q, k and v).

    q ``(B, T, H, D)``, k/v ``(B, T, Hkv, D)`` with ``H % Hkv == 0`` (GQA, K/V not copied);
    ``D`` any size in 1..256 (a power of two >= 16 runs unpadded; others, e.g. MiniMind's 96 or
    80, are padded to the next power of two inside the kernels); fp32/bf16/fp16; q and k of the
    same length (self-attention, as in training). Documents, either way (at most one):
    ``cu_seqlens``: int32 document offsets into the flattened ``B*T`` tokens from 0 to ``B*T``
    containing every row start (FlashAttention's varlen layout; trailing repeats of ``B*T`` are
    allowed, so a fixed upper-bound length works); ``position_ids`` ``(B, T)``: a document starts
    wherever a position is 0 and at every row start (the packed loader's rows; every shape
    static, so ``torch.compile`` keeps one graph); ``doc_bounds``: ``document_bounds(position_ids)``
    computed once by the caller and shared by several calls (what the model passes: one
    computation per forward, not per layer). A token then attends
    only within its document (causally when ``causal``). ``softmax_scale`` defaults to
    ``1/sqrt(D)``. Returns ``(B, T, H, D)`` in q's dtype. Runs as the custom ops
    ``torch.ops.llmcore.flash_attention`` / ``flash_attention_backward``.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("flash_attention: q, k, v must be (batch, seq, heads, head_dim)")
    batch, seq_len, n_heads, head_dim = q.shape
    if k.shape != v.shape or k.shape[0] != batch or k.shape[1] != seq_len or k.shape[3] != head_dim:
        raise ValueError(f"flash_attention: k {tuple(k.shape)} / v {tuple(v.shape)} do not match q {tuple(q.shape)}")
    if n_heads % k.shape[2]:
        raise ValueError(f"flash_attention: {n_heads} query heads are not a multiple of {k.shape[2]} KV heads")
    if not 1 <= head_dim <= 256:
        raise ValueError(f"flash_attention: head_dim must be in [1, 256], got {head_dim}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(
            f"flash_attention: q, k, v must share one of fp32/bf16/fp16, got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    if (cu_seqlens is not None) + (position_ids is not None) + (doc_bounds is not None) > 1:
        raise ValueError("flash_attention: give documents one way (cu_seqlens, position_ids or doc_bounds), not both")
    if doc_bounds is not None and (
        len(doc_bounds) != 2 or any(b.shape != (batch * seq_len,) or b.dtype != torch.int32 for b in doc_bounds)
    ):
        raise ValueError(
            f"flash_attention: doc_bounds must be two int32 tensors of shape ({batch * seq_len},) "
            "from document_bounds(position_ids)"
        )
    if position_ids is not None and tuple(position_ids.shape) != (batch, seq_len):
        raise ValueError(f"flash_attention: position_ids must be ({batch}, {seq_len}), got {tuple(position_ids.shape)}")
    if cu_seqlens is not None:
        _check_cu_seqlens(cu_seqlens, batch * seq_len)
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
    if batch * seq_len == 0:
        return torch.zeros_like(q)
    seg_start = seg_end = None
    if cu_seqlens is not None:
        seg_start, seg_end = _segments(cu_seqlens, batch, seq_len, q.device)
    elif position_ids is not None:
        seg_start, seg_end = document_bounds(position_ids.to(q.device))
    elif doc_bounds is not None:
        seg_start, seg_end = doc_bounds
    return torch.ops.llmcore.flash_attention(q, k, v, seg_start, seg_end, bool(causal), scale)[0]
