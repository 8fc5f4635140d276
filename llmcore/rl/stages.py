"""`llmcore train grpo` and `llmcore train ppo`: RL stages in the stage registry.

They read an RL jsonl directly (no shards), run their own loop (`llmcore.rl.loop.RLTrainer`:
rollouts, rewards, updates) and share the rest of the training stack: the config and its flags,
the engine, checkpoints, metrics, the run-dir lock and resume.

MiniMind's recipes (jingyaogong/minimind trainer/train_grpo.py, train_ppo.py): lr 3e-7, 2 prompts per
step, prompts up to 768 tokens, responses up to 1024, temperature 0.8, thinking on for 90% of the
prompts; GRPO: 6 samples per prompt, CISPO loss (epsilon_high 5.0) or GRPO (clip 0.2), beta 0.1;
PPO: one sample per prompt, clip 0.2, value clip 0.2, KL 0.02 in the loss, GAE gamma 1.0 / lambda
0.95, 2 update passes, early stop at approximate KL 0.25.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmcore.errors import LLMCoreError
from llmcore.train.stages import ObjectiveContext, Stage, _defaults, register_stage

if TYPE_CHECKING:
    from llmcore.train.config import TrainConfig
    from llmcore.train.protocols import Objective

RL_SETTINGS = ("beta", "reward", "reward_model", "max_new_tokens", "temperature", "top_p", "thinking_ratio")


@dataclass(frozen=True)
class RLStage(Stage):
    """A stage whose tokens exist only after generation: its own loop instead of the Trainer's."""

    algo: str = "grpo"

    def check_data(self, cfg: "TrainConfig") -> None:
        path = Path(cfg.data)
        if not path.is_file():
            raise LLMCoreError(
                f"--data {cfg.data}: no such file ({self.name} reads a jsonl of conversations such as "
                "MiniMind's rlaif.jsonl or agent_rl.jsonl)"
            )

    def build_objective(self, ctx: ObjectiveContext) -> "Objective":
        # Never reached: run() below replaces the Trainer, whose objectives see fixed batches.
        raise LLMCoreError(f"{self.name} has no per-batch objective: its loss needs rollouts (RLTrainer)")

    def validate(self, cfg: "TrainConfig") -> None:
        super().validate(cfg)
        if cfg.model:
            raise LLMCoreError(f"{self.name} improves a trained model: pass --init RUN_DIR, not --model")

    def run(self, cfg: "TrainConfig", hooks: Any = None) -> Any:
        from llmcore.rl.loop import RLTrainer

        self.check_inputs(cfg)
        return RLTrainer(self, cfg, self.algo).run()


GRPO = register_stage(
    RLStage(
        name="grpo",
        shard_kind="rl",
        algo="grpo",
        summary="GRPO/CISPO: sample a group of responses per prompt, score them with rewards, raise the better ones.",
        example="llmcore train grpo --data rlaif.jsonl --init runs/sft --out runs/grpo --reward format",
        defaults=_defaults(lr=3e-7, micro_batch_size=6, global_batch_size=12, seq_len=768, epochs=1.0, beta=0.1),
        settings=RL_SETTINGS + ("num_generations", "loss", "epsilon", "epsilon_high"),
        needs_init="the policy starts from it (an SFT run) and it is the frozen reference of the KL term",
        reports_perplexity=False,
        loss_unit="policy loss",
    )
)

PPO = register_stage(
    RLStage(
        name="ppo",
        shard_kind="rl",
        algo="ppo",
        summary="PPO: one response per prompt, a value head, GAE advantages and clipped updates.",
        example="llmcore train ppo --data rlaif.jsonl --init runs/sft --out runs/ppo --reward format",
        defaults=_defaults(lr=3e-7, micro_batch_size=2, global_batch_size=2, seq_len=768, epochs=1.0, beta=0.02),
        settings=RL_SETTINGS
        + ("epsilon", "ppo_epochs", "mini_batch_size", "gamma", "lam", "value_clip", "vf_coef", "early_stop_kl"),
        needs_init="the policy starts from it (an SFT run) and it is the frozen reference of the KL term",
        reports_perplexity=False,
        loss_unit="policy loss",
    )
)

__all__ = ["RLStage", "GRPO", "PPO", "RL_SETTINGS"]
