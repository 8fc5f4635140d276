"""Training: one Trainer loop for every registered stage (pretrain, sft, dpo); plain PyTorch or
DeepSpeed engine, on the CPU or a GPU.

Importing this package never imports deepspeed; only a run with `--deepspeed` does.
"""

from llmcore.train.config import TrainConfig, build_config, load_config_file
from llmcore.train.distributed import shutdown_distributed
from llmcore.train.stages import Stage, all_stages, get_stage, register_stage
from llmcore.train.trainer import RunSummary, Trainer, TrainHooks, TrainingDiverged, TrainingInterrupted, lr_at, train

__all__ = [
    "TrainConfig",
    "Stage",
    "all_stages",
    "get_stage",
    "register_stage",
    "build_config",
    "load_config_file",
    "train",
    "Trainer",
    "RunSummary",
    "TrainHooks",
    "TrainingDiverged",
    "TrainingInterrupted",
    "lr_at",
    "shutdown_distributed",
]
