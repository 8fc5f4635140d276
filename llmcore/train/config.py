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
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from llmcore.errors import LLMCoreError
from llmcore.model import BACKENDS

DTYPES = ("auto", "fp32", "bf16")
PACKINGS = ("packed", "bestfit", "padded")
DPO_LOGP = ("sum", "mean")
REF_LOGPS = ("model", "precompute")


def setting(default: Any, help: str, *, choices: tuple[str, ...] | None = None, minimum: float | None = None,
            maximum: float | None = None, positive: bool = False, cli: bool = True) -> Any:
    """Declare one training setting: its default, help text and the checks its values must pass.

    `minimum`/`maximum`: values outside are refused; `positive`: values <= 0 are refused; `choices`: the only
    strings allowed; `cli=False`: settable from a config file or Python only (no flag)."""
    return field(default=default, metadata={"help": help, "choices": choices, "minimum": minimum,
                                            "maximum": maximum, "positive": positive, "cli": cli})


@dataclass
class TrainConfig:
    """Every knob of a training run; the CLI flags and TOML keys have the same names (dashes or underscores)."""

    data: str = setting("", "Shard dir made by `llmcore prep`.")
    out: str = setting("", "Run dir to create (or continue with --resume).")
    model: str | None = setting(None, "Preset for fresh weights (`llmcore model info NAME`): tiny, demo, "
                                      "minimind2-small, minimind2, minimind2-moe.")
    init: str | None = setting(None, "Run dir or checkpoint to start from (DPO: also the frozen reference).")
    tokenizer: str | None = setting(None, "Tokenizer dir, when the shard manifest's path is gone.")
    seq_len: int | None = setting(None, "Tokens per row.", positive=True)
    micro_batch_size: int | None = setting(None, "Rows (DPO: pairs) per forward pass per process.", positive=True)
    global_batch_size: int | None = setting(None, "Rows per optimizer step; accumulation = global / (micro x processes).",
                                            positive=True)
    # The bounds keep values inside what the fp32 optimizer state can hold (1e39 overflows it).
    lr: float | None = setting(None, "Peak learning rate.", positive=True, maximum=1e30)
    min_lr: float | None = setting(None, "Floor of the cosine decay (default: lr/10, as MiniMind).", minimum=0,
                                   maximum=1e30)
    warmup_steps: int = setting(0, "Linear warmup steps from 0 (MiniMind uses none).", minimum=0)
    weight_decay: float = setting(0.01, "AdamW decay of 2-D weights (not norms, biases, embeddings).", minimum=0)
    adam_beta1: float = setting(0.9, "AdamW beta1, in [0, 1).", minimum=0)
    adam_beta2: float = setting(0.999, "AdamW beta2, in [0, 1).", minimum=0)
    adam_eps: float = setting(1e-8, "AdamW epsilon.", minimum=0)
    grad_clip: float = setting(1.0, "Max gradient norm (0: off).", minimum=0)
    epochs: float | None = setting(None, "Passes over the data.", positive=True)
    max_steps: int | None = setting(None, "Optimizer steps (overrides --epochs).", positive=True)
    device: str = setting("auto", "auto (the local rank's GPU, else cuda:0 when CUDA is there, else cpu), cpu, "
                                  "cuda or cuda:N.")
    dtype: str = setting("auto", "auto (bf16 autocast on CUDA, fp32 on CPU), fp32 or bf16 (autocast, fp32 master "
                                 "weights).", choices=DTYPES)
    packing: str | None = setting(None, "packed (the document stream cut into full rows), bestfit (whole documents "
                                        "placed into rows by best-fit decreasing; no document that fits a row is "
                                        "cut) or padded (one per row, MiniMind's layout).", choices=PACKINGS)
    on_long: str = setting("truncate", "SFT: a conversation longer than a row is truncated at the end and counted "
                                       "(truncate) or refused (fail).", choices=("truncate", "fail"))
    attn_backend: str = setting("auto", "auto (triton on CUDA, sdpa on CPU), eager, sdpa or triton.",
                                choices=("auto", *BACKENDS))
    compile: bool = setting(False, "torch.compile the model.")
    eval_every: int = setting(0, "Evaluate every N steps (0: only at the end, when --eval-docs > 0).", minimum=0)
    eval_docs: int = setting(0, "Documents held out for evaluation.", minimum=0)
    save_every: int = setting(0, "Checkpoint every N steps (0: only at the end).", minimum=0)
    keep_last: int = setting(2, "Checkpoints to keep.", positive=True)
    resume: bool = setting(False, "Continue from RUN_DIR's latest checkpoint.")
    wandb: bool = setting(False, "Log to Weights & Biases (offline unless configured).")
    wandb_project: str = setting("llmcore", "wandb project name.")
    seed: int = setting(42, "Seed for init, data order and RNG.", minimum=0)
    deepspeed: str | None = setting(None, "DeepSpeed config: a name (zero0, zero1, zero2, zero3, zero3-offload) or a "
                                          "JSON file.")
    log_every: int = setting(10, "Write metrics every N steps.", positive=True)
    repeat_warning: float = setting(4.0, "Warn at the start when the run passes over its data more than this many "
                                         "times.", positive=True)
    peak_tflops: float | None = setting(None, "The device's dense bf16 peak in TFLOP/s for the `mfu` metric "
                                              "(default: known for common GPUs).", positive=True)
    # DPO (the stage registry shows these only for the stages that name them)
    beta: float = setting(0.1, "DPO: strength of the KL constraint.", positive=True)
    dpo_logp: str = setting("sum", "DPO: sum or mean log-prob per response.", choices=DPO_LOGP)
    ref_logps: str = setting("model", "DPO: model (frozen reference each step) or precompute (one pass, then dropped).",
                             choices=REF_LOGPS)
    # LoRA (train lora)
    lora_rank: int = setting(16, "LoRA: rank of the adapters (MiniMind: 16).", positive=True)
    lora_alpha: float | None = setting(None, "LoRA: scale numerator; the update is alpha/rank * B @ A (default: the "
                                             "rank, so scale 1 as MiniMind).", positive=True)
    lora_targets: str = setting("attention", "LoRA: attention (q/k/v/o projections), all-linear, or layer names "
                                             "separated by commas (e.g. q_proj,v_proj,gate_proj).")
    # Knowledge distillation (train distill)
    teacher: str | None = setting(None, "Distillation: the teacher's run dir or checkpoint (same tokenizer).")
    kd_alpha: float = setting(0.5, "Distillation: weight of the cross-entropy term; the KL term gets 1 - alpha.",
                              minimum=0, maximum=1)
    kd_temperature: float = setting(1.5, "Distillation: softmax temperature of the KL term (its gradient is "
                                         "scaled by T^2).", positive=True)
    # Stop after this many optimizer steps of *this* invocation while keeping the schedule of the full
    # run (the LR schedule still spans max_steps). Useful to train in slices; tests use it to interrupt.
    stop_after: int | None = setting(None, "Stop after N steps of this invocation (the schedule still spans the run).",
                                     positive=True)
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
            raise LLMCoreError(f"{source}: unknown training setting(s): {', '.join(unknown)}; "
                               f"known: {', '.join(sorted(known))}")
        values = self.to_dict()
        for k, v in norm.items():
            if v is not None:
                values[k] = check_type(k, v, source)
        return TrainConfig(**values)

    def resolved(self, stage: str | Any) -> "TrainConfig":
        """Fill the stage's defaults into unset fields and validate every value; raises LLMCoreError."""
        from llmcore.train.stages import get_stage

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
        cfg.validate()
        st.validate(cfg)
        return cfg

    def validate(self) -> None:
        """Stage-independent checks: each field's declared type, range and choices, then the few
        relations between fields. Stage-specific rules live on the stage object."""
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
        if not self.data:
            raise LLMCoreError("--data SHARD_DIR is required")
        if not self.out:
            raise LLMCoreError("--out RUN_DIR is required")
        if self.model and self.init:
            raise LLMCoreError("give either --model PRESET (fresh weights) or --init RUN_DIR (start from a run), not both")
        if self.min_lr is not None and self.lr is not None and self.min_lr > self.lr:
            raise LLMCoreError(f"--min-lr ({self.min_lr}) must not exceed --lr ({self.lr})")
        for name in ("adam_beta1", "adam_beta2"):
            if not getattr(self, name) < 1:
                raise LLMCoreError(f"{flag_name(name)} must be in [0, 1), got {getattr(self, name)}")
        if not Path(self.data).is_dir():
            raise LLMCoreError(f"--data {self.data}: no such shard directory")
        if self.init is not None and not Path(self.init).exists():
            raise LLMCoreError(f"--init {self.init}: no such run dir or checkpoint")
        if self.deepspeed is not None:
            from llmcore.train.engine import deepspeed_config_path

            deepspeed_config_path(self.deepspeed)
        from llmcore.common import resolve_device

        resolve_device(self.device)


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
        raise LLMCoreError(f"{where} must be {_type_words(want)}, got {value!r}")
    return value


def _type_words(t: type) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(t, t.__name__)


def settings_help() -> dict[str, str]:
    return {f.name: f.metadata["help"] for f in fields(TrainConfig)}


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
            data = yaml.safe_load(text) or {}
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


load_toml = load_config_file


def build_config(stage: str, cli: dict[str, Any], config_file: str | Path | None = None) -> TrainConfig:
    """Stage defaults < config file < CLI flags (entries that are None count as not given), resolved."""
    cfg = TrainConfig()
    if config_file is not None:
        cfg = cfg.merged(load_config_file(config_file), source=str(config_file))
    cfg = cfg.merged(cli, source="flags")
    return cfg.resolved(stage)


__all__ = ["TrainConfig", "build_config", "load_config_file", "load_toml", "setting", "flag_name", "settings_help"]
