"""What `ShardReader.verify()` costs on a shard dir the size of MiniMind's pretrain_hq (1.41M rows).

Writes a synthetic pretrain shard dir with prep's own writer (random token ids below 6400; row
lengths uniform in 257-519 characters at the 1.2 characters per token MiniMind's tokenizer gives on
pretrain_sample.jsonl, so about 324 tokens a row, 200,000 rows a shard as prep writes), then times
`verify()` (sha256 of every shard on up to 8 threads, counts, offsets, ids below the vocab) and,
separately, the sha256 pass on one thread and the id/count pass without checksums.

    python benchmarks/bench_verify.py [--rows 1410000] [--dir /tmp/llmcore-verify-bench] [--keep]

The file cache is warm (the files were just written), as it is when training starts right after
prep; from a cold disk add the time to read the files once, which training's memory map pays anyway.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from llmcore.data_prep.format import MANIFEST_FILE
from llmcore.data_prep.kinds import get_kind
from llmcore.data_prep.prep import _ShardWriter
from llmcore.data_prep.shards import ShardReader
from llmcore.io import sha256_file as file_sha256
from llmcore.io import write_json


def build(out: Path, rows: int, vocab: int = 6400, seed: int = 0) -> dict:
    kind = get_kind("pretrain")
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    writer = _ShardWriter(out, kind, 200_000)
    block = 20_000
    for start in range(0, rows, block):
        n = min(block, rows - start)
        lengths = (rng.integers(257, 520, n) / 1.2).astype(np.int64) + 2
        values = rng.integers(3, vocab, int(lengths.sum()), dtype=np.int64)
        writer.write({"tokens": (values.astype(np.uint16), lengths)}, n)
    shards = writer.finish()
    manifest = {
        "format": "llmcore-shards",
        "format_version": 1,
        "kind": "pretrain",
        "columns": kind.manifest_columns(),
        "tokenizer": {
            "fingerprint": "synthetic",
            "vocab_size": vocab,
            "path": "",
            "special_ids": {"pad": 0, "bos": 1, "eos": 2},
        },
        "num_docs": sum(s["num_docs"] for s in shards),
        "num_tokens": sum(s["num_tokens"] for s in shards),
        "shards": shards,
    }
    write_json(out / MANIFEST_FILE, manifest)
    return manifest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_410_000)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/llmcore-verify-bench"))
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    t = time.perf_counter()
    m = build(args.dir, args.rows)
    size = sum(s["bytes"] for s in m["shards"])
    print(
        f"wrote {args.dir}: {m['num_docs']:,} rows, {m['num_tokens']:,} tokens, {len(m['shards'])} shards, "
        f"{size / 1e6:,.0f} MB in {time.perf_counter() - t:.1f} s"
    )
    reader = ShardReader(args.dir)
    res = {
        "rows": m["num_docs"],
        "tokens": m["num_tokens"],
        "shards": len(m["shards"]),
        "bytes": size,
        "cpus": os.cpu_count(),
    }
    for name, fn in [
        ("verify (all checks)", lambda: reader.verify()),
        ("ids and counts only (checksums=False)", lambda: reader.verify(checksums=False)),
        ("sha256, one thread", lambda: [file_sha256(args.dir / s["file"]) for s in m["shards"]]),
    ]:
        times = []
        for _ in range(3):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        res[name] = min(times)
        print(f"{name}: best of 3 {min(times):.2f} s ({size / 1e6 / min(times):,.0f} MB/s)")
    print(json.dumps(res))
    if not args.keep:
        shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
