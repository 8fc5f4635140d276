"""`llmcore bench recipe`: the --quick run writes the documented files, pairs the two recipes per
seed, and its shares are recomputable from the stored curves."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_bench import load_and_check, run_cli

from llmcore.bench.recipe import crossing


def test_crossing_interpolates_between_evaluations():
    pts = [(100, 1.0, 5.0), (200, 2.0, 4.0), (300, 3.0, 3.0)]
    assert crossing(pts, 3.5) == pytest.approx((250, 2.5))
    assert crossing(pts, 5.5) == (100, 1.0)  # already there at the first evaluation
    assert crossing(pts, 2.0) is None  # never reached


def test_bench_recipe_quick(tmp_path: Path, shared_data: Path) -> None:
    run_cli(["bench", "recipe", "--quick", "--device", "cpu", "--out", str(tmp_path), "--data-dir", str(shared_data)])
    d = load_and_check(tmp_path, "recipe")
    runs = d["extra"]["runs"]
    assert sorted((r["recipe"], r["seed"]) for r in runs) == [
        ("llmcore", 0),
        ("llmcore", 1),
        ("minimind", 0),
        ("minimind", 1),
    ]
    for seed in (0, 1):
        mm, lc = (next(r for r in runs if r["recipe"] == k and r["seed"] == seed) for k in ("minimind", "llmcore"))
        assert mm["tokens"] == lc["tokens"] and mm["steps"] == lc["steps"]  # the same budget and batch
        assert [p[0] for p in mm["held_out"]] == [p[0] for p in lc["held_out"]]  # evaluated at the same points
        hit = crossing(lc["held_out"], mm["final_eval_loss"])
        share = (hit[0] if hit else lc["tokens"]) / mm["tokens"]
        assert d["extra"]["share_tokens"][seed] == pytest.approx(share)
    assert [t["name"] for t in d["targets"]] == ["recipe: share of MiniMind's tokens to reach its final held-out loss"]
