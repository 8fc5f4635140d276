"""End-to-end stage runs and what they leave: run dir files, metrics, plot, eval, DPO metrics, wandb.
`llmcore eval` on a run's held-out documents must print the eval_loss the run logged (the trainer's
eval loop with the stage's rows), and equal a per-document oracle written apart from the loaders."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from llmcore.checkpoint import load_model
from llmcore.cli import main
from llmcore.data_prep.shards import ShardReader
from llmcore.data_prep.split import split_shards
from llmcore.errors import LLMCoreError
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
    # `llmcore eval` on the documents the run held out scores each kept checkpoint as the run did.
    _, heldout = held_out(shards["pretrain"], 20, 3, tmp_path)
    for ev in evals:
        res = evaluate(out / "checkpoints" / f"step-{ev['step']}", heldout, device="cpu", progress=False)
        assert res.stage == "pretrain" and res.layout == "packed"
        assert res.loss == pytest.approx(ev["eval_loss"], abs=1e-6)
        assert res.perplexity == pytest.approx(ev["eval_ppl"], rel=1e-6)


def held_out(src, eval_docs: int, seed: int, tmp_path):
    """`llmcore prep split` of `src`: (train dir, held-out dir) with the documents a run with these
    --eval-docs and --seed holds out."""
    tr, ev = tmp_path / "split-train", tmp_path / "split-eval"
    split_shards(src, eval_docs, tr, ev, seed=seed)
    return tr, ev


def printed_eval(capsys, args) -> tuple[float, str]:
    """`llmcore eval ARGS` in this process: (the eval_loss it prints as `loss`, its stdout)."""
    with pytest.raises(SystemExit) as exc:
        main(["eval", *args])
    out = capsys.readouterr().out
    assert (exc.value.code or 0) == 0, out
    return float(re.search(r"^loss (\S+)", out, re.M).group(1)), out


def test_sft_eval_reproduces_the_runs_logged_eval_loss(shards, tmp_path, capsys):
    """An SFT run (best-fit rows) logs eval_loss on its held-out conversations; `llmcore eval` on the
    same conversations (`prep split`) and checkpoint finds the stage in config.json and prints the
    same number. Packed rows, which SFT training refuses (and the old eval used), are refused."""
    out = tmp_path / "sft"
    train(
        "sft",
        tiny_cfg("sft", shards, out, init=str(pretrained_run()), max_steps=1, eval_docs=16),
    )
    (ev,) = [r for r in read_metrics(out / "metrics.jsonl") if "eval_loss" in r]
    _, heldout = held_out(shards["sft"], 16, 3, tmp_path)
    res = evaluate(out / "checkpoints" / "step-1", heldout, device="cpu", progress=False)
    assert (res.stage, res.layout, res.rows, res.seq_len) == ("sft", "bestfit", 2, 128)
    assert res.loss == pytest.approx(ev["eval_loss"], abs=1e-6)
    assert res.perplexity == pytest.approx(ev["eval_ppl"], rel=1e-6)
    printed, text = printed_eval(capsys, ["--ckpt", str(out), "--data", str(heldout), "--device", "cpu"])
    assert printed == pytest.approx(ev["eval_loss"], abs=1e-6) and "perplexity " in text
    with pytest.raises(LLMCoreError, match="--packing packed: sft rows are bestfit or padded"):
        evaluate(out, heldout, packing="packed", device="cpu", progress=False)


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


@pytest.mark.parametrize("packing", ["padded", "bestfit"])
def test_evaluate_equals_per_document_masked_ce_and_cli_prints_it(shards, capsys, packing):
    """Scored as SFT (a pretrain run on SFT shards: the stage of the data's kind), one row per
    conversation or several per best-fit row, eval_loss is the oracle's per-conversation CE."""
    run = pretrained_run()
    # seq_len 64 cuts about 80 of the 120 conversations: the oracle cuts them the same way.
    res = evaluate(run, shards["sft"], batch_size=3, seq_len=64, packing=packing, progress=False)
    model, _ = load_model(run)
    total, n = per_document_ce(model.float().eval(), shards["sft"], 64)
    assert (res.stage, res.layout, res.items) == ("sft", packing, n)
    assert res.loss == pytest.approx(total / n, rel=1e-6)
    assert res.perplexity == pytest.approx(math.exp(total / n), rel=1e-6)
    args = ["--ckpt", str(run), "--data", str(shards["sft"]), "--seq-len", "64", "--packing", packing]
    printed, text = printed_eval(capsys, args + ["--batch-size", "4", "--device", "cpu"])
    assert printed == pytest.approx(total / n, abs=2e-6) and "perplexity " in text


@pytest.mark.parametrize(
    "data, stage, message",
    [
        ("sft", "nope", "--stage nope: unknown stage 'nope'"),
        ("sft", "grpo", "holds sft shards; --stage grpo scores rl shards"),
        # DPO pairs need the DPO run's reference (its --init): a pretrain run has none to give.
        ("dpo", None, "scoring dpo shards as dpo needs a dpo run dir"),
    ],
)
def test_eval_refuses_a_stage_it_cannot_score_in_one_line(shards, data, stage, message):
    with pytest.raises(LLMCoreError, match=re.escape(message)):
        evaluate(pretrained_run(), shards[data], stage=stage, device="cpu", progress=False)


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
    # `llmcore eval` scores the held-out pairs as the run did: pairs rows, the run's reference.
    (ev,) = [r for r in read_metrics(out / "metrics.jsonl") if "eval_loss" in r]
    _, heldout = held_out(shards["dpo"], 8, 3, tmp_path)
    res = evaluate(out, heldout, device="cpu", progress=False)
    assert (res.stage, res.layout, res.items, res.unit) == ("dpo", "pairs", 8, "pairs")
    assert res.perplexity is None
    for key, value in res.metrics.items():
        assert value == pytest.approx(ev[key], abs=1e-6), key


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
