"""Triton kernels vs the eager model over a short training run (Liger's convergence tests, on CPU).

Twenty AdamW steps of a one-layer model on odd shapes (head_dim 96, 2 query / 1 key-value heads,
QK-norm, intermediate size 200, vocab 131, rows of 29 tokens holding 1-2 documents) once with the eager
reference math and once with `attn_backend="triton"` (the Triton kernels in the interpreter, or on
a GPU when there is one). Same initial weights, same batches: the two loss curves must agree step
by step, so a kernel whose forward or backward is slightly off (a gradient that drifts, a document
bound off by one) shows up as curves that part, even when one step's outputs look close. About 25 s
on a 2-core CPU; skipped only when triton is not installed.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton", reason="the Triton kernels need the triton package")

from llmcore.model import LLM, ModelConfig  # noqa: E402

from _kernel_helpers import DEVICE  # noqa: E402  (after the importorskip)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

STEPS, BATCH, SEQ, VOCAB = 20, 2, 29, 131


def batches() -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(input_ids, labels, position_ids) per step: rows of 29 tokens cut into 1-2 documents of a
    learnable pattern (each token predicts the next one of a random walk with small steps)."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(STEPS):
        start = torch.randint(0, VOCAB, (BATCH, 1), generator=g)
        walk = (start + torch.randint(0, 3, (BATCH, SEQ + 1), generator=g).cumsum(1)) % VOCAB
        pos = torch.empty(BATCH, SEQ, dtype=torch.long)
        labels = walk[:, 1:].clone()
        for b in range(BATCH):
            cuts = sorted(torch.randint(5, SEQ - 5, (b,), generator=g).tolist())
            p = torch.arange(SEQ)
            for c in cuts:
                p[c:] = torch.arange(SEQ - c)
                labels[b, c - 1] = -100  # no label across a document boundary
            pos[b] = p
        out.append((walk[:, :-1], labels, pos))
    return out


def loss_curve(backend: str, init: dict[str, torch.Tensor]) -> list[float]:
    config = ModelConfig.from_preset(
        "tiny",
        hidden_size=192,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=200,
        vocab_size=VOCAB,
        qk_norm=True,
        attn_backend=backend,
        num_hidden_layers=1,
    )
    assert config.head_dim == 96
    model = LLM(config)
    model.load_state_dict(init)
    model.to(DEVICE).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    curve = []
    for ids, labels, pos in batches():
        logits = model(ids.to(DEVICE), position_ids=pos.to(DEVICE)).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), labels.to(DEVICE).flatten(), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        curve.append(float(loss.detach()))
    return curve


def test_triton_and_eager_loss_curves_agree_for_20_steps_on_odd_shapes() -> None:
    torch.manual_seed(0)
    init = LLM(
        ModelConfig.from_preset(
            "tiny",
            hidden_size=192,
            num_attention_heads=2,
            num_key_value_heads=1,
            intermediate_size=200,
            vocab_size=VOCAB,
            qk_norm=True,
            num_hidden_layers=1,
        )
    ).state_dict()
    eager = loss_curve("eager", init)
    triton = loss_curve("triton", init)
    assert eager[-1] < eager[0] - 0.5, eager  # the run learns, so the curves carry information
    for step, (a, b) in enumerate(zip(eager, triton), start=1):
        assert b == pytest.approx(a, rel=2e-4, abs=2e-4), f"step {step}: eager {a:.6f}, triton {b:.6f}"
