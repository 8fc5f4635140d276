"""`llmcore train grpo|ppo` end to end on CPU: a reward that rises (and does not with lr 0), exact
resume, PPO's value head, DeepSpeed ZeRO-2, and one-line errors for bad rows and bad rewards."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmcore.checkpoint import load_model, save_model
from llmcore.errors import DataError, LLMCoreError
from llmcore.model import LLM, ModelConfig
from llmcore.train import train
from llmcore.train.config import TrainConfig
from llmcore.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [f"第{i}题：天是蓝的吗？只答是或否。" for i in range(8)]


@pytest.fixture(scope="module")
def policy_run(tmp_path_factory) -> Path:
    """A tiny model fine-tuned (a plain torch loop, independent of llmcore's trainer) on each prompt
    answered "是" half the time and "否" the other half: right about half the time."""
    from conftest import shared_data_dir

    from llmcore.data_prep.tokenizer import load_tokenizer

    tok_dir = shared_data_dir() / "minimind3_tokenizer"
    if not (tok_dir / "tokenizer.json").is_file():
        pytest.skip(f"MiniMind-3 tokenizer not found at {tok_dir}")
    tok = load_tokenizer(tok_dir)
    torch.manual_seed(0)
    model = LLM(ModelConfig.from_preset("tiny", vocab_size=tok.vocab_size, max_position_embeddings=256))
    rows = [
        tok.encode_chat([{"role": "user", "content": p}, {"role": "assistant", "content": answer}])
        for p in PROMPTS
        for answer in ("是", "否")
    ]
    width = max(len(ids) for ids, _ in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)  # right-padded: causal attention never sees the pad
    mask = torch.zeros(len(rows), width)
    for i, (t, m) in enumerate(rows):
        ids[i, : len(t)] = torch.tensor(t)
        mask[i, : len(m)] = torch.tensor(m, dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(120):
        logits = model(ids[:, :-1]).logits
        ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        loss = (ce * mask[:, 1:]).sum() / mask[:, 1:].sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    run = tmp_path_factory.mktemp("sft") / "run"
    save_model(model.eval(), run / "checkpoints" / "step-1")
    (run / "checkpoints" / "latest").write_text("step-1\n")
    shutil.copytree(tok_dir, run / "tokenizer")
    return run


@pytest.fixture
def rl_data(tmp_path: Path) -> Path:
    path = tmp_path / "rl.jsonl"
    path.write_text(
        "".join(
            json.dumps(
                {"conversations": [{"role": "user", "content": p}, {"role": "assistant", "content": ""}], "gt": "是"},
                ensure_ascii=False,
            )
            + "\n"
            for p in PROMPTS
        )
    )
    return path


def rl_cfg(data: Path, init: Path, out: Path, **kw) -> TrainConfig:
    base = dict(
        data=str(data),
        init=str(init),
        out=str(out),
        lr=2e-3,
        min_lr=2e-3,
        num_generations=8,
        global_batch_size=16,
        micro_batch_size=8,
        max_new_tokens=3,
        temperature=1.0,
        thinking_ratio=0.0,
        beta=0.0,
        reward="exact",
        max_steps=24,
        log_every=1,
        device="cpu",
        dtype="fp32",
        seed=3,
        quiet=True,
        seq_len=64,
    )
    base.update(kw)
    return TrainConfig(**base)


def rewards(run: Path) -> list[float]:
    return [r["reward"] for r in read_metrics(run / "metrics.jsonl") if "reward" in r]


def test_grpo_raises_a_verifiable_reward_and_lr_0_does_not(policy_run: Path, rl_data: Path, tmp_path: Path) -> None:
    summary = train("grpo", rl_cfg(rl_data, policy_run, tmp_path / "grpo"))
    got = rewards(tmp_path / "grpo")
    assert len(got) == 24 and summary.steps == 24
    first, last = sum(got[:4]) / 4, sum(got[-4:]) / 4
    assert 0.2 < first < 0.8, got  # the starting model is partly right
    assert last > first + 0.25 and last > 0.85, got

    # The same run with lr 0: the same rollouts at step 1, and no rise.
    from llmcore.rl.loop import RLTrainer
    from llmcore.train.stages import get_stage

    cfg0 = dataclasses.replace(rl_cfg(rl_data, policy_run, tmp_path / "lr0").resolved("grpo"), lr=0.0, min_lr=0.0)
    RLTrainer(get_stage("grpo"), cfg0, "grpo").run()
    flat = rewards(tmp_path / "lr0")
    assert flat[0] == got[0]
    assert sum(flat[-4:]) / 4 < first + 0.2, flat
    # The policy checkpoint is a plain run: generate/chat/--init load it.
    model, tok = load_model(tmp_path / "grpo")
    assert tok is not None and model.config.vocab_size == tok.vocab_size
    assert (tmp_path / "grpo" / "loss.png").stat().st_size > 0


def test_grpo_resume_is_exact(policy_run: Path, rl_data: Path, tmp_path: Path) -> None:
    train("grpo", rl_cfg(rl_data, policy_run, tmp_path / "full", max_steps=4, beta=0.1, loss="grpo"))
    train("grpo", rl_cfg(rl_data, policy_run, tmp_path / "half", max_steps=4, beta=0.1, loss="grpo", stop_after=2))
    train("grpo", rl_cfg(rl_data, policy_run, tmp_path / "half", max_steps=4, beta=0.1, loss="grpo", resume=True))
    a = read_metrics(tmp_path / "full" / "metrics.jsonl")
    b = read_metrics(tmp_path / "half" / "metrics.jsonl")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        assert x["reward"] == y["reward"] and x["loss"] == pytest.approx(y["loss"], abs=1e-6)
    wa = load_model(tmp_path / "full")[0].state_dict()
    wb = load_model(tmp_path / "half")[0].state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_ppo_runs_with_a_value_head_and_resumes(policy_run: Path, rl_data: Path, tmp_path: Path) -> None:
    kw = dict(global_batch_size=4, micro_batch_size=2, mini_batch_size=2, max_steps=3, beta=0.02, ppo_epochs=2)
    train("ppo", rl_cfg(rl_data, policy_run, tmp_path / "ppo", **kw))
    rows = read_metrics(tmp_path / "ppo" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all("value_loss" in r and r["ppo_updates"] >= 1 for r in rows)
    step = tmp_path / "ppo" / "checkpoints" / "step-3"
    assert (step / "value_head.safetensors").is_file() and (step / "model.safetensors").is_file()
    train("ppo", rl_cfg(rl_data, policy_run, tmp_path / "ppo2", stop_after=2, **kw))
    train("ppo", rl_cfg(rl_data, policy_run, tmp_path / "ppo2", resume=True, **kw))
    again = read_metrics(tmp_path / "ppo2" / "metrics.jsonl")
    assert [r["reward"] for r in again] == [r["reward"] for r in rows]


def test_bad_rows_and_rewards_are_one_line(policy_run: Path, tmp_path: Path) -> None:
    data = tmp_path / "rl.jsonl"
    data.write_text(
        json.dumps({"conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]})
        + "\n{oops\n"
    )
    with pytest.raises(DataError, match=r"rl\.jsonl:2: malformed JSON"):
        train("grpo", rl_cfg(data, policy_run, tmp_path / "a"))
    assert not (tmp_path / "a").exists()
    data.write_text(
        json.dumps({"conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}) + "\n"
    )
    with pytest.raises(LLMCoreError, match=r"reward exact raised ValueError: the row has no gt field .*rl\.jsonl:1"):
        train("grpo", rl_cfg(data, policy_run, tmp_path / "b", global_batch_size=8, max_steps=1))
    with pytest.raises(LLMCoreError, match="--data .*: no such file"):
        train("grpo", rl_cfg(tmp_path / "missing.jsonl", policy_run, tmp_path / "c"))
    with pytest.raises(LLMCoreError, match="must be a multiple of --num-generations"):
        train("grpo", rl_cfg(data, policy_run, tmp_path / "d", global_batch_size=12))


def test_grpo_under_deepspeed_zero2_matches_the_plain_engine(policy_run: Path, rl_data: Path, tmp_path: Path) -> None:
    pytest.importorskip("deepspeed", reason="deepspeed not installed")
    train("grpo", rl_cfg(rl_data, policy_run, tmp_path / "plain", max_steps=2))
    cmd = [
        sys.executable,
        "-m",
        "llmcore",
        "train",
        "grpo",
        "--data",
        str(rl_data),
        "--init",
        str(policy_run),
        "--out",
        str(tmp_path / "z2"),
        "--deepspeed",
        "zero2",
        "--lr",
        "2e-3",
        "--min-lr",
        "2e-3",
        "--num-generations",
        "8",
        "--global-batch-size",
        "16",
        "--micro-batch-size",
        "8",
        "--max-new-tokens",
        "3",
        "--temperature",
        "1.0",
        "--thinking-ratio",
        "0",
        "--beta",
        "0",
        "--reward",
        "exact",
        "--max-steps",
        "2",
        "--log-every",
        "1",
        "--device",
        "cpu",
        "--dtype",
        "fp32",
        "--seed",
        "3",
        "--quiet",
        "--seq-len",
        "64",
    ]
    # Without the rendezvous variables an in-process DeepSpeed run of this session may have left set
    # (their port is still bound here): the child makes its own one-process group on a free port.
    rendezvous = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {
        **{k: v for k, v in os.environ.items() if k not in rendezvous},
        "OMP_NUM_THREADS": "1",
        "DS_ACCELERATOR": "cpu",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    a = read_metrics(tmp_path / "plain" / "metrics.jsonl")
    b = read_metrics(tmp_path / "z2" / "metrics.jsonl")
    assert [r["step"] for r in b] == [1, 2]
    for x, y in zip(a, b):
        assert x["reward"] == y["reward"] and x["loss"] == pytest.approx(y["loss"], abs=1e-5)
