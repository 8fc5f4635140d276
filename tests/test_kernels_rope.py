"""RoPE kernel vs its reference (outputs and q/k gradients), and the reference vs an independent formula."""

from __future__ import annotations

import math

import pytest
import torch

from llmcore.kernels import apply_rope, apply_rope_reference, rope_tables

from _kernel_helpers import (
    DEVICE,
    LOW_PRECISION,
    assert_compiles_for_sm90,
    assert_refuses_cpu_tensors,
    cpu_only,
    needs_ptxas,
    packed_positions,
)

TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 1.6e-2), torch.float16: (2e-3, 2e-3)}


def _qk(batch, seq, heads, kv_heads, head_dim, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seq, heads, head_dim, generator=gen)
    k = torch.randn(batch, seq, kv_heads, head_dim, generator=gen)
    dq = torch.randn(q.shape, generator=gen)
    dk = torch.randn(k.shape, generator=gen)
    return [t.to(DEVICE, dtype) for t in (q, k, dq, dk)]


def _run(fn, q, k, dq, dk, cos, sin, pos):
    q = q.detach().clone().requires_grad_(True)
    k = k.detach().clone().requires_grad_(True)
    q_out, k_out = fn(q, k, cos, sin, pos)
    torch.autograd.backward([q_out, k_out], [dq, dk])
    return q_out.detach(), k_out.detach(), q.grad, k.grad


def _close(actual, expected, dtype, what):
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, *LOW_PRECISION])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (8, 2)])
@pytest.mark.parametrize("packed", [False, True])
def test_rope_matches_reference(dtype, heads, kv_heads, packed):
    batch, seq, head_dim = 3, 37, 64
    cos, sin = rope_tables(head_dim, max_positions=128, theta=1e6, device=DEVICE)
    q, k, dq, dk = _qk(batch, seq, heads, kv_heads, head_dim, dtype)
    pos = packed_positions(batch, seq, [5, 20, 3]) if packed else None
    got = _run(apply_rope, q, k, dq, dk, cos, sin, pos)
    if dtype == torch.float32:
        want = _run(apply_rope_reference, q, k, dq, dk, cos, sin, pos)
    else:  # outputs: the same-dtype reference; gradients: fp32 math on the same inputs
        want = list(_run(apply_rope_reference, q, k, dq, dk, cos, sin, pos)[:2])
        want += list(_run(apply_rope_reference, q.float(), k.float(), dq.float(), dk.float(), cos, sin, pos)[2:])
    for name, a, b in zip(("q", "k", "dq", "dk"), got, want):
        assert a.dtype == dtype
        _close(a, b, dtype, name)
    if dtype != torch.float32:
        # fp32 math then one round-to-nearest: outputs agree with the reference bit for bit but for rare FMA ties.
        for name, a, b in zip(("q", "k"), got, want):
            assert (a != b).float().mean() < 0.01, name


def test_rope_position_ids_select_table_rows():
    # Explicit positions equal to arange must give the default; shifted positions must differ.
    cos, sin = rope_tables(32, max_positions=64, device=DEVICE)
    q, k, _, _ = _qk(2, 11, 2, 1, 32, torch.float32, seed=4)
    default = apply_rope(q, k, cos, sin)
    explicit = apply_rope(q, k, cos, sin, torch.arange(11, device=DEVICE).expand(2, 11))
    shifted = apply_rope(q, k, cos, sin, torch.arange(3, 14, device=DEVICE).expand(2, 11))
    torch.testing.assert_close(default[0], explicit[0], atol=0, rtol=0)
    assert (default[0] - shifted[0]).abs().max() > 1e-2


def test_rope_general_tables_and_noncontiguous_inputs():
    # Random (not half-repeated) tables check that both table halves are used as the formula says;
    # q as a transposed view checks the non-contiguous path.
    gen = torch.Generator().manual_seed(5)
    cos = torch.randn(40, 32, generator=gen).to(DEVICE)
    sin = torch.randn(40, 32, generator=gen).to(DEVICE)
    q_bhtd = torch.randn(2, 3, 13, 32, generator=gen).to(DEVICE)
    q = q_bhtd.transpose(1, 2)
    assert not q.is_contiguous()
    k = torch.randn(2, 13, 1, 32, generator=gen).to(DEVICE)
    dq, dk = torch.randn(q.shape, generator=gen).to(DEVICE), torch.randn(k.shape, generator=gen).to(DEVICE)
    pos = torch.randint(0, 40, (2, 13), generator=gen).to(DEVICE)
    got = _run(apply_rope, q, k, dq, dk, cos, sin, pos)
    want = _run(apply_rope_reference, q, k, dq, dk, cos, sin, pos)
    for name, a, b in zip(("q", "k", "dq", "dk"), got, want):
        _close(a, b, torch.float32, name)


def test_rope_reference_equals_explicit_rotation():
    # Independent formula: rotate each pair (x_i, x_{i+D/2}) by angle p * theta^(-2i/D), in float64.
    batch, seq, heads, head_dim, theta = 2, 9, 3, 16, 1e6
    q, k, _, _ = _qk(batch, seq, heads, 1, head_dim, torch.float32, seed=6)
    pos = packed_positions(batch, seq, [4])
    cos, sin = rope_tables(head_dim, max_positions=32, theta=theta, device=DEVICE)
    half = head_dim // 2
    freqs = torch.tensor([theta ** (-2.0 * i / head_dim) for i in range(half)], dtype=torch.float64, device=DEVICE)
    angle = pos.double()[..., None, None] * freqs  # (B, T, 1, half)
    x1, x2 = q.double()[..., :half], q.double()[..., half:]
    expected = torch.cat((x1 * angle.cos() - x2 * angle.sin(), x2 * angle.cos() + x1 * angle.sin()), dim=-1)
    got, _ = apply_rope_reference(q, k, cos, sin, pos)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)
    assert math.isclose(float(cos[3, 0]), math.cos(3.0), rel_tol=1e-6)


def test_rope_backward_is_inverse_rotation():
    # With half-repeated tables the backward map is the rotation by -angle: applying it to the
    # forward output gives the input back.
    cos, sin = rope_tables(32, max_positions=64, device=DEVICE)
    q, k, _, _ = _qk(2, 21, 2, 2, 32, torch.float32, seed=7)
    q.requires_grad_(True)
    k.requires_grad_(True)
    q_out, k_out = apply_rope(q, k, cos, sin)
    gq, gk = torch.autograd.grad([q_out, k_out], [q, k], [q_out.detach(), k_out.detach()])
    torch.testing.assert_close(gq, q.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gk, k.detach(), atol=1e-5, rtol=1e-5)


def test_rope_rejects_out_of_range_positions_off_gpu():
    if DEVICE == "cuda":
        pytest.skip("the range check runs only off-GPU (it would synchronise the device)")
    cos, sin = rope_tables(16, max_positions=8)
    q, k, _, _ = _qk(1, 4, 1, 1, 16, torch.float32)
    with pytest.raises(ValueError, match="position_ids"):
        apply_rope(q, k, cos, sin, torch.tensor([[0, 1, 2, 8]]))


@cpu_only
def test_rope_cpu_without_interpreter_raises_clearly():
    assert_refuses_cpu_tensors(
        "apply_rope, rope_tables", "apply_rope(torch.randn(1, 4, 2, 8), torch.randn(1, 4, 1, 8), *rope_tables(8, 8))"
    )


@needs_ptxas
def test_rope_compiles_for_sm90():
    assert_compiles_for_sm90("""
        from llmcore.kernels.rope import _rope_kernel
        args = dict(X="*bf16", Y="*bf16", COS="*fp32", SIN="*fp32", POS="*i64", n_tokens=4096, seq_len=512,
                    n_heads=8, half_dim=32, stride_table=64)
        for backward in (False, True):
            tiles = dict(HAS_POS=True, BACKWARD=backward, BLOCK_T=16, BLOCK_H=8, BLOCK_HALF=32, FIX_BF16=False)
            print(compile_for_cuda(_rope_kernel, args, tiles))
    """)
