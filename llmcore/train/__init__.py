"""Training: one Trainer loop for pretrain, SFT and DPO; plain PyTorch or DeepSpeed engine.

Importing this package never imports deepspeed; only a run with `--deepspeed` does.
"""

from llmcore.train.config import STAGE_DEFAULTS, STAGES, TrainConfig, build_config, load_toml
from llmcore.train.trainer import RunSummary, TrainHooks, TrainingDiverged, lr_at, shutdown_distributed, train

__all__ = ["TrainConfig", "STAGES", "STAGE_DEFAULTS", "build_config", "load_toml", "train", "RunSummary",
           "TrainHooks", "TrainingDiverged", "lr_at", "shutdown_distributed"]
