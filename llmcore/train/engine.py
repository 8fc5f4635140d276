"""Two engines behind one interface (`llmcore.train.protocols.Engine`): plain PyTorch (AdamW, one
process) and DeepSpeed (ZeRO 0-3, any number of processes and nodes).

An engine owns three things nothing else decides:
- the device (`--device`, resolved by `llmcore.common.resolve_device`): the model, the batches it is
  handed and the loss live there; batches move from pinned memory without blocking;
- the process group: joined when the engine is made (DeepSpeed), left by `close()` /
  `shutdown_distributed()` (torch 2.13's gloo teardown at interpreter exit can abort a finished
  process, so the group is destroyed while the interpreter is healthy);
- the precision: `--dtype auto` is bf16 autocast over fp32 master weights on CUDA and fp32 on CPU;
  on CUDA TF32 matmuls are allowed and AdamW is the fused kernel.

The Trainer calls, per micro batch: `forward(batch)`, `backward(loss)`, then `micro_step_end(boundary,
lr)`; on the last micro batch of a global batch (`boundary`) the engine clips, applies the optimizer
with `lr` and returns the gradient norm as a device tensor (no host sync). The LR schedule lives in
the Trainer, so both engines get exactly the same rates. DeepSpeed is imported only when a DeepSpeed
engine is built.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import socket
from pathlib import Path
from typing import Any, Iterator

import torch

from llmcore.common import resolve_device
from llmcore.errors import LLMCoreError
from llmcore.train.config import TrainConfig
from llmcore.train.stages import to_device


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


def deepspeed_config_path(spec: str) -> Path:
    """A named DeepSpeed config shipped with llmcore (zero0 ... zero3-offload) or a JSON file."""
    try:
        from llmcore.launch import deepspeed_config_path as packaged
    except ImportError:
        packaged = None
    if packaged is not None:
        return packaged(spec)
    path = Path(spec)
    if not path.is_file():
        raise LLMCoreError(f"--deepspeed {spec}: no such DeepSpeed config file")
    return path


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
        d = _dist()
        if d is not None and d.get_world_size() > 1:
            t = t.clone()
            d.all_reduce(t, op=d.ReduceOp.SUM)
        return t

    def barrier(self) -> None:
        d = _dist()
        if d is not None and d.get_world_size() > 1:
            d.barrier()

    def close(self) -> None:
        """Leave the process group if this engine's run joined one (a no-op in one plain process)."""


class PlainEngine(_EngineBase):
    """One process, torch.optim.AdamW (fused on CUDA), optional torch.compile."""

    kind = "plain"

    def __init__(self, model: torch.nn.Module | None, cfg: TrainConfig, device: torch.device | None = None) -> None:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise LLMCoreError("more than one process needs DeepSpeed: add --deepspeed zero2")
        super().__init__(cfg, device if device is not None else resolve_device(cfg.device), 0, 1)
        if model is not None:
            self.prepare(model, 1)

    def prepare(self, model: torch.nn.Module, accum: int) -> None:
        self.module = model.to(self.device)
        fused = self.device.type == "cuda"
        self.optimizer = torch.optim.AdamW(param_groups(model, self.cfg.weight_decay), lr=self.cfg.lr,
                                           betas=(self.cfg.adam_beta1, self.cfg.adam_beta2), eps=self.cfg.adam_eps,
                                           fused=fused or None)
        self._fwd = torch.compile(model) if self.cfg.compile else model

    def forward(self, batch: dict[str, Any]) -> Any:
        with self.autocast():
            return self._fwd(batch["input_ids"], position_ids=batch["position_ids"])

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
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm.detach()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    @contextlib.contextmanager
    def full_weights(self) -> Iterator[torch.nn.Module]:
        yield self.module

    def save_state(self, step_dir: Path) -> None:
        # Plain tensors and Python scalars only, so torch.load(weights_only=True) can read it back;
        # moved to the CPU so a checkpoint written on a GPU resumes anywhere.
        state = self.optimizer.state_dict()
        state = {"state": {k: {n: (t.to("cpu") if torch.is_tensor(t) else t) for n, t in v.items()}
                           for k, v in state["state"].items()}, "param_groups": state["param_groups"]}
        torch.save(state, step_dir / "optimizer.pt")

    def load_state(self, step_dir: Path) -> None:
        path = step_dir / "optimizer.pt"
        if not path.is_file():
            raise LLMCoreError(f"{step_dir}: no optimizer.pt; was this checkpoint written by a DeepSpeed run? "
                               "resume it with the same --deepspeed config")
        # load_state_dict casts and moves the state to each parameter's device and dtype.
        self.optimizer.load_state_dict(torch.load(path, weights_only=True, map_location="cpu"))

    def train(self, mode: bool = True) -> None:
        self.module.train(mode)


# ----------------------------------------------------------------------------------------------
# process group


def _dist() -> Any:
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_STANDALONE_KEYS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def init_distributed(device: torch.device) -> tuple[int, int, bool]:
    """Join torch.distributed through DeepSpeed (NCCL on CUDA, gloo on CPU); returns (rank,
    world_size, standalone).

    Under a launcher (deepspeed, torchrun) the rendezvous env is set. A one-process run started
    without one still needs it: then this process sets it (with a free port) and destroys the
    group at interpreter exit, before gloo's own teardown."""
    try:
        import deepspeed
    except ImportError as err:
        raise LLMCoreError("--deepspeed needs the deepspeed package: pip install -e '.[deepspeed]'") from err
    import torch.distributed as dist

    if device.type != "cuda":
        # Without CUDA DeepSpeed would probe for other accelerators; on CPU it uses gloo + shared memory.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    else:
        torch.cuda.set_device(device)
    standalone = False
    if not dist.is_initialized():
        if "WORLD_SIZE" not in os.environ and "RANK" not in os.environ:
            standalone = True
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=str(free_port()))
            atexit.register(release_standalone)
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", verbose=False)
    return dist.get_rank(), dist.get_world_size(), standalone


def release_standalone() -> None:
    """End the one-process group `init_distributed` made, while the interpreter is healthy: gloo's
    teardown at interpreter exit aborts some processes (SIGABRT)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    for k in _STANDALONE_KEYS:
        os.environ.pop(k, None)


def shutdown_distributed() -> None:
    """Destroy the process group if one is up (call before exiting a DeepSpeed run)."""
    d = _dist()
    if d is not None:
        try:
            d.barrier()
        except Exception:  # a peer already gone: tearing down is all that is left to do
            pass
        d.destroy_process_group()


def build_ds_config(path: str | Path, cfg: TrainConfig, world: int, accum: int, dtype: str) -> dict[str, Any]:
    """The JSON config with our batch sizes, optimizer settings, clipping and precision filled in, so
    the file only needs to say which ZeRO stage (and any DeepSpeed tuning) to use."""
    try:
        ds = json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise LLMCoreError(f"--deepspeed {path}: not valid JSON ({err})") from err
    ds["train_micro_batch_size_per_gpu"] = cfg.micro_batch_size
    ds["gradient_accumulation_steps"] = accum
    ds["train_batch_size"] = cfg.micro_batch_size * accum * world
    opt = ds.setdefault("optimizer", {"type": "AdamW", "params": {}})
    if str(opt.get("type", "")).lower() not in ("adamw", "adam"):
        raise LLMCoreError(f"--deepspeed {path}: only the AdamW optimizer is supported, got {opt.get('type')!r}")
    opt["type"] = "AdamW"
    params = opt.setdefault("params", {})
    # torch_adam: torch.optim.AdamW, the same update as the plain engine (no fused C++ op to build).
    params.update(lr=cfg.lr, betas=[cfg.adam_beta1, cfg.adam_beta2], eps=cfg.adam_eps,
                  weight_decay=cfg.weight_decay, torch_adam=True)
    params.setdefault("adam_w_mode", True)
    ds.pop("scheduler", None)  # the Trainer sets the LR every step
    ds["gradient_clipping"] = cfg.grad_clip
    ds.pop("fp16", None)
    if dtype == "bf16":
        ds["bf16"] = {"enabled": True}
    else:
        ds.pop("bf16", None)
    ds.setdefault("steps_per_print", 10**9)
    ds.setdefault("wall_clock_breakdown", False)
    return ds


class DeepSpeedEngine(_EngineBase):
    """deepspeed.initialize around the model; ZeRO stage from the JSON config. Making the engine joins
    the process group, so rank and world size are known before data and model are built."""

    kind = "deepspeed"

    def __init__(self, cfg: TrainConfig) -> None:
        device = resolve_device(cfg.device)
        rank, world, self.standalone = init_distributed(device)
        super().__init__(cfg, device, rank, world)
        self.config_path = deepspeed_config_path(cfg.deepspeed)  # type: ignore[arg-type]

    def prepare(self, model: torch.nn.Module, accum: int) -> None:
        import deepspeed

        self.ds_config = build_ds_config(self.config_path, self.cfg, self.world, accum, self.dtype)
        self.stage = int(self.ds_config.get("zero_optimization", {}).get("stage", 0))
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, model_parameters=param_groups(model, self.cfg.weight_decay), config=self.ds_config)
        self.module = self.engine.module
        if self.cfg.compile:
            self.engine.compile()

    def forward(self, batch: dict[str, Any]) -> Any:
        # With a bf16 section DeepSpeed holds bf16 weights itself; autocast covers fp32 inputs to them.
        with self.autocast():
            return self.engine(batch["input_ids"], position_ids=batch["position_ids"])

    def backward(self, loss: torch.Tensor) -> None:
        # The objective already divides by the global batch's loss-token count, so no extra 1/accum.
        self.engine.backward(loss, scale_wrt_gas=False)

    def micro_step_end(self, boundary: bool, lr: float) -> torch.Tensor | None:
        if boundary != self.engine.is_gradient_accumulation_boundary():
            raise RuntimeError("DeepSpeed's gradient accumulation count is out of step with the Trainer")
        norm: Any = None
        if boundary:
            for g in self.engine.optimizer.param_groups:
                g["lr"] = lr
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

            with deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None):
                yield self.module
        else:
            yield self.module

    def save_state(self, step_dir: Path) -> None:
        # Every rank writes its own partition into step_dir/engine/.
        self.engine.save_checkpoint(str(step_dir), tag="engine", save_latest=False)

    def load_state(self, step_dir: Path) -> None:
        if not (step_dir / "engine").is_dir():
            raise LLMCoreError(f"{step_dir}: no DeepSpeed engine state; this checkpoint was written without "
                               "--deepspeed, resume it without --deepspeed")
        path, _ = self.engine.load_checkpoint(str(step_dir), tag="engine", load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
        if path is None:
            raise LLMCoreError(f"{step_dir}/engine: DeepSpeed could not load this checkpoint")

    def train(self, mode: bool = True) -> None:
        self.engine.train(mode)

    def close(self) -> None:
        # A group this process made for itself is released at exit (release_standalone); under a
        # launcher the CLI ends it with shutdown_distributed() and os._exit.
        pass


def make_engine(cfg: TrainConfig) -> PlainEngine | DeepSpeedEngine:
    """The engine a resolved config asks for; joins the process group for DeepSpeed runs."""
    if cfg.deepspeed is not None:
        return DeepSpeedEngine(cfg)
    return PlainEngine(None, cfg)


__all__ = ["PlainEngine", "DeepSpeedEngine", "make_engine", "param_groups", "autocast_ctx", "resolve_dtype",
           "init_distributed", "shutdown_distributed", "free_port", "build_ds_config", "deepspeed_config_path"]
