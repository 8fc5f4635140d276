"""Checkpoints and exact resume: an interrupted run continued with --resume equals the uninterrupted
run bit for bit (weights and every logged loss), with the plain engine and with one-process
DeepSpeed; a save killed half way leaves the previous checkpoint loadable and resumable."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from llmcore.checkpoint import load_model
from llmcore.train import TrainHooks, train
from llmcore.train.deepspeed_config import deepspeed_config_path

from test_train_common import ROOT, assert_same_weights, losses, pretrained_run, tiny_cfg

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _has_deepspeed() -> bool:
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        return False
    return True


class Interrupt(Exception):
    pass


def _interrupt_at(step: int) -> TrainHooks:
    def on_step(s: int, record: dict) -> None:
        if s == step:
            raise Interrupt

    return TrainHooks(on_step=on_step)


ENGINES = [
    pytest.param(None, id="plain"),
    pytest.param(
        "zero0", id="deepspeed-zero0", marks=pytest.mark.skipif(not _has_deepspeed(), reason="deepspeed not installed")
    ),
]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("stage", ["pretrain", "sft"])
def test_resume_equals_uninterrupted_run(shards, tmp_path, stage, engine):
    extra = {"init": str(pretrained_run())} if stage == "sft" else {}
    if engine:
        extra["deepspeed"] = str(deepspeed_config_path(engine))
    # Steps cross an epoch boundary of the SFT data, and the interrupt falls between checkpoints.
    kw = dict(max_steps=7, save_every=2, keep_last=2, eval_docs=6, eval_every=3, **extra)
    full = train(stage, tiny_cfg(stage, shards, tmp_path / "full", **kw))
    with pytest.raises(Interrupt):
        train(stage, tiny_cfg(stage, shards, tmp_path / "cut", **kw), hooks=_interrupt_at(5))
    ck = tmp_path / "cut" / "checkpoints"
    assert (ck / "latest").read_text().strip() == "step-4"
    assert sorted(p.name for p in ck.iterdir()) == ["latest", "step-2", "step-4"]
    resumed = train(stage, tiny_cfg(stage, shards, tmp_path / "cut", resume=True, **kw))
    assert resumed.steps == full.steps == 7
    assert losses(tmp_path / "cut") == losses(tmp_path / "full")  # exact floats, every step
    assert [s for s, _ in losses(tmp_path / "cut")] == list(range(1, 8))
    assert_same_weights(tmp_path / "cut", tmp_path / "full")
    assert sorted(p.name for p in ck.iterdir()) == ["latest", "step-6", "step-7"]  # keep_last=2
    # Plain and DeepSpeed engine states are loadable without pickles.
    step_dir = ck / "step-7"
    torch.load(step_dir / "rng_state.pt", weights_only=True)
    if not engine:
        torch.load(step_dir / "optimizer.pt", weights_only=True)
    state = json.loads((step_dir / "trainer_state.json").read_text())
    assert state["step"] == 7 and state["tokens"] == resumed.tokens


@pytest.mark.skipif(not _has_deepspeed(), reason="deepspeed not installed")
def test_one_process_deepspeed_matches_plain_engine(shards, tmp_path):
    kw = dict(max_steps=4)
    plain = train("pretrain", tiny_cfg("pretrain", shards, tmp_path / "plain", **kw))
    ds = train(
        "pretrain", tiny_cfg("pretrain", shards, tmp_path / "ds", deepspeed=str(deepspeed_config_path("zero1")), **kw)
    )
    assert plain.steps == ds.steps == 4
    for (s1, a), (s2, b) in zip(losses(tmp_path / "plain"), losses(tmp_path / "ds")):
        assert s1 == s2 and a == pytest.approx(b, abs=1e-5)


KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from test_train_common import tiny_cfg
    from llmcore.train import TrainHooks, train

    def on_file(path: Path) -> None:
        # Die like kill -9 right after the weights of the second checkpoint hit the disk.
        if path.name == "model.safetensors" and path.parent.name == ".step-4.tmp":
            os.kill(os.getpid(), signal.SIGKILL)

    shards = {{k: Path(v) for k, v in {shards!r}.items()}}
    train("pretrain", tiny_cfg("pretrain", shards, Path({out!r}), max_steps=6, save_every=2),
          hooks=TrainHooks(on_save_file=on_file))
""")


def test_kill_during_checkpoint_write_keeps_previous_and_resume_works(shards, tmp_path):
    out = tmp_path / "run"
    script = KILL_SCRIPT.format(tests=str(ROOT / "tests"), out=str(out), shards={k: str(v) for k, v in shards.items()})
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == -9, proc.stderr[-2000:]
    ck = out / "checkpoints"
    assert (ck / "latest").read_text().strip() == "step-2"
    assert (ck / ".step-4.tmp").is_dir() and not (ck / "step-4").exists()
    model, tok = load_model(out)  # follows `latest` to the complete step-2
    assert tok is not None and model.config.hidden_size == 64

    # Resuming removes the half-written dir and reaches the uninterrupted result.
    resumed = train("pretrain", tiny_cfg("pretrain", shards, out, max_steps=6, save_every=2, resume=True))
    assert resumed.steps == 6 and not (ck / ".step-4.tmp").exists()
    full = train("pretrain", tiny_cfg("pretrain", shards, tmp_path / "full", max_steps=6, save_every=2))
    assert losses(out) == losses(tmp_path / "full")
    assert_same_weights(out, tmp_path / "full")
    assert full.steps == 6


@pytest.mark.skipif(not _has_deepspeed(), reason="deepspeed not installed")
@pytest.mark.parametrize("ds, dtype", [("zero2", "bf16"), ("zero3-offload", "fp32")])
def test_deepspeed_zero_resume_is_exact(shards, tmp_path, ds, dtype):
    """ZeRO-2 with bf16 (fp32 master weights kept apart from the bf16 module) and ZeRO-3 with
    offload: the optimizer state comes back from optimizer.safetensors bit for bit."""
    kw = dict(max_steps=5, save_every=2, deepspeed=ds, dtype=dtype)
    train("pretrain", tiny_cfg("pretrain", shards, tmp_path / "full", **kw))
    train("pretrain", tiny_cfg("pretrain", shards, tmp_path / "cut", stop_after=2, **kw))
    names = {p.name for p in (tmp_path / "cut" / "checkpoints" / "step-2").iterdir()}
    assert "optimizer.safetensors" in names and "engine" not in names
    train("pretrain", tiny_cfg("pretrain", shards, tmp_path / "cut", resume=True, **kw))
    assert losses(tmp_path / "cut") == losses(tmp_path / "full")
    assert_same_weights(tmp_path / "cut", tmp_path / "full")


@pytest.mark.skipif(not _has_deepspeed(), reason="deepspeed not installed")
def test_plain_checkpoint_resumes_under_deepspeed(shards, tmp_path):
    """Engines share one optimizer-state meaning (per parameter name): a plain run continued with
    --deepspeed zero1 follows the uninterrupted plain run."""
    kw = dict(max_steps=4, save_every=2)
    train("pretrain", tiny_cfg("pretrain", shards, tmp_path / "full", **kw))
    train("pretrain", tiny_cfg("pretrain", shards, tmp_path / "cut", stop_after=2, **kw))
    train("pretrain", tiny_cfg("pretrain", shards, tmp_path / "cut", resume=True, deepspeed="zero1", **kw))
    got, want = losses(tmp_path / "cut"), losses(tmp_path / "full")
    assert [s for s, _ in got] == [1, 2, 3, 4]
    for (_, a), (_, b) in zip(got, want):
        assert a == pytest.approx(b, abs=1e-5)
