"""Training configuration: one dataclass for all stages, per-stage defaults, TOML loading and validation.

Precedence: built-in stage defaults < `--config FILE.toml` < command-line flags. Fields left `None`
mean "use the stage default" and are filled by `TrainConfig.resolved()`.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from llmcore.errors import LLMCoreError

STAGES = ("pretrain", "sft", "dpo")
DTYPES = ("fp32", "bf16")
PACKINGS = ("packed", "padded")
BACKENDS = ("eager", "sdpa", "triton")
DPO_LOGP = ("sum", "mean")
REF_LOGPS = ("model", "precompute")

# MiniMind's published recipes (jingyaogong/minimind trainer/train_pretrain.py, train_full_sft.py,
# train_dpo.py): pretrain lr 5e-4 with batch 32 x accumulation 8; full SFT lr 1e-5, batch 16, no
# accumulation; DPO lr in the 1e-8..5e-7 range (their latest default is 4e-8, "<=5e-8 avoids
# forgetting"), batch 4. Their cosine schedule ends at lr/10, which is our min_lr. Sequence
# lengths: pretrain 512 (the design's benchmark length), SFT 768 and DPO 1024 as MiniMind.
STAGE_DEFAULTS: dict[str, dict[str, Any]] = {
    "pretrain": dict(lr=5e-4, micro_batch_size=32, global_batch_size=256, seq_len=512, epochs=1),
    "sft": dict(lr=1e-5, micro_batch_size=16, global_batch_size=16, seq_len=768, epochs=2),
    "dpo": dict(lr=4e-8, micro_batch_size=4, global_batch_size=4, seq_len=1024, epochs=1),
}


@dataclass
class TrainConfig:
    """Every knob of a training run; the CLI flags and TOML keys have the same names (dashes or underscores)."""

    data: str = ""
    out: str = ""
    model: str | None = None  # preset name for a fresh model (pretrain default: minimind2-small)
    init: str | None = None  # run dir / checkpoint to start from (SFT, DPO; DPO's frozen reference too)
    tokenizer: str | None = None  # tokenizer dir when neither the shard manifest nor --init names one
    seq_len: int | None = None
    micro_batch_size: int | None = None
    global_batch_size: int | None = None
    lr: float | None = None
    min_lr: float | None = None  # floor of the cosine decay (default lr/10, as MiniMind)
    warmup_steps: int = 0  # MiniMind uses none; linear warmup from 0 when > 0
    weight_decay: float = 0.01  # torch AdamW's default, which MiniMind trains with; 2-D non-embedding weights only
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping
    epochs: float | None = None
    max_steps: int | None = None  # optimizer steps; overrides epochs when set
    dtype: str = "fp32"
    packing: str | None = None  # packed|padded (pretrain/SFT); DPO always uses pairs
    attn_backend: str = "sdpa"
    compile: bool = False
    eval_every: int = 0  # 0: evaluate only at the end (when eval_docs > 0)
    eval_docs: int = 0  # documents held out for evaluation (train_eval_split)
    save_every: int = 0  # 0: save only at the end
    keep_last: int = 2
    resume: bool = False
    wandb: bool = False
    wandb_project: str = "llmcore"
    seed: int = 42
    deepspeed: str | None = None  # DeepSpeed JSON config (launch/ds_zeroN.json)
    log_every: int = 10
    # DPO
    beta: float = 0.1
    dpo_logp: str = "sum"
    ref_logps: str = "model"
    # Stop after this many optimizer steps of *this* invocation while keeping the schedule of the full
    # run (the LR schedule still spans max_steps). Useful to train in slices; tests use it to interrupt.
    stop_after: int | None = None
    quiet: bool = False  # no progress bar or per-step lines (the end summary still prints)

    # ------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> "TrainConfig":
        """Build from a dict whose keys may use dashes; unknown keys are refused with their names."""
        return cls().merged(d, source=source)

    def merged(self, d: dict[str, Any], source: str = "config") -> "TrainConfig":
        """A copy with the entries of `d` applied (None values are skipped: they mean "not given")."""
        known = {f.name: f for f in fields(self)}
        norm = {str(k).replace("-", "_"): v for k, v in d.items()}
        # Friendly aliases a MiniMind user or our CLI may write.
        for alias, when_true, when_false in (("packed", "packed", "padded"), ("padded", "padded", "packed")):
            if alias in norm:
                flag = norm.pop(alias)
                if flag is not None:
                    norm["packing"] = when_true if flag else when_false
        unknown = sorted(set(norm) - set(known))
        if unknown:
            raise LLMCoreError(f"{source}: unknown training setting(s): {', '.join(unknown)}; "
                               f"known: {', '.join(sorted(known))}")
        values = self.to_dict()
        for k, v in norm.items():
            if v is not None:
                values[k] = v
        return TrainConfig(**values)

    def resolved(self, stage: str) -> "TrainConfig":
        """Fill stage defaults into unset fields and validate every value; raises LLMCoreError."""
        if stage not in STAGES:
            raise LLMCoreError(f"unknown stage {stage!r}; expected one of {', '.join(STAGES)}")
        values = self.to_dict()
        for k, v in STAGE_DEFAULTS[stage].items():
            if values[k] is None:
                values[k] = v
        if values["min_lr"] is None:
            # MiniMind's cosine ends at lr/10; derived from the lr actually used, so --lr alone rescales it.
            values["min_lr"] = values["lr"] / 10
        if values["packing"] is None:
            values["packing"] = "packed"
        if stage == "pretrain" and not values["model"] and not values["init"]:
            values["model"] = "minimind2-small"
        cfg = TrainConfig(**values)
        cfg._validate(stage)
        return cfg

    def _validate(self, stage: str) -> None:
        def bad(msg: str) -> None:
            raise LLMCoreError(msg)

        if not self.data:
            bad("--data SHARD_DIR is required")
        if not self.out:
            bad("--out RUN_DIR is required")
        if self.model and self.init:
            bad("give either --model PRESET (fresh weights) or --init RUN_DIR (start from a run), not both")
        if stage in ("sft", "dpo") and not self.init and not self.model:
            bad(f"{stage} starts from a trained model: pass --init RUN_DIR (or --model PRESET for fresh weights)")
        if stage == "dpo" and not self.init:
            bad("dpo needs --init RUN_DIR: the policy starts from it and it is the frozen reference model")
        positive_ints = ("seq_len", "micro_batch_size", "global_batch_size", "keep_last", "log_every")
        for name in positive_ints:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                bad(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")
        for name in ("warmup_steps", "eval_every", "eval_docs", "save_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                bad(f"--{name.replace('_', '-')} must be an integer >= 0, got {v!r}")
        for name in ("lr", "min_lr", "weight_decay", "grad_clip", "adam_eps", "beta"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
                bad(f"--{name.replace('_', '-')} must be a finite number >= 0, got {v!r}")
        if self.lr <= 0:
            bad(f"--lr must be > 0, got {self.lr}")
        if self.min_lr > self.lr:
            bad(f"--min-lr ({self.min_lr}) must not exceed --lr ({self.lr})")
        if stage == "dpo" and self.beta <= 0:
            bad(f"--beta must be > 0, got {self.beta}")
        for name in ("adam_beta1", "adam_beta2"):
            v = getattr(self, name)
            if not 0 <= v < 1:
                bad(f"{name} must be in [0, 1), got {v}")
        if self.max_steps is not None and (not isinstance(self.max_steps, int) or self.max_steps < 1):
            bad(f"--max-steps must be a positive integer, got {self.max_steps!r}")
        if self.epochs is not None and (not isinstance(self.epochs, (int, float)) or self.epochs <= 0):
            bad(f"--epochs must be > 0, got {self.epochs!r}")
        if self.stop_after is not None and self.stop_after < 1:
            bad(f"stop_after must be >= 1, got {self.stop_after}")
        if self.dtype not in DTYPES:
            bad(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.packing not in PACKINGS:
            bad(f"packing must be one of {', '.join(PACKINGS)}, got {self.packing!r}")
        if self.attn_backend not in BACKENDS:
            bad(f"--attn-backend must be one of {', '.join(BACKENDS)}, got {self.attn_backend!r}")
        if self.dpo_logp not in DPO_LOGP:
            bad(f"--dpo-logp must be one of {', '.join(DPO_LOGP)}, got {self.dpo_logp!r}")
        if self.ref_logps not in REF_LOGPS:
            bad(f"--ref-logps must be one of {', '.join(REF_LOGPS)}, got {self.ref_logps!r}")
        if self.deepspeed is not None and not Path(self.deepspeed).is_file():
            bad(f"--deepspeed {self.deepspeed}: no such DeepSpeed config file")
        if not Path(self.data).is_dir():
            bad(f"--data {self.data}: no such shard directory")
        if self.init is not None and not Path(self.init).exists():
            bad(f"--init {self.init}: no such run dir or checkpoint")


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML file of training settings (top level, or under a `[train]` table)."""
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise LLMCoreError(f"--config {p}: no such file") from None
    except tomllib.TOMLDecodeError as err:
        raise LLMCoreError(f"--config {p}: not valid TOML ({err})") from err
    if "train" in data and isinstance(data["train"], dict):
        rest = {k: v for k, v in data.items() if k != "train"}
        data = {**rest, **data["train"]}
    return data


def build_config(stage: str, cli: dict[str, Any], config_file: str | Path | None = None) -> TrainConfig:
    """Stage defaults < TOML file < CLI flags (entries that are None count as not given), resolved."""
    cfg = TrainConfig()
    if config_file is not None:
        cfg = cfg.merged(load_toml(config_file), source=str(config_file))
    cfg = cfg.merged(cli, source="flags")
    return cfg.resolved(stage)


__all__ = ["TrainConfig", "STAGE_DEFAULTS", "STAGES", "build_config", "load_toml"]
