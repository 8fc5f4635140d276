"""DeepSpeed's JSON config: the shipped ones (`--deepspeed NAME`) and the run's settings filled in.

`--deepspeed` takes a name (`zero0`, `zero1`, `zero2`, `zero3`, `zero3-offload`) or the path of a
DeepSpeed JSON file. The shipped configs (package data in `llmcore/train/ds_configs/`) say only which
ZeRO stage to use (and offload for `zero3-offload`: parameters and optimizer state in CPU memory,
torch's AdamW, so no DeepSpeed op has to be compiled); micro batch, accumulation, global batch,
clipping and the optimizer's hyperparameters are "auto".

Invariant: `build_ds_config` fills every value the trainer owns from the run's settings; a file that
sets one of them to anything else is refused with the key and the flag, so the JSON and the flags can
never silently disagree. Reading the file is the only I/O here: the engine and `llmcore launch`
(which checks the config on a login node before anything starts) call it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmcore.errors import LLMCoreError

if TYPE_CHECKING:  # config.py imports this module (through optim.py)
    from llmcore.train.config import TrainConfig

CONFIG_DIR = Path(__file__).resolve().parent / "ds_configs"
DEEPSPEED_CONFIGS = ("zero0", "zero1", "zero2", "zero3", "zero3-offload")


def deepspeed_config_path(name_or_path: str | Path) -> Path:
    """The DeepSpeed JSON config for `--deepspeed`: a shipped one by name, or an existing file.

    Raises LLMCoreError naming the flag and the known names when it is neither.
    """
    spec = str(name_or_path)
    if spec in DEEPSPEED_CONFIGS:
        path = CONFIG_DIR / f"{spec}.json"
        if not path.is_file():  # a broken install, not a user error we can explain better
            raise LLMCoreError(f"--deepspeed {spec}: the packaged config {path} is missing; reinstall llmcore")
        return path
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    if path.exists():
        raise LLMCoreError(
            f"--deepspeed {spec}: not a file; expected one of {', '.join(DEEPSPEED_CONFIGS)} "
            "or the path of a DeepSpeed JSON config"
        )
    raise LLMCoreError(
        f"--deepspeed {spec}: no such DeepSpeed config; expected one of "
        f"{', '.join(DEEPSPEED_CONFIGS)} or the path of a DeepSpeed JSON config file"
    )


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


__all__ = ["CONFIG_DIR", "DEEPSPEED_CONFIGS", "build_ds_config", "deepspeed_config_path"]
