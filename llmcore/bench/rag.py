"""`llmcore bench rag`: a RAG index at scale. Builds, opens and queries an index dir of `--n`
passages (default 200,000) through `llmcore.rag.build_index` / `Retriever`, with synthetic vectors
in place of the embedder.

What is synthetic: the vectors (2,000 clusters in a 64-dim latent space, projected to `--dim` dims,
plus isotropic noise, so neighbours are structured the way text embeddings are rather than uniform
on the sphere) and the passage texts (one short line per document). Queries are noisy copies of
random passages. Everything else is the real code path: the Arrow passages file, the manifest with
checksums, the atomic dir write, hnswlib (cosine, `--m` and `--ef-construction` as `llmcore rag
index`), the open-time checks, and the per-query passage lookup.

Reported: build time (HNSW insertion; embedding excluded, `llmcore rag eval` measures that), peak
memory of this process, file sizes, open time with and without the sha256 checks, the memory a
fresh process adds by opening the index, per-query latency and recall@10 against exact search for
several ef (one query at a time, one thread), query + passage lookup, and exact numpy search.

Invariants:
- Build, open and memory are single measurements (n = 1): a 200,000-passage build takes half an
  hour on 2 cores, and the memory probe needs a fresh process; they are labelled as such.
- Query latency is timed per query; the ef settings (and the query + lookup case) take turns in
  `--rounds` interleaved rounds (the harness's `interleaved`), each round a slice of the queries,
  so a shared machine's load falls on all of them alike. Median = p50; p95 is nearest-rank.
- Recall@10 is the mean over all queries of |HNSW top-10 ∩ exact top-10| / 10, the exact top-10
  from `Retriever.exact_search_vectors` (brute-force cosine over the stored vectors).
- The index dir lives in a temporary folder (under `--work`) and is removed at the end.
"""

from __future__ import annotations

import logging
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from llmcore.bench.harness import BenchResult, interleaved, percentile, quick_or_full
from llmcore.bench.report import fmt
from llmcore.errors import LLMCoreError

log = logging.getLogger(__name__)

EFS = (16, 32, 64, 128, 256)
LOOKUP = "query + passage lookup (k 5, default ef)"
# A fresh process that opens the index: memory added by the open (imports excluded), open seconds,
# and the process's whole resident memory. Imports only what a query server needs (no torch).
_OPEN_PROBE = """
import os, sys, time
from llmcore.rag import Retriever
import hnswlib, pyarrow.ipc
def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
a = rss_mb(); t = time.perf_counter()
Retriever.open(sys.argv[1], load_embedder=False)
print(rss_mb() - a, time.perf_counter() - t, rss_mb())
"""


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def synthetic_vectors(n: int, dim: int, seed: int) -> np.ndarray:
    """`n` unit vectors of `dim` dims with clustered low-dimensional structure (see the module docstring)."""
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


def recall_at(got: np.ndarray, truth: np.ndarray) -> float:
    """Mean over rows of |got ∩ truth| / k (k = truth's width)."""
    k = truth.shape[1]
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(got.tolist(), truth.tolist())]))


def check_settings(n: int, dim: int, queries: int, rounds: int, m: int, ef_construction: int) -> None:
    """One LLMCoreError line naming the flag whose value is out of range."""
    if n < 10:
        raise LLMCoreError(f"--n must be at least 10 (recall@10 needs 10 passages), got {n}")
    if dim < 2:
        raise LLMCoreError(f"--dim must be at least 2, got {dim}")
    if not 1 <= rounds <= queries:
        raise LLMCoreError(f"--rounds must be 1..--queries ({queries}), got {rounds}")
    if not 2 <= m <= 256:
        raise LLMCoreError(f"--m must be 2..256, got {m}")
    if ef_construction < 1:
        raise LLMCoreError(f"--ef-construction must be at least 1, got {ef_construction}")


def run_rag(
    device: torch.device,
    quick: bool = False,
    n: int | None = None,
    dim: int | None = None,
    queries: int | None = None,
    m: int = 32,
    ef_construction: int = 200,
    threads: int = -1,
    rounds: int | None = None,
    work: Path | None = None,
    command: str | None = None,
) -> BenchResult:
    """The RAG-at-scale benchmark (see the module docstring); returns the result, not yet written."""
    try:
        import hnswlib  # noqa: F401
    except ImportError as err:
        from llmcore.errors import install_hint

        raise LLMCoreError(f"llmcore bench rag needs hnswlib: {install_hint('rag')} ({err})") from None
    n = quick_or_full(n, quick, 2_000, 200_000)
    dim = quick_or_full(dim, quick, 64, 384)
    queries = quick_or_full(queries, quick, 50, 1000)
    rounds = quick_or_full(rounds, quick, 2, 5)
    check_settings(n, dim, queries, rounds, m, ef_construction)
    if work is not None and not Path(work).is_dir():
        raise LLMCoreError(f"--work {work}: no such folder")
    settings = {
        "passages": n,
        "dim": dim,
        "queries": queries,
        "rounds": rounds,
        "m": m,
        "ef_construction": ef_construction,
        "build threads": threads,
        "vectors": "synthetic: 2,000 clusters in 64 latent dims, projected, plus noise",
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
    }
    res = BenchResult(
        "rag",
        torch.device("cpu"),
        settings,
        quick=quick,
        command=command,
        title=f"RAG index at scale: {n:,} passages (synthetic vectors, dim {dim})",
    )
    tmp = Path(tempfile.mkdtemp(prefix="llmcore-bench-rag-", dir=work))
    try:
        _measure(res, tmp / "idx", n, dim, queries, rounds, m, ef_construction, threads)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    res.plot = _plot
    return res


def _single(res: BenchResult, case: str, metric: str, unit: str, value: float, higher: bool = False) -> None:
    res.measure(case, metric, unit, [value], higher_is_better=higher, single_run=True)


def _measure(
    res: BenchResult,
    index_dir: Path,
    n: int,
    dim: int,
    queries: int,
    rounds: int,
    m: int,
    ef_construction: int,
    threads: int,
) -> None:
    from llmcore.rag import Retriever, build_index  # optional: needs hnswlib and pyarrow

    t0 = time.perf_counter()
    vecs = synthetic_vectors(n, dim, 0)
    res.extra["generate_vectors_s"] = time.perf_counter() - t0
    vectors_mb = vecs.nbytes / 2**20
    docs = ({"id": f"s{i}", "text": f"synthetic passage number {i}"} for i in range(n))
    log.info("rag: building an index of %s passages (HNSW M=%d, ef_construction=%d)", f"{n:,}", m, ef_construction)
    t0 = time.perf_counter()
    man = build_index(
        docs,
        index_dir,
        embedder="synthetic",
        vectors=vecs,
        m=m,
        ef_construction=ef_construction,
        num_threads=threads,
        progress=False,
    )
    build_total = time.perf_counter() - t0
    hnsw_s = float(man["builds"][-1]["hnsw_s"])
    _single(res, "build", "HNSW insert", "s", hnsw_s)
    _single(res, "build", "HNSW inserts per second", "inserts/s", n / hnsw_s, higher=True)
    _single(res, "build", "whole build_index (passages Arrow, checksums, atomic write)", "s", build_total)
    _single(res, "build", f"peak RSS of the process (vectors {fmt(vectors_mb)} MB included)", "MB", peak_rss_mb())
    files_mb = {k: v["bytes"] / 2**20 for k, v in man["files"].items()}
    res.extra.update(vectors_mb=vectors_mb, files_mb=files_mb)

    rng = np.random.default_rng(1)
    q = vecs[rng.integers(0, n, queries)] + 0.02 * rng.standard_normal((queries, dim)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    del vecs, man

    added, open_verify_s, process_mb = map(
        float,
        subprocess.run(
            [sys.executable, "-c", _OPEN_PROBE, str(index_dir)], check=True, capture_output=True, text=True
        ).stdout.split(),
    )
    _single(res, "open", "open with size + sha256 checks (fresh process)", "s", open_verify_s)
    _single(res, "open", "memory of a process that opened the index", "MB", process_mb)
    _single(res, "open", "memory added by the open (imports excluded)", "MB", added)
    t0 = time.perf_counter()
    r = Retriever.open(index_dir, load_embedder=False, verify=False)
    _single(res, "open", "open without sha256 checks", "s", time.perf_counter() - t0)

    r.exact_vectors()  # read the stored vectors once; the timings below are the search alone
    t0 = time.perf_counter()
    truth, _ = r.exact_search_vectors(q, 10)
    _single(res, "exact search", "numpy, batched", "ms/query", (time.perf_counter() - t0) / queries * 1e3)
    single = []
    for i in range(min(20, queries)):
        t1 = time.perf_counter()
        r.exact_search_vectors(q[i : i + 1], 10)
        single.append((time.perf_counter() - t1) * 1e3)
    res.measure("exact search", "numpy, one query", "ms/query", single, higher_is_better=False)

    chunks = np.array_split(np.arange(queries), rounds)
    lookups = np.array_split(np.arange(min(200, queries)), rounds)
    latencies: dict[str, list[float]] = {}
    got: dict[int, np.ndarray] = {ef: np.full((queries, 10), -1, dtype=np.int64) for ef in EFS}
    calls: dict[str, int] = {}

    def round_of(name: str) -> int:
        """The round this call of case `name` belongs to: round k uses the k-th slice of the queries."""
        k = calls.get(name, 0)
        calls[name] = k + 1
        return k

    def ef_case(ef: int) -> Callable[[], float]:
        name = f"ef {ef}"

        def run() -> float:
            lat = latencies.setdefault(name, [])
            idx = chunks[round_of(name)]
            for i in idx:
                t1 = time.perf_counter()
                pids, _ = r.search_vectors(q[i], 10, ef)
                lat.append((time.perf_counter() - t1) * 1e6)
                got[ef][i] = pids[0]
            return float(len(idx))

        return run

    def lookup_case() -> float:
        lat = latencies.setdefault(LOOKUP, [])
        idx = lookups[round_of(LOOKUP)]
        for i in idx:
            t1 = time.perf_counter()
            pids, scores = r.search_vectors(q[i], 5)
            r.passages_for(pids[0], scores[0])
            lat.append((time.perf_counter() - t1) * 1e3)
        return float(len(idx))

    cases: dict[str, Callable[[], float]] = {f"ef {ef}": ef_case(ef) for ef in EFS}
    cases[LOOKUP] = lookup_case
    samples = interleaved(
        cases, rounds, warmup=0, progress=lambda msg: log.info("rag: %s", msg), on_error=lambda c, e: res.fail(c, e)
    )
    rows = []
    for ef in EFS:
        name = f"ef {ef}"
        if name not in samples or not samples[name].wall:
            continue
        done = np.concatenate(chunks[: len(samples[name].wall)])
        lat = latencies[name][: len(done)]
        rec = recall_at(got[ef][done], truth[done])
        res.measure(name, "query latency", "µs", lat, higher_is_better=False, p95=percentile(lat, 0.95), ef=ef)
        res.measure(name, "recall@10 vs exact", "fraction", [rec], ef=ef, queries=len(done))
        lat_m = res.find(name, "query latency")
        rows.append([ef, f"{rec:.4f}", f"{lat_m['median']:.0f}", f"{lat_m['p95']:.0f}"])
    if LOOKUP in samples and samples[LOOKUP].wall:
        lat = latencies[LOOKUP][: sum(len(x) for x in lookups[: len(samples[LOOKUP].wall)])]
        res.measure(LOOKUP, "latency", "ms", lat, higher_is_better=False, p95=percentile(lat, 0.95))
    res.table(
        "Recall and latency per ef (one query at a time, one thread)",
        ["ef", "recall@10 vs exact", "p50 µs", "p95 µs"],
        rows,
    )
    _summary_table(res, n, m, files_mb)
    res.note(
        "Build, open and memory figures are single measurements (n = 1); query latencies are per query, "
        "the ef settings taking turns in interleaved rounds. Recall is against brute-force cosine search "
        "over the same stored vectors."
    )


def _summary_table(res: BenchResult, n: int, m: int, files_mb: dict[str, float]) -> None:
    def val(case: str, metric: str) -> Any:
        try:
            return res.find(case, metric)["median"]
        except KeyError:
            return None

    peak = next(x for x in res.measurements if x["metric"].startswith("peak RSS"))
    rows = [
        [
            f"HNSW build (insert {n:,} vectors, M {m})",
            f"{fmt(val('build', 'HNSW insert'))} s ({fmt(val('build', 'HNSW inserts per second'))}/s)",
        ],
        [
            "whole build_index (passages Arrow, checksums, atomic write included)",
            f"{fmt(val('build', 'whole build_index (passages Arrow, checksums, atomic write)'))} s",
        ],
        [peak["metric"], f"{fmt(peak['median'])} MB"],
        [
            "index.hnsw / passages.arrow",
            f"{fmt(files_mb.get('index.hnsw'))} MB / {fmt(files_mb.get('passages.arrow'))} MB",
        ],
        [
            "open with sha256 check / without",
            f"{fmt(val('open', 'open with size + sha256 checks (fresh process)'))} s"
            f" / {fmt(val('open', 'open without sha256 checks'))} s",
        ],
        [
            "memory of a process that opened the index (added by the open, imports excluded)",
            f"{fmt(val('open', 'memory of a process that opened the index'))} MB "
            f"({fmt(val('open', 'memory added by the open (imports excluded)'))} MB)",
        ],
        [
            "exact search (numpy, one query / batched)",
            f"{fmt(val('exact search', 'numpy, one query'))} / "
            f"{fmt(val('exact search', 'numpy, batched'))} ms per query",
        ],
    ]
    if any(x["case"] == LOOKUP for x in res.measurements):
        rows.append(["query + passage lookup p50 (k 5, default ef)", f"{fmt(val(LOOKUP, 'latency'))} ms"])
    res.tables.insert(0, {"title": "Build, open and memory", "columns": ["measure", "value"], "rows": rows})


def _plot(res: BenchResult, fig: Any) -> None:
    lat = [x for x in res.measurements if x["metric"] == "query latency"]
    rec = {x["ef"]: x["median"] for x in res.measurements if x["metric"] == "recall@10 vs exact"}
    ax1 = fig.add_subplot(1, 2, 1)
    efs = [x["ef"] for x in lat]
    ax1.plot(efs, [x["median"] for x in lat], "o-", label="p50")
    ax1.plot(efs, [x["p95"] for x in lat], "s--", label="p95")
    ax1.set_xscale("log", base=2)
    ax1.set_yscale("log")
    ax1.set_xlabel("ef (search breadth)")
    ax1.set_ylabel("query latency, µs (one query, one thread)")
    ax1.set_title("HNSW query latency", fontsize=10)
    ax1.legend(fontsize=8)
    ax2 = fig.add_subplot(1, 2, 2)
    ax2.plot(efs, [rec[e] for e in efs], "o-", color="tab:green")
    for e in efs:
        ax2.annotate(f"{rec[e]:.4f}", (e, rec[e]), textcoords="offset points", xytext=(0, 6), fontsize=8, ha="center")
    ax2.set_xscale("log", base=2)
    ax2.set_xlabel("ef (search breadth)")
    ax2.set_ylabel("recall@10 vs exact search")
    ax2.set_title("recall", fontsize=10)
    fig.suptitle(res.title, fontsize=11)


def plot_for(res: BenchResult) -> Any:
    """The plot function for a result of this benchmark (used to redraw from json)."""
    return _plot


__all__ = ["run_rag", "plot_for", "synthetic_vectors", "recall_at"]
