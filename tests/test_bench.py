"""`llmcore bench`: every subcommand runs with --quick and writes json/md/png of the documented
structure; ratios come from two measurements of the same run; targets never pass unmeasured;
the report pages and the README block come from the results files only.

Speed targets are reported in the results, never asserted here. Tests that need ../shared/data
skip with a reason when it is absent.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import torch
from _bench_helpers import load_and_check, run_cli

from llmcore.bench.harness import BenchResult, Samples, interleaved, percentile, summarize
from llmcore.errors import LLMCoreError

CPU = torch.device("cpu")


# ------------------------------------------------------------------------------------------------
# harness


def test_interleaved_rotates_order_and_counts_units() -> None:
    calls: list[str] = []

    def case(name: str, units: float):
        def run() -> float:
            calls.append(name)
            return units

        return run

    s = interleaved({"a": case("a", 10), "b": case("b", 20), "c": case("c", 30)}, rounds=3, warmup=1)
    assert calls[:3] == ["a", "b", "c"]  # warm-up, in order
    assert calls[3:] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]  # rotated per round
    assert all(len(x.wall) == len(x.cpu) == 3 for x in s.values())
    assert s["b"].units == [20.0] * 3


def test_ratio_is_paired_median_of_two_measurements() -> None:
    res = BenchResult("unit", CPU, {"x": 1}, quick=True)
    a, b = Samples(), Samples()
    for wa, wb in ((1.0, 2.0), (1.0, 4.0), (2.0, 2.0)):
        a.add(wa, wa, 10)
        b.add(wb, wb, 10)
    res.measure_samples("fast", a, "tokens/s")
    res.measure_samples("slow", b, "tokens/s")
    r = res.ratio("fast vs slow", "fast", "slow", metric="throughput")
    assert r["value"] == pytest.approx(statistics.median([2.0, 4.0, 1.0]))
    assert res.ratio("missing", "fast", "nope") is None
    # on CPU the per-CPU-second rate is a measurement of its own, so ratios can use it too
    assert res.find("fast", "per CPU-second")["unit"] == "tokens/CPU-s"
    res.finish()


def test_target_unmeasured_is_never_a_pass() -> None:
    res = BenchResult("unit", CPU, {}, quick=True)
    assert res.target("t", None, 1.0)["verdict"] == "NOT MEASURED"
    assert res.target("t", float("nan"), 1.0)["verdict"] == "NOT MEASURED"
    assert res.target("t", 0.5, 1.0)["verdict"] == "FAIL"
    assert res.target("t", 0.5, 1.0, higher=False)["verdict"] == "PASS"
    res.finish()


def test_high_load_warns_in_the_results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    monkeypatch.setattr(os, "getloadavg", lambda: (50.0, 50.0, 50.0))
    res = BenchResult("unit", CPU, {"k": "v"}, quick=True)
    res.measure("case", "throughput", "x/s", [1.0, 2.0, 3.0])
    paths = res.write(tmp_path)
    d = json.loads(paths["json"].read_text())
    assert d["load"]["high"] and d["warnings"] and "busy" in d["warnings"][0]
    assert "Warning" in paths["md"].read_text()


def test_percentile_is_nearest_rank() -> None:
    # Hand-computed: rank round(q * (n - 1)) of the sorted values.
    values = [5.0, 1.0, 4.0, 2.0, 3.0, 10.0, 7.0, 6.0, 9.0, 8.0, 11.0]
    assert percentile(values, 0.5) == 6.0
    assert percentile(values, 0.95) == 11.0  # round(9.5) = 10 -> the largest
    assert percentile(values, 0.9) == 10.0
    assert percentile([3.0], 0.95) == 3.0 and percentile([], 0.5) is None


def test_summarize_spread() -> None:
    s = summarize([1.0, 2.0, 4.0])
    assert (s["median"], s["min"], s["max"], s["n"]) == (2.0, 1.0, 4.0, 3)
    assert s["spread"] == pytest.approx(1.5)
    assert summarize([])["n"] == 0


# ------------------------------------------------------------------------------------------------
# subcommands with --quick


def test_bench_kernels_quick_cpu_is_a_correctness_sweep(tmp_path: Path) -> None:
    run_cli(["bench", "kernels", "--quick", "--device", "cpu", "--out", str(tmp_path)])
    d = load_and_check(tmp_path, "kernels")
    assert d["extra"]["failed"] == 0 and d["extra"]["checks"]
    assert not any(m["unit"] in ("GB/s", "TFLOP/s") for m in d["measurements"])  # no interpreter timings
    assert any("correctness only" in n for n in d["notes"])


def test_bench_kernels_timing_code_dry_run(tmp_path: Path) -> None:
    """The CUDA timing path, run on CPU at toy shapes (labelled meaningless): ratios and targets."""
    run_cli(
        [
            "bench",
            "kernels",
            "--dry-run-timing",
            "--device",
            "cpu",
            "--seqs",
            "16",
            "--hiddens",
            "32",
            "--repeats",
            "1",
            "--out",
            str(tmp_path),
        ]
    )
    d = load_and_check(tmp_path, "kernels")
    assert "DRY RUN" in d["title"]
    names = {r["name"] for r in d["ratios"]}
    assert any("attention" in n and "vs sdpa" in n for n in names)
    assert any("rmsnorm" in n and "vs compile" in n for n in names)
    assert {t["verdict"] for t in d["targets"]} <= {"PASS", "FAIL"}
    assert any(t["name"].startswith("flash attention") for t in d["targets"])


def test_bench_train_quick(tmp_path: Path, shared_data: Path) -> None:
    run_cli(["bench", "train", "--quick", "--device", "cpu", "--out", str(tmp_path), "--data-dir", str(shared_data)])
    d = load_and_check(tmp_path, "train")
    loops = {m["loop"] for m in d["measurements"] if m["metric"] == "throughput"}
    assert any(x.startswith("minimind-style") for x in loops) and any(x.startswith("llmcore") for x in loops)
    assert all(r["denominator"].startswith("tiny minimind-style") for r in d["ratios"])
    assert len([r for r in d["ratios"] if r["metric"] == "throughput"]) == len(loops) - 1
    shares = d["extra"]["real_token_share"]
    assert all(0 < s["padded"] <= 1 and 0.99 < s["packed"] <= 1 for s in shares)
    assert 257 <= d["extra"]["rows"]["chars_mean"] <= 519


def test_bench_data_quick(tmp_path: Path, shared_data: Path) -> None:
    run_cli(["bench", "data", "--quick", "--out", str(tmp_path), "--data-dir", str(shared_data)])
    d = load_and_check(tmp_path, "data")
    assert any(r["name"].startswith("prep vs encode_batch") for r in d["ratios"])
    assert [m["copies"] for m in d["extra"]["memory"]] == [1, 2]
    share = d["extra"]["real_token_share"]
    assert share["packed"] >= share["bestfit"] > share["padded"]


def test_bench_generate_quick(tmp_path: Path) -> None:
    run_cli(["bench", "generate", "--quick", "--device", "cpu", "--out", str(tmp_path)])
    d = load_and_check(tmp_path, "generate")
    assert len(d["ratios"]) == 2 and all("KV cache vs no cache" in r["name"] for r in d["ratios"])


def test_bench_user_error_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from llmcore.cli import main

    with pytest.raises(SystemExit) as exc:
        main(
            [
                "bench",
                "train",
                "--quick",
                "--device",
                "cpu",
                "--data-dir",
                str(tmp_path / "nope"),
                "--out",
                str(tmp_path),
            ]
        )
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "--data-dir" in err[0]


def test_bench_user_error_leaves_the_signal_handlers_as_they_were(tmp_path: Path) -> None:
    """An error from a benchmark must not leave SIGINT/SIGTERM ignored in the calling process: its
    later children (prep's worker pool) would inherit SIG_IGN, and terminating them would hang."""
    import signal

    from llmcore.cli import main

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    with pytest.raises(SystemExit):
        main(
            [
                "bench",
                "train",
                "--quick",
                "--device",
                "cpu",
                "--data-dir",
                str(tmp_path / "nope"),
                "--out",
                str(tmp_path),
            ]
        )
    assert {sig: signal.getsignal(sig) for sig in before} == before


# ------------------------------------------------------------------------------------------------
# report pages


def _fake_result(out: Path, name: str, quick: bool, value: float | None) -> None:
    res = BenchResult(name, CPU, {"k": 1}, quick=quick)
    res.measure("a", "throughput", "x/s", [2.0, 2.2])
    res.measure("b", "throughput", "x/s", [1.0, 1.0])
    r = res.ratio("a vs b", "a", "b")
    res.target(f"{name} target", r["value"] if value is None else value, 1.5)
    res.write(out)


def test_report_index_readme_block_and_targets(tmp_path: Path) -> None:
    from llmcore.bench.report import BEGIN, END, build_index, readme_block, replot, targets_summary, update_readme

    results = tmp_path / "benchmarks" / "results"
    _fake_result(results, "alpha", quick=False, value=None)
    _fake_result(results, "beta", quick=True, value=None)
    (results / "other-tool.md").write_text("# not ours\n")
    index = build_index(results).read_text()
    assert "## alpha" in index and "## beta" in index and "alpha-cpu-" in index and "(other-tool.md)" in index
    readme = tmp_path / "README.md"
    readme.write_text(f"# top\n\nkeep me\n\n{BEGIN}\nold numbers\n{END}\n\n## after\nkeep me too\n")
    update_readme(readme, readme_block(results, tmp_path))
    text = readme.read_text()
    assert (
        "old numbers" not in text
        and text.startswith("# top\n\nkeep me\n\n")
        and text.endswith("## after\nkeep me too\n")
    )
    block = text.split(BEGIN)[1].split(END)[0]
    assert "alpha target" in block and "PASS" in block and "benchmarks/results/alpha-cpu-" in block
    assert "beta" not in block  # quick runs never reach the README
    (tmp_path / "bare.md").write_text("no markers\n")
    with pytest.raises(LLMCoreError, match="bench:begin"):
        update_readme(tmp_path / "bare.md", "x")
    before = next(results.glob("alpha-*.json")).read_text()
    assert len(replot(results)) == 2
    assert next(results.glob("alpha-*.json")).read_text() == before
    paths, targets = targets_summary(results, tmp_path / "out", "gpu-test")
    assert {p.suffix for p in paths.values()} == {".json", ".md", ".png"}
    assert {t["verdict"] for t in targets} == {"PASS"}
    with pytest.raises(LLMCoreError, match="no benchmark results"):
        build_index(tmp_path / "empty")


def test_bench_refuses_bad_presets_and_out_before_running(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from llmcore.cli import main

    (tmp_path / "file").write_text("x")
    for args, words in (
        (["train", "--presets", "bogus"], "--presets: unknown preset(s) bogus"),
        (["kernels", "--out", str(tmp_path / "file" / "x")], "is a file, not a folder"),
    ):
        with pytest.raises(SystemExit) as exc:
            main(["bench", *args, "--quick", "--device", "cpu", *([] if "--out" in args else ["--out", str(tmp_path)])])
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], err
    assert not list(tmp_path.glob("*.json"))  # nothing ran


def test_quick_verdicts_are_labelled_not_measurements() -> None:
    from llmcore.bench.report import headline, verdict_label

    assert verdict_label("FAIL", quick=True) == "FAIL (quick run: not a measurement)"
    assert verdict_label("PASS", quick=False) == "PASS" and verdict_label("NOT MEASURED", True) == "NOT MEASURED"
    res = BenchResult("t", CPU, {}, quick=True)
    res.target("x target", 0.5, 1.0)
    assert headline({"bench": "t", "quick": True, "targets": res.targets})[0].startswith(
        "**FAIL (quick run: not a measurement)** x target"
    )
