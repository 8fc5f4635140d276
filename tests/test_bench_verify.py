"""`llmcore bench verify`: the quick run writes the harness's three files; the synthetic shard dir
has the documented shape (rows, shards, row lengths from 257-519 characters at 1.2 characters a
token) and passes `verify()`; MB/s and seconds describe the same bytes."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from _bench_helpers import load_and_check, run_cli

from llmcore.bench.verify import IDS_ONLY, SHA_ONE, VERIFY, build_shards, run_verify
from llmcore.data_prep.shards import ShardReader
from llmcore.errors import LLMCoreError


def test_bench_verify_quick(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    args = ["--rows", "2500", "--rows-per-shard", "1000", "--work", str(work), "--out", str(tmp_path)]
    run_cli(["bench", "verify", "--quick", *args])
    d = load_and_check(tmp_path, "verify")
    assert d["extra"]["rows"] == 2500 and d["extra"]["shards"] == 3
    mb = d["extra"]["bytes"] / 1e6
    tput = {m["case"]: m for m in d["measurements"] if m["metric"] == "throughput"}
    assert set(tput) == {VERIFY, IDS_ONLY, SHA_ONE}
    for m in tput.values():
        assert m["n"] == 2  # --quick: two interleaved rounds
        assert m["max"] * m["seconds"]["min"] == pytest.approx(mb, rel=1e-3)  # fastest pass: MB / seconds
    assert [r["name"] for r in d["ratios"]] == [f"{VERIFY} vs {SHA_ONE}"]
    assert not list(work.iterdir())  # the shard dir is gone without --keep


def test_synthetic_shards_have_the_documented_shape(tmp_path: Path) -> None:
    manifest = build_shards(tmp_path / "s", rows=2100, rows_per_shard=1000)
    assert [s["num_docs"] for s in manifest["shards"]] == [1000, 1000, 100]
    reader = ShardReader(tmp_path / "s")
    reader.verify()  # prep's own checks accept it
    lengths = np.array([len(reader.doc(i)["tokens"]) for i in range(len(reader))])
    lo, hi = math.floor(257 / 1.2) + 2, math.floor(519 / 1.2) + 2
    assert lengths.min() >= lo and lengths.max() <= hi and abs(lengths.mean() - (lo + hi) / 2) < 5
    assert manifest["num_tokens"] == lengths.sum()


def test_bench_verify_keep_and_bad_flags(tmp_path: Path) -> None:
    res = run_verify(torch.device("cpu"), quick=True, rows=300, rows_per_shard=100, work=tmp_path, keep=True)
    res.finish()
    kept = next(tmp_path.glob("llmcore-bench-verify-*/shards"))
    ShardReader(kept).verify()
    assert any(str(kept) in n for n in res.notes)
    with pytest.raises(LLMCoreError, match="--rows"):
        run_verify(torch.device("cpu"), quick=True, rows=-1)
    with pytest.raises(LLMCoreError, match="--work"):
        run_verify(torch.device("cpu"), quick=True, work=tmp_path / "nope")
