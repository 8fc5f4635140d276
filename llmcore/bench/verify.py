"""`llmcore bench verify`: what `ShardReader.verify()` costs on a shard dir the size of MiniMind's
pretrain_hq (1.41M rows by default).

Writes a synthetic pretrain shard dir with prep's own shard writer: random token ids below 6400;
row lengths uniform in 257-519 characters at the 1.2 characters per token MiniMind's tokenizer gives
on pretrain_sample.jsonl, so about 324 tokens a row; 200,000 rows a shard as prep writes. Then
times, in interleaved rounds, `verify()` (sha256 of every shard on up to 8 threads, counts,
offsets, ids below the vocab), the id/count pass alone (`checksums=False`), and the sha256 of
every shard on one thread (the single-core floor of the checksum part).

Invariants:
- The file cache is warm (the files were just written, and one untimed warm-up pass of each case
  runs first), as it is when training starts right after prep; from a cold disk add the time to
  read the files once, which training's memory map pays anyway.
- Throughput is shard megabytes (10^6 bytes) per second; seconds per pass are beside it; the ratio
  of verify to the one-thread sha256 is paired per round.
- The shard dir lives in a temporary folder (under `--work`), removed at the end unless `--keep`.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmcore.bench.harness import BenchResult, interleaved, quick_or_full
from llmcore.bench.report import bar_panel, fmt
from llmcore.data_prep.format import FORMAT, FORMAT_VERSION, MANIFEST_FILE
from llmcore.data_prep.kinds import get_kind
from llmcore.data_prep.prep import _ShardWriter
from llmcore.data_prep.shards import ShardReader
from llmcore.errors import LLMCoreError
from llmcore.io import sha256_file, write_json

log = logging.getLogger(__name__)

VOCAB = 6400
ROWS_PER_SHARD = 200_000
VERIFY = "verify (all checks)"
IDS_ONLY = "ids and counts only (checksums=False)"
SHA_ONE = "sha256, one thread"


def build_shards(out: Path, rows: int, rows_per_shard: int = ROWS_PER_SHARD, seed: int = 0) -> dict[str, Any]:
    """A synthetic pretrain shard dir at `out` (see the module docstring); returns its manifest."""
    kind = get_kind("pretrain")
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    writer = _ShardWriter(out, kind, rows_per_shard)
    block = 20_000
    for start in range(0, rows, block):
        n = min(block, rows - start)
        lengths = (rng.integers(257, 520, n) / 1.2).astype(np.int64) + 2
        values = rng.integers(3, VOCAB, int(lengths.sum()), dtype=np.int64)
        writer.write({"tokens": (values.astype(np.uint16), lengths)}, n)
    shards = writer.finish()
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": "pretrain",
        "columns": kind.manifest_columns(),
        "tokenizer": {
            "fingerprint": "synthetic",
            "vocab_size": VOCAB,
            "path": "",
            "special_ids": {"pad": 0, "bos": 1, "eos": 2},
        },
        "num_docs": sum(s["num_docs"] for s in shards),
        "num_tokens": sum(s["num_tokens"] for s in shards),
        "shards": shards,
    }
    write_json(out / MANIFEST_FILE, manifest)
    return manifest


def run_verify(
    device: torch.device,
    quick: bool = False,
    rows: int | None = None,
    rows_per_shard: int | None = None,
    rounds: int | None = None,
    work: Path | None = None,
    keep: bool = False,
    command: str | None = None,
) -> BenchResult:
    """The shard-verification benchmark (see the module docstring); returns the result, not yet written."""
    rows = quick_or_full(rows, quick, 4_000, 1_410_000)
    rows_per_shard = quick_or_full(rows_per_shard, quick, 1_000, ROWS_PER_SHARD)
    rounds = quick_or_full(rounds, quick, 2, 3)
    if rows < 1 or rows_per_shard < 1 or rounds < 1:
        raise LLMCoreError(
            f"--rows, --rows-per-shard and --rounds must be at least 1 (got {rows}, {rows_per_shard}, {rounds})"
        )
    if work is not None and not Path(work).is_dir():
        raise LLMCoreError(f"--work {work}: no such folder")
    settings = {"rows": rows, "rows per shard": rows_per_shard, "rounds": rounds, "vocab": VOCAB}
    res = BenchResult(
        "verify",
        torch.device("cpu"),
        settings,
        quick=quick,
        command=command,
        title="Shard verification: ShardReader.verify() on a pretrain_hq-sized shard dir",
    )
    tmp = Path(tempfile.mkdtemp(prefix="llmcore-bench-verify-", dir=work))
    try:
        t0 = time.perf_counter()
        manifest = build_shards(tmp / "shards", rows, rows_per_shard)
        size = sum(s["bytes"] for s in manifest["shards"])
        res.extra.update(
            rows=manifest["num_docs"],
            tokens=manifest["num_tokens"],
            shards=len(manifest["shards"]),
            bytes=size,
            write_s=time.perf_counter() - t0,
        )
        log.info(
            "verify: wrote %s rows, %s tokens, %d shards, %.0f MB in %.1f s",
            f"{manifest['num_docs']:,}",
            f"{manifest['num_tokens']:,}",
            len(manifest["shards"]),
            size / 1e6,
            res.extra["write_s"],
        )
        reader = ShardReader(tmp / "shards")
        files = [tmp / "shards" / s["file"] for s in manifest["shards"]]
        mb = size / 1e6

        def sha_one_thread() -> float:
            for f in files:
                sha256_file(f)
            return mb

        cases = {
            VERIFY: lambda: (reader.verify(), mb)[1],
            IDS_ONLY: lambda: (reader.verify(checksums=False), mb)[1],
            SHA_ONE: sha_one_thread,
        }
        samples = interleaved(cases, rounds, warmup=1, progress=lambda m: log.info("verify: %s", m), on_error=res.fail)
        rows_out = []
        for name, s in samples.items():
            m = res.measure_samples(name, s, "MB/s")
            rows_out.append([name, fmt(m["seconds"]["median"]), fmt(m["seconds"]["min"]), fmt(m["median"])])
        res.ratio(f"{VERIFY} vs {SHA_ONE}", VERIFY, SHA_ONE, metric="throughput", what="MB/s, paired per round")
        res.table(
            f"Seconds per pass over {len(files)} shards, {fmt(mb)} MB ({manifest['num_docs']:,} rows)",
            ["pass", "seconds (median)", "seconds (best)", "MB/s (median)"],
            rows_out,
        )
        res.note(
            "verify() hashes the shards on up to 8 threads (one per core at most, one per shard at most); "
            "the one-thread sha256 is the floor of its checksum part on one core."
        )
        if keep:
            res.note(f"shard dir kept at {tmp / 'shards'} (--keep)")
    finally:
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)
    res.plot = _plot
    return res


def _plot(res: BenchResult, fig: Any) -> None:
    ms = [m for m in res.measurements if m["metric"] == "throughput"]
    ax1 = fig.add_subplot(1, 2, 1)
    bar_panel(
        ax1,
        [m["case"] for m in ms],
        [m["seconds"]["median"] for m in ms],
        [(m["seconds"]["min"], m["seconds"]["max"]) for m in ms],
        "seconds per pass (median, min..max)",
        "seconds",
    )
    ax2 = fig.add_subplot(1, 2, 2)
    bar_panel(
        ax2,
        [m["case"] for m in ms],
        [m["median"] for m in ms],
        [(m["min"], m["max"]) for m in ms],
        "throughput",
        "MB/s",
    )
    fig.suptitle(
        f"ShardReader.verify(): {res.extra.get('rows', 0):,} rows, {res.extra.get('shards')} shards, "
        f"{fmt(res.extra.get('bytes', 0) / 1e6)} MB (files in the page cache)",
        fontsize=11,
    )


def plot_for(res: BenchResult) -> Any:
    """The plot function for a result of this benchmark (used to redraw from json)."""
    return _plot


__all__ = ["run_verify", "build_shards", "plot_for"]
