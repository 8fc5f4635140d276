"""The kernels under torch.compile: no graph break (fullgraph=True), same outputs and gradients.

``backend="aot_eager"`` traces with fake tensors through dynamo and AOTAutograd (the path
Inductor takes: forward graph and joint backward graph) and then runs the graphs for real, so
the custom ops execute through Triton's interpreter on CPU; ``fullgraph=True`` fails on any
graph break. Inductor on CPU runs one small block (it calls our ops as extern kernels); the whole
model under Inductor takes about a minute of C++ compiling on CPU, so only a CUDA machine runs
that (the ``inductor`` parameters below, and tests/test_gpu.py's ``--compile`` training run).
Also ``torch.library.opcheck`` on every custom op (schema, fake functions against the real
outputs and strides, autograd registration, AOT dispatch with dynamic shapes).
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.aot_autograd import make_boxed_func

from llmcore.kernels import (
    apply_rope,
    cu_seqlens_from_position_ids,
    document_bounds,
    flash_attention,
    rms_norm,
    rope_tables,
)
from llmcore.kernels.flash_attention import _segments
from llmcore.model import LLM, ModelConfig

from _kernel_helpers import DEVICE

# aot_eager everywhere; Inductor too where it compiles quickly (CUDA: Triton code, not C++).
BACKENDS = ["aot_eager", "inductor"] if DEVICE == "cuda" else ["aot_eager"]


def _compiled(fn, backend="aot_eager"):
    return torch.compile(fn, fullgraph=True, backend=backend, dynamic=False)


def _outputs_and_grads(fn, inputs, seed=0):
    """fn's outputs and the gradients of its tensor inputs for a fixed random upstream gradient."""
    inputs = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    gen = torch.Generator().manual_seed(seed)
    ups = [torch.randn(o.shape, generator=gen).to(o) for o in outs]
    torch.autograd.backward(outs, ups)
    return [o.detach() for o in outs] + [t.grad for t in inputs if t.requires_grad]


def _assert_same(fn, inputs, backend):
    """Compiled and uncompiled calls give identical outputs and gradients (the ops run the same kernels)."""
    eager = _outputs_and_grads(fn, inputs)
    compiled = _outputs_and_grads(_compiled(fn, backend), inputs)
    for i, (a, b) in enumerate(zip(compiled, eager)):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=lambda m: f"tensor {i}: {m}")


def _randn(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def _packed_positions(batch, seq, doc_lengths, first=0):
    """Positions restarting at 0 inside the rows; ``first`` > 0 starts row 0 mid-document."""
    rows = []
    for r in range(batch):
        pos = list(range(first, first + doc_lengths[0])) if r == 0 and first else []
        for n in doc_lengths * seq:
            pos.extend(range(n))
        rows.append(pos[:seq])
    return torch.tensor(rows, device=DEVICE)


# ---------------------------------------------------------------- each op


@pytest.mark.parametrize("backend", BACKENDS)
def test_rms_norm_compiles_whole(backend):
    x, w = _randn(2, 5, 48), 1.0 + 0.1 * _randn(48, seed=1)
    _assert_same(lambda a, b: rms_norm(a, b, 1e-5), [x, w], backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("packed", [False, True])
def test_rope_compiles_whole(packed, backend):
    cos, sin = rope_tables(32, 64, device=DEVICE)
    pos = _packed_positions(2, 11, [4, 5]) if packed else None
    q, k = _randn(2, 11, 4, 32, seed=2), _randn(2, 11, 2, 32, seed=3)
    _assert_same(lambda a, b: apply_rope(a, b, cos, sin, pos), [q, k], backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("docs", ["none", "position_ids", "cu_seqlens"])
def test_flash_attention_compiles_whole(docs, backend):
    batch, seq = 2, 21
    pos = _packed_positions(batch, seq, [6, 1, 9], first=3)
    kw = {
        "none": {},
        "position_ids": {"position_ids": pos},
        "cu_seqlens": {"cu_seqlens": cu_seqlens_from_position_ids(pos)},
    }[docs]
    q, k, v = _randn(batch, seq, 4, 16, seed=4), _randn(batch, seq, 2, 16, seed=5), _randn(batch, seq, 2, 16, seed=6)
    _assert_same(lambda a, b, c: flash_attention(a, b, c, causal=True, **kw), [q, k, v], backend)


@pytest.mark.skipif(DEVICE == "cuda", reason="the inductor parameters of the tests above cover CUDA")
def test_inductor_on_cpu_calls_the_ops_as_extern_kernels():
    # A block of all three ops (no packed documents: their bounds would need C++ kernels, slow to build).
    cos, sin = rope_tables(16, 32, device=DEVICE)

    def block(x, w, q, k, v):
        q, k = apply_rope(q, k, cos, sin)
        return rms_norm(x, w, 1e-5), flash_attention(q, k, v, causal=True)

    inputs = [
        _randn(2, 5, 48),
        _randn(48, seed=1),
        _randn(1, 9, 2, 16, seed=2),
        _randn(1, 9, 1, 16, seed=3),
        _randn(1, 9, 1, 16, seed=4),
    ]
    _assert_same(block, inputs, "inductor")


def test_document_bounds_equal_the_cu_seqlens_route():
    # Rows starting mid-document, one-token documents, a document ending the row.
    pos = torch.tensor([[3, 4, 0, 1, 2, 0, 0], [0, 1, 2, 3, 4, 5, 6], [0, 0, 1, 0, 1, 2, 0]], device=DEVICE)
    start, end = document_bounds(pos)
    want = _segments(cu_seqlens_from_position_ids(pos), 3, 7, pos.device)
    assert start.dtype == end.dtype == torch.int32
    assert start.tolist() == want[0].tolist() and end.tolist() == want[1].tolist()
    assert start.view(3, 7)[0].tolist() == [0, 0, 2, 2, 2, 5, 6]
    assert end.view(3, 7)[0].tolist() == [2, 2, 5, 5, 5, 6, 7]


def test_flash_attention_position_ids_equal_cu_seqlens_bitwise():
    pos = _packed_positions(2, 19, [7, 1, 5], first=2)
    q, k, v = _randn(2, 19, 2, 16, seed=7), _randn(2, 19, 1, 16, seed=8), _randn(2, 19, 1, 16, seed=9)
    a = flash_attention(q, k, v, position_ids=pos)
    b = flash_attention(q, k, v, cu_seqlens=cu_seqlens_from_position_ids(pos))
    assert torch.equal(a, b)
    assert torch.equal(flash_attention(q, k, v, doc_bounds=document_bounds(pos)), a)  # the model's route
    with pytest.raises(ValueError, match="not both"):
        flash_attention(q, k, v, position_ids=pos, cu_seqlens=cu_seqlens_from_position_ids(pos))
    with pytest.raises(ValueError, match="not both"):
        flash_attention(q, k, v, position_ids=pos, doc_bounds=document_bounds(pos))
    with pytest.raises(ValueError, match="doc_bounds"):
        flash_attention(q, k, v, doc_bounds=document_bounds(pos[:1]))


def test_opcheck_custom_ops():
    ops = torch.ops.llmcore
    x, w = _randn(3, 40, seed=10).requires_grad_(), _randn(40, seed=11).requires_grad_()
    y, rstd = ops.rms_norm(x, w, 1e-5)
    torch.library.opcheck(ops.rms_norm.default, (x, w, 1e-5))
    torch.library.opcheck(ops.rms_norm_backward.default, (torch.randn_like(y), x.detach(), w.detach(), rstd))

    cos, sin = rope_tables(16, 32, device=DEVICE)
    q, k = _randn(1, 6, 2, 16, seed=12).requires_grad_(), _randn(1, 6, 1, 16, seed=13).requires_grad_()
    pos = torch.tensor([[0, 1, 2, 0, 1, 0]], device=DEVICE)
    torch.library.opcheck(ops.rope.default, (q, k, cos, sin, pos, False))
    torch.library.opcheck(ops.rope.default, (q, k, cos, sin, None, True))

    q, k, v = (_randn(1, 9, h, 16, seed=14 + h).requires_grad_() for h in (2, 1, 1))
    start, end = document_bounds(torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1]], device=DEVICE))
    torch.library.opcheck(ops.flash_attention.default, (q, k, v, start, end, True, 0.25))
    o, lse = ops.flash_attention(q, k, v, None, None, False, 0.25)
    torch.library.opcheck(
        ops.flash_attention_backward.default,
        (torch.randn_like(o), q.detach(), k.detach(), v.detach(), o.detach(), lse, start, end, True, 0.25),
    )


# ---------------------------------------------------------------- the model


def _tiny_triton_model():
    torch.manual_seed(0)
    return LLM(ModelConfig.from_preset("tiny", attn_backend="triton")).to(DEVICE)


# Packed rows: positions restart inside each row, and row 1 starts mid-document.
PACKED = [[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3], [5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 0, 1]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_triton_model_compiles_as_one_graph_packed(backend):
    model = _tiny_triton_model()
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, model.config.vocab_size, (2, 12), generator=gen).to(DEVICE)
    pos = torch.tensor(PACKED, device=DEVICE)

    def run(fn):
        model.zero_grad(set_to_none=True)
        logits = fn(x, position_ids=pos).logits
        logits.square().mean().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    ref_logits, ref_grads = run(model)
    logits, grads = run(_compiled(model, backend))
    # aot_eager runs the same ops (equal in practice); Inductor may fuse the torch parts differently.
    tol = dict(atol=1e-6, rtol=1e-6) if backend == "aot_eager" else dict(atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits, ref_logits, **tol)
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], **tol, msg=lambda m: f"{name}: {m}")


def test_triton_model_graph_holds_the_ops_and_takes_new_lengths():
    # What the compiled graphs contain (AOTAutograd with a recording no-op compiler, i.e. aot_eager),
    # and that dynamic shapes keep one graph for other sequence lengths (no nonzero, no recompile).
    graphs = []

    def record(gm, _example_inputs):
        graphs.append([str(n.target) for n in gm.graph.nodes if n.op == "call_function"])
        return make_boxed_func(gm.forward)

    model = _tiny_triton_model()
    compiled = torch.compile(
        model, fullgraph=True, dynamic=True, backend=aot_autograd(fw_compiler=record, bw_compiler=record)
    )
    gen = torch.Generator().manual_seed(2)
    x = torch.randint(0, model.config.vocab_size, (2, 12), generator=gen).to(DEVICE)
    compiled(x, position_ids=torch.tensor(PACKED, device=DEVICE)).logits.sum().backward()
    assert len(graphs) == 2
    forward, backward = graphs
    layers = model.config.num_hidden_layers
    assert forward.count("llmcore.flash_attention.default") == layers
    assert forward.count("llmcore.rope.default") == layers
    assert forward.count("llmcore.rms_norm.default") == 2 * layers + 1
    assert not any("nonzero" in op for op in forward)
    assert backward.count("llmcore.flash_attention_backward.default") == layers
    assert backward.count("llmcore.rms_norm_backward.default") == 2 * layers + 1
    assert backward.count("llmcore.rope.default") == layers  # its own gradient, direction flipped
    for seq in (17,):  # the same two graphs, forward and backward
        x = torch.randint(0, model.config.vocab_size, (2, seq), generator=gen).to(DEVICE)
        pos = torch.arange(seq, device=DEVICE).remainder(5).repeat(2, 1)  # contiguous, as PACKED (strides are guarded)
        logits = compiled(x, position_ids=pos).logits
        logits.sum().backward()
        torch.testing.assert_close(logits, model(x, position_ids=pos).logits, atol=1e-6, rtol=1e-6)
    assert len(graphs) == 2
