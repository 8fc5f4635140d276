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

pytest.importorskip("hnswlib", reason="hnswlib is not installed (pip install -e '.[rag]')")

from llmcore.errors import LLMCoreError  # noqa: E402
from llmcore.rag import Retriever, build_index  # noqa: E402
from llmcore.rag.index import INDEX_FILE, MANIFEST, PASSAGES_FILE  # noqa: E402
from test_rag import build, make_docs, snapshot, write_jsonl  # noqa: E402  (registers the test embedders)

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


@pytest.mark.parametrize("case,edit,msg", [
    ("no counts", lambda m: m.pop("counts"), "'counts' is missing"),
    ("files a list", lambda m: m.__setitem__("files", []), "'files' is missing or not an object"),
    ("dim a string", lambda m: m["embedder"].__setitem__("dim", "abc"), "embedder.dim = 'abc'"),
    ("no embedder name", lambda m: m["embedder"].pop("name"), "embedder.name"),
    ("negative passages", lambda m: m["counts"].__setitem__("passages", -1), "counts.passages = -1"),
    ("m a float", lambda m: m["hnsw"].__setitem__("m", 3.5), "hnsw.m = 3.5"),
    ("other space", lambda m: m.__setitem__("space", "l2"), "space 'l2'"),
])
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
