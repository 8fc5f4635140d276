"""`llmcore bench scale`: the study's bookkeeping. On hand-made curves the reported held-out minimum
and its epoch are the curve's, the memorising verdict follows the curves (held-out rising while
train falls) and so does "where larger stops helping"; the sizes span what the issue asks
(5+ sizes, 30x+ non-embedding parameters) and minimind-3's shape counts MiniMind's published
63,912,192 parameters; a --quick run through the CLI writes a study those functions re-derive."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _bench_helpers import load_and_check, run_cli

from llmcore.bench.harness import BenchResult
from llmcore.bench.scale import CPU_SIZES, GPU_SIZES, curve_summary, size_verdicts, summarise, train_loss_at

VOCAB = 6400


def fake_curve(name: str, non_embedding: int, held: list[float], train: list[float], epochs: int = 4) -> dict:
    """A size's curve as train_with_curves returns it: 100 tokens per step, one held-out
    evaluation every 4 steps, each train loss logged at every step of its window."""
    steps_per_eval = 4
    held_out = [((i + 1) * steps_per_eval * 100, float(i), loss) for i, loss in enumerate(held)]
    train_pts = [
        ((i * steps_per_eval + k + 1) * 100, loss + (0.1 if k % 2 else -0.1))  # noisy steps, mean = loss
        for i, loss in enumerate(train)
        for k in range(steps_per_eval)
    ]
    return {
        "size": name,
        "non_embedding": non_embedding,
        "total": non_embedding + VOCAB * 8,
        "hidden": 8,
        "layers": 1,
        "epochs": epochs,
        "held_out": held_out,
        "train": train_pts,
        "tokens": held_out[-1][0],
        "steps": len(held) * steps_per_eval,
        "eval_every": steps_per_eval,
        "seconds": 10.0,
        "final_eval_loss": held[-1],
    }


def test_minimum_epoch_and_memorising_come_from_the_curve():
    # 8 evaluations over 4 epochs (2 per epoch): minimum at the 3rd (1.5 epochs done: epoch 2).
    c = fake_curve("m", 1000, [6.0, 5.5, 5.2, 5.3, 5.4, 5.6, 5.8, 6.0], [6.0, 5.4, 5.0, 4.6, 4.2, 3.8, 3.4, 3.0])
    s = curve_summary(c)
    assert s["best_loss"] == 5.2 and s["best_tokens"] == 1200
    assert s["best_epochs"] == pytest.approx(1.5) and s["best_epoch"] == 2
    assert s["rise_after_best"] == pytest.approx(0.8)
    assert s["train_at_best"] == pytest.approx(5.0) and s["train_final"] == pytest.approx(3.0)
    assert s["memorising"]
    # Held-out rising while train loss also rises (a diverging run) is not memorising.
    diverging = fake_curve(
        "d", 1000, [6.0, 5.5, 5.2, 5.3, 5.4, 5.6, 5.8, 6.0], [6.0, 5.4, 5.0, 5.1, 5.2, 5.3, 5.4, 5.5]
    )
    assert not curve_summary(diverging)["memorising"]
    # Still falling at the end: minimum in the last epoch, not memorising.
    falling = fake_curve("f", 1000, [6.0, 5.8, 5.6, 5.4, 5.3, 5.2, 5.1, 5.05], [6.0, 5.7, 5.5, 5.3, 5.2, 5.1, 5.0, 4.9])
    sf = curve_summary(falling)
    assert sf["best_epoch"] == 4 and sf["best_epochs"] == pytest.approx(4.0) and not sf["memorising"]
    # A rise within the noise threshold is not called.
    flat = fake_curve(
        "n", 1000, [6.0, 5.5, 5.2, 5.21, 5.22, 5.21, 5.22, 5.22], [6.0, 5.4, 5.0, 4.6, 4.2, 3.8, 3.4, 3.0]
    )
    assert not curve_summary(flat, noise=0.03)["memorising"] and curve_summary(flat, noise=0.01)["memorising"]


def test_train_loss_window_is_the_steps_since_the_previous_evaluation():
    c = fake_curve("m", 1000, [6.0, 5.0, 4.0], [7.0, 6.0, 5.0])
    assert [train_loss_at(c["train"], c["held_out"], i) for i in (0, 1, 2, -1)] == pytest.approx([7, 6, 5, 5])


def test_stops_helping_and_first_memorising_across_sizes():
    down = [6.0, 5.6, 5.3, 5.1, 5.0, 4.95, 4.92, 4.9]
    curves = [
        fake_curve("c", 9000, [6.0, 5.3, 4.9, 4.95, 5.1, 5.3, 5.5, 5.7], [6.0, 5.0, 4.5, 4.0, 3.5, 3.0, 2.5, 2.0]),
        fake_curve("a", 1000, down, [d - 0.3 for d in down]),
        fake_curve("b", 3000, [d - 0.2 for d in down], [d - 0.6 for d in down]),
    ]
    v = size_verdicts(curves)
    assert v["best"] == "b"  # 4.70 beats c's minimum 4.9
    assert v["stops_helping"] == "c" and v["first_memorising"] == "c"
    # Make c's minimum clearly the lowest: then no size stops helping.
    curves[0]["held_out"][2] = (curves[0]["held_out"][2][0], 2.0, 4.0)
    v = size_verdicts(curves)
    assert v["best"] == "c" and v["stops_helping"] is None


def test_summarise_is_idempotent_and_reports_each_minimum():
    res = BenchResult("scale", torch.device("cpu"), {"noise": 0.03}, quick=True)
    down = [6.0, 5.6, 5.3, 5.1, 5.0, 4.95, 4.92, 4.9]
    res.extra["curves"] = [fake_curve("a", 1000, down, down), fake_curve("b", 3000, [d - 0.2 for d in down], down)]
    summarise(res)
    first = (list(res.notes), [m["values"] for m in res.measurements], list(res.tables))
    summarise(res)
    assert (list(res.notes), [m["values"] for m in res.measurements], list(res.tables)) == first
    by_case = {m["case"]: m for m in res.measurements}
    assert by_case["a: held-out minimum"]["values"] == [4.9] and by_case["a: held-out minimum"]["epoch"] == 4
    assert by_case["b: held-out minimum"]["values"] == [pytest.approx(4.7)]


@pytest.mark.parametrize("sizes", [CPU_SIZES, GPU_SIZES], ids=["cpu", "gpu"])
def test_sizes_span_30x_in_non_embedding_parameters(sizes):
    counts = [s.params(VOCAB)["non_embedding"] for s in sizes]
    assert len(sizes) >= 5 and max(counts) / min(counts) >= 30
    assert all(s.hidden % s.heads == 0 and s.heads % s.kv_heads == 0 for s in sizes)


def test_minimind3_width_is_minimind3():
    """The GPU family's largest size is MiniMind-3 itself: MiniMind's published parameter count."""
    largest = max(GPU_SIZES, key=lambda s: s.hidden * s.layers)
    assert largest.params(VOCAB)["total"] == 63_912_192


def test_bench_scale_quick(tmp_path: Path, shared_data: Path) -> None:
    run_cli(["bench", "scale", "--quick", "--device", "cpu", "--out", str(tmp_path), "--data-dir", str(shared_data)])
    d = load_and_check(tmp_path, "scale")
    curves = d["extra"]["curves"]
    assert len(curves) == 2 and curves[0]["non_embedding"] < curves[1]["non_embedding"]
    for c in curves:
        assert c["held_out"] and c["train"] and c["epochs"] == d["settings"]["epochs"]
        s = curve_summary(c)
        assert s["best_loss"] == min(p[2] for p in c["held_out"])
        assert d["extra"]["verdicts"]["summaries"][c["size"]]["best_epoch"] == s["best_epoch"]
    assert d["extra"]["conclusions"] and all(line in d["notes"] for line in d["extra"]["conclusions"])


def test_sizes_flag_picks_default_sizes_by_shape():
    from llmcore.bench.scale import pick_sizes
    from llmcore.errors import LLMCoreError

    cpu = torch.device("cpu")
    assert [s.name for s in pick_sizes("128x4, 192x4", cpu, False)] == ["128x4", "192x4 (demo)"]
    with pytest.raises(LLMCoreError, match="--sizes '256x4': choose from 32x2, 48x2"):
        pick_sizes("256x4", cpu, False)
