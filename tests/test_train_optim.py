"""--optimizer muon and --lr-schedule wsd: Muon's update, the parameter groups, the WSD schedule,
exact resume, and what Muon under DeepSpeed refuses."""

from __future__ import annotations

import math

import pytest
import torch

from llmcore.errors import LLMCoreError
from llmcore.model import LLM, PRESETS, ModelConfig
from llmcore.train import TrainConfig, lr_at, train
from llmcore.train.optim import MuonAdamW, group_names, make_optimizer, set_lr

from test_train_common import assert_same_weights, losses, tiny_cfg

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

A, B, C = 3.4445, -4.7750, 2.0315  # Keller Jordan's quintic Newton-Schulz coefficients


def newton_schulz(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """The published iteration, in float64: X = G / |G|_F (transposed to be wide), then
    X <- a X + (b X X^T + c (X X^T)^2) X, `steps` times."""
    x = g.double()
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T
    x = x / (x.norm() + 1e-7)
    for _ in range(steps):
        gram = x @ x.T
        x = A * x + (B * gram + C * gram @ gram) @ x
    return (x.T if tall else x).float()


def _tiny_model(**over) -> LLM:
    torch.manual_seed(0)
    return LLM(ModelConfig(**{**PRESETS["tiny"], **over}))


def _cfg(**kw) -> TrainConfig:
    base = dict(lr=1e-3, optimizer="muon", muon_lr=0.02, muon_momentum=0.95, muon_weight_decay=0.1)
    base.update(kw)
    return TrainConfig(**base)


def test_muon_update_is_newton_schulz_of_nesterov_momentum_and_torch_muon():
    """Three steps on the tiny model: each Muon matrix moves by lr * sqrt(max(1, A/B)) times the
    Newton-Schulz orthogonalisation of the Nesterov momentum (buf = mu buf + (1-mu) g; update =
    (1-mu) g + mu buf), after decoupled decay; and bit for bit as a standalone torch.optim.Muon."""
    model, twin = _tiny_model(), _tiny_model()
    cfg = _cfg()
    opt = make_optimizer(model, cfg)
    assert isinstance(opt, MuonAdamW)
    name = "layers.0.mlp.up_proj.weight"  # tall (192 x 64): exercises the transpose and the lr ratio
    p, q = dict(model.named_parameters())[name], dict(twin.named_parameters())[name]
    ref = torch.optim.Muon([q], lr=0.02, momentum=0.95, weight_decay=0.1, nesterov=True, adjust_lr_fn="original")
    rows, cols = p.shape
    buf = torch.zeros_like(p)
    gen = torch.Generator().manual_seed(1)
    for step in range(3):
        before = p.detach().clone()
        for prm in model.parameters():
            prm.grad = torch.randn(prm.shape, generator=gen) * 0.01
        q.grad = p.grad.clone()
        g = p.grad.clone()
        set_lr(opt, cfg.lr, cfg.lr)
        opt.step()
        ref.step()
        assert torch.equal(p.detach(), q.detach())  # torch.optim.Muon's update, no second copy
        buf = 0.95 * buf + 0.05 * g
        nesterov = 0.05 * g + 0.95 * buf
        lr = 0.02 * math.sqrt(max(1.0, rows / cols))
        got = (before * (1 - 0.02 * 0.1) - p.detach()) / lr
        want = newton_schulz(nesterov)
        # torch runs the iteration in bf16 (about 3 significant digits): entries agree to 0.04.
        err = (got - want).abs().max().item()
        assert err < 0.04, (step, err)
        if step > 0:  # and it is the Nesterov momentum, not the plain one
            assert (got - newton_schulz(buf)).abs().max().item() > 2 * err
        sv = torch.linalg.svdvals(got)
        assert sv.min() > 0.5 and sv.max() < 1.5  # orthogonalised: singular values near 1


MUON_TINY = [
    f"layers.{i}.{m}.weight"
    for i in range(2)
    for m in (
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    )
]


def test_parameter_groups_are_as_documented():
    model = _tiny_model()
    assert group_names(model, "muon") == {
        "muon": MUON_TINY,
        "adamw_no_decay": [
            "embed_tokens.weight",
            "layers.0.input_layernorm.weight",
            "layers.0.post_attention_layernorm.weight",
            "layers.1.input_layernorm.weight",
            "layers.1.post_attention_layernorm.weight",
            "norm.weight",
        ],
    }
    # adamw: MiniMind's groups (decay the 2-D hidden weights, not norms or the tied embedding)
    assert group_names(model, "adamw") == {
        "adamw_decay": MUON_TINY,
        "adamw_no_decay": group_names(model, "muon")["adamw_no_decay"],
    }
    # The optimizer holds exactly those parameters, with the documented rates and decay.
    names = {id(p): n for n, p in model.named_parameters()}
    opt = make_optimizer(model, _cfg())
    got = [(g["base_lr"], g["weight_decay"], [names[id(p)] for p in g["params"]]) for g in opt.param_groups]
    assert got == [(1e-3, 0.0, group_names(model, "muon")["adamw_no_decay"]), (0.02, 0.1, MUON_TINY)]
    assert opt.muon.param_groups[0]["nesterov"] and opt.muon.param_groups[0]["momentum"] == 0.95
    # MoE: the router (mlp.gate) stays with AdamW, every expert's matrices go to Muon.
    moe = _tiny_model(
        num_hidden_layers=1,
        use_moe=True,
        num_experts=2,
        num_experts_per_tok=1,
        num_shared_experts=0,
        moe_intermediate_size=32,
    )
    groups = group_names(moe, "muon")
    assert "layers.0.mlp.gate.weight" in groups["adamw_decay"]
    assert "layers.0.mlp.experts.1.down_proj.weight" in groups["muon"]


def test_both_groups_follow_the_schedule():
    model = _tiny_model()
    cfg = _cfg()
    opt = make_optimizer(model, cfg)
    set_lr(opt, 2.5e-4, cfg.lr)  # a quarter of --lr
    assert [g["lr"] for g in opt.param_groups] == [2.5e-4, pytest.approx(0.005)]


def test_wsd_lr_at_hand_computed_steps():
    # 10 steps, warmup 2, decay over round(0.3 * 10) = 3 steps, lr 1 -> min 0.1
    got = [lr_at(s, 10, 1.0, 0.1, 2, "wsd", 0.3) for s in range(10)]
    assert got == pytest.approx([0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.7, 0.4, 0.1])
    # no warmup, default fraction 0.2 of 5 steps = 1 step of decay: the last step is at min_lr
    assert [lr_at(s, 5, 1.0, 0.1, 0, "wsd") for s in range(5)] == pytest.approx([1, 1, 1, 1, 0.1])
    # the decay never starts inside the warmup
    assert [lr_at(s, 4, 1.0, 0.0, 3, "wsd", 0.9) for s in range(4)] == pytest.approx([1 / 3, 2 / 3, 1.0, 0.0])
    # cosine is still the default and unchanged
    assert lr_at(0, 10, 1.0, 0.1, 0) == 1.0 and lr_at(9, 10, 1.0, 0.1, 0) == pytest.approx(0.1)


def test_muon_wsd_resume_is_exact(shards, tmp_path):
    """2 + 2 steps with a checkpoint in between equal 4 uninterrupted steps, bit for bit."""
    kw = dict(max_steps=4, save_every=2, optimizer="muon", lr_schedule="wsd", decay_fraction=0.5, warmup_steps=1)
    full = train("pretrain", tiny_cfg("pretrain", shards, tmp_path / "full", **kw))
    train("pretrain", tiny_cfg("pretrain", shards, tmp_path / "cut", stop_after=2, **kw))
    state = torch.load(tmp_path / "cut" / "checkpoints" / "step-2" / "optimizer.pt", weights_only=True)
    assert {g["optimizer"] for g in state["param_groups"]} == {"adamw", "muon"}
    assert any("momentum_buffer" in s for s in state["state"].values())
    resumed = train("pretrain", tiny_cfg("pretrain", shards, tmp_path / "cut", resume=True, **kw))
    assert resumed.steps == full.steps == 4
    assert losses(tmp_path / "cut") == losses(tmp_path / "full")
    assert_same_weights(tmp_path / "cut", tmp_path / "full")
    # and Muon really trained something different from AdamW with the same schedule
    adamw = tiny_cfg("pretrain", shards, tmp_path / "adamw", **{**kw, "optimizer": "adamw"})
    train("pretrain", adamw)
    assert losses(tmp_path / "adamw")[1:] != losses(tmp_path / "full")[1:]


def test_muon_with_deepspeed_outside_zero12_or_with_clipping_is_refused_in_one_line(shards, tmp_path):
    # ZeRO-1/2 with --grad-clip 0 run DeepSpeed's Muon: tests/test_train_muon_zero.py
    for ds in ("zero0", "zero2", "zero3"):
        cfg = tiny_cfg("pretrain", shards, tmp_path / ds, optimizer="muon", deepspeed=ds)  # --grad-clip 1
        with pytest.raises(LLMCoreError, match=r"--optimizer muon with --deepspeed") as e:
            cfg.resolved("pretrain")
        assert "\n" not in str(e.value)


def test_resume_cannot_switch_optimizer(shards, tmp_path):
    from llmcore.train.config import check_resume

    cfg = tiny_cfg("pretrain", shards, tmp_path / "r", optimizer="muon").resolved("pretrain")
    saved = {"stage": "pretrain", "train": {**cfg.to_dict(), "optimizer": "adamw"}}
    with pytest.raises(LLMCoreError, match="--optimizer: the run has 'adamw'"):
        check_resume(saved, "pretrain", cfg, tmp_path / "r")
