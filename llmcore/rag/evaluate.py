"""`llmcore rag eval`: retrieval quality, HNSW accuracy against exact search, build speed, query latency,
and (with a checkpoint) how often grounded answers contain a gold answer.

Definitions (all over the questions file, one line `{"question", "doc_id"[, "answers"]}`):
- the ranking of a question is the list of distinct doc ids of its top passages, in order (a document
  with several passages counts once, at its best passage); recall@k = share of questions whose gold
  `doc_id` is among the first k docs; MRR = mean of 1/rank of the gold doc within the first 10 (0 if absent);
- `exact` is the same with brute-force cosine search over all passage vectors;
- hnsw_recall@10 = mean over questions of |HNSW top-10 passages ∩ exact top-10 passages| / 10 at the
  given ef; the ef sweep repeats it per ef (plotted);
- hybrid = dense and BM25 (character bigrams) fused by reciprocal rank; bm25 = BM25 alone;
- query latency = wall time of `Retriever.search(question, k)` (embedding + HNSW + passage lookup),
  one question at a time after a warm-up, p50/p95 in ms;
- build time and passages/s come from the index manifest (embedding + HNSW insertion, summed over builds);
- answer_contains_gold = share of answered questions whose generated answer contains any gold answer string.
Invariants: nothing here changes the index; reports are written atomically through `llmcore.io`
(`write_json`, `write_text`, `atomic_write` for the plot).
"""

from __future__ import annotations

import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from llmcore.errors import DataError, LLMCoreError
from llmcore.rag.documents import iter_jsonl
from llmcore.rag.retriever import Retriever, rrf

log = logging.getLogger(__name__)

EF_SWEEP = (10, 16, 32, 64, 128, 256)
KS = (1, 5, 10)


def read_questions(path: str | Path, limit: int | None = None) -> list[dict[str, Any]]:
    """Validated question lines: `question` (non-empty string), `doc_id`, optional `answers` (list of strings)."""
    p = Path(path)
    if not p.is_file():
        raise LLMCoreError(f"--questions {p}: no such file")
    if limit is not None and limit < 1:
        raise LLMCoreError(f"--limit {limit}: must be >= 1")
    out: list[dict[str, Any]] = []
    for obj, (_, n) in iter_jsonl(p):
        if not isinstance(obj, dict):
            raise DataError("expected a JSON object", str(p), n)
        q = obj.get("question")
        if not isinstance(q, str) or not q.strip():
            raise DataError('missing or empty "question"', str(p), n)
        if "doc_id" not in obj or obj["doc_id"] is None:
            raise DataError('missing "doc_id"', str(p), n)
        answers = obj.get("answers") or []
        if isinstance(answers, str):
            answers = [answers]
        if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
            raise DataError('"answers" must be a list of strings', str(p), n)
        out.append({"question": q.strip(), "doc_id": str(obj["doc_id"]), "answers": [a for a in answers if a]})
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise LLMCoreError(f"--questions {p}: no questions")
    return out


def doc_rankings(r: Retriever, pids: np.ndarray, depth_docs: int = 10) -> list[list[str]]:
    doc_col = r.doc_ids()
    rows = np.searchsorted(r.pids, pids)
    out = []
    for row in rows:
        seen: list[str] = []
        for x in row:
            d = doc_col[int(x)]
            if d not in seen:
                seen.append(d)
                if len(seen) >= depth_docs:
                    break
        out.append(seen)
    return out


def rank_metrics(rankings: list[list[str]], gold: list[str]) -> dict[str, float]:
    res: dict[str, float] = {}
    for k in KS:
        res[f"recall@{k}"] = float(np.mean([g in rk[:k] for rk, g in zip(rankings, gold)]))
    rr = [1.0 / (rk[:10].index(g) + 1) if g in rk[:10] else 0.0 for rk, g in zip(rankings, gold)]
    res["mrr"] = float(np.mean(rr))
    return res


def _overlap(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean([len(set(x.tolist()) & set(y.tolist())) / len(y) for x, y in zip(a, b)]))


def evaluate(
    index_dir: str | Path,
    questions_path: str | Path,
    *,
    ef: int = 64,
    k_search: int = 5,
    limit: int | None = None,
    latency_queries: int = 200,
    hybrid: bool = True,
    answer: Callable[[str, list[Any]], str] | None = None,
    answer_limit: int = 50,
    context_k: int = 3,
    progress: bool = True,
) -> dict[str, Any]:
    """All metrics as one dict (keys as documented in the module docstring)."""
    from tqdm import tqdm

    if k_search < 1:
        raise LLMCoreError(f"-k {k_search}: must be >= 1")
    r = Retriever.open(index_dir)
    qs = read_questions(questions_path, limit)
    n_pass = len(r)
    k_search = min(k_search, n_pass)
    known = set(r.doc_ids())
    missing = sum(q["doc_id"] not in known for q in qs)
    if missing == len(qs):
        raise LLMCoreError(f"--questions {questions_path}: none of the gold doc ids is in the index {index_dir}")
    if missing:
        log.warning(
            "%d of %d questions name a doc_id that is not in the index (they count as misses)", missing, len(qs)
        )
    gold = [q["doc_id"] for q in qs]
    texts = [q["question"] for q in qs]

    t0 = time.perf_counter()
    vecs = np.zeros((len(texts), r.dim), dtype=np.float32)
    bar = tqdm(
        total=len(texts),
        unit="question",
        desc="embed questions",
        file=sys.stderr,
        disable=None if progress else True,
        dynamic_ncols=True,
    )
    for i in range(0, len(texts), 64):
        vecs[i : i + 64] = r.embed_queries(texts[i : i + 64])
        bar.update(len(texts[i : i + 64]))
    bar.close()
    q_embed_s = time.perf_counter() - t0

    depth = min(n_pass, 50)
    h_pids, _ = r.search_vectors(vecs, depth, max(ef, depth))
    e_pids, _ = r.exact_search_vectors(vecs, depth)
    dense = rank_metrics(doc_rankings(r, h_pids), gold)
    exact = rank_metrics(doc_rankings(r, e_pids), gold)

    k10 = min(10, n_pass)
    e10 = e_pids[:, :k10]
    sweep = []
    for e in EF_SWEEP:
        t1 = time.perf_counter()
        p10, _ = r.search_vectors(vecs, k10, e)
        dt = time.perf_counter() - t1
        sweep.append({"ef": e, "hnsw_recall@10": _overlap(p10, e10), "search_us": dt / len(vecs) * 1e6})
    p10, _ = r.search_vectors(vecs, k10, ef)
    hnsw_recall = _overlap(p10, e10)

    res: dict[str, Any] = {}
    res.update(dense)
    res["hnsw_recall@10"] = hnsw_recall
    res["ef"] = ef

    if hybrid:
        bm = r.bm25()
        fused_pids, bm_pids = [], []
        for q, hp in zip(texts, h_pids):
            b = bm.top(q, depth)
            bm_pids.append(b + [-1] * (depth - len(b)))
            fused_pids.append([p for p, _ in rrf([hp.tolist(), b], depth)])
        res["hybrid"] = rank_metrics(_rank_lists(r, fused_pids), gold)
        res["bm25"] = rank_metrics(_rank_lists(r, bm_pids), gold)

    # Latency: one question at a time, end to end (embedding + HNSW + passage lookup).
    lat_qs = texts[: max(1, min(latency_queries, len(texts)))]
    for q in lat_qs[:5]:
        r.search(q, k_search, ef)
    times, emb_times = [], []
    for q in lat_qs:  # what search(q, k, ef) does, timed in two parts: the embedding is part of the whole
        t1 = time.perf_counter()
        vec = r.embed_queries([q])
        t2 = time.perf_counter()
        pids, scores = r.search_vectors(vec, k_search, ef)
        r.passages_for(pids[0], scores[0])
        times.append(time.perf_counter() - t1)
        emb_times.append(t2 - t1)
    ms = np.asarray(times) * 1e3
    res["query_p50_ms"] = float(np.percentile(ms, 50))
    res["query_p95_ms"] = float(np.percentile(ms, 95))
    res["query_embed_p50_ms"] = float(np.percentile(np.asarray(emb_times) * 1e3, 50))

    builds = r.manifest.get("builds", [])
    build_s = float(sum(b.get("build_s", 0.0) for b in builds))
    embed_s = float(sum(b.get("embed_s", 0.0) for b in builds))
    embedded = int(sum(b.get("passages", 0) for b in builds))
    res["build_s"] = build_s
    res["build_embed_s"] = embed_s
    res["build_hnsw_s"] = float(sum(b.get("hnsw_s", 0.0) for b in builds))
    res["passages_per_s"] = embedded / embed_s if embed_s > 0 else None
    res["build_chars"] = int(sum(b.get("chars", 0) for b in builds))

    res["exact"] = exact
    res["ef_sweep"] = sweep
    res["n_questions"] = len(qs)
    res["n_questions_gold_missing"] = missing
    res["n_passages"] = n_pass
    res["n_docs"] = int(r.manifest["counts"]["docs"])
    res["question_embed_per_s"] = len(texts) / q_embed_s if q_embed_s > 0 else None
    res["k_search"] = k_search
    res["latency_queries"] = len(lat_qs)
    res["embedder"] = r.manifest["embedder"]
    res["hnsw"] = r.manifest["hnsw"]
    res["chunking"] = r.manifest["chunking"]
    res["machine"] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "loadavg_1m_at_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    res["date"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    res["index"] = str(index_dir)
    res["questions"] = str(questions_path)

    if answer is not None:
        with_gold = [q for q in qs if q["answers"]][:answer_limit]
        hits, examples = 0, []
        bar = tqdm(
            total=len(with_gold),
            unit="answer",
            desc="answer",
            file=sys.stderr,
            disable=None if progress else True,
            dynamic_ncols=True,
        )
        for q in with_gold:
            passages = r.search(q["question"], min(context_k, n_pass), ef)
            text = answer(q["question"], passages)
            hit = any(a in text for a in q["answers"])
            hits += hit
            if len(examples) < 5:
                examples.append({"question": q["question"], "gold": q["answers"][0], "answer": text, "hit": hit})
            bar.update(1)
        bar.close()
        res["answer_n"] = len(with_gold)
        res["answer_contains_gold"] = hits / len(with_gold) if with_gold else None
        res["answer_examples"] = examples
    return res


def _rank_lists(r: Retriever, pid_lists: list[list[int]]) -> list[list[str]]:
    doc_col = r.doc_ids()
    out = []
    for pl in pid_lists:
        seen: list[str] = []
        for p in pl:
            if p < 0:
                continue
            d = doc_col[int(np.searchsorted(r.pids, p))]
            if d not in seen:
                seen.append(d)
                if len(seen) >= 10:
                    break
        out.append(seen)
    return out


def markdown(res: dict[str, Any]) -> str:
    """The report as markdown: a retrieval table (HNSW, exact, hybrid, BM25), speed, and the ef sweep."""
    lines = [
        f"# RAG eval: {Path(res['questions']).name} on {res['index']}",
        "",
        f"{res['n_questions']} questions, {res['n_docs']} docs, {res['n_passages']} passages "
        f"(chunks of {res['chunking']['chunk_chars']} chars, overlap {res['chunking']['overlap']}); "
        f"embedder `{res['embedder']['name']}` ({res['embedder'].get('model', '')}, dim {res['embedder']['dim']}); "
        f"HNSW M={res['hnsw']['m']}, ef_construction={res['hnsw']['ef_construction']}, ef={res['ef']}. "
        f"{res['date']}, {res['machine']['cpus']} CPUs, load average {res['machine'].get('loadavg_1m_at_end') or 0:.1f} "
        "when the latency was measured.",
        "",
        "| retrieval | recall@1 | recall@5 | recall@10 | MRR@10 |",
        "|---|---:|---:|---:|---:|",
    ]
    rows = [("dense, HNSW", res), ("dense, exact search", res["exact"])]
    if "hybrid" in res:
        rows += [("hybrid (dense + BM25 bigrams, RRF)", res["hybrid"]), ("BM25 bigrams alone", res["bm25"])]
    for name, m in rows:
        lines.append(f"| {name} | {m['recall@1']:.4f} | {m['recall@5']:.4f} | {m['recall@10']:.4f} | {m['mrr']:.4f} |")
    pps = res.get("passages_per_s")
    lines += [
        "",
        "| speed | value |",
        "|---|---:|",
        f"| HNSW recall@10 vs exact (ef {res['ef']}) | {res['hnsw_recall@10']:.4f} |",
        f"| query latency p50 / p95 (embedding + search, k={res['k_search']}) | "
        f"{res['query_p50_ms']:.1f} / {res['query_p95_ms']:.1f} ms |",
        f"| of which query embedding p50 | {res['query_embed_p50_ms']:.1f} ms |",
        f"| index build (embed + HNSW) | {res['build_s']:.1f} s ({res['build_embed_s']:.1f} + "
        f"{res['build_hnsw_s']:.2f}) |",
        f"| passages embedded per second | {pps:.2f} |" if pps else "| passages embedded per second | - |",
        f"| questions embedded per second (batches of 64) | {res['question_embed_per_s']:.1f} |",
        "",
        "| ef | HNSW recall@10 | search µs/query (vectors only) |",
        "|---:|---:|---:|",
    ]
    for s in res["ef_sweep"]:
        lines.append(f"| {s['ef']} | {s['hnsw_recall@10']:.4f} | {s['search_us']:.0f} |")
    if "answer_n" in res:
        share = res["answer_contains_gold"]
        lines += [
            "",
            f"Answers containing a gold answer string: {share:.3f} of {res['answer_n']}"
            if share is not None
            else "No questions with gold answers.",
            "",
        ]
        for ex in res.get("answer_examples", []):
            lines.append(
                f"- {ex['question']} gold `{ex['gold']}` -> {ex['answer'][:120]!r} ({'hit' if ex['hit'] else 'miss'})"
            )
    return "\n".join(lines) + "\n"


def plot_ef(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    efs = [s["ef"] for s in res["ef_sweep"]]
    rec = [s["hnsw_recall@10"] for s in res["ef_sweep"]]
    us = [s["search_us"] for s in res["ef_sweep"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(efs, rec, "o-", label="HNSW recall@10 vs exact")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("ef (search)")
    ax.set_ylabel("recall@10 vs exact")
    ax.set_title(f"recall vs ef ({res['n_passages']} passages, M={res['hnsw']['m']})")
    ax2 = ax.twinx()
    ax2.plot(efs, us, "s--", color="tab:orange", label="µs/query")
    ax2.set_ylabel("search µs/query (vectors only)")
    ax.grid(alpha=0.3)
    fig.legend(loc="lower right")
    fig.tight_layout()
    from llmcore.io import atomic_write

    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)


def report_paths(out_dir: str | Path, name: str = "rag-eval") -> list[Path]:
    """The three report files in `out_dir`, after checking `--name` is a plain file stem and `--out` can
    be a directory (so a bad flag fails before the evaluation runs, not after)."""
    from llmcore.io import check_out_dir

    if not name or name in (".", "..") or "/" in name or "\\" in name or name.startswith("."):
        raise LLMCoreError(f"--name {name!r}: a file name stem (no '/', not starting with '.')")
    d = Path(out_dir)
    check_out_dir(d, overwrite=True, what="", replaceable=lambda _p: None)  # never below or at a file
    return [d / f"{name}.json", d / f"{name}.md", d / f"{name}-recall-vs-ef.png"]


def write_reports(res: dict[str, Any], out_dir: str | Path, name: str = "rag-eval") -> list[Path]:
    """`name.json`, `name.md`, `name-recall-vs-ef.png` in `out_dir` (each written atomically)."""
    from llmcore.io import write_json, write_text

    paths = report_paths(out_dir, name)
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    write_json(paths[0], res)
    write_text(paths[1], markdown(res))
    plot_ef(res, paths[2])
    return paths


__all__ = ["evaluate", "read_questions", "report_paths", "write_reports", "markdown", "rank_metrics"]
