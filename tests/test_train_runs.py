"""End-to-end stage runs and what they leave: run dir files, metrics, plot, eval, DPO metrics, wandb."""

from __future__ import annotations

import json
import math

import pytest
import torch

from llmcore.checkpoint import load_model
from llmcore.cli import main
from llmcore.data_prep.shards import ShardReader
from llmcore.evaluate import evaluate
from llmcore.train import train
from llmcore.train.metrics import read_metrics

from test_train_common import losses, pretrained_run, sft_run, tiny_cfg

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_pretrain_run_dir_contents_and_learning(shards, tmp_path):
    out = tmp_path / "pre"
    s = train(
        "pretrain",
        tiny_cfg("pretrain", shards, out, max_steps=12, eval_docs=20, eval_every=6, save_every=6, log_every=2),
    )
    assert s.steps == 12 and s.tokens > 0 and s.checkpoint == out / "checkpoints" / "step-12"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["stage"] == "pretrain" and cfg["model"]["hidden_size"] == 64 and cfg["train"]["seq_len"] == 48
    assert cfg["tokenizer_fingerprint"] and (out / "tokenizer" / "tokenizer.json").is_file()
    rows = read_metrics(out / "metrics.jsonl")
    train_rows = [r for r in rows if "eval_loss" not in r]
    assert [r["step"] for r in train_rows] == [1, 2, 4, 6, 8, 10, 12]  # step 1 is always logged
    for r in train_rows:
        assert {
            "step",
            "loss",
            "lr",
            "tokens",
            "tokens_per_s",
            "step_s",
            "peak_mem_gb",
            "grad_norm",
            "epoch",
        } <= r.keys()
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [6, 12] and all("eval_ppl" in r for r in evals)
    assert (out / "loss.png").stat().st_size > 1000
    assert train_rows[-1]["loss"] < train_rows[0]["loss"]  # it learns
    assert s.eval_loss == evals[-1]["eval_loss"]
    model, tok = load_model(out)
    assert tok.fingerprint == cfg["tokenizer_fingerprint"]


def per_document_ce(model, shard_dir, seq_len: int) -> tuple[float, int]:
    """The oracle, written apart from the loaders and objectives: each SFT document alone, cut to
    seq_len + 1 tokens; the token at t+1 is a label exactly where its loss_mask is 1 (the assistant
    turns). Returns (summed cross-entropy, label count)."""
    import torch.nn.functional as F

    reader = ShardReader(shard_dir)
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(len(reader)):
            doc = reader.doc(i)
            ids = torch.from_numpy(doc["tokens"][: seq_len + 1].astype("int64"))
            keep = torch.from_numpy(doc["loss_mask"][: seq_len + 1].astype(bool))[1:]
            logits = model(ids[None, :-1]).logits[0].double()
            total += float(F.cross_entropy(logits[keep], ids[1:][keep], reduction="sum"))
            count += int(keep.sum())
    return total, count


def test_evaluate_equals_per_document_masked_ce_and_cli_prints_it(shards, capsys):
    run = pretrained_run()
    # seq_len 64 cuts about 80 of the 120 conversations: the oracle cuts them the same way.
    res = evaluate(run, shards["sft"], batch_size=3, seq_len=64, packing="padded")
    model, _ = load_model(run)
    total, n = per_document_ce(model.float().eval(), shards["sft"], 64)
    assert res.tokens == n
    assert res.loss == pytest.approx(total / n, rel=1e-5)
    assert res.perplexity == pytest.approx(math.exp(res.loss))
    with pytest.raises(SystemExit) as exc:
        main(["eval", "--ckpt", str(run), "--data", str(shards["pretrain"]), "--batch-size", "4"])
    assert (exc.value.code or 0) == 0
    out = capsys.readouterr().out
    assert "loss " in out and "perplexity " in out


def test_sft_from_pretrain_loss_is_only_over_assistant_tokens(shards, tmp_path):
    """Step 1's loss (the forward before any update) over one global batch holding every SFT
    document once equals the per-document oracle over the assistant tokens only: a loss that also
    counted user/system tokens, or dropped assistant ones, differs."""
    n_docs = len(ShardReader(shards["sft"]))
    s = train(
        "sft",
        tiny_cfg(
            "sft",
            shards,
            tmp_path / "sft",
            init=str(pretrained_run()),
            max_steps=1,
            packing="padded",
            micro_batch_size=n_docs,
            global_batch_size=n_docs,
        ),
    )
    model, _ = load_model(pretrained_run())
    total, n = per_document_ce(model.float().eval(), shards["sft"], 128)
    assert s.steps == 1 and losses(s.run_dir)[0][1] == pytest.approx(total / n, rel=1e-4)


@pytest.mark.parametrize("ref_logps", ["model", "precompute"])
def test_dpo_logs_trl_metrics_and_moves_rewards(shards, tmp_path, ref_logps):
    out = tmp_path / ref_logps
    s = train(
        "dpo", tiny_cfg("dpo", shards, out, init=str(sft_run()), max_steps=4, ref_logps=ref_logps, eval_docs=8, lr=5e-3)
    )
    rows = [r for r in read_metrics(out / "metrics.jsonl") if "eval_loss" not in r]
    assert {"rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin", "dpo_loss"} <= rows[0].keys()
    # Step 1: policy == reference, so the loss is log 2 and every reward is 0.
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert rows[0]["rewards/chosen"] == pytest.approx(0, abs=1e-5)
    assert rows[-1]["rewards/margin"] != pytest.approx(0, abs=1e-6)
    assert s.eval_loss is not None


def test_dpo_precomputed_reference_matches_reference_model(shards, tmp_path):
    a = train("dpo", tiny_cfg("dpo", shards, tmp_path / "a", init=str(sft_run()), max_steps=3, lr=5e-3))
    b = train(
        "dpo",
        tiny_cfg("dpo", shards, tmp_path / "b", init=str(sft_run()), max_steps=3, lr=5e-3, ref_logps="precompute"),
    )
    for (_, x), (_, y) in zip(losses(a.run_dir), losses(b.run_dir)):
        assert x == pytest.approx(y, abs=1e-5)


def test_wandb_offline_and_bf16_run(shards, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    out = tmp_path / "wb"
    s = train(
        "pretrain",
        tiny_cfg("pretrain", shards, out, max_steps=2, wandb=True, wandb_project="llmcore-test", dtype="bf16"),
    )
    assert s.steps == 2 and math.isfinite(s.loss)
    assert (out / "wandb").is_dir() and (out / "wandb_id.txt").is_file()
