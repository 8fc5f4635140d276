"""`llmcore bench data`: the data pipeline against its baselines, on the shared pretrain sample with
MiniMind's tokenizer.

- prep speed: tokens/s of `llmcore prep pretrain` end to end (read, parse, validate, encode with one
  worker per core, write Arrow, checksum) against the tokenizer's own `encode_batch` on the same
  texts already in memory (the Rust batch encoder on all cores); interleaved repeats; both count
  the same tokens (without bos/eos); CPU seconds include prep's reaped worker processes.
- prep memory: peak summed RSS of a `llmcore prep pretrain` process tree (sampled every 20 ms) on the
  input and on the input given several times (it must stay flat as the input grows).
- loader: batches/s of the packed, bestfit and padded loaders (16 x 512), interleaved.
- real-token share of packed, bestfit and padded rows over one epoch.

Invariants: the token counts of prep and of encode_batch are checked equal before a ratio is
taken; memory runs that fail raise an LLMCoreError with prep's own message.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from llmcore.bench.corpus import minimind_tokenizer_dir, need, read_texts, shared_data_dir, write_jsonl
from llmcore.bench.harness import BenchResult, cpu_seconds_with_children, interleaved
from llmcore.bench.report import bar_panel, fmt
from llmcore.errors import LLMCoreError

log = logging.getLogger(__name__)


def peak_rss_of(cmd: list[str]) -> tuple[float, float]:
    """Run cmd; (seconds, peak MiB of the summed RSS of it and all its children, sampled every 20 ms)."""
    import psutil

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    root = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        total = 0
        try:
            for p in [root] + root.children(recursive=True):
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
        except psutil.Error:
            pass
        peak = max(peak, total)
        time.sleep(0.02)
    seconds = time.perf_counter() - t0
    err = proc.stderr.read() if proc.stderr else ""
    if proc.returncode != 0:
        raise LLMCoreError(
            f"prep (memory run) failed: {err.strip().splitlines()[-1] if err.strip() else proc.returncode}"
        )
    return seconds, peak / 2**20


def run_data(
    device: Any,
    quick: bool = False,
    input_path: str | Path | None = None,
    repeats: int | None = None,
    workers: int | None = None,
    copies: list[int] | None = None,
    data_dir: str | Path | None = None,
    command: str | None = None,
) -> BenchResult:
    """The data benchmark (see the module docstring); returns the result, not yet written."""
    from llmcore.bench.train import real_token_share
    from llmcore.data_prep.loaders import make_loader
    from llmcore.data_prep.prep import prep
    from llmcore.data_prep.shards import ShardReader
    from llmcore.data_prep.tokenizer import load_tokenizer

    ddir = shared_data_dir(data_dir)
    tok_dir = minimind_tokenizer_dir(ddir)
    src = Path(input_path) if input_path else need(ddir / "pretrain_sample.jsonl", "the pretrain sample")
    if not src.is_file():
        raise LLMCoreError(f"--input {src}: no such file")
    repeats = repeats or (2 if quick else 5)
    workers = workers or os.cpu_count() or 1
    copies = copies or ([1, 2] if quick else [1, 4])
    work = Path(tempfile.mkdtemp(prefix="llmcore-bench-data-"))
    try:
        texts = read_texts(src, limit=1500 if quick else None)
        if quick:
            src = write_jsonl(texts, work / "input.jsonl")
        settings = {
            "input": f"{src.name} ({len(texts)} documents, {src.stat().st_size / 2**20:.1f} MiB)",
            "tokenizer": "MiniMind's (vocab 6400)",
            "prep_workers": workers,
            "repeats": repeats,
            "memory_copies": copies,
            "loader": "16 x 512",
        }
        res = BenchResult(
            "data",
            device,
            settings,
            quick=quick,
            command=command,
            title="Data benchmark: prep vs the tokenizer's batch encode, memory, loaders",
        )
        tok = load_tokenizer(tok_dir)
        counts: dict[str, int] = {}

        def encode() -> float:
            encs = tok.backend.encode_batch(texts, add_special_tokens=False)
            counts["encode"] = sum(len(e.ids) for e in encs)
            return float(counts["encode"])

        def run_prep() -> float:
            m = prep("pretrain", [src], tok_dir, work / "shards", workers=workers, overwrite=True)
            counts["prep"] = int(m["num_tokens"]) - 2 * int(m["num_docs"])  # without bos/eos, like encode_batch
            return float(counts["prep"])

        log.info("prep vs encode_batch: %d interleaved repeats", repeats)
        s = interleaved(
            {"tokenizer encode_batch (texts in memory)": encode, "llmcore prep pretrain (end to end)": run_prep},
            repeats,
            warmup=1,
            cpu_clock=cpu_seconds_with_children,
            progress=lambda m: log.info("%s", m),
        )
        if counts["prep"] != counts["encode"]:
            raise LLMCoreError(f"prep counted {counts['prep']} tokens, encode_batch {counts['encode']}: not comparable")
        for name, sm in s.items():
            res.measure_samples(name, sm, "tokens/s", tokens=counts["prep"])
            res.measure(name, "CPU tokens/s", "tokens/CPU-s", sm.cpu_rate(), note="CPU seconds include reaped workers")
        r = res.ratio(
            "prep vs encode_batch (wall)",
            "llmcore prep pretrain (end to end)",
            "tokenizer encode_batch (texts in memory)",
            metric="throughput",
            what="tokens/s",
        )
        res.ratio(
            "prep vs encode_batch (per CPU-second)",
            "llmcore prep pretrain (end to end)",
            "tokenizer encode_batch (texts in memory)",
            metric="CPU tokens/s",
            what="tokens per CPU-second",
        )
        res.target(
            "prep speed vs the tokenizer's batch encode", r["value"] if r else None, 0.8, source="wall, interleaved"
        )

        # Peak memory of a prep process tree against input size.
        mem_rows = []
        mem: list[dict[str, Any]] = []
        for n in copies:
            cmd = [
                sys.executable,
                "-m",
                "llmcore",
                "prep",
                "pretrain",
                "--tokenizer",
                str(tok_dir),
                "--out",
                str(work / f"mem{n}"),
                "--workers",
                str(workers),
                "--overwrite",
            ]
            for _ in range(n):
                cmd += ["--input", str(src)]
            log.info("prep memory run: input x%d", n)
            seconds, peak = peak_rss_of(cmd)
            size = n * src.stat().st_size / 2**20
            mem.append({"copies": n, "input_mib": size, "peak_rss_mib": peak, "seconds": seconds})
            res.measure(
                f"prep peak RSS, input x{n}",
                "peak memory",
                "MiB",
                [peak],
                higher_is_better=False,
                input_mib=round(size, 2),
                seconds=round(seconds, 2),
            )
            mem_rows.append([f"x{n}", f"{size:.1f}", f"{peak:.0f}", f"{seconds:.1f}"])
        res.table(
            "Prep peak memory (summed RSS of the process tree, sampled every 20 ms)",
            ["input", "input MiB", "peak RSS MiB", "wall s"],
            mem_rows,
        )
        res.extra["memory"] = mem
        growth = mem[-1]["peak_rss_mib"] / mem[0]["peak_rss_mib"]
        res.ratio(
            f"prep peak RSS x{copies[-1]} input vs x{copies[0]}",
            f"prep peak RSS, input x{copies[-1]}",
            f"prep peak RSS, input x{copies[0]}",
            what="memory growth (1.0 = flat)",
        )
        res.target(
            f"prep memory flat in input size (peak at x{copies[-1]} / peak at x{copies[0]})", growth, 1.25, higher=False
        )

        # Loaders and real-token shares.
        reader = ShardReader(work / "shards")
        loaders = {mode: make_loader(reader, mode, 512, 16, seed=0) for mode in ("packed", "bestfit", "padded")}
        for ld in loaders.values():
            next(ld)
        per_call = 20 if quick else 100

        def batches(ld: Any) -> float:
            for _ in range(per_call):
                next(ld)
            return float(per_call)

        ls = interleaved(
            {f"{mode} loader 16x512": (lambda ld=ld: batches(ld)) for mode, ld in loaders.items()}, repeats, warmup=0
        )
        for name, sm in ls.items():
            res.measure_samples(name, sm, "batches/s")
        shares = {mode: real_token_share(work / "shards", mode, 512) for mode in ("packed", "bestfit", "padded")}
        res.extra["real_token_share"] = shares
        res.table(
            "Real-token share of rows at seq 512 (one epoch)",
            ["layout", "real tokens"],
            [
                ["padded (one document per row, MiniMind's layout)", f"{shares['padded']:.1%}"],
                ["bestfit (whole documents per row, best-fit decreasing; SFT's layout)", f"{shares['bestfit']:.2%}"],
                ["packed (documents concatenated into rows of 513)", f"{shares['packed']:.3%}"],
            ],
        )
        lengths = reader.lengths()
        res.extra["doc_tokens"] = {"mean": float(lengths.mean()), "max": int(lengths.max()), "docs": len(lengths)}
        res.note(f"Documents average {lengths.mean():.0f} tokens (max {lengths.max()}) with MiniMind's tokenizer.")
        res.note(
            "encode_batch gets the texts already parsed in memory and its word cache warm from the earlier "
            "repeats; prep starts its worker processes cold on every run."
        )
        res.plot = _plot
        return res
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _plot(res: BenchResult, fig: Any) -> None:
    ax = fig.add_subplot(1, 3, 1)
    ms = [m for m in res.measurements if m["metric"] == "throughput" and m["unit"] == "tokens/s"]
    r = next((x for x in res.ratios if x["metric"] == "throughput"), None)
    bar_panel(
        ax,
        [m["case"].replace(" (", "\n(") for m in ms],
        [m["median"] / 1e3 for m in ms],
        [(m["min"] / 1e3, m["max"] / 1e3) for m in ms],
        f"prep vs batch encode ({fmt(r['value']) if r else '-'}x)",
        "thousand tokens per second (median, min..max)",
        ["tab:gray", "tab:blue"],
    )
    ax = fig.add_subplot(1, 3, 2)
    mem = res.extra.get("memory", [])
    ax.plot([m["input_mib"] for m in mem], [m["peak_rss_mib"] for m in mem], marker="o", label="prep peak RSS")
    ax.plot([m["input_mib"] for m in mem], [m["input_mib"] for m in mem], ls="--", color="gray", label="input size")
    for m in mem:
        ax.annotate(
            f"{m['peak_rss_mib']:.0f} MiB",
            (m["input_mib"], m["peak_rss_mib"]),
            textcoords="offset points",
            xytext=(4, 6),
            fontsize=8,
        )
    ax.set_xlabel("input size (MiB)")
    ax.set_ylabel("peak resident memory (MiB)")
    ax.set_ylim(bottom=0)
    ax.set_xlim(left=0)
    ax.set_title("prep memory against input size", fontsize=10)
    ax.legend(fontsize=8)
    ax = fig.add_subplot(1, 3, 3)
    shares = res.extra.get("real_token_share", {})
    modes = [m for m in ("padded", "bestfit", "packed") if m in shares]
    vals = [100 * shares.get(m, 0) for m in modes]
    loader = {
        m["case"].split()[0]: m["median"]
        for m in res.measurements
        if m["unit"] == "batches/s" and m["metric"] == "throughput"
    }
    colors = {"padded": "tab:red", "bestfit": "tab:orange", "packed": "tab:green"}
    ax.bar(modes, vals, color=[colors[m] for m in modes])
    for i, (mode, v) in enumerate(zip(modes, vals)):
        ax.text(i, v + 1, f"{v:.1f}% real\n{fmt(loader.get(mode))} batches/s", ha="center", fontsize=8)
    ax.set_ylim(0, 125)
    ax.set_ylabel("% of row positions that are real tokens")
    ax.set_title("rows of 512: real tokens, loader speed", fontsize=10)
    fig.suptitle("llmcore data pipeline (MiniMind's tokenizer)", fontsize=11)


__all__ = ["run_data", "peak_rss_of"]


def plot_for(res: BenchResult) -> Any:
    """The plot function for a result of this benchmark (used to redraw from json)."""
    return _plot
