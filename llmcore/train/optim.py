"""The optimizers of the plain engine: AdamW (MiniMind's) or Muon on the hidden matrices + AdamW on
the rest (`--optimizer muon`, as modded-nanogpt and nanochat).

Which parameter goes where (`optimizer_groups`):
- Muon: every trainable 2-D `.weight` under `layers.` — the attention projections (q/k/v/o) and the
  MLP projections (gate/up/down, and each MoE expert's and shared expert's). Muon's update is the
  orthogonalised (Newton-Schulz, 5 steps, a, b, c = 3.4445, -4.7750, 2.0315) Nesterov momentum of a
  whole matrix, which is what these square-ish hidden maps want.
- AdamW: the token embedding (tied to the output head), an untied head, every norm gain, biases,
  LoRA adapters (low-rank, trained on their own), and the MoE routers (`layers.N.mlp.gate.weight`,
  shape experts x hidden). A router has a handful of rows; orthogonalising its update would move
  every expert's logit direction by the same amount each step, whatever its gradient says, which
  fights the load-balancing loss, and its logit scale (what top-k reads) is better left to AdamW's
  per-coordinate steps. This is also how DeepSeek-V3/Kimi-style Muon recipes treat gates.

Learning rates: AdamW groups use `--lr`; the Muon group uses `--muon-lr` (0.02, Keller Jordan's
and modded-nanogpt's), with torch's `adjust_lr_fn="original"`: a matrix of shape (A, B) steps with
lr * sqrt(max(1, A / B)), so tall matrices (gate/up) get their update RMS back. The schedule
(`lr_at`) gives a factor lr_at/--lr each step, and every group gets its own base lr times that
factor. Weight decay: AdamW as before (`--weight-decay` on 2-D weights that are not embeddings;
with Muon that leaves only an untied head), decoupled `--muon-weight-decay` (default 0, as Keller's
Muon) on the Muon group: param *= 1 - lr * wd before the update.

The update itself is `torch.optim.Muon`'s (no second copy here); `MuonAdamW` only steps the two
torch optimizers together and keeps one state dict in torch's format (int-keyed state, groups with
`params` index lists, AdamW's groups first), so `optimizer.pt` stays loadable with
`torch.load(weights_only=True)` and resumes exactly.
"""

from __future__ import annotations

from typing import Any

import torch

from llmcore.errors import LLMCoreError

OPTIMIZERS = ("adamw", "muon")
LR_SCHEDULES = ("cosine", "wsd")
MUON_ADJUST_LR = "original"


def is_muon_param(name: str, p: torch.nn.Parameter) -> bool:
    """A hidden weight matrix that Muon updates (see the module docstring)."""
    if p.dim() != 2 or not name.startswith("layers.") or not name.endswith(".weight"):
        return False
    return not name.endswith(".mlp.gate.weight")  # the MoE router (dense MLPs use gate_proj)


def adamw_groups(named: list[tuple[str, torch.nn.Parameter]], weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay 2-D weights, not norms, biases, or the (tied) token embedding."""
    decay = [p for n, p in named if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in named if not (p.dim() >= 2 and "embed" not in n)]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def group_names(model: torch.nn.Module, optimizer: str) -> dict[str, list[str]]:
    """Parameter names per group, as `make_optimizer` builds them: keys `muon`, `adamw_decay`,
    `adamw_no_decay` (empty ones left out)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    muon = [n for n, p in named if optimizer == "muon" and is_muon_param(n, p)]
    rest = [(n, p) for n, p in named if n not in set(muon)]
    decay = [n for n, p in rest if p.dim() >= 2 and "embed" not in n]
    no_decay = [n for n, p in rest if not (p.dim() >= 2 and "embed" not in n)]
    out = {"muon": muon, "adamw_decay": decay, "adamw_no_decay": no_decay}
    return {k: v for k, v in out.items() if v}


class MuonAdamW:
    """`torch.optim.Muon` on the hidden matrices and `torch.optim.AdamW` on the rest, stepped together.

    Quacks like a torch optimizer where the engine needs it: `param_groups` (AdamW's, then Muon's;
    each has `base_lr` for the schedule), `step`, `zero_grad`, `state_dict`, `load_state_dict`."""

    def __init__(self, adamw: torch.optim.Optimizer, muon: torch.optim.Optimizer) -> None:
        self.adamw, self.muon = adamw, muon

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.adamw.param_groups + self.muon.param_groups

    @property
    def state(self) -> dict[Any, Any]:
        return {**self.adamw.state, **self.muon.state}

    def step(self) -> None:
        self.adamw.step()
        self.muon.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.adamw.zero_grad(set_to_none=set_to_none)
        self.muon.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        a, m = self.adamw.state_dict(), self.muon.state_dict()
        offset = sum(len(g["params"]) for g in a["param_groups"])
        state = {**a["state"], **{int(k) + offset: v for k, v in m["state"].items()}}
        groups = [dict(g, optimizer="adamw") for g in a["param_groups"]]
        groups += [dict(g, optimizer="muon", params=[i + offset for i in g["params"]]) for g in m["param_groups"]]
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        groups = sd.get("param_groups", [])
        kinds = [g.get("optimizer", "adamw") for g in groups]
        if kinds != ["adamw"] * len(self.adamw.param_groups) + ["muon"] * len(self.muon.param_groups):
            raise LLMCoreError(
                "the checkpoint's optimizer state is not this run's --optimizer muon groups "
                f"(saved groups: {', '.join(kinds) or 'none'})"
            )
        na = len(self.adamw.param_groups)
        offset = sum(len(g["params"]) for g in groups[:na])
        strip = lambda g: {k: v for k, v in g.items() if k != "optimizer"}  # noqa: E731
        a_ids = {i for g in groups[:na] for i in g["params"]}
        self.adamw.load_state_dict(
            {
                "state": {k: v for k, v in sd["state"].items() if int(k) in a_ids},
                "param_groups": [strip(g) for g in groups[:na]],
            }
        )
        self.muon.load_state_dict(
            {
                "state": {int(k) - offset: v for k, v in sd["state"].items() if int(k) not in a_ids},
                "param_groups": [dict(strip(g), params=[i - offset for i in g["params"]]) for g in groups[na:]],
            }
        )


def make_optimizer(model: torch.nn.Module, cfg: Any, fused: bool = False) -> torch.optim.Optimizer | MuonAdamW:
    """The plain engine's optimizer for `cfg.optimizer`; every group carries `base_lr`."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    kind = getattr(cfg, "optimizer", "adamw")
    muon_named = [(n, p) for n, p in named if kind == "muon" and is_muon_param(n, p)]
    muon_ids = {id(p) for _, p in muon_named}
    groups = adamw_groups([(n, p) for n, p in named if id(p) not in muon_ids], cfg.weight_decay)
    for g in groups:
        g["base_lr"] = cfg.lr
    adamw = torch.optim.AdamW(
        groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps, fused=fused or None
    )
    if kind != "muon":
        return adamw
    if not muon_named:
        raise LLMCoreError(
            "--optimizer muon: no hidden weight matrix trains in this run (LoRA trains only its "
            "adapters); use --optimizer adamw"
        )
    muon = torch.optim.Muon(
        [{"params": [p for _, p in muon_named], "base_lr": cfg.muon_lr}],
        lr=cfg.muon_lr,
        weight_decay=cfg.muon_weight_decay,
        momentum=cfg.muon_momentum,
        nesterov=True,
        adjust_lr_fn=MUON_ADJUST_LR,
    )
    return MuonAdamW(adamw, muon)


def set_lr(optimizer: Any, lr: float, base_lr: float) -> None:
    """Apply the schedule's `lr` (for a group whose base is `base_lr`, i.e. --lr): a group with the
    same base gets `lr` itself, any other (Muon's) its own base times lr / base_lr."""
    scale = lr / base_lr if base_lr else 1.0
    for g in optimizer.param_groups:
        b = g.get("base_lr", base_lr)
        g["lr"] = lr if b == base_lr else b * scale


__all__ = ["OPTIMIZERS", "LR_SCHEDULES", "MuonAdamW", "make_optimizer", "set_lr", "group_names", "is_muon_param"]
