"""The optimizers of both engines: AdamW (MiniMind's) or Muon on the hidden matrices + AdamW on the
rest (`--optimizer muon`, as modded-nanogpt and nanochat).

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

Plain engine: the update itself is `torch.optim.Muon`'s (no second copy here); `MuonAdamW` steps the two
torch optimizers together and keeps one state dict in torch's format (int-keyed state, groups with
`params` index lists, AdamW's groups first), so `optimizer.pt` stays loadable with
`torch.load(weights_only=True)` and resumes exactly.

Under DeepSpeed (`--deepspeed` with ZeRO stage 1 or 2) the same update is DeepSpeed's own ZeRO Muon
(`deepspeed.runtime.zero.muon`): `zero_muon_optimizer` hands DeepSpeed a `MuonWithAuxAdam` built
from the groups above (each parameter tagged `use_muon`), with `torch.optim.AdamW` as its AdamW.
ZeRO-1/2 all-reduces each Muon matrix's whole gradient to every rank whose partition holds part
of it, and that rank runs Muon's update on the whole matrix before keeping its slice: momentum
m = mu m + (1-mu) g, Nesterov u = (1-mu) g + mu m, the same quintic Newton-Schulz (5 steps, same
coefficients, normalised by |u|_F + 1e-7; `MUON_NS_METHOD`), times sqrt(max(1, A/B)); then
param *= 1 - lr wd and param -= lr * update. So both engines take the same step; only the
Newton-Schulz precision differs (torch's bf16 against DeepSpeed's fp16, or fp32 on a CPU without
fp16 matmuls): losses agree to ~3e-5 over a few steps (tests/test_train_muon_zero.py). With
`--dtype bf16` DeepSpeed keeps the momentum in the gradients' dtype, bf16. What is refused, in one
line each (`check_muon_zero`; `check_muon_deepspeed` when the config is resolved), because
DeepSpeed's Muon there is not this update:
- ZeRO-0 and ZeRO-3 (ZeRO-3 shards the matrices and runs a different sub-group path; stage 0
  wraps no ZeRO optimizer), and optimizer offload (a separate CPU path);
- `--grad-clip` > 0: ZeRO clips after Muon has replaced the gradient by its orthogonalised
  update, so the clip would shrink Muon's step by the update's norm instead of clipping the
  gradient; with Muon under DeepSpeed, pass `--grad-clip 0`. (For the same reason the norm
  DeepSpeed reports, the trainer's `grad_norm`, is the norm of the update there, not of the gradient.)
Each Muon matrix's momentum lives in a flat per-rank buffer laid out over the whole parameters of
that rank's partition (`zero_muon_momentum`); `gather_zero_momentum` / `scatter_zero_momentum`
turn it into / from one full tensor per parameter name for the checkpoint.
"""

from __future__ import annotations

import json
from typing import Any, Iterator

import torch

from llmcore.errors import LLMCoreError
from llmcore.train.deepspeed_config import DEEPSPEED_CONFIGS, deepspeed_config_path

OPTIMIZERS = ("adamw", "muon")
LR_SCHEDULES = ("cosine", "wsd")
MUON_ADJUST_LR = "original"
MUON_ZERO_STAGES = (1, 2)
# DeepSpeed's "gram" Newton-Schulz applies the same quintic polynomial through the Gram matrix X X^T
# (exact in exact arithmetic; one restart keeps it so in half precision) and runs in fp16 where the
# accelerator has it, else fp32: closer to the published iteration than its "standard" (bf16 with a
# rounding after every op: measured, about twice the deviation of torch's from a float64 iteration).
MUON_NS_METHOD = "gram"


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
    def adamw_size(self) -> int:
        """How many parameters AdamW holds: the state dict numbers Muon's from here on."""
        return sum(len(g["params"]) for g in self.adamw.param_groups)

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
        offset = self.adamw_size
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


def offloads_optimizer(zero: dict[str, Any]) -> bool:
    """Whether a `zero_optimization` section moves the optimizer state off the accelerator."""
    off = zero.get("offload_optimizer")
    return isinstance(off, dict) and str(off.get("device", "none")).lower() not in ("none", "")


def check_muon_zero(zero: dict[str, Any], grad_clip: float, config: str) -> None:
    """Refuse, in one line, the DeepSpeed settings under which DeepSpeed's Muon is not Muon's update
    (see the module docstring). `zero`: the config's `zero_optimization` section; `config`: the
    --deepspeed value, for the message."""
    stage = int(zero.get("stage", 0))
    if stage not in MUON_ZERO_STAGES:
        raise LLMCoreError(
            f"--optimizer muon with --deepspeed {config}: ZeRO stage {stage} is not supported "
            "(DeepSpeed's Muon is Muon's update only under ZeRO-1/2); use --deepspeed zero1 or zero2"
        )
    if offloads_optimizer(zero):
        raise LLMCoreError(
            f"--optimizer muon with --deepspeed {config}: optimizer offload is not supported "
            "with Muon; remove offload_optimizer from the config"
        )
    if grad_clip > 0:
        raise LLMCoreError(
            f"--optimizer muon with --deepspeed needs --grad-clip 0 (got {grad_clip:g}): ZeRO clips "
            "Muon's orthogonalised update, not the gradient, which would shrink Muon's step"
        )


def check_muon_deepspeed(deepspeed: str, grad_clip: float) -> None:
    """The part of `check_muon_zero` the settings decide before the run: --grad-clip, and the stage
    of a shipped config (`--deepspeed NAME`, package data). A JSON path of the user's is checked by
    the engine when it reads the file (settings are checked without looking at the machine)."""
    zero: dict[str, Any] = {"stage": 1}  # a stage check_muon_zero accepts: the file decides later
    if deepspeed in DEEPSPEED_CONFIGS:
        shipped = json.loads(deepspeed_config_path(deepspeed).read_text())
        zero = shipped.get("zero_optimization", {})
    check_muon_zero(zero, grad_clip, deepspeed)


def zero_muon_optimizer(model: torch.nn.Module, cfg: Any) -> torch.optim.Optimizer:
    """DeepSpeed's `MuonWithAuxAdam` for ZeRO-1/2 with exactly `make_optimizer`'s groups, rates and
    decay: Muon (Nesterov, `MUON_NS_METHOD`) on `is_muon_param`, torch's AdamW on the rest. Tags
    every trainable parameter's `use_muon`, which ZeRO reads to run Muon on the whole matrix."""
    from deepspeed.runtime.zero.muon.muon_optimizer import MuonWithAuxAdam

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    for n, p in named:
        p.use_muon = is_muon_param(n, p)  # type: ignore[attr-defined]
    muon = [p for _, p in named if p.use_muon]  # type: ignore[attr-defined]
    if not muon:
        raise LLMCoreError(
            "--optimizer muon: no hidden weight matrix trains in this run (LoRA trains only its "
            "adapters); use --optimizer adamw"
        )
    betas = (cfg.adam_beta1, cfg.adam_beta2)
    groups = adamw_groups([(n, p) for n, p in named if not p.use_muon], cfg.weight_decay)  # type: ignore[attr-defined]
    for g in groups:
        g.update(use_muon=False, lr=cfg.lr, base_lr=cfg.lr, betas=betas, eps=cfg.adam_eps)
    groups.append(
        {
            "params": muon,
            "use_muon": True,
            "lr": cfg.muon_lr,
            "base_lr": cfg.muon_lr,
            "momentum": cfg.muon_momentum,
            "weight_decay": cfg.muon_weight_decay,
            "ns_method": MUON_NS_METHOD,
        }
    )
    return MuonWithAuxAdam(
        groups,
        adam_optimizer=torch.optim.AdamW,
        adam_optimizer_kwargs={"lr": cfg.lr, "betas": betas, "eps": cfg.adam_eps},
    )


def zero_muon_momentum(zero_optimizer: Any, create: bool = False) -> Iterator[tuple[torch.nn.Parameter, torch.Tensor]]:
    """(parameter, view of its momentum) for every Muon matrix this rank's ZeRO-1/2 partitions hold.

    DeepSpeed keeps one flat momentum buffer per Muon group and rank, laid out over the *whole*
    parameters of `params_in_partition` in order (a matrix split across ranks has a full copy on
    each: every one of them runs the update on the whole matrix). `create`: make zero buffers
    where a fresh engine has none yet (before its first step), to load a checkpoint into.
    This reads DeepSpeed privates (`params_in_partition`, the flat group's `momentum_buffer`):
    only the pinned DeepSpeed version guards it."""
    basic = zero_optimizer.optimizer
    for i, params in enumerate(zero_optimizer.params_in_partition):
        if not params or not basic.param_groups[i].get("use_muon", False):
            continue
        flat = basic.param_groups[i]["params"][0]
        state = basic.state[flat]
        if "momentum_buffer" not in state:
            if not create:
                continue
            state["momentum_buffer"] = torch.zeros(sum(p.numel() for p in params), dtype=flat.dtype, device=flat.device)
        buf, offset = state["momentum_buffer"], 0
        for p in params:
            yield p, buf.narrow(0, offset, p.numel()).view(p.shape)
            offset += p.numel()


def gather_zero_momentum(zero_optimizer: Any, module: torch.nn.Module, keep: bool) -> dict[str, torch.Tensor]:
    """`{"momentum_buffer/NAME": full fp32 momentum}` for every Muon matrix, on the CPU; empty before
    the first step. A collective (every rank calls it); only ranks with `keep` collect."""
    import torch.distributed as dist

    local = {id(p): m for p, m in zero_muon_momentum(zero_optimizer)}
    named = [(n, p) for n, p in module.named_parameters() if getattr(p, "use_muon", False)]
    device = next(iter(local.values())).device if local else named[0][1].device
    world = dist.get_world_size()
    # The lowest rank holding a matrix sends it; every copy is the same (each holder ran the update).
    holder = torch.tensor([dist.get_rank() if id(p) in local else world for _, p in named], device=device)
    dist.all_reduce(holder, op=dist.ReduceOp.MIN)
    out: dict[str, torch.Tensor] = {}
    for (name, p), h in zip(named, holder.tolist()):
        if h == world:  # no rank has momentum yet: no step taken
            continue
        t = local[id(p)].float().clone() if h == dist.get_rank() else torch.zeros(p.shape, device=device)
        dist.all_reduce(t)
        if keep:
            out[f"momentum_buffer/{name}"] = t.cpu().contiguous()
    return out


def scatter_zero_momentum(
    zero_optimizer: Any, module: torch.nn.Module, state: dict[str, torch.Tensor], source: Any
) -> None:
    """Write `momentum_buffer/NAME` tensors into this rank's ZeRO-1/2 Muon buffers; a matrix without
    one is an LLMCoreError naming `source` (the checkpoint file). Local: no collective."""
    names = {id(p): n for n, p in module.named_parameters()}
    for p, m in zero_muon_momentum(zero_optimizer, create=True):
        t = state.get(f"momentum_buffer/{names[id(p)]}")
        if t is None:
            raise LLMCoreError(f"{source} has no Muon momentum for {names[id(p)]} (written with --optimizer adamw?)")
        with torch.no_grad():
            m.copy_(t.to(m.device, m.dtype))


def set_lr(optimizer: Any, lr: float, base_lr: float) -> None:
    """Apply the schedule's `lr` (for a group whose base is `base_lr`, i.e. --lr): a group with the
    same base gets `lr` itself, any other (Muon's) its own base times lr / base_lr."""
    scale = lr / base_lr if base_lr else 1.0
    for g in optimizer.param_groups:
        b = g.get("base_lr", base_lr)
        g["lr"] = lr if b == base_lr else b * scale


__all__ = [
    "OPTIMIZERS",
    "LR_SCHEDULES",
    "MUON_ZERO_STAGES",
    "MuonAdamW",
    "check_muon_deepspeed",
    "check_muon_zero",
    "gather_zero_momentum",
    "group_names",
    "is_muon_param",
    "make_optimizer",
    "offloads_optimizer",
    "scatter_zero_momentum",
    "set_lr",
    "zero_muon_momentum",
    "zero_muon_optimizer",
]
