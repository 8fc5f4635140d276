"""Fused QK-norm + RoPE kernel vs its reference (outputs, gradients of q, k and both weights), the
reference vs an independent float64 formula, torch.compile, opcheck, and the sm_90 build."""

from __future__ import annotations

import pytest
import torch

from llmcore.kernels import qk_norm_rope, qk_norm_rope_reference, rope_tables

from _kernel_helpers import (
    DEVICE,
    LOW_PRECISION,
    assert_compiles_for_sm90,
    assert_refuses_cpu_tensors,
    cpu_only,
    needs_ptxas,
    packed_positions,
)

# bf16: the kernel keeps fp32 between the rotation's and the norm's backward where eager rounds.
TOL = {torch.float32: (2e-5, 1e-5), torch.bfloat16: (3e-2, 2e-2), torch.float16: (4e-3, 4e-3)}


def _inputs(batch, seq, heads, kv_heads, head_dim, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seq, heads, head_dim, generator=gen) * 3.0
    k = torch.randn(batch, seq, kv_heads, head_dim, generator=gen)
    qw = 1.0 + 0.5 * torch.randn(head_dim, generator=gen)
    kw = 1.0 + 0.5 * torch.randn(head_dim, generator=gen)
    dq = torch.randn(q.shape, generator=gen)
    dk = torch.randn(k.shape, generator=gen)
    return [t.to(DEVICE, dtype) for t in (q, k, qw, kw, dq, dk)]


def _run(fn, q, k, qw, kw, dq, dk, cos, sin, pos, eps):
    q, k, qw, kw = (t.detach().clone().requires_grad_(True) for t in (q, k, qw, kw))
    q_out, k_out = fn(q, k, qw, kw, cos, sin, pos, eps)
    torch.autograd.backward([q_out, k_out], [dq, dk])
    return q_out.detach(), k_out.detach(), q.grad, k.grad, qw.grad, kw.grad


NAMES = ("q_out", "k_out", "dq", "dk", "dq_weight", "dk_weight")


def _check(dtype, heads, kv_heads, head_dim, packed, batch=3, seq=37, eps=1e-6, seed=0):
    cos, sin = rope_tables(head_dim, max_positions=64, theta=1e6, device=DEVICE)
    q, k, qw, kw, dq, dk = _inputs(batch, seq, heads, kv_heads, head_dim, dtype, seed=seed)
    pos = packed_positions(batch, seq, [5, 20, 3]) if packed else None
    got = _run(qk_norm_rope, q, k, qw, kw, dq, dk, cos, sin, pos, eps)
    # The reference in the kernel's dtype (same roundings), and in fp32 for the gradients of low precision.
    want = _run(qk_norm_rope_reference, q, k, qw, kw, dq, dk, cos, sin, pos, eps)
    want32 = _run(qk_norm_rope_reference, *(t.float() for t in (q, k, qw, kw, dq, dk)), cos, sin, pos, eps)
    atol, rtol = TOL[dtype]
    for i, (name, a, b, b32) in enumerate(zip(NAMES, got, want, want32)):
        assert a.dtype == dtype and a.shape == b.shape, name
        assert torch.isfinite(a).all(), name
        if i < 2:  # outputs: same roundings as eager
            torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")
        else:  # gradients: against fp32 math; weight gradients sum over tokens and heads
            scale = 1.0 if i < 4 else (batch * seq * (heads if name == "dq_weight" else kv_heads)) ** 0.5
            torch.testing.assert_close(a.float(), b32, atol=atol * scale, rtol=rtol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (8, 2), (3, 3)])
@pytest.mark.parametrize("head_dim", [96, 64, 10])
@pytest.mark.parametrize("packed", [False, True])
def test_qk_norm_rope_fp32_matches_reference(heads, kv_heads, head_dim, packed):
    _check(torch.float32, heads, kv_heads, head_dim, packed, seed=heads + head_dim)


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("packed", [False, True])
def test_qk_norm_rope_low_precision(dtype, packed):
    _check(dtype, 8, 4, 96, packed, batch=2, seq=29, seed=7)


def test_qk_norm_rope_eps_matters():
    # Tiny vectors: eps dominates the RMS, so a kernel that ignored or hard-coded eps would differ.
    cos, sin = rope_tables(16, 32, device=DEVICE)
    q = torch.full((1, 3, 2, 16), 1e-3, device=DEVICE)
    k = torch.full((1, 3, 1, 16), 1e-3, device=DEVICE)
    w = torch.ones(16, device=DEVICE)
    for eps in (1e-6, 1e-2):
        got = qk_norm_rope(q, k, w, w, cos, sin, None, eps)
        want = qk_norm_rope_reference(q, k, w, w, cos, sin, None, eps)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert (
        qk_norm_rope(q, k, w, w, cos, sin, None, 1e-2)[0] - qk_norm_rope(q, k, w, w, cos, sin, None, 1e-6)[0]
    ).abs().max() > 0.1


def test_reference_equals_float64_formula():
    # Independent of the model's code: normalise by the L2 norm / sqrt(D), scale, then rotate each
    # pair (x_i, x_{i+D/2}) as a complex number by exp(i * pos * theta^(-2i/D)).
    batch, seq, heads, head_dim, eps, theta = 2, 9, 3, 12, 1e-6, 1e4
    cos, sin = rope_tables(head_dim, 32, theta=theta, device=DEVICE)
    q, k, qw, kw, _, _ = _inputs(batch, seq, heads, 1, head_dim, torch.float32, seed=3)
    pos = packed_positions(batch, seq, [4])
    got_q, _ = qk_norm_rope_reference(q, k, qw, kw, cos, sin, pos, eps)
    x = q.double()
    normed = x / torch.sqrt(x.pow(2).sum(-1, keepdim=True) / head_dim + eps) * qw.double()
    half = head_dim // 2
    z = torch.complex(normed[..., :half], normed[..., half:])
    freq = theta ** (-torch.arange(half, dtype=torch.float64, device=DEVICE) * 2 / head_dim)
    rot = torch.polar(torch.ones_like(freq), pos.double()[..., None] * freq)[:, :, None, :]
    zr = z * rot
    want = torch.cat([zr.real, zr.imag], dim=-1)
    torch.testing.assert_close(got_q.double(), want, atol=1e-5, rtol=1e-5)


def test_qk_norm_rope_rejects_bad_inputs():
    cos, sin = rope_tables(16, 32, device=DEVICE)
    q, k, qw, kw, _, _ = _inputs(1, 4, 2, 1, 16, torch.float32)
    with pytest.raises(ValueError, match="k_weight"):
        qk_norm_rope(q, k, qw, kw[:8], cos, sin)
    with pytest.raises(ValueError, match="position_ids"):
        qk_norm_rope(q, k, qw, kw, cos, sin, torch.zeros(1, 3, dtype=torch.long, device=DEVICE))
    if DEVICE == "cpu":
        with pytest.raises(ValueError, match=r"\[0, 32\)"):
            qk_norm_rope(q, k, qw, kw, cos, sin, torch.full((1, 4), 40, device=DEVICE))


def test_qk_norm_rope_compiles_whole_and_opcheck():
    cos, sin = rope_tables(24, 32, device=DEVICE)
    q, k, qw, kw, _, _ = _inputs(2, 7, 4, 2, 24, torch.float32, seed=5)
    pos = packed_positions(2, 7, [3])

    def fn(a, b, c, d):
        return qk_norm_rope(a, b, c, d, cos, sin, pos, 1e-6)

    eager = _run(lambda *t: fn(*t[:4]), q, k, qw, kw, q, k, cos, sin, pos, 1e-6)
    compiled_fn = torch.compile(fn, fullgraph=True, backend="aot_eager", dynamic=False)
    compiled = _run(lambda *t: compiled_fn(*t[:4]), q, k, qw, kw, q, k, cos, sin, pos, 1e-6)
    for name, a, b in zip(NAMES, compiled, eager):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=lambda m: f"{name}: {m}")
    ops = torch.ops.llmcore
    args = (q.requires_grad_(), k.requires_grad_(), qw.requires_grad_(), kw.requires_grad_(), cos, sin, pos, 1e-6)
    torch.library.opcheck(ops.qk_norm_rope.default, args)
    torch.library.opcheck(ops.qk_norm_rope.default, (*args[:6], None, 1e-6))
    torch.library.opcheck(
        ops.qk_norm_rope_backward.default,
        (torch.randn_like(q), torch.randn_like(k), *(t.detach() for t in args[:4]), cos, sin, pos, 1e-6),
    )


@cpu_only
def test_qk_norm_rope_cpu_without_interpreter_raises_clearly():
    assert_refuses_cpu_tensors(
        "qk_norm_rope, rope_tables",
        "qk_norm_rope(torch.randn(1, 4, 2, 16), torch.randn(1, 4, 1, 16), torch.ones(16), torch.ones(16), "
        "*rope_tables(16, 8))",
    )


@needs_ptxas
def test_qk_norm_rope_compiles_for_sm90():
    assert_compiles_for_sm90("""
        import sys
        import llmcore.kernels.qk_norm_rope
        m = sys.modules["llmcore.kernels.qk_norm_rope"]  # the package re-exports a function of this name
        from llmcore.kernels.rope import token_blocks
        for dt in ("*bf16", "*fp32"):
            for heads, hd in ((8, 96), (4, 128)):
                bt, bh, bhalf = token_blocks(heads, hd, False)
                table = dict(COS="*fp32", SIN="*fp32", POS="*i64", n_tokens=4096, seq_len=512, n_heads=heads,
                             half_dim=hd // 2, stride_table=hd, eps=1e-6)
                flags = dict(HAS_POS=True, BLOCK_T=bt, BLOCK_H=bh, BLOCK_HALF=bhalf, FIX_BF16=False)
                dirs = dict(X=dt, W=dt, Y=dt, DY=dt, DW_PARTIAL="*fp32", **table)
                for backward in (False, True):
                    print(compile_for_cuda(m._qk_norm_rope_kernel, dirs,
                                           dict(flags, BACKWARD=backward, ROUND_N=not backward)))
    """)


@pytest.mark.skipif(
    DEVICE == "cuda", reason="the CPU dry run of the timing code; on CUDA `bench kernels` times for real"
)
def test_bench_kernels_times_qk_norm_rope_and_head_dim_96():
    from llmcore.bench.kernels import run_kernels

    res = run_kernels(torch.device("cpu"), dry_run_timing=True, seqs=[16], hiddens=[32], repeats=1)
    ratios = {r["name"] for r in res.ratios}
    assert {f"qk_norm_rope B1 T16 H8/4 D96 fwd+bwd: triton vs {base}" for base in ("eager", "compile")} <= ratios
    assert any(
        m.get("op") == "attention" and "D96 causal" in m["shape"] and m.get("impl") == "triton"
        for m in res.measurements
    )
    sweep = run_kernels(torch.device("cpu"), quick=True)
    checks = [c for c in sweep.extra["checks"] if c["op"] == "qk_norm_rope"]
    assert len(checks) == 3 and all(c["ok"] for c in checks)
