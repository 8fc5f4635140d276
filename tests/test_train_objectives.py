"""Objectives against direct computations: SFT masked CE, DPO loss/rewards, accumulation = big batch, LR."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from llmcore.data_prep.loaders import make_loader
from llmcore.data_prep.shards import ShardReader
from llmcore.model import LLM, ModelConfig
from llmcore.train import lr_at, train
from llmcore.train.engine import PlainEngine, param_groups
from llmcore.train.objectives import DPOObjective, LMObjective, sequence_logps

from test_train_common import build_shards, losses, tiny_cfg

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny_model(vocab: int, seed: int = 0) -> LLM:
    torch.manual_seed(seed)
    return LLM(ModelConfig.from_preset("tiny", vocab_size=vocab)).float()


def _find_doc(reader: ShardReader, row_ids: np.ndarray) -> int:
    """The document whose tokens start with this padded row's non-pad inputs."""
    n = int((row_ids != 0).sum())
    for i in range(len(reader)):
        t = reader.doc(i)["tokens"]
        if len(t) >= n and np.array_equal(t[:n].astype(np.int64), row_ids[:n]):
            return i
    raise AssertionError("row not found among the documents")


def test_sft_loss_is_ce_over_exactly_the_assistant_positions(shards):
    reader = ShardReader(shards["sft"])
    vocab = reader.manifest["tokenizer"]["vocab_size"]
    model = tiny_model(vocab)
    T = 512  # long enough that no conversation is truncated
    batch = next(make_loader(reader, "padded", T, 4, seed=1))
    obj = LMObjective()
    count = obj.count(batch)
    with torch.no_grad():
        got = obj(lambda b: model(b["input_ids"], position_ids=b["position_ids"]), batch, count, 1, 1).terms["loss"]

    # Direct: run each conversation alone; score position t iff the token at t+1 has loss_mask 1.
    total, n = 0.0, 0
    for row in batch["input_ids"].numpy():
        doc = reader.doc(_find_doc(reader, row))
        tokens = torch.as_tensor(doc["tokens"].astype(np.int64))
        mask = torch.as_tensor(doc["loss_mask"].astype(bool))
        assert mask.any()
        with torch.no_grad():
            logits = model(tokens[None, :-1]).logits[0]
        targets = mask[1:]
        total += F.cross_entropy(logits[targets], tokens[1:][targets], reduction="sum").item()
        n += int(targets.sum())
    assert count == n
    assert float(got) == pytest.approx(total / n, rel=1e-6)


@pytest.mark.parametrize("average", [False, True])
def test_dpo_loss_rewards_accuracy_match_direct_logprobs(shards, average):
    reader = ShardReader(shards["dpo"])
    vocab = reader.manifest["tokenizer"]["vocab_size"]
    policy, ref = tiny_model(vocab, 1), tiny_model(vocab, 2)
    beta = 0.3
    batch = next(make_loader(reader, "pairs", 128, 3, seed=0))
    b = batch["num_pairs"]
    obj = DPOObjective(beta, average, ref_model=ref)
    with torch.no_grad():
        out = obj(lambda x: policy(x["input_ids"], position_ids=x["position_ids"]), batch, b, 1, 1)

    def logps(model):
        rows = []
        for ids, labels in zip(batch["input_ids"], batch["labels"]):
            with torch.no_grad():
                lp = torch.log_softmax(model(ids[None]).logits[0].double(), -1)
            keep = labels != -100
            vals = lp[keep].gather(1, labels[keep][:, None]).squeeze(1)
            rows.append(vals.mean() if average else vals.sum())
        return torch.stack(rows)

    pi, rf = logps(policy), logps(ref)
    chosen = beta * (pi[:b] - rf[:b])
    rejected = beta * (pi[b:] - rf[b:])
    loss = -F.logsigmoid(chosen - rejected).mean()
    t = out.terms
    assert float(t["loss"]) == pytest.approx(float(loss), rel=1e-5)
    assert float(t["rewards/chosen"]) == pytest.approx(float(chosen.mean()), rel=1e-4, abs=1e-6)
    assert float(t["rewards/rejected"]) == pytest.approx(float(rejected.mean()), rel=1e-4, abs=1e-6)
    assert float(t["rewards/margin"]) == pytest.approx(float((chosen - rejected).mean()), rel=1e-4, abs=1e-6)
    assert float(t["rewards/accuracy"]) == pytest.approx(float((chosen > rejected).double().mean()))
    # sequence_logps is the same quantity the direct loop computed
    with torch.no_grad():
        lp = sequence_logps(policy(batch["input_ids"]).logits, batch["labels"], average)
    assert torch.allclose(lp.double(), pi, rtol=1e-5, atol=1e-5)


def test_dpo_counts_and_warns_about_pairs_cut_off_by_seq_len(shards, caplog):
    reader = ShardReader(shards["dpo"])
    vocab = reader.manifest["tokenizer"]["vocab_size"]
    policy, ref = tiny_model(vocab, 1), tiny_model(vocab, 2)
    batch = next(make_loader(reader, "pairs", 128, 3, seed=0))
    b = batch["num_pairs"]
    obj = DPOObjective(0.1, False, ref_model=ref)
    forward = lambda x: policy(x["input_ids"], position_ids=x["position_ids"])  # noqa: E731
    with torch.no_grad():
        out = obj(forward, batch, b, 1, 1)
    assert float(out.terms["pairs_without_response"]) == 0.0
    assert "DPO pairs" not in caplog.text
    batch["labels"][b + 1] = -100  # the rejected side of pair 1 lost its whole response
    with torch.no_grad():
        out = obj(forward, batch, b, 1, 1)
    assert float(out.terms["pairs_without_response"]) == pytest.approx(1 / b)
    assert "1 of 3 DPO pairs" in caplog.text


def test_accumulated_micro_batches_give_the_big_batch_gradient(shards):
    """Micro batches with different loss-token counts: normalising by the global count makes the
    accumulated gradient equal to the one-batch gradient (per-micro means would not)."""
    reader = ShardReader(shards["sft"])
    vocab = reader.manifest["tokenizer"]["vocab_size"]
    big = next(make_loader(reader, "padded", 64, 8, seed=5))
    micros = [{k: (v[i : i + 2] if isinstance(v, torch.Tensor) else v) for k, v in big.items()} for i in range(0, 8, 2)]
    counts = [int((m["labels"] != -100).sum()) for m in micros]
    assert len(set(counts)) > 1, "test data should give micro batches of unequal loss-token counts"
    obj = LMObjective()

    def grads(batches):
        model = tiny_model(vocab, 7)
        total = sum(obj.count(b) for b in batches)
        for b in batches:
            obj(
                lambda x: model(x["input_ids"], position_ids=x["position_ids"]), b, total, len(batches), 1
            ).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    g_big, g_acc = grads([big]), grads(micros)
    for n in g_big:
        assert torch.allclose(g_big[n], g_acc[n], rtol=1e-4, atol=1e-7), n


def test_training_with_accumulation_logs_the_big_batch_losses(shards, tmp_path):
    a = train(
        "pretrain", tiny_cfg("pretrain", shards, tmp_path / "acc", micro_batch_size=1, global_batch_size=4, max_steps=3)
    )
    b = train(
        "pretrain", tiny_cfg("pretrain", shards, tmp_path / "big", micro_batch_size=4, global_batch_size=4, max_steps=3)
    )
    la, lb = losses(a.run_dir), losses(b.run_dir)
    assert [s for s, _ in la] == [1, 2, 3]
    for (_, x), (_, y) in zip(la, lb):
        assert x == pytest.approx(y, abs=1e-5)


def test_lr_schedule_warmup_then_cosine_to_floor():
    lrs = [lr_at(s, 10, 1.0, 0.1, 2) for s in range(10)]
    assert lrs[0] == pytest.approx(0.5) and lrs[1] == pytest.approx(1.0)
    assert lrs[2] == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))
    assert lr_at(0, 1, 1.0, 0.1, 0) == pytest.approx(1.0)
    mid = lr_at(5, 11, 2.0, 0.0, 0)
    assert mid == pytest.approx(1.0)
    assert math.isfinite(lr_at(100, 10, 1.0, 0.1, 0))


def test_weight_decay_only_on_2d_non_embedding_weights():
    model = tiny_model(300)
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 and "embed" not in names[id(p)] for p in decay["params"])
    assert any("embed" in names[id(p)] for p in no_decay["params"])
    assert any("norm" in names[id(p)] for p in no_decay["params"])
    engine = PlainEngine(tiny_cfg("pretrain", build_shards(), "unused").resolved("pretrain"))
    engine.prepare(model, accum=1)
    assert len(engine.optimizer.param_groups) == 2
