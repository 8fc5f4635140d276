"""A CPU rehearsal of benchmarks/gpu_check.sh in the conditions of its first GPU run (issue 27).

One run of the whole script, `GPU_CHECK_DEVICE=cpu`, from a copy of the checkout that is not the
installed package (so the script maps llmcore through its symlink folder) with the sample data
staged inside the copy (`--stage-data`, what the device machine gets), under a tight overall
deadline, with:
- a forced failure in one training loop (`LLMCORE_BENCH_FAULT=raise:...`): recorded, the other
  loops still measured;
- the kernels phase hanging in a measurement (`hang:...`) until its deadline stops it: what it
  measured before is written, marked interrupted;
- the recipe phase stopped at a short limit (what finished is written, marked interrupted) and the
  scale phase run to its end under the --budget-minutes the script derives from its limit;
- every phase's limit (cut to the overall deadline) plus its grace ending before the summary's
  reserve, a phase with too little time skipped and named, the whole script inside its deadline.
Each ends in a summary naming what was and was not measured. The script's CUDA paths (timing code)
run through `--dry-run-timing`; nothing here says anything about speed.

Plus the pieces it relies on, in-process: a loop that raises while timed is dropped and the rest
measured; an interrupt keeps the complete rounds; the partial result is written by the CLI; the
data folder is found from the resolved checkout through a folder of symlinks.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from llmcore.bench.harness import BenchResult, clear_stop, interleaved, stop_requested

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
CPU = torch.device("cpu")


def _copy_checkout(dst: Path) -> Path:
    """The parts of the working tree the script runs (no .git, no venv, no caches)."""
    for name in ("benchmarks", "llmcore", "kernels", "data_prep", "tests"):
        shutil.copytree(
            ROOT / name, dst / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__", "results", "*.pyc")
        )
    (dst / "benchmarks" / "results").mkdir()
    shutil.copy(ROOT / "pyproject.toml", dst / "pyproject.toml")
    return dst


def _summary_rows(log: str) -> dict[str, str]:
    """The phase table the script prints last: {phase: status}."""
    lines = log.splitlines()
    start = max(i for i, line in enumerate(lines) if line.startswith("phase ") and "status" in line)
    rows = {}
    for line in lines[start + 1 :]:
        if line.startswith("==="):
            break
        parts = line.split(None, 2)
        if len(parts) == 3:
            rows[parts[0]] = parts[2]
    return rows


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and timeout")
def test_gpu_check_rehearsal_on_cpu(tmp_path: Path, shared_data: Path) -> None:
    repo = _copy_checkout(tmp_path / "checkout")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GPU_CHECK_", "LLMCORE_", "TRITON_"))}
    staged = subprocess.run(
        ["bash", str(repo / "benchmarks" / "gpu_check.sh"), "--stage-data"],
        capture_output=True,
        text=True,
        env={**env, "LLMCORE_SHARED_DATA": str(shared_data)},
        timeout=60,
    )
    assert staged.returncode == 0, staged.stderr
    assert (repo / ".cache" / "shared-data" / "minimind_tokenizer" / "tokenizer.json").is_file()

    total, reserve, grace = 250, 25, 10
    env.update(
        {
            "PYTHON": sys.executable,
            "GPU_CHECK_DEVICE": "cpu",
            "GPU_CHECK_QUICK": "1",
            "GPU_CHECK_RESULTS": str(tmp_path / "results"),
            "OUT": str(tmp_path / "out"),
            "GPU_CHECK_TOTAL_S": str(total),
            "GPU_CHECK_SUMMARY_S": str(reserve),
            "GPU_CHECK_GRACE_S": str(grace),
            "GPU_CHECK_MIN_PHASE_S": "15",
            "GPU_CHECK_KERNELS_S": "25",
            "GPU_CHECK_RECIPE_S": "15",
            # Eight seeds: far more than 15 s of work even on an idle machine (two seeds can finish in
            # 12 s, and a deadline that lands during the exit leaves a complete, unmarked result).
            "GPU_CHECK_RECIPE_ARGS": "--seeds 8",
            "GPU_CHECK_SCALE_S": "45",
            "GPU_CHECK_SCALE_ARGS": "--epochs 1 --documents 8 --held-out 2",
            "GPU_CHECK_TRAIN_TESTS_S": "1",
            "GPU_CHECK_KERNEL_TESTS": "tests/test_kernels_rmsnorm.py -k reference_is_hf_llama_formula",
            "GPU_CHECK_TRAIN_TESTS": "tests/test_gpu.py",
            "GPU_CHECK_KERNELS_ARGS": "--dry-run-timing --seqs 16 --hiddens 32 --repeats 1",
            "GPU_CHECK_TRAIN_ARGS": "--variants minimind,sdpa,sdpa:padded",
            "LLMCORE_BENCH_FAULT": "raise:train warm-up tiny llmcore sdpa packed,hang:kernels measure peak: bf16 matmul",
        }
    )
    (tmp_path / "out").mkdir()
    t0 = time.monotonic()
    proc = subprocess.run(
        ["bash", str(repo / "benchmarks" / "gpu_check.sh")],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=total + 60,
    )
    elapsed = time.monotonic() - t0
    log = proc.stdout + proc.stderr
    assert elapsed <= total + 5, f"the script took {elapsed:.0f}s, over its {total}s deadline\n{log[-3000:]}"
    # Every phase started with a limit that, with its grace, ends before the summary's reserve.
    starts = re.findall(r"^=== \[(\d+)s\] ([a-z-]+) \(limit (\d+)s\)", log, re.M)
    assert [name for _, name, _ in starts] == ["kernel-tests", "kernels", "train", "recipe", "scale"], starts
    for at, name, limit in starts:
        assert int(at) + int(limit) + grace <= total - reserve, (name, at, limit)
    assert proc.returncode == 1, log[-3000:]  # a part failed and a phase was stopped: said in the exit status

    # Not installed from the copy: mapped through the symlink folder to the copy itself.
    assert "llmcore mapped through" in log and f"to {repo}" in log, log[:3000]
    assert f"sample data: {repo / '.cache' / 'shared-data'}" in log

    rows = _summary_rows(log)
    assert list(rows) == ["versions", "kernel-tests", "kernels", "train", "recipe", "scale", "train-tests"], rows
    assert rows["versions"].startswith("ok")
    assert rows["kernel-tests"].startswith("ok") and "1 passed" in rows["kernel-tests"]
    # Stopped at its limit (or, on a loaded machine, killed after the grace once its files were written).
    assert rows["kernels"].startswith("STOPPED") or "partial results written before the kill" in rows["kernels"], rows
    assert "1 part(s) FAILED" in rows["train"], rows
    # recipe: stopped at its 15 s limit; scale: run to its end, or on a loaded machine stopped at its limit.
    assert rows["recipe"].startswith(("STOPPED", "KILLED")), rows
    assert rows["scale"].startswith(("ok", "STOPPED", "KILLED")), rows
    assert rows["train-tests"].startswith("SKIPPED (no time left: "), rows

    run = Path(log.split("results of this run: ")[1].split()[0])
    kernels = json.loads(next(run.glob("kernels-cpu-*.json")).read_text())
    assert kernels["interrupted"] and "SIGTERM" in kernels["interrupted"]
    assert [m["case"] for m in kernels["measurements"]] == ["peak: device copy"]
    train = json.loads(next(run.glob("train-cpu-*.json")).read_text())
    assert [f["what"] for f in train["failures"]] == ["tiny llmcore sdpa packed fp32"]
    assert "InjectedFault" in train["failures"][0]["error"]
    loops = {m["loop"] for m in train["measurements"] if m["metric"] == "throughput"}
    assert loops == {"minimind-style (padded, sdpa, fp32)", "llmcore sdpa padded fp32"}, loops
    assert any(r["numerator"] == "tiny llmcore sdpa padded fp32" for r in train["ratios"])
    # What a stopped benchmark wrote is marked interrupted (on a loaded machine it may be stopped
    # before its result exists: then the status says "no results written").
    for recipe_json in run.glob("recipe-cpu-*.json"):
        assert "SIGTERM" in json.loads(recipe_json.read_text())["interrupted"]
    scale_limit = int(next(limit for _, name, limit in starts if name == "scale"))
    budget_s = max(scale_limit - 30, scale_limit // 2)  # the script's budget(), passed in minutes
    assert f"--budget-minutes {budget_s / 60:.2f} --quick --epochs 1 --documents 8 --held-out 2" in log
    for scale_json in run.glob("scale-cpu-*.json"):
        scale = json.loads(scale_json.read_text())
        assert scale["settings"]["budget_minutes"] == pytest.approx(budget_s / 60, abs=0.01)
        assert scale["settings"]["epochs"] == 1 and scale["settings"]["held_out_documents"] == 2
        assert scale["interrupted"] or scale["extra"]["curves"]

    # The summary names what was measured, what failed and what was cut short, in the log and the md.
    summary = json.loads(next((run / "summary").glob("gpu-*.json")).read_text())
    assert [p["phase"] for p in summary["phases"]] == list(rows)
    assert any(f["what"] == "tiny llmcore sdpa packed fp32" for f in summary["failed"])
    assert any("SIGTERM" in m["why"] for m in summary["not_measured"] if m["result"].startswith("kernels"))
    assert "FAILED  train-cpu" in log and "NOT MEASURED  kernels-cpu" in log
    md = (tmp_path / "out" / "gpu_check_summary.md").read_text()
    assert "## Failed (not measured)" in md and "tiny llmcore sdpa packed fp32" in md and "SKIPPED" in md
    assert {p.name for p in (tmp_path / "out").iterdir()} == {
        "gpu_check.log",
        "gpu_check_summary.md",
        "gpu_check_results.tar.gz",
    }
    assert list((tmp_path / "results").glob("train-cpu-*.json")) and list((tmp_path / "results").glob("gpu-*.md"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer on a machine without CUDA")
def test_gpu_check_without_a_gpu_still_ends_with_a_summary(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GPU_CHECK_", "TRITON_"))}
    env.update({"PYTHON": sys.executable, "GPU_CHECK_RESULTS": str(tmp_path / "results")})
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 1, log[-2000:]
    assert "gpu_check.sh needs a CUDA device" in log and "nothing was measured" in log
    rows = _summary_rows(log)
    assert rows["versions"].startswith("FAILED")
    phases = ("kernel-tests", "kernels", "train", "recipe", "scale", "train-tests")
    assert [rows[p] for p in phases] == ["SKIPPED (the versions phase failed)"] * len(phases)


def test_interleaved_drops_a_failing_case_and_measures_the_rest() -> None:
    calls = {"good": 0, "bad": 0}

    def good() -> float:
        calls["good"] += 1
        return 2.0

    def bad() -> float:
        calls["bad"] += 1
        if calls["bad"] == 2:  # fine in warm-up, raises in its first timed round
            raise RuntimeError("boom")
        return 1.0

    errors: list[tuple[str, str]] = []
    out = interleaved({"bad": bad, "good": good}, rounds=3, warmup=1, on_error=lambda n, e: errors.append((n, str(e))))
    assert errors == [("bad", "boom")]
    assert set(out) == {"good"} and out["good"].units == [2.0, 2.0, 2.0]
    with pytest.raises(ZeroDivisionError):  # without on_error a failure still propagates
        interleaved({"bad": lambda: 1 / 0}, rounds=1, warmup=0)


def test_interleaved_interrupt_keeps_complete_rounds() -> None:
    clear_stop()
    n = {"a": 0}

    def a() -> float:
        n["a"] += 1
        if n["a"] == 3:  # the third timed call: round 2, after case b
            raise KeyboardInterrupt
        return 1.0

    try:
        out = interleaved({"a": a, "b": lambda: 1.0}, rounds=5, warmup=0)
        assert stop_requested()
    finally:
        clear_stop()
    assert len(out["a"].wall) == len(out["b"].wall) == 2  # the unfinished third round is dropped


def test_cli_writes_the_partial_result_on_sigterm(tmp_path: Path) -> None:
    """A benchmark stopped by SIGTERM mid-run writes its measurements so far, marked interrupted."""
    code = (
        "import os, signal, threading, time\n"
        "from pathlib import Path\n"
        "import torch\n"
        "from llmcore.bench import cli\n"
        "from llmcore.bench.harness import BenchResult\n"
        "def make():\n"
        "    res = BenchResult('train', torch.device('cpu'), {'presets': ['tiny']})\n"
        "    res.measure('tiny minimind-style (padded, sdpa, fp32)', 'throughput', 'real tokens/s', [1.0, 2.0],\n"
        "                preset='tiny', loop='minimind-style (padded, sdpa, fp32)', step_s={'median': 0.1})\n"
        "    threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM)).start()\n"
        "    while True: time.sleep(0.05)\n"
        "try:\n"
        f"    cli._run('train', make, Path({str(tmp_path)!r}))\n"
        "except cli.typer.Exit as e:\n"
        "    raise SystemExit(e.exit_code)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 124, proc.stderr[-2000:]
    assert "writing what was measured so far" in proc.stderr
    d = json.loads(next(tmp_path.glob("train-cpu-*.json")).read_text())
    assert "SIGTERM" in d["interrupted"] and len(d["measurements"]) == 1
    assert any(t["title"] == "Real tokens per second" and t["rows"] for t in d["tables"])  # re-derived
    assert "Interrupted" in next(tmp_path.glob("train-cpu-*.md")).read_text()


def test_shared_data_found_from_the_resolved_checkout(tmp_path: Path) -> None:
    """Through a folder of symlinks (gpu_check.sh's mapping) corpus.py still looks beside the checkout."""
    shim = tmp_path / "shim" / "llmcore"
    shim.mkdir(parents=True)
    for entry in (ROOT / "llmcore").iterdir():
        if entry.name != "__pycache__":
            (shim / entry.name).symlink_to(entry)
    code = "from llmcore.bench.corpus import data_candidates as d, __file__ as f; print(f); print(d()[0])"
    env = {k: v for k, v in os.environ.items() if k != "LLMCORE_SHARED_DATA"}
    env["PYTHONPATH"] = str(shim.parent)
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60
    )
    assert out.returncode == 0, out.stderr
    loaded_from, first = out.stdout.split()
    assert loaded_from.startswith(str(shim))  # the symlinked copy was imported ...
    assert Path(first) == ROOT.parent / "shared" / "data"  # ... and still finds the data beside the checkout


def test_result_without_its_plot_data_still_writes(tmp_path: Path) -> None:
    res = BenchResult("kernels", CPU, {"seqs": [16]})
    res.plot = lambda r, fig: r.find("peak: bf16 matmul")  # what a partial kernels result lacks
    res.mark_interrupted("stopped by SIGTERM")
    paths = res.write(tmp_path)
    assert paths["png"].read_bytes()[:4] == b"\x89PNG" and "Interrupted" in paths["md"].read_text()
