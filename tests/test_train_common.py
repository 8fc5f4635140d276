"""Shared data and helpers for the training tests (no tests here).

The shards are built once per test process from synthetic text the helper writes: a tokenizer is
trained on it and `llmcore.data_prep.prep` makes pretrain, SFT and DPO shard dirs. Tests get them
through the `shards` fixture in tests/conftest.py, which calls `build_shards()`; it caches, so the
whole suite builds them once. Fixtures live in conftest.py; this module holds plain helpers only.
"""

from __future__ import annotations

import atexit
import functools
import json
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]

WORDS = (
    "the cat dog bird sees eats runs jumps over under small big red blue green happy sad river tree "
    "house moon sun star light night day water fire stone 今天 天气 很好 我们 学习 模型 数据 训练 中文 "
    "句子 明天 下雨 山 水 花 鸟"
).split()


def _sentence(rng: random.Random, n: int) -> str:
    # A little structure (repeated bigrams) so a tiny model's loss can fall within a few steps.
    words = []
    for _ in range(n):
        w = rng.choice(WORDS)
        words.append(w)
        if rng.random() < 0.3:
            words.append(WORDS[(WORDS.index(w) + 1) % len(WORDS)])
    return " ".join(words) + "."


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@functools.cache
def build_shards() -> dict[str, Path]:
    """Tokenizers and shard dirs under one temp dir (removed at exit):
    keys tok, tok_other (another vocab), pretrain, sft, dpo, pretrain_other (made with tok_other)."""
    from llmcore.data_prep.prep import prep
    from llmcore.data_prep.tokenizer import train_tokenizer

    root = Path(tempfile.mkdtemp(prefix="llmcore-train-tests-"))
    atexit.register(shutil.rmtree, root, True)
    rng = random.Random(0)
    pre = [{"text": " ".join(_sentence(rng, rng.randint(4, 14)) for _ in range(rng.randint(1, 4)))} for _ in range(300)]
    sft = []
    for _ in range(120):
        turns = [
            {"role": "user", "content": _sentence(rng, rng.randint(3, 8))},
            {"role": "assistant", "content": _sentence(rng, rng.randint(2, 12))},
        ]
        if rng.random() < 0.3:
            turns += [
                {"role": "user", "content": _sentence(rng, 4)},
                {"role": "assistant", "content": _sentence(rng, rng.randint(2, 6))},
            ]
        if rng.random() < 0.3:
            turns.insert(0, {"role": "system", "content": "you are a helpful assistant."})
        sft.append({"conversations": turns})
    dpo = []
    for _ in range(60):
        prompt = [{"role": "user", "content": _sentence(rng, rng.randint(3, 8))}]
        dpo.append(
            {
                "chosen": prompt + [{"role": "assistant", "content": _sentence(rng, rng.randint(3, 10))}],
                "rejected": prompt + [{"role": "assistant", "content": _sentence(rng, rng.randint(2, 8))}],
            }
        )
    src = root / "src"
    src.mkdir()
    paths = {
        "pretrain": _write_jsonl(src / "pre.jsonl", pre),
        "sft": _write_jsonl(src / "sft.jsonl", sft),
        "dpo": _write_jsonl(src / "dpo.jsonl", dpo),
    }
    out: dict[str, Path] = {}
    out["tok"] = train_tokenizer([paths["pretrain"]], root / "tok", vocab_size=400)
    out["tok_other"] = train_tokenizer([paths["pretrain"]], root / "tok_other", vocab_size=350)
    for kind in ("pretrain", "sft", "dpo"):
        prep(kind, [paths[kind]], out["tok"], root / kind, workers=1)
        out[kind] = root / kind
    prep("pretrain", [paths["pretrain"]], out["tok_other"], root / "pretrain_other", workers=1)
    out["pretrain_other"] = root / "pretrain_other"
    out["root"] = root
    return out


def tiny_cfg(stage: str, shards: dict[str, Path], out: Path, **kw: Any) -> Any:
    """A small, fast, fully deterministic config: tiny model, fp32, log every step."""
    from llmcore.train import TrainConfig

    base: dict[str, Any] = dict(
        data=str(shards[stage]),
        out=str(out),
        seq_len=48,
        micro_batch_size=2,
        global_batch_size=4,
        max_steps=6,
        log_every=1,
        quiet=True,
        seed=3,
        attn_backend="sdpa",
    )
    if stage == "pretrain":
        base.update(model="tiny", lr=3e-3)
    elif stage == "sft":
        base.update(lr=1e-3, seq_len=128)  # whole conversations per row (best-fit): room for the longest
    else:
        base.update(lr=1e-3, seq_len=96)
    base.update(kw)
    return TrainConfig(**base)


def losses(run_dir: Path) -> list[tuple[int, float]]:
    """(step, loss) of every logged training step, in file order."""
    from llmcore.train.metrics import read_metrics

    return [(r["step"], r["loss"]) for r in read_metrics(Path(run_dir) / "metrics.jsonl") if "eval_loss" not in r]


def weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from llmcore.checkpoint import resolve_checkpoint

    return load_file(str(resolve_checkpoint(path) / "model.safetensors"))


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"weights differ at {k}"


@functools.cache
def pretrained_run() -> Path:
    """A tiny pretrain run to start SFT and DPO from (built once)."""
    from llmcore.train import train

    shards = build_shards()
    out = shards["root"] / "runs" / "pre"
    train("pretrain", tiny_cfg("pretrain", shards, out, max_steps=4))
    return out


@functools.cache
def sft_run() -> Path:
    from llmcore.train import train

    shards = build_shards()
    out = shards["root"] / "runs" / "sft"
    train("sft", tiny_cfg("sft", shards, out, init=str(pretrained_run()), max_steps=3))
    return out


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """`llmcore ARGS` in this process: (exit code, stdout, stderr)."""
    from llmcore.cli import main

    try:
        main(args)
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err
