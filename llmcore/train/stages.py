"""The stage registry: each training stage (pretrain, sft, dpo, lora, distill, ...) is one object.

A stage names the shard kind it trains on, how its loader lays out rows, its objective, the
settings only it has and its defaults, what it validates, and which metrics it reports. The
trainer, the CLI and `llmcore eval` ask the stage; none of them compares a stage's name.

Adding an objective (ORPO, KTO): write its Objective class in `objectives.py`, a Stage subclass
(or instance) here and `register_stage(...)` it; add its own settings as fields of `TrainConfig`
(`config.py`, one `setting(...)` line each) and name them in the stage's `settings`. The CLI
command `llmcore train NAME`, its `--help` defaults, config-file keys and validation follow.
A new shard layout (KTO's unpaired rows) is also a shard kind in `llmcore.data_prep`.

A stage may also change the model (`model_hook(cfg)`, a `ModelHook`): the trainer builds the base
model (preset or `--init`), hands it to the hook before the engine wraps it, and lets the hook write
and read the checkpoint's weights. LoRA (adapters on a frozen base, only adapters saved) is such a
hook; the trainer knows nothing of it. The default hook keeps the model and saves full weights.

The registry is read when it is used (`all_stages()`, `get_stage()`), never snapshotted at import,
so a stage registered by another module (a plugin, a test) gets its `llmcore train NAME` command
from the CLI built after the registration.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Callable, Mapping

from llmcore.common import to_device
from llmcore.errors import LLMCoreError

if TYPE_CHECKING:
    import torch

    from llmcore.train.config import TrainConfig
    from llmcore.train.protocols import ModelHook, Objective


@dataclass(frozen=True)
class ObjectiveContext:
    """What a stage may use to build its objective: the resolved config, the engine's autocast,
    a loader factory `(doc_indices, rank, world, shuffle) -> loader` and the held-out split."""

    cfg: "TrainConfig"
    autocast: Callable[[], Any]
    device: Any
    make_loader: Callable[..., Any]
    train_idx: Any
    eval_idx: Any
    model: Any = None  # the model being trained (after the stage's model hook), e.g. to check a teacher against
    tokenizer: Any = None  # the run's tokenizer (the one the shards were made with)


class FullWeights:
    """The default model hook: the model trains as built; checkpoints hold its full weights
    (`model.safetensors` + `model_config.json`) and resume loads them back."""

    def __init__(self, cfg: "TrainConfig") -> None:
        self.cfg = cfg

    def convert(self, model: "torch.nn.Module") -> "torch.nn.Module":
        return model

    def save(self, model: "torch.nn.Module", step_dir: Path) -> None:
        from llmcore.checkpoint import save_model

        save_model(model, step_dir)  # type: ignore[arg-type]

    def load(self, step_dir: Path) -> "torch.nn.Module":
        from llmcore.checkpoint import load_model

        model, _ = load_model(step_dir, attn_backend=self.cfg.attn_backend, with_tokenizer=False)
        return model


@dataclass(frozen=True)
class Stage(ABC):
    """One training stage. Subclasses choose the objective; instances choose defaults and texts."""

    name: str
    shard_kind: str  # the `llmcore prep KIND` shard dirs this stage trains on
    summary: str  # first line of `llmcore train NAME --help`
    example: str
    defaults: Mapping[str, Any]  # values for settings left unset (None) by file and flags
    settings: tuple[str, ...] = ()  # settings only this stage has (shown only in its --help)
    needs_init: str | None = None  # why --init is required, or None when a fresh --model is fine
    needs_init_or_model: bool = False
    default_model: str | None = None  # preset when neither --model nor --init is given
    eval_key: str = "ce_loss"  # the objective term whose mean is `eval_loss`
    reports_perplexity: bool = True
    plot_panels: tuple[tuple[str, ...], ...] = ()  # extra metric groups for loss.png
    loss_unit: str = "nats/token"  # what one unit of the logged loss is an average over
    other_shard_kinds: tuple[str, ...] = ()  # further kinds it also trains on (distillation: pretrain and sft)

    @property
    def shard_kinds(self) -> tuple[str, ...]:
        return (self.shard_kind, *self.other_shard_kinds)

    def loader_mode(self, cfg: "TrainConfig") -> str:
        return str(cfg.packing)

    def model_hook(self, cfg: "TrainConfig") -> "ModelHook":
        """How this stage changes, saves and reloads the model (see `ModelHook`); one per run."""
        return FullWeights(cfg)

    def check_data(self, cfg: "TrainConfig") -> None:
        """`--data` is what this stage reads: a shard dir made by `llmcore prep` (RL stages: a jsonl)."""
        if not Path(cfg.data).is_dir():
            raise LLMCoreError(f"--data {cfg.data}: no such shard directory")

    def check_inputs(self, cfg: "TrainConfig") -> None:
        """The paths this run reads are there (`check_data`, then --init): called when the run starts
        (`Trainer.from_config`, a stage's own `run`), before a process group is joined or the run dir
        is locked. Settings validation (`validate`) never looks at the disk: it also runs where the
        paths are not (`llmcore launch` on a login node)."""
        self.check_data(cfg)
        if cfg.init is not None and not Path(cfg.init).exists():
            raise LLMCoreError(f"--init {cfg.init}: no such run dir or checkpoint")

    def run(self, cfg: "TrainConfig", hooks: Any = None) -> Any:
        """Train a resolved config into `cfg.out` and return the `RunSummary`: the Trainer's loop
        (a stage with a loop of its own, such as RL's rollouts, overrides this)."""
        from llmcore.train.trainer import Trainer

        return Trainer.from_config(self, cfg, hooks).run()

    @abstractmethod
    def build_objective(self, ctx: ObjectiveContext) -> "Objective":
        """The objective this stage minimises, built once per run."""

    def validate(self, cfg: "TrainConfig") -> None:
        if self.needs_init and not cfg.init:
            raise LLMCoreError(f"{self.name} needs --init RUN_DIR: {self.needs_init}")
        if self.needs_init_or_model and not cfg.init and not cfg.model:
            raise LLMCoreError(
                f"{self.name} starts from a trained model: pass --init RUN_DIR (or --model PRESET for fresh weights)"
            )


@dataclass(frozen=True)
class LanguageModelStage(Stage):
    """Masked next-token cross-entropy over the rows' label tokens (pretrain: all; SFT: assistant).

    `packings`: the row layouts this stage accepts (a masked stage never cuts a conversation
    across rows, so it has no stream packing)."""

    packings: tuple[str, ...] = ("packed", "bestfit", "padded")

    def validate(self, cfg: "TrainConfig") -> None:
        super().validate(cfg)
        if cfg.packing not in self.packings:
            raise LLMCoreError(
                f"--packing {cfg.packing}: {self.name} rows are {' or '.join(self.packings)} "
                "(a conversation is never split across rows)"
            )

    def build_objective(self, ctx: ObjectiveContext) -> "Objective":
        from llmcore.train.objectives import LMObjective

        return LMObjective()


@dataclass(frozen=True)
class PreferenceStage(Stage):
    """DPO against a frozen reference model (the --init run), or its log-probs computed once."""

    def loader_mode(self, cfg: "TrainConfig") -> str:
        return "pairs"

    def validate(self, cfg: "TrainConfig") -> None:
        super().validate(cfg)
        if not cfg.beta:
            raise LLMCoreError(f"--beta must be > 0 for {self.name}, got {cfg.beta!r}")

    def build_objective(self, ctx: ObjectiveContext) -> "Objective":
        from llmcore.checkpoint import load_model
        from llmcore.train.objectives import DPOObjective, precompute_reference

        cfg = ctx.cfg
        ref, _ = load_model(
            cfg.init,
            device=ctx.device,
            attn_backend=cfg.attn_backend,  # type: ignore[arg-type]
            with_tokenizer=False,
        )
        ref = ref.float().eval()
        ref.requires_grad_(False)
        average = cfg.dpo_logp == "mean"
        if cfg.ref_logps == "model":
            return DPOObjective(cfg.beta, average, ref_model=ref, autocast=ctx.autocast)
        # One pass over every row this run can see (all ranks' rows: shuffling moves rows between ranks
        # from epoch to epoch), then the reference model is dropped.
        cache: dict[bytes, float] = {}
        for idx in [ctx.train_idx] + ([ctx.eval_idx] if ctx.eval_idx is not None else []):
            ld = ctx.make_loader(idx, 0, 1, shuffle=False)
            batches = (to_device(next(ld), ctx.device) for _ in range(ld.steps_per_epoch))
            cache.update(precompute_reference(ref, batches, average, ctx.autocast))
        del ref
        return DPOObjective(cfg.beta, average, ref_cache=cache)


@dataclass(frozen=True)
class LoRAStage(LanguageModelStage):
    """LoRA: the LM loss, trained only through low-rank adapters on the frozen --init model
    (`llmcore.lora.LoRAHook`); checkpoints hold the adapters and the base's path and sha256."""

    def model_hook(self, cfg: "TrainConfig") -> "ModelHook":
        from llmcore.lora import LoRAHook

        return LoRAHook(cfg)


@dataclass(frozen=True)
class DistillStage(LanguageModelStage):
    """Knowledge distillation from a frozen --teacher run that shares the student's tokenizer."""

    def validate(self, cfg: "TrainConfig") -> None:
        super().validate(cfg)
        if not cfg.teacher:
            raise LLMCoreError(
                f"{self.name} needs --teacher RUN_DIR (the model whose token distributions the student learns)"
            )

    def check_inputs(self, cfg: "TrainConfig") -> None:
        super().check_inputs(cfg)
        if not Path(cfg.teacher).exists():
            raise LLMCoreError(f"--teacher {cfg.teacher}: no such run dir or checkpoint")

    def build_objective(self, ctx: ObjectiveContext) -> "Objective":
        from llmcore.checkpoint import load_model
        from llmcore.train.objectives import DistillObjective

        cfg = ctx.cfg
        teacher, teacher_tok = load_model(
            cfg.teacher,
            device=ctx.device,  # type: ignore[arg-type]
            attn_backend=cfg.attn_backend,
            with_tokenizer=True,
        )
        check_same_tokenizer(cfg.teacher, teacher, teacher_tok, ctx.model, ctx.tokenizer)  # type: ignore[arg-type]
        # The student's precision: fp32 weights, the engine's autocast around the forward.
        teacher = teacher.float().eval()
        teacher.requires_grad_(False)
        return DistillObjective(teacher, cfg.kd_alpha, cfg.kd_temperature, autocast=ctx.autocast)


def check_same_tokenizer(teacher_path: str, teacher: Any, teacher_tok: Any, student: Any, tokenizer: Any) -> None:
    """A teacher whose logits do not index the student's vocabulary is refused in one line: another
    vocab size, other special ids, or a stored tokenizer with another vocabulary than --data's."""
    from llmcore.model import unwrap_model

    t, s = teacher.config, unwrap_model(student).config
    if t.vocab_size != s.vocab_size:
        raise LLMCoreError(
            f"--teacher {teacher_path} has a vocabulary of {t.vocab_size} tokens, the student "
            f"{s.vocab_size}; distillation needs one tokenizer for both"
        )
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(t, name) != getattr(s, name):
            raise LLMCoreError(
                f"--teacher {teacher_path} has {name} {getattr(t, name)}, the student "
                f"{getattr(s, name)}; distillation needs one tokenizer for both"
            )
    if teacher_tok is not None and tokenizer is not None and teacher_tok.fingerprint != tokenizer.fingerprint:
        raise LLMCoreError(
            f"--teacher {teacher_path} was trained with another tokenizer than --data (fingerprint "
            f"{teacher_tok.fingerprint[:12]}... vs {tokenizer.fingerprint[:12]}...); distillation "
            "needs one tokenizer for both"
        )


# MiniMind's published recipes (jingyaogong/minimind trainer/train_pretrain.py, train_full_sft.py,
# train_dpo.py): pretrain lr 5e-4 with batch 32 x accumulation 8; full SFT lr 1e-5, batch 16, no
# accumulation; DPO lr in the 1e-8..5e-7 range (their latest default is 4e-8, "<=5e-8 avoids
# forgetting"), batch 4. Their cosine schedule ends at lr/10, which is our min_lr default. Sequence
# lengths: pretrain 512 (the design's benchmark length), SFT 768 and DPO 1024 as MiniMind.
_REGISTRY: dict[str, Stage] = {}


def register_stage(stage: Stage) -> Stage:
    if stage.name in _REGISTRY:
        raise ValueError(f"stage {stage.name!r} is already registered")
    _REGISTRY[stage.name] = stage
    return stage


def get_stage(name: str) -> Stage:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise LLMCoreError(f"unknown stage {name!r}; expected one of {', '.join(_REGISTRY)}") from None


def all_stages() -> list[Stage]:
    return list(_REGISTRY.values())


def stage_only_settings() -> set[str]:
    """Settings some stage claims as its own: the other stages' commands do not show them."""
    return {name for st in _REGISTRY.values() for name in st.settings}


def _defaults(**kw: Any) -> Mapping[str, Any]:
    return MappingProxyType(kw)


PRETRAIN = register_stage(
    LanguageModelStage(
        name="pretrain",
        shard_kind="pretrain",
        summary="Pretraining: next-token loss on every token.",
        example="llmcore train pretrain --data shards/pretrain --model minimind2-small --out runs/pre",
        defaults=_defaults(
            lr=5e-4, micro_batch_size=32, global_batch_size=256, seq_len=512, epochs=1.0, packing="packed"
        ),
        settings=("packing",),
        default_model="minimind2-small",
    )
)

SFT = register_stage(
    LanguageModelStage(
        name="sft",
        shard_kind="sft",
        summary="Supervised fine-tuning: loss on the assistant's tokens only.",
        example="llmcore train sft --data shards/sft --init runs/pre --out runs/sft",
        defaults=_defaults(
            lr=1e-5, micro_batch_size=16, global_batch_size=16, seq_len=768, epochs=2.0, packing="bestfit"
        ),
        settings=("packing", "on_long"),
        needs_init_or_model=True,
        packings=("bestfit", "padded"),
    )
)

DPO = register_stage(
    PreferenceStage(
        name="dpo",
        shard_kind="dpo",
        summary="DPO: preference pairs against a frozen reference model.",
        example="llmcore train dpo --data shards/dpo --init runs/sft --out runs/dpo --beta 0.1",
        defaults=_defaults(lr=4e-8, micro_batch_size=4, global_batch_size=4, seq_len=1024, epochs=1.0, beta=0.1),
        settings=("beta", "dpo_logp", "ref_logps"),
        needs_init="the policy starts from it and it is the frozen reference model",
        eval_key="dpo_loss",
        reports_perplexity=False,
        loss_unit="nats/pair",
        plot_panels=(("rewards/accuracy",), ("rewards/margin", "rewards/chosen", "rewards/rejected")),
    )
)

# MiniMind's train_lora.py: lr 1e-4, rank 16 adapters, on the SFT data; the rest as full SFT.
LORA = register_stage(
    LoRAStage(
        name="lora",
        shard_kind="sft",
        other_shard_kinds=("pretrain",),
        summary="LoRA: low-rank adapters on a frozen model (SFT or pretrain shards); saves only the adapters.",
        example="llmcore train lora --data shards/sft --init runs/sft --out runs/lora",
        defaults=_defaults(
            lr=1e-4, micro_batch_size=16, global_batch_size=16, seq_len=768, epochs=2.0, packing="bestfit"
        ),
        settings=("packing", "on_long", "lora_rank", "lora_alpha", "lora_targets"),
        needs_init="the adapters train on top of its (frozen) weights",
        packings=("bestfit", "padded"),
    )
)

# MiniMind's train_distillation.py: alpha 0.5 (CE weight), T 1.5, lr 5e-6 for a student that starts
# from a trained model (a fresh --model student wants a pretraining lr such as 5e-4), on SFT data.
DISTILL = register_stage(
    DistillStage(
        name="distill",
        shard_kind="sft",
        other_shard_kinds=("pretrain",),
        summary="Knowledge distillation: a*CE + (1-a)*T^2*KL(teacher||student) on SFT or pretrain shards.",
        example="llmcore train distill --data shards/sft --teacher runs/big --init runs/small --out runs/kd",
        defaults=_defaults(
            lr=5e-6, micro_batch_size=16, global_batch_size=16, seq_len=768, epochs=2.0, packing="bestfit"
        ),
        settings=("packing", "on_long", "teacher", "kd_alpha", "kd_temperature"),
        needs_init_or_model=True,
        packings=("bestfit", "padded"),
        plot_panels=(("kd_loss", "ce_loss"), ("top1_agreement",)),
    )
)

__all__ = [
    "Stage",
    "LanguageModelStage",
    "PreferenceStage",
    "LoRAStage",
    "DistillStage",
    "ObjectiveContext",
    "FullWeights",
    "register_stage",
    "get_stage",
    "all_stages",
    "stage_only_settings",
    "check_same_tokenizer",
    "PRETRAIN",
    "SFT",
    "DPO",
    "LORA",
    "DISTILL",
]

# RL stages (grpo, ppo) live in llmcore.rl.stages; importing them here registers them with the rest.
from llmcore.rl import stages as _rl_stages  # noqa: E402,F401
