"""Two engines behind one interface (`llmcore.train.protocols.Engine`): plain PyTorch (AdamW or Muon,
one process) and DeepSpeed (ZeRO 0-3, any number of processes and nodes).

An engine owns three things nothing else decides:
- the device (`--device`, resolved by `llmcore.common.resolve_device` when the engine is made, so a
  `--device cuda` on a machine without CUDA fails here, not when the settings are checked): the model,
  the batches it is handed and the loss live there; batches move from pinned memory without blocking;
- the process group: joined when a DeepSpeed engine is made (`distributed.init_distributed`); the engine
  never leaves it: a group this process made for itself is destroyed at interpreter exit
  (`distributed.release_standalone`), one made under a launcher by the CLI (`shutdown_distributed`,
  then `os._exit`);
- the precision: `--dtype auto` is bf16 autocast over fp32 master weights on CUDA and fp32 on CPU;
  on CUDA TF32 matmuls are allowed and AdamW is the fused kernel.

The Trainer calls, per micro batch: `forward(batch)`, `backward(loss)`, then `micro_step_end(boundary,
lr)`; on the last micro batch of a global batch (`boundary`) the engine clips, applies the optimizer
with `lr` and returns the gradient norm as a device tensor (no host sync). The LR schedule lives in
the Trainer, so both engines get exactly the same rates. DeepSpeed is imported only when a DeepSpeed
engine is built. What the engines write to disk (optimizer.pt, optimizer.safetensors) and how the ZeRO
partitions are gathered is `optim_state.py`; the DeepSpeed JSON is `deepspeed_config.py`.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch

from llmcore.common import resolve_device, to_device
from llmcore.errors import LLMCoreError
from llmcore.train.deepspeed_config import build_ds_config, deepspeed_config_path
from llmcore.train.distributed import active_dist, init_distributed, peer_errors
from llmcore.train.optim import (
    MuonAdamW,
    check_muon_zero,
    gather_zero_momentum,
    group_names,
    make_optimizer,
    scatter_zero_momentum,
    set_lr,
    zero_muon_optimizer,
)
from llmcore.train.optim_state import (
    gather_named_state,
    named_optimizer_state,
    optimizer_step,
    read_optimizer_pt,
    scatter_named_state,
    write_optimizer_pt,
    write_optimizer_safetensors,
)
from llmcore.train.protocols import model_positions

if TYPE_CHECKING:
    from llmcore.train.config import TrainConfig


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay the 2-D weight matrices of linear layers; not norms, biases, or the
    (tied) token embedding, since shrinking embedding rows of rare tokens toward 0 only hurts them."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.dim() >= 2 and "embed" not in name:
            decay.append(p)
        else:
            no_decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def plain_state_order(model: torch.nn.Module, weight_decay: float, optimizer: str = "adamw") -> list[str]:
    """The parameter names in the order the plain engine's `optimizer.pt` numbers them: AdamW's
    `param_groups` order; with `optimizer` muon, `MuonAdamW`'s (AdamW's groups, then Muon's)."""
    if optimizer == "muon":
        groups = group_names(model, "muon")
        return [n for key in ("adamw_decay", "adamw_no_decay", "muon") for n in groups.get(key, [])]
    names = {p: n for n, p in model.named_parameters()}
    return [names[p] for g in param_groups(model, weight_decay) for p in g["params"]]


def resolve_dtype(dtype: str, device: torch.device) -> str:
    """`auto` is bf16 on CUDA (where bf16 tensor cores are the fast path) and fp32 on CPU."""
    if dtype == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return dtype


def autocast_ctx(dtype: str, device: torch.device | str = "cpu") -> contextlib.AbstractContextManager:
    """bf16 autocast on the device; fp32 runs with autocast off."""
    device_type = torch.device(device).type
    if dtype == "bf16":
        if device_type == "cuda" and not torch.cuda.is_bf16_supported():
            raise LLMCoreError("--dtype bf16: this GPU does not support bfloat16; use --dtype fp32")
        return torch.autocast(device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class _EngineBase:
    """Device, precision and collectives shared by both engines."""

    kind = "base"

    def __init__(self, cfg: TrainConfig, device: torch.device, rank: int, world: int) -> None:
        self.cfg = cfg
        self.device = device
        self.rank, self.world = rank, world
        self.dtype = resolve_dtype(cfg.dtype, device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
            # TF32 for the fp32 matmuls autocast leaves (and fp32 runs); bf16 ones are unaffected.
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.module: torch.nn.Module = torch.nn.Identity()

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast_ctx(self.dtype, self.device)

    def to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        return to_device(batch, self.device)

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        d = active_dist()
        if d is not None and d.get_world_size() > 1:
            t = t.clone()
            with peer_errors("a step's all-reduce"):
                d.all_reduce(t, op=d.ReduceOp.SUM)
        return t

    def barrier(self) -> None:
        d = active_dist()
        if d is not None and d.get_world_size() > 1:
            with peer_errors("a barrier"):
                d.barrier()


class PlainEngine(_EngineBase):
    """One process: `make_optimizer`'s AdamW (fused on CUDA) or Muon + AdamW; optional torch.compile."""

    kind = "plain"

    def __init__(self, cfg: TrainConfig) -> None:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise LLMCoreError("more than one process needs DeepSpeed: add --deepspeed zero2")
        super().__init__(cfg, resolve_device(cfg.device), 0, 1)

    def prepare(self, model: torch.nn.Module, accum: int) -> None:
        self.module = model.to(self.device)
        # AdamW (fused on CUDA), or --optimizer muon: torch's Muon on the hidden matrices + AdamW.
        self.optimizer = make_optimizer(model, self.cfg, fused=self.device.type == "cuda")
        self._fwd = torch.compile(model) if self.cfg.compile else model

    def forward(self, batch: dict[str, Any]) -> Any:
        with self.autocast():
            return self._fwd(batch["input_ids"], position_ids=model_positions(batch))

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def micro_step_end(self, boundary: bool, lr: float) -> torch.Tensor | None:
        if not boundary:
            return None
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if self.cfg.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        set_lr(self.optimizer, lr, self.cfg.lr)  # each group: its base lr times the schedule's factor
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm.detach()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    @contextlib.contextmanager
    def full_weights(self) -> Iterator[torch.nn.Module]:
        yield self.module

    def save_state(self, step_dir: Path) -> None:
        write_optimizer_pt(step_dir, self.optimizer.state_dict())

    def load_state(self, step_dir: Path) -> None:
        if not (step_dir / "optimizer.pt").is_file() and (step_dir / "optimizer.safetensors").is_file():
            # Written by a DeepSpeed run (any world size, any ZeRO stage): the name-keyed full state.
            state, step = named_optimizer_state(step_dir, [])
            names = {p: n for n, p in self.module.named_parameters()}
            sd = self.optimizer.state_dict()
            sd["state"] = {}
            idx = 0
            for g in self.optimizer.param_groups:
                for p in g["params"]:
                    n = names[p]
                    if f"master/{n}" in state:
                        with torch.no_grad():
                            p.copy_(state[f"master/{n}"].to(p.device, p.dtype))
                    muon = isinstance(self.optimizer, MuonAdamW) and idx >= self.optimizer.adamw_size
                    keys = ("momentum_buffer",) if muon else ("exp_avg", "exp_avg_sq")
                    missing = [k for k in keys if f"{k}/{n}" not in state]
                    if missing:
                        raise LLMCoreError(
                            f"{step_dir}/optimizer.safetensors has no {missing[0]} for {n} "
                            f"(written with another --optimizer than {self.cfg.optimizer})"
                        )
                    sd["state"][idx] = {k: state[f"{k}/{n}"] for k in keys}
                    if not muon:
                        sd["state"][idx]["step"] = torch.tensor(step)
                    idx += 1
            self.optimizer.load_state_dict(sd)
            return
        # load_state_dict casts and moves the state to each parameter's device and dtype.
        self.optimizer.load_state_dict(read_optimizer_pt(step_dir))

    def train(self, mode: bool = True) -> None:
        self.module.train(mode)


class DeepSpeedEngine(_EngineBase):
    """deepspeed.initialize around the model; ZeRO stage from the JSON config. Making the engine joins
    the process group, so rank and world size are known before data and model are built."""

    kind = "deepspeed"

    def __init__(self, cfg: TrainConfig) -> None:
        # The device and the config file are looked at before the group is joined: a wrong one is
        # one line, not a rendezvous the other processes wait on.
        device = resolve_device(cfg.device)
        config_path = deepspeed_config_path(cfg.deepspeed)  # type: ignore[arg-type]
        rank, world, self.standalone = init_distributed(device)
        super().__init__(cfg, device, rank, world)
        self.config_path = config_path

    def prepare(self, model: torch.nn.Module, accum: int) -> None:
        import deepspeed

        self.ds_config = build_ds_config(self.config_path, self.cfg, self.world, accum, self.dtype)
        zero = self.ds_config.get("zero_optimization", {})
        self.stage = int(zero.get("stage", 0))
        self.muon = self.cfg.optimizer == "muon"
        if self.muon:
            # DeepSpeed's ZeRO-1/2 Muon, handed over built (llmcore/train/optim.py), not from the JSON.
            check_muon_zero(zero, self.cfg.grad_clip, str(self.cfg.deepspeed))
            self.ds_config.pop("optimizer", None)
            self.engine, self.optimizer, _, _ = deepspeed.initialize(
                model=model, optimizer=zero_muon_optimizer(model, self.cfg), config=self.ds_config
            )
        else:
            self.engine, self.optimizer, _, _ = deepspeed.initialize(
                model=model, model_parameters=param_groups(model, self.cfg.weight_decay), config=self.ds_config
            )
        self.module = self.engine.module
        if self.cfg.compile:
            self.engine.compile()

    def forward(self, batch: dict[str, Any]) -> Any:
        # With a bf16 section DeepSpeed holds bf16 weights itself; autocast covers fp32 inputs to them.
        with self.autocast(), peer_errors("the forward pass"):
            return self.engine(batch["input_ids"], position_ids=model_positions(batch))

    def backward(self, loss: torch.Tensor) -> None:
        # The objective already divides by the global batch's loss-token count, so no extra 1/accum.
        with peer_errors("the backward pass"):
            self.engine.backward(loss, scale_wrt_gas=False)

    def micro_step_end(self, boundary: bool, lr: float) -> torch.Tensor | None:
        with peer_errors("the optimizer step"):
            return self._micro_step_end(boundary, lr)

    def _micro_step_end(self, boundary: bool, lr: float) -> torch.Tensor | None:
        if boundary != self.engine.is_gradient_accumulation_boundary():
            raise RuntimeError("DeepSpeed's gradient accumulation count is out of step with the Trainer")
        norm: Any = None
        if boundary:
            set_lr(self.engine.optimizer, lr, self.cfg.lr)  # Muon's group: --muon-lr times the schedule
            if self.stage == 0:
                params = [p for p in self.module.parameters() if p.grad is not None]
                if self.cfg.grad_clip > 0:
                    norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
                else:
                    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        self.engine.step()
        if not boundary:
            return None
        if norm is None:
            norm = self.engine.get_global_grad_norm()
        if norm is None:
            return torch.tensor(float("nan"))
        return norm.detach() if torch.is_tensor(norm) else torch.tensor(float(norm))

    def zero_grad(self) -> None:
        self.engine.zero_grad()

    @contextlib.contextmanager
    def full_weights(self) -> Iterator[torch.nn.Module]:
        """The whole module with full parameters on every rank (ZeRO-3 gathers the partitions)."""
        if self.stage == 3:
            import deepspeed

            with (
                peer_errors("gathering the weights"),
                deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None),
            ):
                yield self.module
        else:
            yield self.module

    # -- optimizer state, independent of the world size (formats and gathering: optim_state.py) ----

    def save_state(self, step_dir: Path) -> None:
        with peer_errors("gathering the optimizer state"):
            tensors = gather_named_state(self.engine, self.module, keep=self.rank == 0)
            if self.muon:
                tensors.update(gather_zero_momentum(self.engine.optimizer, self.module, keep=self.rank == 0))
        if self.rank == 0:
            meta = {
                "engine": "deepspeed",
                "zero_stage": str(self.stage),
                "world_size": str(self.world),
                "step": repr(optimizer_step(self.engine)),
            }
            write_optimizer_safetensors(step_dir, tensors, meta)

    def load_state(self, step_dir: Path) -> None:
        order = plain_state_order(self.module, self.cfg.weight_decay, self.cfg.optimizer)
        state, step = named_optimizer_state(step_dir, order, self.cfg.optimizer)
        with peer_errors("restoring the optimizer state"):
            scatter_named_state(
                self.engine,
                self.module,
                state,
                step,
                self.device,
                relink=self.stage > 0 or self.dtype == "bf16",
                source=step_dir / "optimizer.safetensors",
            )
            if self.muon:
                scatter_zero_momentum(self.engine.optimizer, self.module, state, step_dir / "optimizer.safetensors")
            self.engine.global_steps = int(step)
            self.engine.global_samples = int(step) * self.engine.train_batch_size()

    def train(self, mode: bool = True) -> None:
        self.engine.train(mode)


def make_engine(cfg: TrainConfig) -> PlainEngine | DeepSpeedEngine:
    """The engine a resolved config asks for; joins the process group for DeepSpeed runs."""
    if cfg.deepspeed is not None:
        return DeepSpeedEngine(cfg)
    return PlainEngine(cfg)


__all__ = [
    "PlainEngine",
    "DeepSpeedEngine",
    "make_engine",
    "param_groups",
    "plain_state_order",
    "autocast_ctx",
    "resolve_dtype",
]
