"""Shared test setup: Triton in interpreter mode without a GPU, caches inside the project, one
intra-op thread, and the fixtures several modules use (real data, the synthetic shards). Plain helpers
live in test_train_common.py and _kernel_helpers.py.

One thread for the whole run (OMP_NUM_THREADS=1 unless the caller set it, so every `llmcore`
subprocess a test starts inherits it): the models here are tiny, and on a 2-core machine two OpenMP
threads spin-wait for each other whenever anything else holds a core (a server thread, a child
process, another pytest worker). Measured on the 2-core machine: test_rl_train.py took 334 s with
torch's default two threads and 42 s with one.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Before torch is imported, so its OpenMP pool starts with one thread (and child processes inherit it).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

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


@pytest.fixture
def minimind_tok_dir(shared_data: Path) -> Path:
    """MiniMind's own tokenizer from the real sample data (skips with a reason when absent)."""
    path = shared_data / "minimind_tokenizer"
    if not (path / "tokenizer.json").is_file():
        pytest.skip(f"MiniMind tokenizer not found at {path}")
    return path


@pytest.fixture
def one_thread():
    """One intra-op thread for the test even when the run was started with OMP_NUM_THREADS above 1
    (modules opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`): their tiny-model
    steps get ~10x slower when two threads spin against each other. Restored afterwards."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def shards() -> dict[str, Path]:
    """Synthetic pretrain/SFT/DPO shard dirs and their tokenizer (built once per process, cached)."""
    from test_train_common import build_shards

    return build_shards()


@pytest.fixture
def no_leftover_handlers():
    """`llmcore.cli.main` adds a plain-line handler to the `llmcore` logger; take it away after the
    test (modules that run the CLI in-process opt in with `usefixtures`)."""
    import logging

    from llmcore.log import PlainHandler

    yield
    logger = logging.getLogger("llmcore")
    for h in [h for h in logger.handlers if isinstance(h, PlainHandler)]:
        logger.removeHandler(h)
