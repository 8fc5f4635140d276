"""RAG at scale: build, open and query an index dir of N passages (default 200,000) through
`llmcore.rag.build_index` / `Retriever`, with synthetic vectors in place of the embedder.

What is synthetic: the vectors (2,000 clusters in a 64-dim latent space, projected to 384 dims, plus
isotropic noise, so neighbours are structured the way text embeddings are rather than uniform on the
sphere) and the passage texts (one short line per document). Queries are noisy copies of random
passages. Everything else is the real code path: the Arrow passages file, the manifest with
checksums, the atomic dir write, hnswlib (cosine, M and ef_construction as `llmcore rag index`), the
open-time checks, and the per-query passage lookup.

Reports build time (HNSW insertion; embedding excluded, see the CMRC eval for that), peak and
resident memory, file sizes, open time, and per-query latency and recall@10 against exact search for
several ef, one query at a time on one thread.

    .venv/bin/python benchmarks/bench_rag_scale.py --n 200000 --out benchmarks/results --name rag-scale-cpu
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llmcore.rag import Retriever, build_index  # noqa: E402


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def synthetic(n: int, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    latent, clusters = 64, 2000
    proj = rng.standard_normal((latent, dim)).astype(np.float32) / np.sqrt(latent)
    centers = rng.standard_normal((clusters, latent)).astype(np.float32)
    out = np.empty((n, dim), dtype=np.float32)
    for i in range(0, n, 50_000):
        m = min(50_000, n - i)
        z = centers[rng.integers(0, clusters, m)] + 0.6 * rng.standard_normal((m, latent)).astype(np.float32)
        x = z @ proj + 0.05 * rng.standard_normal((m, dim)).astype(np.float32)
        out[i : i + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def exact_top(base: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    out = np.empty((len(q), k), dtype=np.int64)
    for i in range(0, len(q), 100):
        s = q[i : i + 100] @ base.T
        top = np.argpartition(-s, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(s, top, axis=1), axis=1)
        out[i : i + 100] = np.take_along_axis(top, order, axis=1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--m", type=int, default=32)
    ap.add_argument("--ef-construction", type=int, default=200)
    ap.add_argument("--threads", type=int, default=-1, help="HNSW build threads (-1 = all cores)")
    ap.add_argument("--work", type=Path, default=None, help="where the index dir goes (default: a temp dir)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--name", default="rag-scale-cpu")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="rag-scale-", dir=args.work))
    res: dict = {
        "n": args.n,
        "dim": args.dim,
        "m": args.m,
        "ef_construction": args.ef_construction,
        "queries": args.queries,
        "cpus": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)),
        "platform": platform.platform(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    try:
        rss0 = rss_mb()
        t0 = time.perf_counter()
        vecs = synthetic(args.n, args.dim, 0)
        res["gen_s"] = time.perf_counter() - t0
        res["vectors_mb"] = vecs.nbytes / 2**20
        docs = ({"id": f"s{i}", "text": f"synthetic passage number {i}"} for i in range(args.n))
        rss_before = rss_mb()
        t0 = time.perf_counter()
        man = build_index(
            docs,
            work / "idx",
            embedder="synthetic",
            vectors=vecs,
            m=args.m,
            ef_construction=args.ef_construction,
            num_threads=args.threads,
            progress=False,
        )
        res["build_total_s"] = time.perf_counter() - t0
        res["build_hnsw_s"] = man["builds"][-1]["hnsw_s"]
        res["insert_per_s"] = args.n / res["build_hnsw_s"]
        res["rss_before_build_mb"] = rss_before - rss0
        res["peak_rss_mb"] = peak_mb()
        res["files_mb"] = {k: v["bytes"] / 2**20 for k, v in man["files"].items()}

        rng = np.random.default_rng(1)
        picks = rng.integers(0, args.n, args.queries)
        q = vecs[picks] + 0.02 * rng.standard_normal((args.queries, args.dim)).astype(np.float32)
        q /= np.linalg.norm(q, axis=1, keepdims=True)
        t0 = time.perf_counter()
        truth = exact_top(vecs, q, 10)
        res["exact_batched_ms_per_query"] = (time.perf_counter() - t0) / args.queries * 1e3
        t0 = time.perf_counter()
        for i in range(20):
            exact_top(vecs, q[i : i + 1], 10)
        res["exact_single_ms_per_query"] = (time.perf_counter() - t0) / 20 * 1e3
        del vecs

        # Memory of a fresh process that only opens the index (what a query server pays).
        probe = (
            "import sys, time; sys.path.insert(0, sys.argv[2]); from llmcore.rag import Retriever; "
            "import hnswlib, pyarrow.ipc; from benchmarks.bench_rag_scale import rss_mb; a = rss_mb(); t = time.perf_counter(); "
            "r = Retriever.open(sys.argv[1], load_embedder=False); "
            "print(rss_mb() - a, time.perf_counter() - t, rss_mb())"
        )
        added, res["open_verify_s"], total = map(
            float,
            subprocess.run(
                [sys.executable, "-c", probe, str(work / "idx"), str(ROOT)], check=True, capture_output=True, text=True
            ).stdout.split(),
        )
        res["rss_open_mb"], res["rss_open_process_mb"] = added, total
        t0 = time.perf_counter()
        r = Retriever.open(work / "idx", load_embedder=False, verify=False)
        res["open_noverify_s"] = time.perf_counter() - t0

        sweep = []
        for ef in (16, 32, 64, 128, 256):
            lat = []
            got = np.empty((args.queries, 10), dtype=np.int64)
            for i in range(args.queries):
                t1 = time.perf_counter()
                pids, _ = r.search_vectors(q[i], 10, ef)
                lat.append(time.perf_counter() - t1)
                got[i] = pids[0]
            rec = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got.tolist(), truth.tolist())]))
            us = np.asarray(lat) * 1e6
            sweep.append(
                {
                    "ef": ef,
                    "recall@10": rec,
                    "p50_us": float(np.percentile(us, 50)),
                    "p95_us": float(np.percentile(us, 95)),
                }
            )
            print(f"ef {ef}: recall@10 {rec:.4f}, p50 {sweep[-1]['p50_us']:.0f} µs", file=sys.stderr)
        res["ef_sweep"] = sweep
        lat = []
        for i in range(200):
            t1 = time.perf_counter()
            pids, scores = r.search_vectors(q[i % len(q)], 5)
            r.passages_for(pids[0], scores[0])
            lat.append(time.perf_counter() - t1)
        res["search_and_lookup_p50_ms"] = float(np.percentile(np.asarray(lat) * 1e3, 50))
        res["peak_rss_mb_end"] = peak_mb()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(res, indent=2) + "\n")
    ef64 = next(s for s in res["ef_sweep"] if s["ef"] == 64)
    lines = [
        f"# RAG index at scale: {args.n:,} passages (synthetic vectors, dim {args.dim})",
        "",
        f"{res['date']}, {res['cpus']} CPUs (shared with other work), hnswlib cosine M={args.m}, "
        f"ef_construction={args.ef_construction}. Built and opened through `build_index` / `Retriever`.",
        "",
        "| measure | value |",
        "|---|---:|",
        f"| HNSW build (insert {args.n:,} vectors) | {res['build_hnsw_s']:.1f} s ({res['insert_per_s']:.0f}/s) |",
        f"| whole build_index (passages Arrow, checksums, atomic write included) | {res['build_total_s']:.1f} s |",
        f"| peak RSS of the process (vectors {res['vectors_mb']:.0f} MB included) | {res['peak_rss_mb']:.0f} MB |",
        f"| index.hnsw / passages.arrow | {res['files_mb']['index.hnsw']:.0f} MB / "
        f"{res['files_mb']['passages.arrow']:.1f} MB |",
        f"| open with sha256 check / without | {res['open_verify_s']:.2f} s / {res['open_noverify_s']:.2f} s |",
        f"| memory of a process that opened the index (added by the open, imports excluded) | {res['rss_open_process_mb']:.0f} MB "
        f"({res['rss_open_mb']:.0f} MB) |",
        f"| query p50 / p95 at ef 64 (one thread, vectors only) | {ef64['p50_us'] / 1e3:.2f} / "
        f"{ef64['p95_us'] / 1e3:.2f} ms |",
        f"| query + passage lookup p50 (k=5, ef 64) | {res['search_and_lookup_p50_ms']:.2f} ms |",
        f"| exact search (numpy, one query / batched) | {res['exact_single_ms_per_query']:.1f} / "
        f"{res['exact_batched_ms_per_query']:.2f} ms per query |",
        "",
        "| ef | recall@10 vs exact | p50 µs | p95 µs |",
        "|---:|---:|---:|---:|",
    ]
    for s in res["ef_sweep"]:
        lines.append(f"| {s['ef']} | {s['recall@10']:.4f} | {s['p50_us']:.0f} | {s['p95_us']:.0f} |")
    (args.out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
