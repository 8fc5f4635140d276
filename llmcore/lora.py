"""LoRA: low-rank adapters on a frozen base model (Hu et al. 2021; MiniMind's `model_lora.py`).

A targeted `nn.Linear` with weight W (out x in) becomes a `LoRALinear`:
    y = x W^T + (alpha / r) * (x A^T) B^T
with A (r x in) drawn from N(0, 0.02) as MiniMind does and B (out x r) zero, so before the first
update the adapted model computes exactly the base's outputs. W keeps its parameter name
(`layers.0.self_attn.q_proj.weight`); the adapters are `...q_proj.lora_A` and `...q_proj.lora_B`.

Invariants:
- After `apply_lora` only `lora_A`/`lora_B` require gradients, so only they reach the optimizer
  (`param_groups` skips frozen parameters) and the base weights never change.
- A LoRA checkpoint dir holds `adapter.safetensors` (the adapters, fp32), `adapter.json` (format,
  rank, alpha, the adapted module names, and the base: the absolute path of its checkpoint dir and
  the sha256 of its weights) and `model_config.json` (the base's architecture); never the base's
  weights. Every load checks that the base is there and unchanged, else a one-line LLMCoreError.
- Merging is one function (`merged_state`): W' = W + (alpha/r) B A in fp32, cast back to W's dtype.
  `llmcore.checkpoint.load_model` returns a LoRA checkpoint merged (a plain `LLM`), so generate,
  chat, serve, eval, rag --answer and export hf take a LoRA run as `--ckpt`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmcore.checkpoint import ADAPTER_CONFIG, ADAPTER_WEIGHTS, CONFIG, WEIGHTS, resolve_checkpoint
from llmcore.errors import LLMCoreError
from llmcore.io import atomic_write, sha256_file, write_json, write_text
from llmcore.model import LLM, unwrap_model

log = logging.getLogger(__name__)

ADAPTER_FORMAT = "llmcore-lora-1"
ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
TARGET_PRESETS = ("attention", "all-linear")
INIT_STD = 0.02  # MiniMind's A init (normal, std 0.02)


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable rank-r update; `weight` (and `bias`) are the base's
    own parameters, so the base's state-dict keys are unchanged."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.alpha, self.scaling = int(rank), float(alpha), float(alpha) / int(rank)
        self.weight = base.weight
        self.bias = base.bias
        w = base.weight
        a = torch.empty(rank, self.in_features, dtype=torch.float32).normal_(0.0, INIT_STD, generator=generator)
        self.lora_A = nn.Parameter(a.to(device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=w.device, dtype=w.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scaling

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, alpha={self.alpha:g}"


def target_modules(model: nn.Module, targets: str) -> list[str]:
    """Names of the linear layers `targets` selects: `attention` (q/k/v/o projections), `all-linear`
    (every nn.Linear; the LM head is the tied embedding, not a Linear), or comma-separated layer
    names matched against the last part of a module name (or the whole name). A name that selects
    nothing is a one-line error naming `--lora-targets` and the layer names there are."""
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    short = sorted({n.rsplit(".", 1)[-1] for n in linears})
    spec = targets.strip()
    if spec == "all-linear":
        chosen = linears
    else:
        wanted = ATTENTION_TARGETS if spec == "attention" else tuple(t.strip() for t in spec.split(",") if t.strip())
        missing = [t for t in wanted if not any(n == t or n.rsplit(".", 1)[-1] == t for n in linears)]
        if missing or not wanted:
            raise LLMCoreError(
                f"--lora-targets {targets!r}: {', '.join(missing) or 'nothing'} names no linear layer "
                f"of this model; use attention, all-linear or some of {', '.join(short)}"
            )
        chosen = [n for n in linears if n in wanted or n.rsplit(".", 1)[-1] in wanted]
    if not chosen:
        raise LLMCoreError(f"--lora-targets {targets!r} selects no linear layer of this model")
    return chosen


def apply_lora(model: nn.Module, rank: int, alpha: float, modules: list[str], seed: int = 0) -> nn.Module:
    """Replace each named `nn.Linear` of `model` by a `LoRALinear` (in place, in `modules` order, A
    drawn from a generator seeded with `seed`, so every process builds the same adapters) and
    freeze everything but the adapters. Returns `model`."""
    gen = torch.Generator().manual_seed(int(seed))
    model.requires_grad_(False)
    for name in modules:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, child)
        if not isinstance(base, nn.Linear):
            raise LLMCoreError(f"LoRA: {name} is not a linear layer of this model")
        setattr(parent, child, LoRALinear(base, rank, alpha, gen))
    return model


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' weights as contiguous fp32 CPU tensors, keyed like the model's parameters."""
    inner = unwrap_model(model)
    return {
        n: p.detach().float().cpu().contiguous()
        for n, p in inner.named_parameters()
        if n.endswith((".lora_A", ".lora_B"))
    }


def lora_modules(model: nn.Module) -> list[str]:
    return [n for n, m in unwrap_model(model).named_modules() if isinstance(m, LoRALinear)]


def trainable_report(model: nn.Module) -> tuple[int, int]:
    """(trainable parameters, all parameters)."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


# ----------------------------------------------------------------------------------------------
# the base model a LoRA checkpoint names


def base_fingerprint(base_dir: Path) -> str:
    """sha256 of the base checkpoint's weights: of `model.safetensors` (the same value its manifest
    lists), or, for a sharded transformers folder, of the names and hashes of all its weight files."""
    if (base_dir / WEIGHTS).is_file():
        return sha256_file(base_dir / WEIGHTS)
    files = sorted(p for p in base_dir.iterdir() if p.suffix == ".safetensors" or p.name.endswith(".index.json"))
    if not files:
        raise LLMCoreError(f"{base_dir}: no weights to fingerprint (model.safetensors or shards)")
    import hashlib

    h = hashlib.sha256()
    for p in files:
        h.update(f"{p.name}:{sha256_file(p)}\n".encode())
    return h.hexdigest()


def describe_base(init: str | Path) -> dict[str, str]:
    """The record of a base that adapters are trained on: its checkpoint dir (absolute) and weights sha256."""
    base = resolve_checkpoint(init)
    if (base / ADAPTER_CONFIG).is_file():
        raise LLMCoreError(
            f"--init {init} is a LoRA run; merge it first (`llmcore model merge-lora --ckpt {init} "
            "--out DIR`) and train the new adapters on the merged model"
        )
    return {"path": str(base.resolve()), "sha256": base_fingerprint(base), "given": str(init)}


def read_adapter_config(ckpt: Path) -> dict[str, Any]:
    path = ckpt / ADAPTER_CONFIG
    try:
        meta = json.loads(path.read_text())
        assert isinstance(meta, dict) and meta.get("format") == ADAPTER_FORMAT
        (
            int(meta["rank"]),
            float(meta["alpha"]),
            list(meta["modules"]),
            str(meta["base"]["path"]),
            str(meta["base"]["sha256"]),
        )
    except (OSError, ValueError, KeyError, TypeError, AssertionError) as err:
        raise LLMCoreError(f"{path}: not an llmcore LoRA adapter config ({type(err).__name__})") from None
    return meta


def checked_base(ckpt: Path, meta: dict[str, Any]) -> Path:
    """The base checkpoint dir a LoRA checkpoint names, if it is there and its weights are unchanged."""
    base = Path(meta["base"]["path"])
    if not base.is_dir():
        raise LLMCoreError(
            f"{ckpt}: its base model {base} is missing (a LoRA checkpoint holds only the adapters; "
            "restore the base there, or merge adapters while the base exists)"
        )
    found = base_fingerprint(base)
    if found != meta["base"]["sha256"]:
        raise LLMCoreError(
            f"{ckpt}: its base model {base} has changed since the adapters were trained (weights "
            f"sha256 {found[:12]}..., expected {meta['base']['sha256'][:12]}...); the adapters fit "
            "only the original base"
        )
    return base


def _adapter_tensors(ckpt: Path, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = ckpt / ADAPTER_WEIGHTS
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise LLMCoreError(f"{path}: cannot read the adapters ({err})") from None
    want = {f"{m}.{ab}" for m in meta["modules"] for ab in ("lora_A", "lora_B")}
    if set(state) != want:
        extra, missing = sorted(set(state) - want), sorted(want - set(state))
        raise LLMCoreError(f"{path}: adapters do not match {ADAPTER_CONFIG} (missing {missing[:3]}, extra {extra[:3]})")
    return state


def load_adapted(ckpt: str | Path, attn_backend: str | None = None) -> LLM:
    """A LoRA checkpoint as the model that trained it: the base (CPU, fp32) with `LoRALinear`
    adapters loaded, base frozen, adapters trainable (what `--resume` continues)."""
    from llmcore.checkpoint import load_model

    ckpt = resolve_checkpoint(ckpt)
    meta = read_adapter_config(ckpt)
    base = checked_base(ckpt, meta)
    model, _ = load_model(base, attn_backend=attn_backend, with_tokenizer=False)
    model = model.float()
    apply_lora(model, int(meta["rank"]), float(meta["alpha"]), list(meta["modules"]))
    state = _adapter_tensors(ckpt, meta)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, t in state.items():
            if params[name].shape != t.shape:
                raise LLMCoreError(
                    f"{ckpt / ADAPTER_WEIGHTS}: {name} has shape {tuple(t.shape)}, the model needs "
                    f"{tuple(params[name].shape)}"
                )
            params[name].copy_(t)
    return model


def merged_state(ckpt: str | Path) -> tuple[Any, dict[str, torch.Tensor]]:
    """(base config, merged weights) of a LoRA checkpoint: W + (alpha/r) B A per adapted layer, in
    fp32 and cast back to W's dtype. `llmcore.checkpoint.load_model` builds the model from it."""
    from llmcore.checkpoint import load_model, model_state_dict

    ckpt = resolve_checkpoint(ckpt)
    meta = read_adapter_config(ckpt)
    base = checked_base(ckpt, meta)
    model, _ = load_model(base, with_tokenizer=False)
    state = model_state_dict(model)
    adapters = _adapter_tensors(ckpt, meta)
    scaling = float(meta["alpha"]) / int(meta["rank"])
    for m in meta["modules"]:
        key = f"{m}.weight"
        if key not in state:
            raise LLMCoreError(f"{ckpt / ADAPTER_CONFIG}: adapted layer {m} is not in the base model {base}")
        w = state[key]
        a, b = adapters[f"{m}.lora_A"].float(), adapters[f"{m}.lora_B"].float()
        if a.shape[1] != w.shape[1] or b.shape[0] != w.shape[0]:
            raise LLMCoreError(f"{ckpt / ADAPTER_WEIGHTS}: adapters of {m} do not fit its weight {tuple(w.shape)}")
        state[key] = (w.float() + scaling * (b @ a)).to(w.dtype)
    return model.config, state


# ----------------------------------------------------------------------------------------------
# the training stage's model hook


class LoRAHook:
    """`train lora`'s model hook: adapters on the frozen `--init` model; checkpoints hold the adapters."""

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        self.base: dict[str, str] | None = None

    @property
    def rank(self) -> int:
        return int(self.cfg.lora_rank)

    @property
    def alpha(self) -> float:
        return float(self.cfg.lora_alpha if self.cfg.lora_alpha is not None else self.cfg.lora_rank)

    def convert(self, model: nn.Module) -> nn.Module:
        self.base = describe_base(self.cfg.init)
        modules = target_modules(model, self.cfg.lora_targets)
        apply_lora(model, self.rank, self.alpha, modules, seed=self.cfg.seed)
        trainable, total = trainable_report(model)
        log.info(
            "LoRA rank %d, alpha %g on %d layers (%s): %s trainable parameters of %s (%.2f%%); base %s frozen",
            self.rank,
            self.alpha,
            len(modules),
            self.cfg.lora_targets,
            f"{trainable:,}",
            f"{total:,}",
            100 * trainable / max(total, 1),
            self.base["path"],
        )
        return model

    def save(self, model: nn.Module, step_dir: Path) -> None:
        save_adapters(model, step_dir, self.base or {}, self.rank, self.alpha)

    def load(self, step_dir: Path) -> nn.Module:
        meta = read_adapter_config(step_dir)
        self.base = dict(meta["base"])
        return load_adapted(step_dir, attn_backend=self.cfg.attn_backend)


def save_adapters(model: nn.Module, out_dir: Path, base: dict[str, str], rank: int, alpha: float) -> None:
    """Write a LoRA checkpoint's files (adapters, adapter.json, model_config.json) into `out_dir`."""
    from safetensors.torch import save_file

    if not base.get("path") or not base.get("sha256"):
        raise ValueError("save_adapters needs the base's path and sha256")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = adapter_state(model)
    atomic_write(
        out_dir / ADAPTER_WEIGHTS,
        lambda tmp: save_file(state, str(tmp), metadata={"format": "pt", "llmcore": ADAPTER_FORMAT}),
    )
    write_json(
        out_dir / ADAPTER_CONFIG,
        {"format": ADAPTER_FORMAT, "rank": rank, "alpha": alpha, "modules": lora_modules(model), "base": base},
    )
    write_text(out_dir / CONFIG, json.dumps(unwrap_model(model).config.to_dict(), indent=2) + "\n")


def _merge_dir_problem(path: Path) -> str | None:
    """Why `path` is not an earlier merge that --overwrite may replace (None when it is)."""
    if not ((path / WEIGHTS).is_file() and (path / CONFIG).is_file()):
        return f"it has no {WEIGHTS} + {CONFIG}"
    for p in path.iterdir():
        if p.name not in (WEIGHTS, CONFIG, "manifest.json") and not p.name.startswith(
            ("tokenizer", "llmcore_tokenizer", "special_tokens")
        ):
            return f"it holds {p.name}, which a merge does not write"
    return None


def merge_lora(ckpt: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """`llmcore model merge-lora`: the LoRA run/checkpoint `ckpt` merged into a plain checkpoint dir
    `out` (model.safetensors, model_config.json, tokenizer files, manifest.json), written atomically."""
    from llmcore.checkpoint import load_model, load_tokenizer_for, save_model, write_manifest
    from llmcore.io import atomic_dir, check_out_dir

    src = resolve_checkpoint(ckpt)
    if not (src / ADAPTER_CONFIG).is_file():
        raise LLMCoreError(f"--ckpt {ckpt}: not a LoRA run or checkpoint (no {ADAPTER_CONFIG}); nothing to merge")
    out = check_out_dir(
        Path(out),
        overwrite=overwrite,
        what="an earlier merge",
        inputs=(Path(ckpt), src),
        replaceable=_merge_dir_problem,
    )
    model, _ = load_model(src, with_tokenizer=False)
    tok = load_tokenizer_for(src)
    with atomic_dir(out) as tmp:
        save_model(model, tmp)
        if tok is not None:
            tok.save(tmp)
        write_manifest(tmp)
    return out


__all__ = [
    "LoRALinear",
    "LoRAHook",
    "apply_lora",
    "target_modules",
    "adapter_state",
    "load_adapted",
    "merged_state",
    "merge_lora",
    "save_adapters",
    "describe_base",
    "base_fingerprint",
    "ATTENTION_TARGETS",
    "ADAPTER_FORMAT",
]
