"""Optimizer state on disk: the two file formats, and DeepSpeed's partitions gathered into / scattered
from the name-keyed one.

Formats (neither can run code when read):
- `optimizer.pt` (plain engine): the torch optimizer's state dict with every tensor on the CPU, read
  back with `torch.load(weights_only=True)`; parameters are numbered in the optimizer's group order.
- `optimizer.safetensors` (DeepSpeed, any ZeRO stage and world size): `master/NAME` (fp32 master
  weight), `exp_avg/NAME`, `exp_avg_sq/NAME` per parameter name (a Muon matrix of `--optimizer muon`
  under ZeRO-1/2 has `momentum_buffer/NAME` instead of the two moments: optim.py), and in the metadata `format`
  (`OPTIMIZER_FORMAT`), `engine`, `zero_stage`, `world_size` and `step`.
`named_optimizer_state` reads either one into the name-keyed form, so a checkpoint resumes on any
world size, any ZeRO stage, or the plain engine.

DeepSpeed's own `save_checkpoint` writes pickles per rank (loading them runs arbitrary code, and they
only load on the same number of ranks), so it is not used: `gather_named_state` collects the full
tensors through DeepSpeed's tensor-fragment API (`safe_get_full_*`), `scatter_named_state` writes them
back (`safe_set_full_*`). Both are collectives: every rank calls them. DeepSpeed is imported only
inside them (it is optional).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from llmcore.errors import LLMCoreError
from llmcore.io import atomic_write

OPTIMIZER_FORMAT = "llmcore-optimizer-1"
# The name-keyed tensors per parameter: (prefix in the file, DeepSpeed's optimizer-state key or None
# for the fp32 master weight).
_NAMED_KEYS = (("master", None), ("exp_avg", "exp_avg"), ("exp_avg_sq", "exp_avg_sq"))


# -- optimizer.pt (plain engine) ---------------------------------------------------------------------


def write_optimizer_pt(step_dir: Path, state_dict: dict[str, Any]) -> None:
    """The plain engine's optimizer state as `optimizer.pt`: plain tensors and Python scalars only, so
    `torch.load(weights_only=True)` reads it back; moved to the CPU, so a checkpoint written on a GPU
    resumes anywhere."""
    state = {
        "state": {
            k: {n: (t.to("cpu") if torch.is_tensor(t) else t) for n, t in v.items()}
            for k, v in state_dict["state"].items()
        },
        "param_groups": state_dict["param_groups"],
    }
    torch.save(state, step_dir / "optimizer.pt")


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


# -- optimizer.safetensors (DeepSpeed) ---------------------------------------------------------------


def write_optimizer_safetensors(step_dir: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    """The name-keyed state as `optimizer.safetensors`, written atomically, `format` set in the metadata."""
    meta = {"format": OPTIMIZER_FORMAT, **meta}
    atomic_write(step_dir / "optimizer.safetensors", lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def read_optimizer_safetensors(step_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The name-keyed optimizer state a DeepSpeed run writes (`master/NAME`, `exp_avg/NAME`,
    `exp_avg_sq/NAME` and the step in the metadata); safetensors, so nothing in it can run code."""
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
    if meta.get("format") != OPTIMIZER_FORMAT:
        raise LLMCoreError(f"{path}: not an llmcore optimizer state (format {meta.get('format')!r})")
    return state, meta


def named_optimizer_state(
    step_dir: Path, pt_order: Sequence[str], optimizer: str = "adamw"
) -> tuple[dict[str, torch.Tensor], float]:
    """The optimizer state of a checkpoint as `{"exp_avg/NAME": t, "exp_avg_sq/NAME": t,
    ["master/NAME": t]}` (a Muon matrix: `{"momentum_buffer/NAME": t}`) and the step, from either
    engine's file: optimizer.safetensors (DeepSpeed) or optimizer.pt (plain engine), whose numbered
    parameters are named by `pt_order` (the parameter names in the plain optimizer's group order for
    `optimizer`; an optimizer.pt written with the other --optimizer is an LLMCoreError)."""
    if (step_dir / "optimizer.safetensors").is_file():
        state, meta = read_optimizer_safetensors(step_dir)
        return state, float(meta.get("step", 0.0))
    raw = read_optimizer_pt(step_dir)
    saved = "muon" if any(g.get("optimizer") == "muon" for g in raw.get("param_groups", [])) else "adamw"
    if saved != optimizer:
        raise LLMCoreError(f"{step_dir}/optimizer.pt was written with --optimizer {saved}, not {optimizer}")
    out: dict[str, torch.Tensor] = {}
    step = 0.0
    try:
        for idx, st in raw["state"].items():
            n = pt_order[int(idx)]
            if "momentum_buffer" in st:  # torch.optim.Muon's state (--optimizer muon): no step count
                out[f"momentum_buffer/{n}"] = st["momentum_buffer"]
                continue
            out[f"exp_avg/{n}"], out[f"exp_avg_sq/{n}"] = st["exp_avg"], st["exp_avg_sq"]
            step = float(st["step"])
    except (KeyError, IndexError, TypeError, ValueError) as err:
        raise LLMCoreError(f"{step_dir}/optimizer.pt does not fit this model ({type(err).__name__}: {err})") from None
    return out, step


# -- DeepSpeed partitions <-> full tensors ----------------------------------------------------------


def basic_optimizer(ds_engine: Any) -> Any:
    """The torch optimizer inside DeepSpeed's wrapper (ZeRO and bf16 wrap it; ZeRO-0 fp32 does not)."""
    opt = ds_engine.optimizer
    return getattr(opt, "optimizer", opt)


def link_zero_state(ds_engine: Any, step: float | None = None) -> None:
    """Make sure every flat fp32 partition has AdamW state (`step` given: zeros where a fresh
    engine has none yet) and that DeepSpeed's per-parameter fragments point into it. DeepSpeed
    links them once, after the first step of the *first* param group, so the fragments of the
    other groups stay empty; relinking here fixes that for ZeRO-1/2 and bf16.

    This touches DeepSpeed privates (`fp32_partitioned_groups_flat`, `_hp_optimizer_states_linked`,
    `_lazy_init_hp_params_optimizer_state`): only the pinned DeepSpeed version guards it."""
    basic = basic_optimizer(ds_engine)
    # Muon's groups (`--optimizer muon`, ZeRO-1/2) keep a momentum buffer, not AdamW moments (optim.py).
    adamw = [g for g in basic.param_groups if not g.get("use_muon", False)]
    if step is not None:
        flats = list(
            getattr(ds_engine.optimizer, "fp32_partitioned_groups_flat", None)
            or [p for g in adamw for p in g["params"]]
        )
        for p in flats:  # ZeRO-3 keeps its flat fp32 partitions outside the optimizer's groups
            st = basic.state[p]
            if "exp_avg" not in st:
                st.update(step=torch.tensor(float(step)), exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
    opt = ds_engine.optimizer
    if hasattr(opt, "_hp_optimizer_states_linked") and hasattr(opt, "_lazy_init_hp_params_optimizer_state"):
        if all("exp_avg" in basic.state[p] for g in adamw for p in g["params"]):
            opt._hp_optimizer_states_linked = False
            opt._lazy_init_hp_params_optimizer_state()


def _full(ds_engine: Any, p: torch.nn.Parameter, key: str | None) -> torch.Tensor | None:
    """Parameter `p`'s full fp32 master weight (`key` None) or optimizer state `key`, on the CPU."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    if hasattr(p, "ds_id") or hasattr(p, "_hp_mapping"):
        t = safe_get_full_fp32_param(p) if key is None else safe_get_full_optimizer_state(p, key)
        return None if t is None else t.detach().float().cpu().contiguous()
    if key is None:  # ZeRO-0 in fp32: the module's parameter is the master weight
        return p.detach().float().cpu().contiguous()
    st = basic_optimizer(ds_engine).state.get(p, {})
    return st[key].detach().float().cpu().contiguous() if key in st else None


def _set_full(
    ds_engine: Any, p: torch.nn.Parameter, key: str | None, value: torch.Tensor, step: float, device: torch.device
) -> None:
    """Write the full `value` into parameter `p`'s master weight (`key` None) or optimizer state `key`."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    if hasattr(p, "ds_id") or hasattr(p, "_hp_mapping"):
        v = value.to(device)
        if key is None:
            safe_set_full_fp32_param(p, v)
        else:
            safe_set_full_optimizer_state(p, v, key)
        return
    if key is None:
        with torch.no_grad():
            p.data.copy_(value.to(p.device, p.dtype))
        return
    st = basic_optimizer(ds_engine).state.setdefault(p, {})
    st[key] = value.to(p.device, torch.float32).clone()
    st.setdefault("step", torch.tensor(float(step)))


def gather_named_state(ds_engine: Any, module: torch.nn.Module, keep: bool) -> dict[str, torch.Tensor]:
    """The full name-keyed state (`master/NAME`, `exp_avg/NAME`, `exp_avg_sq/NAME`) of a DeepSpeed
    engine's trainable parameters. A collective: every rank calls it; only ranks with `keep` collect.
    A Muon matrix (`use_muon`) has no AdamW moments: its momentum is `optim.gather_zero_momentum`'s."""
    tensors: dict[str, torch.Tensor] = {}
    link_zero_state(ds_engine)
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        for prefix, key in _NAMED_KEYS:
            if key is not None and getattr(p, "use_muon", False):
                continue
            t = _full(ds_engine, p, key)
            if keep and t is not None:
                tensors[f"{prefix}/{name}"] = t
    return tensors


def optimizer_step(ds_engine: Any) -> float:
    """The optimizer's step count (the largest over its parameters; 0 before the first step)."""
    steps = [float(st["step"]) for st in basic_optimizer(ds_engine).state.values() if "step" in st]
    return max(steps) if steps else 0.0


def scatter_named_state(
    ds_engine: Any,
    module: torch.nn.Module,
    state: dict[str, torch.Tensor],
    step: float,
    device: torch.device,
    relink: bool,
    source: Path,
) -> None:
    """Write a name-keyed state (from `named_optimizer_state`) into a DeepSpeed engine's partitions and
    set every parameter's step; `relink` (ZeRO 1-3 or bf16) first gives each flat partition AdamW state.
    A collective: every rank calls it. A missing moment is an LLMCoreError naming `source`; a missing
    master weight is fine (the weights came from model.safetensors)."""
    if relink:
        link_zero_state(ds_engine, step)
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        for prefix, key in _NAMED_KEYS:
            if key is not None and getattr(p, "use_muon", False):
                continue  # Muon's momentum: optim.scatter_zero_momentum
            t = state.get(f"{prefix}/{name}")
            if t is None:
                if prefix == "master":
                    continue
                raise LLMCoreError(f"{source} has no {prefix} for {name}")
            _set_full(ds_engine, p, key, t, step, device)
    for st in basic_optimizer(ds_engine).state.values():
        if "step" in st:
            st["step"] = torch.tensor(step) if not torch.is_tensor(st["step"]) else torch.full_like(st["step"], step)


__all__ = [
    "OPTIMIZER_FORMAT",
    "basic_optimizer",
    "gather_named_state",
    "link_zero_state",
    "named_optimizer_state",
    "optimizer_step",
    "read_optimizer_pt",
    "read_optimizer_safetensors",
    "scatter_named_state",
    "write_optimizer_pt",
    "write_optimizer_safetensors",
]
