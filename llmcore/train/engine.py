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
import datetime
import json
import os
import socket
from pathlib import Path
from typing import Any, Iterator

import torch

from llmcore.common import resolve_device, to_device
from llmcore.errors import LLMCoreError, install_hint
from llmcore.launch import deepspeed_config_path
from llmcore.train.config import TrainConfig
from llmcore.train.protocols import model_positions


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


# ZeRO flattens each group into 1-D partitions (stage 1/2) or shards the matrices (stage 3), and Muon
# needs each whole matrix; DeepSpeed's own Muon falls back to SGD at stage 0. Refused, not approximated.
MUON_DEEPSPEED = (
    "--optimizer muon runs on the plain engine only (one process): DeepSpeed ZeRO splits the "
    "matrices Muon orthogonalises; drop --deepspeed or use --optimizer adamw"
)


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
            with peer_errors("a step's all-reduce"):
                d.all_reduce(t, op=d.ReduceOp.SUM)
        return t

    def barrier(self) -> None:
        d = _dist()
        if d is not None and d.get_world_size() > 1:
            with peer_errors("a barrier"):
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
        from llmcore.train.optim import make_optimizer

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
        from llmcore.train.optim import set_lr

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
        # Plain tensors and Python scalars only, so torch.load(weights_only=True) can read it back;
        # moved to the CPU so a checkpoint written on a GPU resumes anywhere.
        state = self.optimizer.state_dict()
        state = {
            "state": {
                k: {n: (t.to("cpu") if torch.is_tensor(t) else t) for n, t in v.items()}
                for k, v in state["state"].items()
            },
            "param_groups": state["param_groups"],
        }
        torch.save(state, step_dir / "optimizer.pt")

    def load_state(self, step_dir: Path) -> None:
        if not (step_dir / "optimizer.pt").is_file() and (step_dir / "optimizer.safetensors").is_file():
            # Written by a DeepSpeed run (any world size, any ZeRO stage): the name-keyed full state.
            state, step = named_optimizer_state(step_dir, self.module, self.cfg.weight_decay)
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
                    sd["state"][idx] = {
                        "step": torch.tensor(step),
                        "exp_avg": state[f"exp_avg/{n}"],
                        "exp_avg_sq": state[f"exp_avg_sq/{n}"],
                    }
                    idx += 1
            self.optimizer.load_state_dict(sd)
            return
        # load_state_dict casts and moves the state to each parameter's device and dtype.
        self.optimizer.load_state_dict(read_optimizer_pt(step_dir))

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
        raise LLMCoreError("--deepspeed needs the deepspeed package: " + install_hint("deepspeed")) from err
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
            os.environ.update(
                RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())
            )
            atexit.register(release_standalone)
        deepspeed.init_distributed(
            dist_backend="nccl" if device.type == "cuda" else "gloo",
            verbose=False,
            timeout=datetime.timedelta(seconds=dist_timeout_s()),
        )
    return dist.get_rank(), dist.get_world_size(), standalone


DEFAULT_DIST_TIMEOUT_S = 600.0


def dist_timeout_s() -> float:
    """How long a collective waits for the other processes before failing: LLMCORE_DIST_TIMEOUT
    seconds (`llmcore launch --timeout`), default 600. A node that dies makes its peers fail at
    once (connection closed); one that hangs makes them fail after this long, never wait forever."""
    raw = os.environ.get("LLMCORE_DIST_TIMEOUT", "")
    if not raw:
        return DEFAULT_DIST_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        raise LLMCoreError(f"LLMCORE_DIST_TIMEOUT={raw!r}: expected seconds, e.g. 600") from None
    if value <= 0:
        raise LLMCoreError(f"LLMCORE_DIST_TIMEOUT={raw!r}: must be positive")
    return value


_PEER_LOST = False


def _first_sentence(text: str) -> str:
    """`[.../pair.cc:553] Connection closed by peer [127.0.0.1]:64170. This is ...` -> the part
    that says what happened."""
    import re

    line = text.strip().splitlines()[0] if text.strip() else "no detail"
    line = re.sub(r"^\[[^\]]*\.(cc|cpp|h|py):\d+\]\s*", "", line)
    return re.split(r"\.\s+(?=[A-Z])", line, maxsplit=1)[0].rstrip(".")[:160]


def peer_lost() -> bool:
    """True once a collective of this process failed because another process is gone."""
    return _PEER_LOST


@contextlib.contextmanager
def peer_errors(what: str) -> Iterator[None]:
    """Turn the error a collective raises when another process died or stopped answering (gloo:
    "Connection closed by peer", "Timed out"; NCCL: watchdog errors) into one LLMCoreError line."""
    global _PEER_LOST
    try:
        yield
    except LLMCoreError:
        raise
    except RuntimeError as err:
        import torch.distributed as dist

        text = str(err)
        markers = (
            "connection closed",
            "connection reset",
            "timed out",
            "timeout",
            "gloo",
            "nccl",
            "broken pipe",
            "socket",
            "peer",
        )
        if not (isinstance(err, getattr(dist, "DistError", ())) or any(m in text.lower() for m in markers)):
            raise
        _PEER_LOST = True
        raise LLMCoreError(
            f"lost contact with another process of this run during {what} (a node died, was "
            f"killed or stopped answering within {dist_timeout_s():g}s): {_first_sentence(text)}; "
            "restart the run "
            "with --resume to continue from its last checkpoint"
        ) from None


def release_standalone() -> None:
    """End the one-process group `init_distributed` made, while the interpreter is healthy: gloo's
    teardown at interpreter exit aborts some processes (SIGABRT)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    for k in _STANDALONE_KEYS:
        os.environ.pop(k, None)


def shutdown_distributed() -> None:
    """Destroy the process group if one is up (call before exiting a DeepSpeed run). After a lost
    peer there is nobody to meet: the group is left for os._exit to drop."""
    d = _dist()
    if d is not None and _PEER_LOST:
        return
    if d is not None:
        try:
            d.barrier()
        except Exception:  # a peer already gone: tearing down is all that is left to do
            pass
        d.destroy_process_group()


def _is_auto(v: Any) -> bool:
    return v is None or v == "auto"


def _check_agrees(path: Any, ds: dict[str, Any], key: str, value: Any, flag: str, ours: Any) -> None:
    v = ds.get(key)
    if not _is_auto(v) and v != value:
        raise LLMCoreError(
            f"--deepspeed {path} sets {key} {v!r}, but {flag} {ours} gives {value!r}; "
            f"remove it from the JSON (llmcore fills it in) or change {flag.split()[0]}"
        )


def build_ds_config(path: str | Path, cfg: TrainConfig, world: int, accum: int, dtype: str) -> dict[str, Any]:
    """The JSON config with our batch sizes, optimizer settings, clipping and precision filled in, so
    the file only needs to say which ZeRO stage (and any DeepSpeed tuning) to use.

    A value the trainer owns may be "auto" or absent in the file; set to anything else than the run's
    settings give, it is an error naming the key and the flag (the two cannot silently disagree)."""
    try:
        ds = json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise LLMCoreError(f"--deepspeed {path}: not valid JSON ({err})") from err
    if not isinstance(ds, dict):
        raise LLMCoreError(f"--deepspeed {path}: expected a JSON object")
    mb = cfg.micro_batch_size
    _check_agrees(path, ds, "train_micro_batch_size_per_gpu", mb, "--micro-batch-size", mb)
    _check_agrees(
        path,
        ds,
        "gradient_accumulation_steps",
        accum,
        "--global-batch-size",
        f"{cfg.global_batch_size} / (micro batch {mb} x {world} process(es))",
    )
    _check_agrees(path, ds, "train_batch_size", mb * accum * world, "--global-batch-size", cfg.global_batch_size)
    _check_agrees(path, ds, "gradient_clipping", cfg.grad_clip, "--grad-clip", cfg.grad_clip)
    for section, name in (("fp16", "fp16"), ("bf16", "bf16")):
        enabled = ds.get(section, {}).get("enabled", False) if isinstance(ds.get(section), dict) else False
        if enabled not in (False, "auto") and name != dtype:
            raise LLMCoreError(
                f"--deepspeed {path} enables {section}, but --dtype {cfg.dtype} runs {dtype}; "
                f"remove the {section} section (llmcore sets precision from --dtype) or pass "
                f"--dtype {name}" + (" (fp16 is not supported; use bf16)" if name == "fp16" else "")
            )
    ds["train_micro_batch_size_per_gpu"] = mb
    ds["gradient_accumulation_steps"] = accum
    ds["train_batch_size"] = mb * accum * world
    opt = ds.setdefault("optimizer", {"type": "AdamW", "params": {}})
    if str(opt.get("type", "")).lower() not in ("adamw", "adam"):
        raise LLMCoreError(f"--deepspeed {path}: only the AdamW optimizer is supported, got {opt.get('type')!r}")
    opt["type"] = "AdamW"
    params = opt.setdefault("params", {})
    for key, flag, ours in (
        ("lr", "--lr", cfg.lr),
        ("eps", "--adam-eps", cfg.adam_eps),
        ("weight_decay", "--weight-decay", cfg.weight_decay),
        ("betas", "--adam-beta1/--adam-beta2", [cfg.adam_beta1, cfg.adam_beta2]),
    ):
        _check_agrees(path, params, key, ours if key != "betas" else list(ours), flag, ours)
    # torch_adam: torch.optim.AdamW, the same update as the plain engine (no fused C++ op to build).
    params.update(
        lr=cfg.lr,
        betas=[cfg.adam_beta1, cfg.adam_beta2],
        eps=cfg.adam_eps,
        weight_decay=cfg.weight_decay,
        torch_adam=True,
    )
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


def read_optimizer_pt(step_dir: Path) -> dict[str, Any]:
    """The plain engine's optimizer.pt, loaded weights-only (a pickled payload is refused, never run)."""
    path = step_dir / "optimizer.pt"
    if not path.is_file():
        raise LLMCoreError(f"{step_dir}: no optimizer state (optimizer.pt or optimizer.safetensors)")
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as err:  # a truncated file, or a pickle the weights-only unpickler refuses
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise LLMCoreError(f"{path}: cannot be read safely ({first})") from None


def named_optimizer_state(
    step_dir: Path, module: torch.nn.Module, weight_decay: float
) -> tuple[dict[str, torch.Tensor], float]:
    """The optimizer state of a checkpoint as `{"exp_avg/NAME": t, "exp_avg_sq/NAME": t,
    ["master/NAME": t]}` and the step, from either engine's file: optimizer.safetensors (DeepSpeed)
    or optimizer.pt (plain engine; its parameters are numbered in `param_groups(module)` order)."""
    if (step_dir / "optimizer.safetensors").is_file():
        state, meta = read_optimizer_safetensors(step_dir)
        return state, float(meta.get("step", 0.0))
    raw = read_optimizer_pt(step_dir)
    names = {p: n for n, p in module.named_parameters()}
    order = [names[p] for g in param_groups(module, weight_decay) for p in g["params"]]
    out: dict[str, torch.Tensor] = {}
    step = 0.0
    try:
        for idx, st in raw["state"].items():
            n = order[int(idx)]
            out[f"exp_avg/{n}"], out[f"exp_avg_sq/{n}"] = st["exp_avg"], st["exp_avg_sq"]
            step = float(st["step"])
    except (KeyError, IndexError, TypeError, ValueError) as err:
        raise LLMCoreError(f"{step_dir}/optimizer.pt does not fit this model ({type(err).__name__}: {err})") from None
    return out, step


def read_optimizer_safetensors(step_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The name-keyed optimizer state a DeepSpeed run writes (`master/NAME`, `exp_avg/NAME`,
    `exp_avg_sq/NAME` and the step in the metadata); safetensors, so nothing in it can run code."""
    from safetensors import SafetensorError, safe_open

    path = step_dir / "optimizer.safetensors"
    if not path.is_file():
        if (step_dir / "optimizer.pt").is_file():
            raise LLMCoreError(f"{step_dir}: written without --deepspeed (optimizer.pt); resume it without --deepspeed")
        raise LLMCoreError(f"{step_dir}: no optimizer state (optimizer.safetensors is missing)")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise LLMCoreError(f"{path}: cannot read the optimizer state ({err})") from None
    if meta.get("format") != "llmcore-optimizer-1":
        raise LLMCoreError(f"{path}: not an llmcore optimizer state (format {meta.get('format')!r})")
    return state, meta


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

        if getattr(self.cfg, "optimizer", "adamw") != "adamw":
            raise LLMCoreError(MUON_DEEPSPEED)
        self.ds_config = build_ds_config(self.config_path, self.cfg, self.world, accum, self.dtype)
        self.stage = int(self.ds_config.get("zero_optimization", {}).get("stage", 0))
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

            with (
                peer_errors("gathering the weights"),
                deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None),
            ):
                yield self.module
        else:
            yield self.module

    # -- optimizer state, independent of the world size ---------------------------------------------
    # DeepSpeed's own save_checkpoint writes pickles per rank (loading them runs arbitrary code, and
    # they only load on the same number of ranks). We store the full fp32 master weights and AdamW
    # moments per parameter name in safetensors instead, gathered through DeepSpeed's tensor-fragment
    # API (ZeRO 1-3, offload, bf16): any world size, any ZeRO stage, and the plain engine, can load it.

    def _basic_optimizer(self) -> Any:
        opt = self.engine.optimizer
        return getattr(opt, "optimizer", opt)

    def _link_optimizer_state(self, step: float | None = None) -> None:
        """Make sure every flat fp32 partition has AdamW state (`step` given: zeros where a fresh
        engine has none yet) and that DeepSpeed's per-parameter fragments point into it. DeepSpeed
        links them once, after the first step of the *first* param group, so the fragments of the
        other groups stay empty; relinking here fixes that for ZeRO-1/2 and bf16."""
        basic = self._basic_optimizer()
        if step is not None:
            flats = list(
                getattr(self.engine.optimizer, "fp32_partitioned_groups_flat", None)
                or [p for g in basic.param_groups for p in g["params"]]
            )
            for p in flats:  # ZeRO-3 keeps its flat fp32 partitions outside the optimizer's groups
                st = basic.state[p]
                if "exp_avg" not in st:
                    st.update(
                        step=torch.tensor(float(step)), exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p)
                    )
        opt = self.engine.optimizer
        if hasattr(opt, "_hp_optimizer_states_linked") and hasattr(opt, "_lazy_init_hp_params_optimizer_state"):
            if all("exp_avg" in basic.state[p] for g in basic.param_groups for p in g["params"]):
                opt._hp_optimizer_states_linked = False
                opt._lazy_init_hp_params_optimizer_state()

    def _full(self, p: torch.nn.Parameter, key: str | None) -> torch.Tensor | None:
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        if hasattr(p, "ds_id") or hasattr(p, "_hp_mapping"):
            t = safe_get_full_fp32_param(p) if key is None else safe_get_full_optimizer_state(p, key)
            return None if t is None else t.detach().float().cpu().contiguous()
        if key is None:  # ZeRO-0 in fp32: the module's parameter is the master weight
            return p.detach().float().cpu().contiguous()
        st = self._basic_optimizer().state.get(p, {})
        return st[key].detach().float().cpu().contiguous() if key in st else None

    def _set_full(self, p: torch.nn.Parameter, key: str | None, value: torch.Tensor, step: float) -> None:
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        if hasattr(p, "ds_id") or hasattr(p, "_hp_mapping"):
            v = value.to(self.device)
            if key is None:
                safe_set_full_fp32_param(p, v)
            else:
                safe_set_full_optimizer_state(p, v, key)
            return
        if key is None:
            with torch.no_grad():
                p.data.copy_(value.to(p.device, p.dtype))
            return
        st = self._basic_optimizer().state.setdefault(p, {})
        st[key] = value.to(p.device, torch.float32).clone()
        st.setdefault("step", torch.tensor(float(step)))

    def save_state(self, step_dir: Path) -> None:
        from safetensors.torch import save_file

        from llmcore.io import atomic_write

        tensors: dict[str, torch.Tensor] = {}
        with peer_errors("gathering the optimizer state"):
            self._link_optimizer_state()
            for name, p in self.module.named_parameters():
                if not p.requires_grad:
                    continue
                for prefix, key in (("master", None), ("exp_avg", "exp_avg"), ("exp_avg_sq", "exp_avg_sq")):
                    t = self._full(p, key)
                    if self.rank == 0 and t is not None:
                        tensors[f"{prefix}/{name}"] = t
        if self.rank == 0:
            steps = [float(st["step"]) for st in self._basic_optimizer().state.values() if "step" in st]
            meta = {
                "format": "llmcore-optimizer-1",
                "engine": "deepspeed",
                "zero_stage": str(self.stage),
                "world_size": str(self.world),
                "step": repr(max(steps) if steps else 0.0),
            }
            atomic_write(step_dir / "optimizer.safetensors", lambda tmp: save_file(tensors, str(tmp), metadata=meta))

    def load_state(self, step_dir: Path) -> None:
        state, step = named_optimizer_state(step_dir, self.module, self.cfg.weight_decay)
        with peer_errors("restoring the optimizer state"):
            if self.stage > 0 or self.dtype == "bf16":
                self._link_optimizer_state(step)
            for name, p in self.module.named_parameters():
                if not p.requires_grad:
                    continue
                for prefix, key in (("master", None), ("exp_avg", "exp_avg"), ("exp_avg_sq", "exp_avg_sq")):
                    t = state.get(f"{prefix}/{name}")
                    if t is None:
                        if prefix == "master":
                            continue  # the weights came from model.safetensors already
                        raise LLMCoreError(f"{step_dir}/optimizer.safetensors has no {prefix} for {name}")
                    self._set_full(p, key, t, step)
            for st in self._basic_optimizer().state.values():
                if "step" in st:
                    st["step"] = (
                        torch.tensor(step) if not torch.is_tensor(st["step"]) else torch.full_like(st["step"], step)
                    )
            self.engine.global_steps = int(step)
            self.engine.global_samples = int(step) * self.engine.train_batch_size()

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


__all__ = [
    "PlainEngine",
    "DeepSpeedEngine",
    "make_engine",
    "param_groups",
    "autocast_ctx",
    "resolve_dtype",
    "init_distributed",
    "shutdown_distributed",
    "free_port",
    "build_ds_config",
]
