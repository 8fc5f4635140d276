"""Training configuration: every setting declared once, as a field of `TrainConfig`.

A field is declared with `setting(default, help, ...)`; from that one line come the CLI option
(`llmcore train STAGE --the-name`, built in `llmcore.cli_train`), the TOML key (`the_name` or
`the-name`), type checking of values read from files, range/choice validation, and the `--help`
text with the default each stage uses. Why our own small layer rather than pydantic or tyro: the
dataclass stays a plain, picklable, `asdict`-able record that DeepSpeed, the run dir's config.json
and tests use as is, and the two things a library would not give us anyway (per-stage defaults from
the stage registry, and the Typer options our CLI is built on) are about 40 lines here.

Precedence: the stage's defaults < `--config FILE.toml` < command-line flags. Fields left `None`
mean "use the stage's default" and are filled by `TrainConfig.resolved(stage)`, which also
validates every value and raises `LLMCoreError` naming the flag.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from llmcore.common import check_device_spec
from llmcore.errors import LLMCoreError
from llmcore.model import BACKENDS
from llmcore.train.optim import check_muon_deepspeed

DTYPES = ("auto", "fp32", "bf16")
PACKINGS = ("packed", "bestfit", "padded")
DPO_LOGP = ("sum", "mean")
REF_LOGPS = ("model", "precompute")


def setting(
    default: Any,
    help: str,
    *,
    choices: tuple[str, ...] | None = None,
    minimum: float | None = None,
    maximum: float | None = None,
    positive: bool = False,
) -> Any:
    """Declare one training setting: its default, help text and the checks its values must pass.

    `minimum`/`maximum`: values outside are refused; `positive`: values <= 0 are refused; `choices`: the only
    strings allowed. Every setting is a flag of the stages it belongs to and a config-file key."""
    return field(
        default=default,
        metadata={
            "help": help,
            "choices": choices,
            "minimum": minimum,
            "maximum": maximum,
            "positive": positive,
        },
    )


@dataclass
class TrainConfig:
    """Every knob of a training run; the CLI flags and TOML keys have the same names (dashes or underscores)."""

    data: str = setting("", "Shard dir made by `llmcore prep`.")
    out: str = setting("", "Run dir to create (or continue with --resume).")
    model: str | None = setting(
        None,
        "Preset for fresh weights (`llmcore model info NAME`): tiny, demo, minimind2-small, minimind2, minimind2-moe.",
    )
    init: str | None = setting(None, "Run dir or checkpoint to start from (DPO: also the frozen reference).")
    tokenizer: str | None = setting(None, "Tokenizer dir, when the shard manifest's path is gone.")
    seq_len: int | None = setting(None, "Tokens per row.", positive=True)
    micro_batch_size: int | None = setting(None, "Rows (DPO: pairs) per forward pass per process.", positive=True)
    global_batch_size: int | None = setting(
        None, "Rows per optimizer step; accumulation = global / (micro x processes).", positive=True
    )
    # The bounds keep values inside what the fp32 optimizer state can hold (1e39 overflows it).
    lr: float | None = setting(None, "Peak learning rate.", positive=True, maximum=1e30)
    min_lr: float | None = setting(
        None, "Floor of the cosine or WSD decay (default: lr/10, as MiniMind).", minimum=0, maximum=1e30
    )
    warmup_steps: int = setting(0, "Linear warmup steps from 0 (MiniMind uses none).", minimum=0)
    weight_decay: float = setting(0.01, "AdamW decay of 2-D weights (not norms, biases, embeddings).", minimum=0)
    adam_beta1: float = setting(0.9, "AdamW beta1, in [0, 1).", minimum=0)
    adam_beta2: float = setting(0.999, "AdamW beta2, in [0, 1).", minimum=0)
    adam_eps: float = setting(1e-8, "AdamW epsilon.", minimum=0)
    grad_clip: float = setting(1.0, "Max gradient norm (0: off).", minimum=0)
    optimizer: str = setting(
        "adamw",
        "adamw (MiniMind's) or muon (torch.optim.Muon, Nesterov, on the hidden weight "
        "matrices; AdamW at --lr on embeddings, norms and MoE routers); plain engine, or "
        "--deepspeed zero1/zero2 with --grad-clip 0.",
        choices=("adamw", "muon"),
    )
    muon_lr: float = setting(
        0.02,
        "Muon: peak learning rate of the hidden matrices (scaled by "
        "sqrt(max(1, rows/cols)); follows the same schedule as --lr).",
        positive=True,
        maximum=1e30,
    )
    muon_momentum: float = setting(0.95, "Muon: Nesterov momentum, in [0, 1).", minimum=0)
    muon_weight_decay: float = setting(
        0.0, "Muon: decoupled weight decay of the hidden matrices (p *= 1 - lr*wd).", minimum=0
    )
    lr_schedule: str = setting(
        "cosine",
        "cosine (MiniMind's: warmup, then cosine to --min-lr) or wsd (warmup, flat "
        "at --lr, then linear to --min-lr over the last --decay-fraction of steps).",
        choices=("cosine", "wsd"),
    )
    decay_fraction: float = setting(
        0.2, "wsd: share of the steps spent decaying to --min-lr.", positive=True, maximum=1
    )
    epochs: float | None = setting(None, "Passes over the data.", positive=True)
    max_steps: int | None = setting(None, "Optimizer steps (overrides --epochs).", positive=True)
    device: str = setting(
        "auto", "auto (the local rank's GPU, else cuda:0 when CUDA is there, else cpu), cpu, cuda or cuda:N."
    )
    dtype: str = setting(
        "auto",
        "auto (bf16 autocast on CUDA, fp32 on CPU), fp32 or bf16 (autocast, fp32 master weights).",
        choices=DTYPES,
    )
    packing: str | None = setting(
        None,
        "packed (the document stream cut into full rows), bestfit (whole documents "
        "placed into rows by best-fit decreasing; no document that fits a row is "
        "cut) or padded (one per row, MiniMind's layout).",
        choices=PACKINGS,
    )
    on_long: str = setting(
        "truncate",
        "SFT: a conversation longer than a row is truncated at the end and counted (truncate) or refused (fail).",
        choices=("truncate", "fail"),
    )
    attn_backend: str = setting(
        "auto", "auto (triton on CUDA, sdpa on CPU), eager, sdpa or triton.", choices=("auto", *BACKENDS)
    )
    compile: bool = setting(False, "torch.compile the model.")
    eval_every: int = setting(0, "Evaluate every N steps (0: only at the end, when --eval-docs > 0).", minimum=0)
    eval_docs: int = setting(0, "Documents held out for evaluation.", minimum=0)
    # A default run keeps its work: MiniMind saves every 1000 steps, HF Trainer every 500; the time
    # bound covers slow steps (a big model on a small device), where 1000 steps can be a day.
    save_every: int = setting(
        1000,
        "Checkpoint every N steps (0: no step-based saves); there is always one at the end and on Ctrl-C/SIGTERM.",
        minimum=0,
    )
    save_minutes: float = setting(
        30.0,
        "Also checkpoint when this many minutes of training have passed since the last checkpoint (0: off).",
        minimum=0,
    )
    keep_last: int = setting(2, "Checkpoints to keep.", positive=True)
    resume: bool = setting(
        False,
        "Continue from RUN_DIR's latest checkpoint, with its saved settings; flags may "
        "change only what keeps the run exact (--max-steps, logging, saving ...).",
    )
    allow_lr_change: bool = setting(
        False,
        "With --resume: accept a changed learning-rate schedule or optimizer "
        "setting (--lr, --min-lr, --warmup-steps, --weight-decay, --adam-*, "
        "--grad-clip, --muon-*, --lr-schedule, --decay-fraction).",
    )
    wandb: bool = setting(False, "Log to Weights & Biases (offline unless configured).")
    wandb_project: str = setting("llmcore", "wandb project name.")
    seed: int = setting(42, "Seed for init, data order and RNG.", minimum=0)
    deepspeed: str | None = setting(
        None, "DeepSpeed config: a name (zero0, zero1, zero2, zero3, zero3-offload) or a JSON file."
    )
    log_every: int = setting(10, "Write metrics every N steps.", positive=True)
    repeat_warning: float = setting(
        4.0, "Warn at the start when the run passes over its data more than this many times.", positive=True
    )
    peak_tflops: float | None = setting(
        None,
        "The device's dense bf16 peak in TFLOP/s for the `mfu` metric (default: known for common GPUs).",
        positive=True,
    )
    # DPO (the stage registry shows these only for the stages that name them)
    beta: float | None = setting(
        None,
        "DPO: strength of the KL constraint (0.1). GRPO/PPO: weight of the per-token KL "
        "to the frozen --init model (GRPO 0.1, PPO 0.02; 0 loads no reference).",
        minimum=0,
    )
    dpo_logp: str = setting("sum", "DPO: sum or mean log-prob per response.", choices=DPO_LOGP)
    ref_logps: str = setting(
        "model", "DPO: model (frozen reference each step) or precompute (one pass, then dropped).", choices=REF_LOGPS
    )
    # LoRA (train lora)
    lora_rank: int = setting(16, "LoRA: rank of the adapters (MiniMind: 16).", positive=True)
    lora_alpha: float | None = setting(
        None,
        "LoRA: scale numerator; the update is alpha/rank * B @ A (default: the rank, so scale 1 as MiniMind).",
        positive=True,
    )
    lora_targets: str = setting(
        "attention",
        "LoRA: attention (q/k/v/o projections), all-linear, or layer names "
        "separated by commas (e.g. q_proj,v_proj,gate_proj).",
    )
    # Knowledge distillation (train distill)
    teacher: str | None = setting(None, "Distillation: the teacher's run dir or checkpoint (same tokenizer).")
    kd_alpha: float = setting(
        0.5, "Distillation: weight of the cross-entropy term; the KL term gets 1 - alpha.", minimum=0, maximum=1
    )
    kd_temperature: float = setting(
        1.5, "Distillation: softmax temperature of the KL term (its gradient is scaled by T^2).", positive=True
    )
    # Reinforcement learning (train grpo, train ppo): rollouts, rewards, policy updates
    num_generations: int = setting(
        6, "GRPO: responses sampled per prompt (the group its advantages are normalised in).", minimum=2
    )
    loss: str = setting(
        "cispo",
        "GRPO: cispo (clipped, detached importance weight; MiniMind's default) or grpo (PPO-style clipped ratio).",
        choices=("cispo", "grpo"),
    )
    epsilon: float = setting(0.2, "GRPO/PPO: clip range of the probability ratio (1 - eps, 1 + eps).", positive=True)
    epsilon_high: float = setting(5.0, "CISPO: upper bound of the importance weight.", positive=True)
    reward: str = setting(
        "format",
        "RL: rewards to sum, comma-separated NAME[:WEIGHT]: exact (answer == gt), "
        "format (MiniMind's rules), model (with --reward-model), module:function.",
    )
    reward_model: str | None = setting(
        None,
        "RL: a transformers sequence-classification model folder scoring the "
        "conversation (name `model` in --reward sets its weight).",
    )
    max_new_tokens: int = setting(1024, "RL: longest response sampled (tokens).", positive=True)
    temperature: float = setting(0.8, "RL: sampling temperature of rollouts.", positive=True)
    top_p: float = setting(1.0, "RL: nucleus sampling of rollouts.", positive=True, maximum=1)
    thinking_ratio: float = setting(
        0.9,
        "RL: share of prompts rendered with the template's open_thinking (the prompt ends in <think>).",
        minimum=0,
        maximum=1,
    )
    ppo_epochs: int = setting(2, "PPO: passes over each rollout batch.", positive=True)
    mini_batch_size: int | None = setting(
        None, "PPO: responses per optimizer step within a rollout batch (default: the whole batch).", positive=True
    )
    gamma: float = setting(1.0, "PPO: GAE discount.", minimum=0, maximum=1)
    lam: float = setting(0.95, "PPO: GAE lambda.", minimum=0, maximum=1)
    value_clip: float = setting(0.2, "PPO: clip range of the value update.", positive=True)
    vf_coef: float = setting(0.5, "PPO: weight of the value loss.", minimum=0)
    early_stop_kl: float = setting(
        0.25,
        "PPO: stop a step's updates once the approximate KL to the rollout policy exceeds this (0: never).",
        minimum=0,
    )
    # Stop after this many optimizer steps of *this* invocation while keeping the schedule of the full
    # run (the LR schedule still spans max_steps). Useful to train in slices; tests use it to interrupt.
    stop_after: int | None = setting(
        None, "Stop after N steps of this invocation (the schedule still spans the run).", positive=True
    )
    quiet: bool = setting(False, "No progress output except the summary.")

    # ------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> "TrainConfig":
        """Build from a dict whose keys may use dashes; unknown keys are refused with their names."""
        return cls().merged(d, source=source)

    def merged(self, d: dict[str, Any], source: str = "config") -> "TrainConfig":
        """A copy with the entries of `d` applied (None values are skipped: they mean "not given").
        Each value is type-checked against its field, so a file's `lr = "1e-3"` or `compile = "no"`
        is refused instead of misread."""
        known = {f.name: f for f in fields(self)}
        norm = {str(k).replace("-", "_"): v for k, v in d.items()}
        unknown = sorted(set(norm) - set(known))
        if unknown:
            raise LLMCoreError(
                f"{source}: unknown training setting(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        values = self.to_dict()
        for k, v in norm.items():
            if v is not None:
                values[k] = check_type(k, v, source)
        return TrainConfig(**values)

    def resolved(self, stage: str | Any, check_paths: bool = True) -> "TrainConfig":
        """Fill the stage's defaults into unset fields and validate every value; raises LLMCoreError.
        Values only: nothing on disk or on the machine is looked at (the run does that when it starts:
        `Stage.check_inputs`, the engine's device), so a GPU run's settings check on a login node.
        `check_paths=False` (`--print-config`): --data, --out and --init may be missing, so a stage's
        defaults can be shown on their own."""
        from llmcore.train.stages import get_stage  # stages.py imports this module (cycle)

        st = get_stage(stage) if isinstance(stage, str) else stage
        values = self.to_dict()
        for k, v in st.defaults.items():
            if values[k] is None:
                values[k] = v
        if st.default_model and not values["model"] and not values["init"]:
            values["model"] = st.default_model
        if values["min_lr"] is None and values["lr"] is not None:
            # MiniMind's cosine ends at lr/10; derived from the lr actually used, so --lr alone rescales it.
            values["min_lr"] = values["lr"] / 10
        cfg = TrainConfig(**values)
        cfg.validate(check_paths)
        if check_paths or cfg.init or cfg.model:
            st.validate(cfg)
        return cfg

    def validate(self, check_paths: bool = True) -> None:
        """Stage-independent checks of the values: each field's declared type, range and choices, then
        the few relations between fields (and, with `check_paths`, that --data and --out are given).
        Whether paths exist and the device is there is the run's to find out, not this method's.
        Stage-specific rules live on the stage object."""
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            check_type(f.name, value, "flags")
            meta, flag = f.metadata, flag_name(f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise LLMCoreError(f"{flag} must be a finite number, got {value!r}")
            if meta.get("positive") and value <= 0:
                kind = "a positive integer" if isinstance(value, int) else "> 0"
                raise LLMCoreError(f"{flag} must be {kind}, got {value!r}")
            if meta.get("minimum") is not None and value < meta["minimum"]:
                raise LLMCoreError(f"{flag} must be >= {meta['minimum']}, got {value!r}")
            if meta.get("maximum") is not None and value > meta["maximum"]:
                raise LLMCoreError(f"{flag} must be <= {meta['maximum']:g}, got {value!r}")
            if meta.get("choices") and value not in meta["choices"]:
                raise LLMCoreError(f"{flag} must be one of {', '.join(meta['choices'])}, got {value!r}")
        if check_paths and not self.data:
            raise LLMCoreError("--data SHARD_DIR is required")
        if check_paths and not self.out:
            raise LLMCoreError("--out RUN_DIR is required")
        if self.model and self.init:
            raise LLMCoreError(
                "give either --model PRESET (fresh weights) or --init RUN_DIR (start from a run), not both"
            )
        if self.min_lr is not None and self.lr is not None and self.min_lr > self.lr:
            raise LLMCoreError(f"--min-lr ({self.min_lr}) must not exceed --lr ({self.lr})")
        if not self.muon_momentum < 1:
            raise LLMCoreError(f"--muon-momentum must be in [0, 1), got {self.muon_momentum}")
        if self.optimizer == "muon" and self.deepspeed is not None:
            check_muon_deepspeed(self.deepspeed, self.grad_clip)  # ZeRO-1/2 only, --grad-clip 0
        for name in ("adam_beta1", "adam_beta2"):
            if not getattr(self, name) < 1:
                raise LLMCoreError(f"{flag_name(name)} must be in [0, 1), got {getattr(self, name)}")
        check_device_spec(self.device)


# ----------------------------------------------------------------------------------------------
# the generic part: types, names, help


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def base_type(annotation: Any) -> type:
    """int / float / bool / str for a field annotation such as `int | None`."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return base_type(args[0])
    if typing.get_origin(annotation) is Literal:
        return str
    return annotation


def check_type(name: str, value: Any, source: str) -> Any:
    """`value` if it has the field's type (ints are accepted for float fields); else LLMCoreError."""
    want = base_type(_field_types()[name])
    ok = isinstance(value, want) and not (want is not bool and isinstance(value, bool))
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        where = flag_name(name) if source == "flags" else f"{source}: {name}"
        hint = ""
        if isinstance(value, str) and want in (int, float):
            try:
                float(value)
                hint = " (a quoted string; write the number without quotes)"
            except ValueError:
                pass
        raise LLMCoreError(f"{where} must be {_type_words(want)}, got {value!r}{hint}")
    return value


def _type_words(t: type) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(t, t.__name__)


# YAML 1.2's float syntax. PyYAML implements YAML 1.1, whose floats need a dot, so `lr: 1e-3` (how
# every paper and recipe writes a learning rate) would be read as the string "1e-3".
_YAML12_FLOAT = (
    r"^[-+]?(?:[0-9][0-9_]*\.?[0-9_]*(?:[eE][-+]?[0-9]+)?|\.[0-9_]+(?:[eE][-+]?[0-9]+)?"
    r"|\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
)


def _yaml_loader(yaml: Any) -> Any:
    """PyYAML's SafeLoader with YAML 1.2 floats (`1e-3`, `5E-4`); a quoted "1e-3" stays a string."""
    import re

    class Loader(yaml.SafeLoader):
        pass

    Loader.yaml_implicit_resolvers = {
        k: [r for r in v if r[0] != "tag:yaml.org,2002:float"]
        for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(_YAML12_FLOAT), list("-+0123456789."))
    # Integers keep their own (earlier-registered) resolver: a plain `1000` is still an int.
    for first in "-+0123456789":
        Loader.yaml_implicit_resolvers[first] = sorted(
            Loader.yaml_implicit_resolvers.get(first, []), key=lambda r: r[0] != "tag:yaml.org,2002:int"
        )
    return Loader


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML (or YAML) file of training settings (top level, or under a `[train]` table)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LLMCoreError(f"--config {p}: no such file") from None
    except (IsADirectoryError, UnicodeDecodeError) as err:
        raise LLMCoreError(f"--config {p}: cannot read it as text ({err})") from None
    if p.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise LLMCoreError(f"--config {p}: YAML needs pyyaml (pip install pyyaml), or use TOML") from None
        try:
            data = yaml.load(text, Loader=_yaml_loader(yaml)) or {}
        except yaml.YAMLError as err:
            raise LLMCoreError(f"--config {p}: not valid YAML ({str(err).splitlines()[0]})") from None
    else:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise LLMCoreError(f"--config {p}: not valid TOML ({err})") from None
    if not isinstance(data, dict):
        raise LLMCoreError(f"--config {p}: expected a table of settings, got {type(data).__name__}")
    if "train" in data and isinstance(data["train"], dict):
        rest = {k: v for k, v in data.items() if k != "train"}
        data = {**rest, **data["train"]}
    return data


def build_config(
    stage: str, cli: dict[str, Any], config_file: str | Path | None = None, *, check_paths: bool = True
) -> TrainConfig:
    """Stage defaults < config file < CLI flags (entries that are None count as not given), resolved.

    With --resume into a run dir that has a config.json, the run's saved settings take the place of
    the defaults: `llmcore train STAGE --out RUN --resume` continues the run as it was, and a flag
    given is a change that `check_resume` accepts, reports or refuses."""
    file_values = load_config_file(config_file) if config_file is not None else {}
    given = {str(k).replace("-", "_"): v for k, v in cli.items() if v is not None}
    explicit = {**{str(k).replace("-", "_"): v for k, v in file_values.items()}, **given}
    cfg = TrainConfig()
    if explicit.get("resume") is True and isinstance(explicit.get("out"), str) and explicit["out"]:
        saved = saved_settings(Path(explicit["out"]))
        if saved is not None:
            if "lr" in explicit and "min_lr" not in explicit:
                saved.pop("min_lr", None)  # derived from the new lr again (lr/10)
            cfg = cfg.merged(saved, source=str(Path(explicit["out"]) / "config.json"))
    if config_file is not None:
        cfg = cfg.merged(file_values, source=str(config_file))
    cfg = cfg.merged(cli, source="flags")
    return cfg.resolved(stage, check_paths=check_paths)


# ----------------------------------------------------------------------------------------------
# resume: what a continued run may change


PER_INVOCATION = ("resume", "stop_after", "quiet", "allow_lr_change")  # never taken from the saved run
# Where the run continues, not what it is: a resume on another machine (or the plain engine after
# DeepSpeed) says it again instead of inheriting it; a change is still reported.
WHERE = ("device", "deepspeed")
# Changes that make the continued run differ from the one the checkpoint belongs to: refused.
RESUME_FIXED = (
    "model",
    "init",
    "seq_len",
    "global_batch_size",
    "packing",
    "seed",
    "eval_docs",
    "on_long",
    "beta",
    "dpo_logp",
    "optimizer",
)
# The learning-rate schedule and the optimizer: changed only with --allow-lr-change.
RESUME_OPTIMIZER = (
    "lr",
    "min_lr",
    "warmup_steps",
    "weight_decay",
    "adam_beta1",
    "adam_beta2",
    "adam_eps",
    "grad_clip",
    "muon_lr",
    "muon_momentum",
    "muon_weight_decay",
    "lr_schedule",
    "decay_fraction",
)


def saved_settings(run_dir: Path) -> dict[str, Any] | None:
    """The training settings a run dir's config.json records (known names only, without the
    per-invocation ones and `WHERE` it ran), or None when there is no readable one."""
    try:
        saved = json.loads((Path(run_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    train = saved.get("train") if isinstance(saved, dict) else None
    if not isinstance(train, dict):
        return None
    known = {f.name for f in fields(TrainConfig)}
    return {k: v for k, v in train.items() if k in known and k not in PER_INVOCATION + WHERE}


def _same_data(old: str, new: str) -> bool:
    """The same shard dir, or a copy/move of it (identical shard checksums in the manifests)."""
    if Path(old).resolve() == Path(new).resolve():
        return True
    try:
        a, b = (json.loads((Path(d) / "manifest.json").read_text(encoding="utf-8")) for d in (old, new))
    except (OSError, ValueError):
        return False
    return (
        isinstance(a, dict)
        and isinstance(b, dict)
        and bool(a.get("shards"))
        and a.get("shards") == b.get("shards")
        and a.get("kind") == b.get("kind")
    )


def _shown(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else repr(value)


def check_resume(saved_run: dict[str, Any], stage_name: str, cfg: TrainConfig, run_dir: Path) -> list[str]:
    """Compare a run dir's config.json (`saved_run`) with the settings of the run that continues it.

    Refuses (LLMCoreError, one line naming each flag with both values) a change of stage, model,
    data, batch, sequence length, seed ... that would make the continued run differ from an
    uninterrupted one; refuses a learning-rate or optimizer change unless --allow-lr-change; returns
    one line per change it accepts (--max-steps, logging, saving, device ...) for the caller to show."""
    saved = saved_run.get("train")
    if not isinstance(saved, dict):
        return []
    if saved_run.get("stage") not in (None, stage_name):
        raise LLMCoreError(
            f"--resume: {run_dir} is a `train {saved_run.get('stage')}` run, not `train {stage_name}`; "
            f"to train {stage_name} on top of it, start a new run with --init {run_dir}"
        )
    now = cfg.to_dict()
    refused, optimizer, applied = [], [], []
    for name in sorted(set(saved) & set(now)):
        if name in PER_INVOCATION or name == "out" or saved[name] == now[name]:
            continue
        old, new = _shown(saved[name]), _shown(now[name])
        change = f"{flag_name(name)} {old} -> {new}"
        if name == "data":
            if _same_data(str(saved[name]), str(now[name])):
                applied.append(f"{change} (the same shards, moved)")
            else:
                refused.append(f"{flag_name(name)}: the run trained on {old}, this command gives {new}")
        elif name in RESUME_FIXED:
            refused.append(f"{flag_name(name)}: the run has {old}, this command gives {new}")
        elif name in RESUME_OPTIMIZER and not cfg.allow_lr_change:
            optimizer.append(change)
        else:
            applied.append(change)
    if refused:
        raise LLMCoreError(
            f"--resume would change what {run_dir} trains, so it would no longer continue the same run: "
            f"{'; '.join(refused)}. Drop those flags to continue it, or start a new run "
            f"(--init {run_dir} to start from its weights)"
        )
    if optimizer:
        raise LLMCoreError(
            f"--resume changes the learning-rate schedule or optimizer of {run_dir} mid-run "
            f"({'; '.join(optimizer)}); pass --allow-lr-change to do that, or drop the flags"
        )
    return applied


__all__ = [
    "TrainConfig",
    "build_config",
    "check_resume",
    "saved_settings",
    "load_config_file",
    "setting",
    "flag_name",
]
