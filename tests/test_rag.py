"""RAG plumbing with a deterministic test embedder (no model): chunking, index dir, search, append/replace,
errors that leave nothing half-written, the CLI, eval reports, and the answer prompt."""

from __future__ import annotations

import json
import random
import zlib
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("hnswlib", reason="hnswlib is not installed (pip install -e '.[rag]' in the checkout)")

from llmcore.cli import main  # noqa: E402
from llmcore.errors import LLMCoreError  # noqa: E402
from llmcore.rag import (  # noqa: E402
    DEFAULT_SYSTEM,
    Passage,
    Retriever,
    answer_messages,
    build_index,
    fit_passages,
    register_embedder,
)
from llmcore.rag.chunking import chunk_spans  # noqa: E402
from llmcore.rag.embedders import Embedder, get_embedder  # noqa: E402
from llmcore.rag.retriever import rrf  # noqa: E402
from llmcore.rag.store import FORMAT_VERSION, INDEX_FILE, MANIFEST, PASSAGES_FILE  # noqa: E402


class HashEmbedder(Embedder):
    """Character bigrams hashed into `dim` buckets: texts sharing many bigrams get close vectors."""

    def __init__(self, name: str = "test-hash", dim: int = 96) -> None:
        self.name, self.dim, self.model = name, dim, "crc32 bigram buckets"
        self.query_prefix, self.passage_prefix = "q: ", "p: "
        self.calls = 0

    def _encode(self, texts: list[str], is_query: bool) -> np.ndarray:
        self.calls += 1
        out = np.full((len(texts), self.dim), 1e-3, dtype=np.float32)
        for i, t in enumerate(texts):
            for a, b in zip(t, t[1:]):
                out[i, zlib.crc32((a + b).encode()) % self.dim] += 1.0
        return out


register_embedder("test-hash", lambda: HashEmbedder())
register_embedder("test-other", lambda: HashEmbedder("test-other", 96))

SYLLABLES = (
    "天地玄黄宇宙洪荒日月盈昃辰宿列张寒来暑往秋收冬藏闰余成岁律吕调阳云腾致雨露结为霜金生丽水玉出昆冈剑号巨阙珠称夜光"
)


def make_docs(n: int = 12, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        sents = []
        for _ in range(rng.randint(6, 14)):
            sents.append("".join(rng.choice(SYLLABLES) for _ in range(rng.randint(12, 30))) + "。")
        docs.append({"id": f"d{i}", "title": f"标题{i}", "text": "".join(sents)})
    return docs


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows), encoding="utf-8"
    )
    return path


def build(tmp_path: Path, docs: list[dict] | None = None, name: str = "idx", **kw) -> Path:
    docs = make_docs() if docs is None else docs
    kw.setdefault("embedder", "test-hash")
    kw.setdefault("chunk_chars", 120)
    kw.setdefault("overlap", 20)
    out = tmp_path / name
    build_index(write_jsonl(tmp_path / f"{name}.jsonl", docs), out, progress=False, **kw)
    return out


def snapshot(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())} if d.exists() else {}


def no_temp_left(parent: Path) -> bool:
    return not [p for p in parent.iterdir() if p.name.startswith(".") and ".tmp" in p.name]


# ---------------------------------------------------------------- chunking


@pytest.mark.parametrize("chunk,overlap", [(16, 0), (40, 10), (120, 20), (480, 64)])
def test_chunk_spans_cover_the_text_within_bounds(chunk: int, overlap: int) -> None:
    rng = random.Random(chunk)
    texts = ["短。", "x" * chunk, "y" * (chunk + 1)] + [
        "".join(rng.choice(SYLLABLES + "。，\n ab") for _ in range(rng.randint(1, 2000))) for _ in range(30)
    ]
    for text in texts:
        spans = chunk_spans(text, chunk, overlap)
        assert spans[0][0] == 0 and spans[-1][1] == len(text)
        for (s, e), (s2, e2) in zip(spans, spans[1:]):
            assert s < s2 <= e, (s, e, s2)  # moves forward, no gap
            assert e - s2 <= overlap
        assert all(0 < e - s <= chunk for s, e in spans)
        assert chunk_spans(text, chunk, overlap) == spans
    assert chunk_spans("a" * chunk, chunk, overlap) == [(0, chunk)]


def test_chunk_prefers_sentence_ends() -> None:
    text = ("甲" * 70 + "。") * 5
    spans = chunk_spans(text, 100, 10)
    assert all(text[e - 1] == "。" for _, e in spans)


@pytest.mark.parametrize("chunk,overlap", [(8, 0), (100, 50), (100, -1)])
def test_chunk_settings_are_checked(chunk: int, overlap: int) -> None:
    with pytest.raises(LLMCoreError):
        chunk_spans("abc", chunk, overlap)


# ---------------------------------------------------------------- build and search


def test_build_open_search_roundtrip(tmp_path: Path) -> None:
    docs = make_docs()
    out = build(tmp_path, docs)
    assert sorted(p.name for p in out.iterdir()) == sorted([INDEX_FILE, PASSAGES_FILE, MANIFEST])
    assert no_temp_left(tmp_path)
    man = json.loads((out / MANIFEST).read_text())
    assert man["format_version"] == FORMAT_VERSION
    assert man["embedder"]["name"] == "test-hash" and man["embedder"]["dim"] == 96
    assert man["embedder"]["query_prefix"] == "q: " and man["embedder"]["passage_prefix"] == "p: "
    assert man["embedder"]["normalized"] is True and man["space"] == "cosine"
    assert man["hnsw"]["m"] == 32 and man["hnsw"]["ef_construction"] == 200
    assert man["chunking"]["chunk_chars"] == 120 and man["counts"]["docs"] == len(docs)
    assert set(man["files"]) == {INDEX_FILE, PASSAGES_FILE}

    r = Retriever.open(out)
    assert len(r) == man["counts"]["passages"] > len(docs)
    by_id = {d["id"]: d["text"] for d in docs}
    for d in docs:
        query = d["text"][30:90]
        res = r.search(query, 3)
        assert len(res) == 3 and res[0].doc_id == d["id"]
        assert res[0].score >= res[1].score >= res[2].score
        for p in res:
            assert isinstance(p, Passage) and by_id[p.doc_id][p.start : p.end] == p.text
            assert -1.0 <= p.score <= 1.0 + 1e-5
    # HNSW agrees with exact search on this tiny index.
    vecs = r.embed_queries([d["text"][:50] for d in docs])
    h, _ = r.search_vectors(vecs, 5)
    e, _ = r.exact_search_vectors(vecs, 5)
    assert (h == e).all()
    # hybrid mode returns the same passage type, best first
    hy = r.search(docs[3]["text"][10:60], 4, mode="hybrid")
    assert hy[0].doc_id == "d3" and len(hy) == 4


def test_title_field_is_embedded_and_kept(tmp_path: Path) -> None:
    out = build(tmp_path, title_field="title")
    r = Retriever.open(out)
    p = r.search("标题5", 1)[0]
    assert p.title == f"标题{p.doc_id[1:]}"
    assert json.loads((out / MANIFEST).read_text())["chunking"]["title_field"] == "title"


def test_append_adds_refuses_duplicates_and_replaces(tmp_path: Path) -> None:
    docs = make_docs(12)
    out = build(tmp_path, docs[:8])
    n8 = len(Retriever.open(out))
    extra = write_jsonl(tmp_path / "extra.jsonl", docs[8:])
    man = build_index(extra, out, append=True, progress=False)
    assert man["counts"]["docs"] == 12 and man["builds"][-1]["op"] == "append"
    r = Retriever.open(out)
    assert len(r) > n8
    assert r.search(docs[10]["text"][20:80], 1)[0].doc_id == "d10"

    before = snapshot(out)
    with pytest.raises(LLMCoreError, match="already in the index"):
        build_index(write_jsonl(tmp_path / "dup.jsonl", [docs[2]]), out, append=True, progress=False)
    assert snapshot(out) == before and no_temp_left(tmp_path)
    with pytest.raises(LLMCoreError, match="built with embedder"):
        build_index(extra, out, append=True, replace=True, embedder="test-other", progress=False)

    new_text = "全新的内容完全不同" * 20
    man = build_index(
        write_jsonl(tmp_path / "rep.jsonl", [{"id": "d2", "text": new_text}]),
        out,
        append=True,
        replace=True,
        progress=False,
    )
    assert man["counts"]["docs"] == 12 and man["counts"]["deleted"] > 0
    r = Retriever.open(out)
    hit = r.search(new_text[:40], 1)[0]
    assert hit.doc_id == "d2" and hit.text in new_text
    old_query = docs[2]["text"][20:80]
    for p in r.search(old_query, len(r)):
        assert not (p.doc_id == "d2" and p.text in docs[2]["text"])  # old passages are gone


def test_overwrite_and_out_dir_rules(tmp_path: Path) -> None:
    out = build(tmp_path)
    before = snapshot(out)
    docs_path = tmp_path / "idx.jsonl"
    with pytest.raises(LLMCoreError, match="already an index"):
        build_index(docs_path, out, embedder="test-hash", progress=False)
    assert snapshot(out) == before
    build_index(
        write_jsonl(tmp_path / "two.jsonl", make_docs(2, seed=5)),
        out,
        embedder="test-hash",
        overwrite=True,
        progress=False,
    )
    assert json.loads((out / MANIFEST).read_text())["counts"]["docs"] == 2
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(LLMCoreError, match="not an index dir"):
        build_index(docs_path, other, embedder="test-hash", progress=False)
    assert snapshot(other) == {"keep.txt": b"mine"}
    empty = tmp_path / "empty"
    empty.mkdir()
    build_index(docs_path, empty, embedder="test-hash", progress=False)
    assert (empty / MANIFEST).is_file()
    with pytest.raises(LLMCoreError, match="not an existing index"):
        build_index(docs_path, tmp_path / "nope", embedder="test-hash", append=True, progress=False)


# ---------------------------------------------------------------- bad input: one error, nothing written

BAD_DOCS = {
    "empty file": ([], "no documents"),
    "blank lines only": (["", "  "], "no documents"),
    "missing text field": ([{"id": "a", "body": "x"}], "missing text field 'text'"),
    "empty text": ([{"id": "a", "text": "  \n"}], "empty text"),
    "text not a string": ([{"id": "a", "text": 5}], "must be a string"),
    "missing id": ([{"text": "abc"}], "missing id field 'id'"),
    "duplicate ids": (
        [{"id": "a", "text": "abc"}, {"id": "b", "text": "x"}, {"id": "a", "text": "y"}],
        "duplicate id 'a' \\(first on line 1\\)",
    ),
    "bad json": (["{not json"], "malformed JSON"),
    "not an object": (["[1, 2]"], "expected a JSON object"),
    "lone surrogate in text": (['{"id": "s", "text": "abc\\ud800def"}'], ":1: a string holds the lone surrogate"),
    "lone surrogate in id": (['{"id": "\\udc80", "text": "abc"}'], ":1: a string holds the lone surrogate"),
    "nested 100,000 deep": (
        ['{"id": "a", "text": "x", "n": ' + "[" * 100_000 + "]" * 100_000 + "}"],
        ":1: JSON is nested too deeply",
    ),
    "5,000-digit number": (['{"id": "a", "text": "x", "n": ' + "9" * 5000 + "}"], ":1: malformed JSON"),
}


@pytest.mark.parametrize("case", sorted(BAD_DOCS))
def test_bad_docs_fail_before_embedding_and_write_nothing(tmp_path: Path, case: str) -> None:
    rows, msg = BAD_DOCS[case]
    emb = get_embedder("test-hash")
    calls = emb.calls
    with pytest.raises(LLMCoreError, match=msg):
        build_index(write_jsonl(tmp_path / "d.jsonl", rows), tmp_path / "out", embedder="test-hash", progress=False)
    assert not (tmp_path / "out").exists() and no_temp_left(tmp_path)
    assert emb.calls == calls


def test_missing_docs_file(tmp_path: Path) -> None:
    with pytest.raises(LLMCoreError, match="no such file"):
        build_index(tmp_path / "nope.jsonl", tmp_path / "out", embedder="test-hash")


def test_failure_during_embedding_leaves_the_old_index(tmp_path: Path) -> None:
    out = build(tmp_path)
    before = snapshot(out)

    class Boom(HashEmbedder):
        def _encode(self, texts, is_query):  # type: ignore[override]
            raise KeyboardInterrupt

    register_embedder("test-boom", lambda: Boom("test-boom"))
    with pytest.raises(KeyboardInterrupt):
        build_index(tmp_path / "idx.jsonl", out, embedder="test-boom", overwrite=True, progress=False)
    assert snapshot(out) == before and no_temp_left(tmp_path)


def _flip(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage,msg",
    [
        ("truncate index", "truncated or corrupted"),
        ("flip index byte", "corrupted \\(sha256"),
        ("flip passages byte", "corrupted \\(sha256"),
        ("delete passages", "passages.arrow is missing"),
        ("manifest garbage", "corrupted manifest"),
        ("other version", "format version 99"),
        ("no manifest", "not an llmcore RAG index"),
    ],
)
def test_damaged_index_is_refused(tmp_path: Path, damage: str, msg: str) -> None:
    out = build(tmp_path)
    idx, pas, man = out / INDEX_FILE, out / PASSAGES_FILE, out / MANIFEST
    if damage == "truncate index":
        idx.write_bytes(idx.read_bytes()[: idx.stat().st_size // 2])
    elif damage == "flip index byte":
        _flip(idx, idx.stat().st_size // 2)
    elif damage == "flip passages byte":
        _flip(pas, pas.stat().st_size // 2)
    elif damage == "delete passages":
        pas.unlink()
    elif damage == "manifest garbage":
        man.write_text("{")
    elif damage == "other version":
        m = json.loads(man.read_text())
        m["format_version"] = 99
        man.write_text(json.dumps(m))
    elif damage == "no manifest":
        man.unlink()
    with pytest.raises(LLMCoreError, match=msg):
        Retriever.open(out)


def test_query_errors(tmp_path: Path) -> None:
    out = build(tmp_path)
    r = Retriever.open(out)
    with pytest.raises(LLMCoreError, match="empty question"):
        r.search("   ", 3)
    with pytest.raises(LLMCoreError, match="larger than the index"):
        r.search("天地", len(r) + 1)
    with pytest.raises(LLMCoreError, match="must be >= 1"):
        r.search("天地", 0)
    assert len(r.search("天地", len(r))) == len(r)
    with pytest.raises(LLMCoreError, match="refusing to query it with 'test-other'"):
        Retriever.open(out, embedder="test-other")
    with pytest.raises(LLMCoreError, match="unknown"):
        get_embedder("no-such-embedder")


def test_sentence_transformers_missing_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "sentence_transformers", None)
    with pytest.raises(LLMCoreError, match="needs sentence-transformers: pip install") as err:
        get_embedder("st:some/model-not-here")
    assert "\n" not in str(err.value)


def test_rrf_fuses_ranks() -> None:
    assert rrf([[1, 2, 3], [3, 1]], 2) == [(1, 1 / 61 + 1 / 62), (3, 1 / 63 + 1 / 61)]


# ---------------------------------------------------------------- CLI


def run_cli(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_cli_index_query_eval(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    docs = make_docs(10)
    dpath = write_jsonl(tmp_path / "docs.jsonl", docs)
    out = tmp_path / "idx"
    code, so, se = run_cli(
        capsys,
        "rag",
        "index",
        "--docs",
        dpath,
        "--out",
        out,
        "--embedder",
        "test-hash",
        "--chunk-chars",
        "100",
        "--overlap",
        "10",
        "--m",
        "8",
        "--ef-construction",
        "50",
    )
    assert code == 0, se
    assert "10 docs" in so and "test-hash" in so
    assert json.loads((out / MANIFEST).read_text())["hnsw"]["m"] == 8

    code, so, se = run_cli(capsys, "rag", "query", "--index", out, docs[4]["text"][5:60], "-k", "2", "--json")
    assert code == 0, se
    res = json.loads(so)
    assert res["results"][0]["doc_id"] == "d4" and len(res["results"]) == 2
    assert set(res["results"][0]) >= {"doc_id", "text", "score", "start", "end"}
    code, so, _ = run_cli(capsys, "rag", "query", "--index", out, docs[4]["text"][5:60], "-k", "1")
    assert code == 0 and "doc d4" in so and "score" in so

    for args, msg in [
        (("-k", "100000"), "larger than the index"),
        (("--embedder", "test-other"), "refusing"),
        (("--answer",), "--answer needs --ckpt"),
    ]:
        code, so, se = run_cli(capsys, "rag", "query", "--index", out, "天地", *args)
        assert code == 2 and se.startswith("error: ") and msg in se and se.count("\n") == 1, se
    code, _, se = run_cli(capsys, "rag", "query", "--index", out, " ")
    assert code == 2 and "empty question" in se
    code, _, se = run_cli(capsys, "rag", "index", "--docs", dpath, "--out", out, "--embedder", "test-hash")
    assert code == 2 and "already an index" in se

    qs = [{"question": d["text"][10:50], "doc_id": d["id"], "answers": [d["text"][12:16]]} for d in docs]
    qpath = write_jsonl(tmp_path / "q.jsonl", qs)
    code, so, se = run_cli(
        capsys,
        "rag",
        "eval",
        "--index",
        out,
        "--questions",
        qpath,
        "--out",
        tmp_path / "rep",
        "--name",
        "t",
        "--json",
        "--latency-queries",
        "5",
    )
    assert code == 0, se
    m = json.loads(so)
    for key in (
        "recall@1",
        "recall@5",
        "recall@10",
        "mrr",
        "hnsw_recall@10",
        "build_s",
        "query_p50_ms",
        "query_p95_ms",
    ):
        assert key in m and isinstance(m[key], float), key
    assert m["recall@1"] >= 0.9 and m["recall@10"] == 1.0 and m["hnsw_recall@10"] == 1.0
    assert m["exact"]["recall@10"] == 1.0 and "hybrid" in m and m["n_questions"] == 10
    assert [s["ef"] for s in m["ef_sweep"]] == [10, 16, 32, 64, 128, 256]
    assert {p.name for p in (tmp_path / "rep").iterdir()} == {"t.json", "t.md", "t-recall-vs-ef.png"}
    assert "| dense, HNSW |" in (tmp_path / "rep" / "t.md").read_text()

    code, _, se = run_cli(
        capsys,
        "rag",
        "eval",
        "--index",
        out,
        "--questions",
        write_jsonl(tmp_path / "bad.jsonl", [{"question": "", "doc_id": "d1"}]),
    )
    assert code == 2 and 'empty "question"' in se


# ---------------------------------------------------------------- answer prompt


def test_answer_messages_format() -> None:
    ps = [Passage("d1", "第一段资料。", 0.9, 0, 6, 0, "标题"), Passage("d2", "second passage", 0.5, 10, 24, 3)]
    msgs = answer_messages(" 问什么？ ", ps)
    assert msgs[0] == {"role": "system", "content": DEFAULT_SYSTEM}
    assert msgs[1]["role"] == "user"
    assert msgs[1]["content"] == (
        "参考资料：\n[1] 《标题》(d1)\n第一段资料。\n[2] (d2)\nsecond passage\n\n问题：问什么？\n请根据参考资料回答。"
    )
    assert answer_messages("q", ps, system="S")[0]["content"] == "S"
    with pytest.raises(LLMCoreError, match="empty question"):
        answer_messages(" ", ps)


class CharTok:
    """One token per character of the rendered prompt."""

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + (
            "<assistant>" if add_generation_prompt else ""
        )

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def encode_prompt(self, messages: list[dict]) -> list[int]:
        return self.encode(self.apply_chat_template(messages, add_generation_prompt=True))


def test_fit_passages_drops_and_cuts_from_the_end() -> None:
    tok = CharTok()
    ps = [Passage(f"d{i}", "字" * 200, 1.0 - i / 10, 0, 200, i) for i in range(3)]
    full = len(tok.encode(tok.apply_chat_template(answer_messages("q", ps), True)))
    assert fit_passages(tok, "q", ps, full) == ps
    fitted = fit_passages(tok, "q", ps, full - 100)
    assert [p.doc_id for p in fitted] == ["d0", "d1", "d2"] and len(fitted[-1].text) == 100 and fitted[-1].end == 100
    fitted = fit_passages(tok, "q", ps, full - 390)
    assert [p.doc_id for p in fitted] == ["d0"]
    with pytest.raises(LLMCoreError):
        fit_passages(tok, "q", ps, 10)


def test_query_answer_streams_from_a_tiny_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from llmcore.checkpoint import save_model
    from llmcore.data_prep.tokenizer import load_tokenizer, train_tokenizer
    from llmcore.model import LLM, ModelConfig

    docs = make_docs(6)
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"text": d["text"]} for d in docs])
    tok_dir = train_tokenizer([corpus], tmp_path / "tok", vocab_size=300)
    tok = load_tokenizer(tok_dir)
    import torch

    torch.manual_seed(0)
    model = LLM(ModelConfig.from_preset("tiny", vocab_size=tok.vocab_size, max_position_embeddings=512))
    ckpt = save_model(model, tmp_path / "ckpt")
    tok.save(ckpt)
    out = build(tmp_path, docs)
    question = docs[1]["text"][:30]
    code, so, se = run_cli(
        capsys,
        "rag",
        "query",
        "--index",
        out,
        question,
        "-k",
        "2",
        "--answer",
        "--ckpt",
        ckpt,
        "--device",
        "cpu",
        "--max-new-tokens",
        "5",
        "--show-prompt",
        "--max-prompt-tokens",
        "400",
    )
    assert code == 0, se
    assert "--- prompt ---" in so and "answer: " in so and "doc d1" in so
    prompt = so.split("--- prompt ---\n", 1)[1].split("\n--- end of prompt ---", 1)[0]
    assert f"问题：{question}" in prompt and "参考资料：\n[1]" in prompt and DEFAULT_SYSTEM in prompt
    assert len(tok.encode(prompt)) <= 400
    code, so, se = run_cli(
        capsys,
        "rag",
        "query",
        "--index",
        out,
        question,
        "-k",
        "2",
        "--answer",
        "--ckpt",
        ckpt,
        "--device",
        "cpu",
        "--max-new-tokens",
        "5",
        "--json",
    )
    assert code == 0, se
    res = json.loads(so)
    assert isinstance(res["answer"], str) and res["context_passages"] >= 1
    qpath = write_jsonl(
        tmp_path / "q.jsonl",
        [
            {
                "question": docs[i]["text"][:20],
                "doc_id": docs[i]["id"],
                "answers": [docs[i]["text"][2:4], "不会出现的答案"],
            }
            for i in range(3)
        ],
    )
    code, so, se = run_cli(
        capsys,
        "rag",
        "eval",
        "--index",
        out,
        "--questions",
        qpath,
        "--ckpt",
        ckpt,
        "--device",
        "cpu",
        "--answer-limit",
        "2",
        "--max-new-tokens",
        "4",
        "--latency-queries",
        "2",
        "--out",
        tmp_path / "rep",
        "--json",
    )
    assert code == 0, se
    m = json.loads(so)
    assert m["answer_n"] == 2 and 0.0 <= m["answer_contains_gold"] <= 1.0 and len(m["answer_examples"]) == 2
    assert "Answers containing a gold answer string" in (tmp_path / "rep" / "rag-eval.md").read_text()
