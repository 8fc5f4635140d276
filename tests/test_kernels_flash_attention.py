"""Flash attention kernel vs its reference: outputs and dq/dk/dv; GQA, causal, packed documents, tails."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from llmcore.kernels import cu_seqlens_from_position_ids, flash_attention, flash_attention_reference

from _kernel_helpers import DEVICE, assert_compiles_for_sm90, assert_refuses_cpu_tensors, cpu_only, needs_ptxas

LOW_PRECISION = [torch.bfloat16, torch.float16] if DEVICE == "cuda" else [torch.bfloat16]
# fp32 to 1e-5; half precision: P and dS are rounded for their matmuls, so a few ulps of O(1) values.
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (4e-2, 4e-2), torch.float16: (1e-2, 1e-2)}


def _qkv(batch, seq, heads, kv_heads, head_dim, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [
        (batch, seq, heads, head_dim),
        (batch, seq, kv_heads, head_dim),
        (batch, seq, kv_heads, head_dim),
        (batch, seq, heads, head_dim),
    ]
    return [torch.randn(s, generator=gen).to(DEVICE, dtype) for s in shapes]


def _doc_offsets(batch, seq, doc_lengths):
    """cu_seqlens for rows cut into documents of the given lengths (the last one fills the row)."""
    cu = [0]
    for row in range(batch):
        start, end = row * seq, (row + 1) * seq
        pos = start
        for n in doc_lengths:
            if pos + n >= end:
                break
            pos += n
            cu.append(pos)
        cu.append(end)
    return torch.tensor(cu, dtype=torch.int32, device=DEVICE)


def _run(fn, q, k, v, do, **kw):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    o = fn(q, k, v, **kw)
    o.backward(do)
    return o.detach(), q.grad, k.grad, v.grad


def _check(q, k, v, do, **kw):
    dtype = q.dtype
    got = _run(flash_attention, q, k, v, do, **kw)
    want = _run(flash_attention_reference, q.float(), k.float(), v.float(), do.float(), **kw)
    atol, rtol = TOL[dtype]
    for name, a, b in zip(("o", "dq", "dk", "dv"), got, want):
        assert a.dtype == dtype and a.shape == b.shape, name
        assert torch.isfinite(a).all(), f"{name} has non-finite values"
        # Gradients of shared KV heads sum over the group: scale the tolerance with the group size.
        scale = q.shape[2] // k.shape[2] if name in ("dk", "dv") else 1
        torch.testing.assert_close(a.float(), b, atol=atol * scale, rtol=rtol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("docs", [False, True])
def test_flash_attention_fp32_matches_reference(causal, heads, kv_heads, docs):
    batch, seq = 3, 37
    q, k, v, do = _qkv(batch, seq, heads, kv_heads, 32, torch.float32, seed=heads * 10 + kv_heads)
    cu = _doc_offsets(batch, seq, [5, 1, 17]) if docs else None
    _check(q, k, v, do, causal=causal, cu_seqlens=cu)


@pytest.mark.parametrize("causal", [True, False])
def test_flash_attention_multi_tile_sequence(causal):
    # Long enough for every path: unmasked full tiles, diagonal tiles and the ragged tail.
    q, k, v, do = _qkv(1, 100, 2, 1, 32, torch.float32, seed=11)
    _check(q, k, v, do, causal=causal)


def test_flash_attention_documents_spanning_tiles():
    # Documents longer than a tile, a one-token document and boundaries off the tile grid.
    q, k, v, do = _qkv(2, 90, 2, 1, 32, torch.float32, seed=12)
    cu = _doc_offsets(2, 90, [40, 1, 33])
    _check(q, k, v, do, causal=True, cu_seqlens=cu)


@pytest.mark.parametrize("head_dim", [64, 128])
def test_flash_attention_head_dims(head_dim):
    q, k, v, do = _qkv(1, 37, 2, 1, head_dim, torch.float32, seed=head_dim)
    _check(q, k, v, do, causal=True, cu_seqlens=_doc_offsets(1, 37, [20]))


@pytest.mark.parametrize("head_dim", [96, 80, 40, 8])
@pytest.mark.parametrize("docs", [False, True])
def test_flash_attention_padded_head_dims(head_dim, docs):
    # MiniMind-3 / MiniMind2 (96), MiniMind2-MoE (80) and small sizes: tiles padded to a power of
    # two with masked columns. An odd length (37) leaves ragged tails; GQA 4 -> 2 heads;
    # packed rows through position_ids (the model's route) with documents crossing tiles.
    batch, seq = 2, 37
    q, k, v, do = _qkv(batch, seq, 4, 2, head_dim, torch.float32, seed=head_dim + docs)
    pos = None
    if docs:
        pos = torch.cat([torch.arange(20), torch.arange(1), torch.arange(16)]).to(DEVICE).expand(batch, seq)
    _check(q, k, v, do, causal=True, position_ids=pos)


def test_flash_attention_padded_head_dim_non_causal_multi_tile():
    q, k, v, do = _qkv(1, 70, 2, 1, 96, torch.float32, seed=5)
    _check(q, k, v, do, causal=False)


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_flash_attention_padded_head_dim_low_precision(dtype):
    q, k, v, do = _qkv(1, 37, 4, 2, 96, dtype, seed=14)
    _check(q, k, v, do, causal=True, cu_seqlens=_doc_offsets(1, 37, [9, 14]))


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("docs", [False, True])
def test_flash_attention_low_precision(dtype, docs):
    q, k, v, do = _qkv(2, 37, 4, 2, 64, dtype, seed=13)
    cu = _doc_offsets(2, 37, [9, 14]) if docs else None
    _check(q, k, v, do, causal=True, cu_seqlens=cu)


def test_flash_attention_scale_and_strided_views():
    # q/k/v as slices of one fused projection (the model's layout): strided, head dim contiguous.
    gen = torch.Generator().manual_seed(14)
    batch, seq, heads, kv_heads, head_dim = 2, 23, 4, 2, 32
    qkv = torch.randn(batch, seq, heads + 2 * kv_heads, head_dim, generator=gen).to(DEVICE)
    q, k, v = qkv.split([heads, kv_heads, kv_heads], dim=2)
    assert not q.is_contiguous() and not k.is_contiguous()
    do = torch.randn(batch, seq, heads, head_dim, generator=gen).to(DEVICE)
    _check(q, k, v, do, causal=True, softmax_scale=0.3)


def test_flash_attention_single_token_rows():
    q, k, v, do = _qkv(2, 1, 2, 1, 32, torch.float32, seed=15)
    _check(q, k, v, do, causal=True)


def test_reference_matches_sdpa():
    # The reference itself against PyTorch's attention with an explicit block-diagonal causal mask.
    batch, seq, heads, kv_heads, head_dim = 2, 19, 4, 2, 32
    q, k, v, _ = _qkv(batch, seq, heads, kv_heads, head_dim, torch.float32, seed=16)
    cu = _doc_offsets(batch, seq, [7])
    doc = torch.searchsorted(cu.long(), torch.arange(batch * seq, device=DEVICE), right=True).view(batch, seq)
    mask = (doc[:, :, None] == doc[:, None, :]) & torch.ones(seq, seq, dtype=torch.bool, device=DEVICE).tril()
    rep = heads // kv_heads
    expected = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.repeat_interleave(rep, 2).transpose(1, 2),
        v.repeat_interleave(rep, 2).transpose(1, 2),
        attn_mask=mask[:, None],
    ).transpose(1, 2)
    got = flash_attention_reference(q, k, v, causal=True, cu_seqlens=cu)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_documents_do_not_leak():
    # Changing the keys/values of one document must leave the other documents' outputs unchanged.
    q, k, v, _ = _qkv(1, 30, 2, 1, 32, torch.float32, seed=17)
    cu = torch.tensor([0, 12, 30], dtype=torch.int32, device=DEVICE)
    base = flash_attention(q, k, v, causal=False, cu_seqlens=cu)
    k2, v2 = k.clone(), v.clone()
    k2[:, 12:] += 3.0
    v2[:, 12:] -= 5.0
    moved = flash_attention(q, k2, v2, causal=False, cu_seqlens=cu)
    torch.testing.assert_close(moved[:, :12], base[:, :12], atol=0, rtol=0)
    assert (moved[:, 12:] - base[:, 12:]).abs().max() > 1.0


def test_cu_seqlens_from_position_ids():
    pos = torch.tensor([[0, 1, 2, 0, 1], [3, 4, 0, 1, 2]], device=DEVICE)
    assert cu_seqlens_from_position_ids(pos).tolist() == [0, 3, 5, 7, 10]
    assert cu_seqlens_from_position_ids(pos).dtype == torch.int32


def test_flash_attention_rejects_bad_inputs():
    q, k, v, _ = _qkv(1, 8, 3, 2, 32, torch.float32)
    with pytest.raises(ValueError, match="multiple"):
        flash_attention(q, k, v)
    q, k, v, _ = _qkv(1, 8, 2, 1, 288, torch.float32)
    with pytest.raises(ValueError, match="head_dim"):
        flash_attention(q, k, v)
    if DEVICE == "cpu":
        q, k, v, _ = _qkv(1, 8, 2, 1, 32, torch.float32)
        with pytest.raises(ValueError, match="cu_seqlens"):
            flash_attention(q, k, v, cu_seqlens=torch.tensor([0, 4, 7], dtype=torch.int32))


def test_default_scale_is_inverse_sqrt_head_dim():
    q, k, v, _ = _qkv(1, 9, 2, 2, 32, torch.float32, seed=18)
    torch.testing.assert_close(flash_attention(q, k, v), flash_attention(q, k, v, softmax_scale=1 / math.sqrt(32)))


@cpu_only
def test_flash_attention_cpu_without_interpreter_raises_clearly():
    assert_refuses_cpu_tensors(
        "flash_attention",
        "flash_attention(torch.randn(1, 4, 2, 16), torch.randn(1, 4, 1, 16), torch.randn(1, 4, 1, 16))",
    )


@needs_ptxas
def test_flash_attention_compiles_for_sm90():
    assert_compiles_for_sm90("""
        import sys
        import llmcore.kernels.flash_attention
        fa = sys.modules["llmcore.kernels.flash_attention"]  # the package re-exports a function of this name
        dt = "*bf16"
        strides = lambda *names: {f"stride_{n}{a}": 4096 for n in names for a in "bth"}
        base = dict(SEG_START="*i32", SEG_END="*i32", seq_len=1000, n_heads=8, group=4, qk_scale=0.18)
        fwd = dict(Q=dt, K=dt, V=dt, O=dt, LSE="*fp32", **base, **strides("q", "k", "v", "o"))
        grads = dict(Q=dt, K=dt, V=dt, DO=dt, LSE="*fp32", DELTA="*fp32", sm_scale=0.125, **base)
        dkdv = dict(DK=dt, DV=dt, n_kv_heads=2, **grads, **strides("q", "k", "v", "do", "dk", "dv"))
        dq = dict(DQ=dt, **grads, **strides("q", "k", "v", "do", "dq"))
        # head dim 64 (power of two, no column mask) and 96 (MiniMind-3: 128-wide tiles, masked columns)
        for causal, docs, hd in ((True, False, 64), (False, True, 64), (True, False, 96), (True, True, 96)):
            flags = dict(HEAD_DIM=hd, BLOCK_D=fa._block_d(hd), CAUSAL=causal, HAS_SEG=docs, F32=False, FIX_BF16=False)
            for kind, kernel, args in (("fwd", fa._fwd_kernel, fwd), ("dkdv", fa._bwd_dkdv_kernel, dkdv),
                                       ("dq", fa._bwd_dq_kernel, dq)):
                m, n, warps, stages = fa._CUDA[kind][0] if hd < 96 else fa._CUDA_D128[kind]
                print(kind, causal, docs, hd, compile_for_cuda(kernel, args, dict(flags, BLOCK_M=m, BLOCK_N=n),
                                                            num_warps=warps, num_stages=stages))
        delta = dict(O=dt, DO=dt, DELTA="*fp32", seq_len=1000, n_heads=8, **strides("o", "d"))
        for hd in (64, 96):
            print(compile_for_cuda(fa._bwd_delta_kernel, delta, dict(HEAD_DIM=hd, BLOCK_D=fa._block_d(hd), BLOCK_M=64)))
    """)


def test_autotune_pruning_at_padded_head_dims():
    # Head dim 96 tiles are 128 wide: the dK/dV kernel keeps key tiles of at most 64 rows (two
    # 64 x 128 fp32 accumulators), forward/dQ tiles of at most 128 x 64; head dim 64 keeps all.
    import sys

    fa = sys.modules["llmcore.kernels.flash_attention"]
    for kind in ("fwd", "dkdv", "dq"):
        configs = fa._cuda_configs(fa._CUDA[kind])
        assert fa._prune_head_dim(kind)(configs, {}, BLOCK_D=64) == configs
        kept = fa._prune_head_dim(kind)(configs, {}, BLOCK_D=fa._block_d(96))
        assert kept and (kind == "dq" or len(kept) < len(configs))  # dQ's candidates all fit already
        if kind == "dkdv":
            assert all(c.kwargs["BLOCK_N"] <= 64 for c in kept)
        else:
            assert all(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 128 * 64 for c in kept)
