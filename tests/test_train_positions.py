"""Rows that are one document each (padded and DPO pair rows) reach the model without position ids,
so it takes its plain causal path without reading positions back from the device; packed and
best-fit rows keep them (they carry document starts)."""

from __future__ import annotations

import torch

from llmcore.data_prep.loaders import first_rows, make_loader
from llmcore.data_prep.shards import ShardReader
from llmcore.model import LLM, ModelConfig
from llmcore.train.protocols import model_positions


def test_padded_and_pair_rows_are_marked_single_documents(shards) -> None:
    for kind, mode, single in (
        ("pretrain", "padded", True),
        ("pretrain", "packed", False),
        ("sft", "bestfit", False),
        ("dpo", "pairs", True),
    ):
        batch = next(make_loader(ShardReader(shards[kind]), mode, 32, 2, seed=0))
        assert bool(batch.get("single_documents")) is single, (kind, mode)
        pos = model_positions(batch)
        if single:
            assert pos is None
            # The claim holds: every row's positions are 0..T-1 (one document starting at 0).
            assert torch.equal(
                batch["position_ids"], torch.arange(batch["input_ids"].shape[1]).expand_as(batch["input_ids"])
            )
        else:
            assert pos is batch["position_ids"]
        assert first_rows(batch, 1).get("single_documents") == batch.get("single_documents")


def test_no_position_ids_gives_the_same_logits_on_padded_rows(shards) -> None:
    torch.manual_seed(0)
    model = LLM(ModelConfig.from_preset("tiny", vocab_size=6400)).eval()
    batch = next(make_loader(ShardReader(shards["pretrain"]), "padded", 32, 3, seed=1))
    with torch.no_grad():
        a = model(batch["input_ids"], position_ids=batch["position_ids"]).logits
        b = model(batch["input_ids"], position_ids=model_positions(batch)).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
