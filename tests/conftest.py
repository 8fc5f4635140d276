"""Shared test setup: Triton in interpreter mode without a GPU, caches inside the project, real-data fixture."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Must happen before anything imports triton: without a GPU, Triton only runs in its interpreter.
try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover - torch is a hard dependency
    pass
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def shared_data_dir() -> Path:
    """../shared/data beside the repository (LLMCORE_SHARED_DATA overrides)."""
    return Path(os.environ.get("LLMCORE_SHARED_DATA", ROOT.parent / "shared" / "data"))


@pytest.fixture
def shared_data() -> Path:
    """The real sample data; tests that need it skip with a reason when it is absent."""
    path = shared_data_dir()
    if not (path / "pretrain_sample.jsonl").exists():
        pytest.skip(f"real sample data not found at {path} (../shared/data is absent in this checkout)")
    return path
