"""Long runs that lose nothing: default save intervals, a checkpoint on SIGINT/SIGTERM with the
command to resume, one writer per run dir (fcntl lock), resume that refuses changes which would
silently alter the run, and run-dir files written with the user's umask (weights included)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_train_common import one_thread, shards  # noqa: F401  (fixtures)
from test_train_common import ROOT, tiny_cfg

from llmcore.errors import LLMCoreError
from llmcore.train import train


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


@pytest.mark.parametrize("mask, want", [(0o022, 0o644), (0o027, 0o640)])
def test_every_checkpoint_file_follows_the_umask_weights_included(shards, tmp_path, mask, want):
    # safetensors' save_file recreates its file 0600; the weights were the one file a teammate or a
    # serving container with another uid could not read.
    old = os.umask(mask)
    try:
        train("pretrain", tiny_cfg("pretrain", shards, tmp_path / "run", max_steps=1))
    finally:
        os.umask(old)
    step = tmp_path / "run" / "checkpoints" / "step-1"
    files = sorted(p for p in step.rglob("*") if p.is_file())
    assert step / "model.safetensors" in files
    assert {p.name: oct(_mode(p)) for p in files} == {p.name: oct(want) for p in files}
