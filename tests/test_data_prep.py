"""Prep: shard contents equal per-document tokenizer output, manifest, bad input, atomic output."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from llmcore.data_prep.prep import prep
from llmcore.data_prep.shards import ShardReader
from llmcore.data_prep.tokenizer import load_tokenizer, train_tokenizer
from llmcore.errors import DataError, LLMCoreError

TEXTS = [
    "今天天气很好。",
    "Hello world, this is a test.",
    "emoji 😀🎉 and 中文 mixed",
    "x",
    "长" * 300,
    "line\nbreaks\tand tabs",
]


def write_jsonl(path: Path, rows: list, raw_lines: dict[int, bytes] | None = None) -> Path:
    """rows as JSON lines; raw_lines puts verbatim bytes at given 0-based positions."""
    lines = [json.dumps(r, ensure_ascii=False).encode("utf-8") for r in rows]
    for pos, raw in sorted((raw_lines or {}).items()):
        lines.insert(pos, raw)
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def conv(*pairs: str, system: str | None = None) -> list[dict]:
    msgs = [{"role": "system", "content": system}] if system else []
    for i, c in enumerate(pairs):
        msgs.append({"role": "user" if i % 2 == 0 else "assistant", "content": c})
    return msgs


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tok")
    corpus = write_jsonl(d / "c.jsonl", [{"text": t + f" {i}"} for i in range(200) for t in TEXTS])
    return train_tokenizer([corpus], d / "tok", vocab_size=500)


def read_all(path: Path) -> list[dict]:
    r = ShardReader(path)
    return [{k: v.tolist() for k, v in r.doc(i).items()} for i in range(len(r))]


@pytest.mark.parametrize("workers", [1, 2])
def test_pretrain_equals_per_document_encode(tmp_path, tok_dir, workers):
    texts = [TEXTS[i % len(TEXTS)] + f" 第{i}号" for i in range(500)]
    src1 = write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in texts[:300]])
    src2 = write_jsonl(tmp_path / "b.jsonl", [{"text": t} for t in texts[300:]])
    # tiny blocks and shards so the test crosses block, batch and shard boundaries
    m = prep("pretrain", [src1, src2], tok_dir, tmp_path / "out", workers=workers, shard_docs=128, block_bytes=2048)
    tok = load_tokenizer(tok_dir)
    docs = read_all(tmp_path / "out")
    assert [d["tokens"] for d in docs] == [[1] + tok.encode(t) + [2] for t in texts]
    assert (
        m["num_docs"] == 500 and len(m["shards"]) == 4 and [s["num_docs"] for s in m["shards"]] == [128, 128, 128, 116]
    )
    assert m["num_tokens"] == sum(len(d["tokens"]) for d in docs)
    assert [s["lines_read"] for s in m["sources"]] == [300, 200]
    assert m["tokenizer"]["fingerprint"] == tok.fingerprint and m["tokenizer"]["special_ids"] == {
        "pad": 0,
        "bos": 1,
        "eos": 2,
    }
    for shard in m["shards"]:
        data = (tmp_path / "out" / shard["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == shard["sha256"]
    assert json.loads((tmp_path / "out" / "manifest.json").read_text()) == m
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # temp dir renamed away


def test_shard_columns_are_uint16_and_zero_copy(tmp_path, tok_dir):
    prep(
        "sft",
        [write_jsonl(tmp_path / "s.jsonl", [{"conversations": conv("q", "a")}])],
        tok_dir,
        tmp_path / "o",
        workers=1,
    )
    reader = ShardReader(tmp_path / "o")
    doc = reader.doc(0)
    assert doc["tokens"].dtype == np.uint16 and doc["loss_mask"].dtype == np.uint8
    assert not doc["tokens"].flags.owndata and not doc["tokens"].flags.writeable  # a view into the mapped file
    table = pa.ipc.open_file(pa.memory_map(str(tmp_path / "o" / "shard-00000.arrow"))).read_all()
    assert table.schema.field("tokens").type == pa.list_(pa.uint16())


def test_sft_and_dpo_equal_encode_chat(tmp_path, tok_dir):
    tok = load_tokenizer(tok_dir)
    convs = [conv("你好", "你好！"), conv("a", "b", "c", "d", system="sys"), conv("Hi 😀", "Yo\n\nyo", "more", "fin")]
    prep(
        "sft",
        [write_jsonl(tmp_path / "s.jsonl", [{"conversations": c} for c in convs])],
        tok_dir,
        tmp_path / "sft",
        workers=2,
    )
    for c, d in zip(convs, read_all(tmp_path / "sft"), strict=True):
        tokens, mask = tok.encode_chat(c)
        assert d["tokens"] == tokens and d["loss_mask"] == mask and sum(mask) > 0
    pairs = [
        {"chosen": conv("q", "a", "q2", "good"), "rejected": conv("q", "a", "q2", "bad answer")},
        {"chosen": conv("问", "好的"), "rejected": conv("问", "不好")},
    ]
    prep("dpo", [write_jsonl(tmp_path / "d.jsonl", pairs)], tok_dir, tmp_path / "dpo", workers=1)
    for p, d in zip(pairs, read_all(tmp_path / "dpo"), strict=True):
        for side in ("chosen", "rejected"):
            tokens, mask = tok.encode_chat(p[side], only_last=True)
            assert d[side] == tokens and d[side + "_mask"] == mask
            # only the final reply (+ its im_end) is marked
            marked = tok.decode([t for t, m in zip(tokens, mask) if m])
            assert marked == "<think>\n\n</think>\n\n" + p[side][-1]["content"] + "<|im_end|>"  # MiniMind-3 template


def test_shared_samples_with_minimind_tokenizer(tmp_path, shared_data):
    tok_dir = shared_data / "minimind_tokenizer"
    tok = load_tokenizer(tok_dir)
    # The first 3,000 rows of the pretrain sample (the whole file is the benchmark's job; this keeps the suite fast).
    lines = (shared_data / "pretrain_sample.jsonl").read_bytes().split(b"\n")[:3000]
    src = tmp_path / "pretrain_head.jsonl"
    src.write_bytes(b"\n".join(lines) + b"\n")
    m = prep("pretrain", [src], tok_dir, tmp_path / "pre", workers=2, block_bytes=1 << 18)
    texts = [json.loads(line)["text"] for line in lines]
    reader = ShardReader(tmp_path / "pre")
    assert len(reader) == len(texts) == m["num_docs"]
    expected = tok.encode_batch(texts)
    for i in range(len(texts)):
        assert reader.doc(i)["tokens"].tolist() == [1] + expected[i] + [2], f"doc {i}"

    sft = shared_data / "sft_sample.jsonl"
    prep("sft", [sft], tok_dir, tmp_path / "sft", workers=2)
    reader = ShardReader(tmp_path / "sft")
    rows = [json.loads(line) for line in sft.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert len(reader) == len(rows)
    for i in range(0, len(rows), 7):
        msgs = [{"role": m["role"], "content": m["content"]} for m in rows[i]["conversations"]]
        tokens, mask = tok.encode_chat(msgs)
        d = reader.doc(i)
        assert d["tokens"].tolist() == tokens and d["loss_mask"].tolist() == mask

    m = prep("dpo", [shared_data / "dpo_sample.jsonl"], tok_dir, tmp_path / "dpo", workers=2)
    assert m["num_docs"] == 600 and m["lines_skipped"] == 0


# -- bad input ---------------------------------------------------------------------------------

BAD_CASES = [
    # (kind, raw line, reason, message fragment)
    ("pretrain", b'{"text": "ok", ', "malformed_json", "malformed JSON"),
    ("pretrain", b'["a list"]', "malformed_json", "expected a JSON object"),
    ("pretrain", b'{"txt": "wrong key"}', "missing_field", 'missing field "text"'),
    ("pretrain", b'{"text": 42}', "bad_field_type", "expected a string"),
    ("pretrain", b'{"text": "   "}', "empty_text", "empty"),
    ("pretrain", b'{"text": "caf\xe9 latin-1"}', "invalid_utf8", "invalid UTF-8"),
    (
        "sft",
        b'{"conversations": [{"role": "user", "content": "only a question"}]}',
        "no_assistant_turn",
        "no assistant turn",
    ),
    ("sft", b'{"conversations": "not a list"}', "bad_field_type", "list of messages"),
    (
        "sft",
        b'{"conversations": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]}',
        "bad_field_type",
        "content",
    ),
    ("sft", b'{"conversations": []}', "empty_text", "empty conversation"),
    ("sft", b'{"messages": []}', "missing_field", '"conversations"'),
    (
        "dpo",
        b'{"chosen": [{"role": "user", "content": "q"}], "rejected": [{"role": "user", "content": "q"}]}',
        "no_assistant_turn",
        "no assistant turn",
    ),
    (
        "dpo",
        b'{"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}',
        "missing_field",
        '"rejected"',
    ),
]


def good_row(kind: str) -> dict:
    if kind == "pretrain":
        return {"text": "good text"}
    if kind == "sft":
        return {"conversations": conv("q", "a")}
    return {"chosen": conv("q", "good"), "rejected": conv("q", "bad")}


@pytest.mark.parametrize(
    "kind,raw,reason,fragment", BAD_CASES, ids=[c[2] + "-" + c[0] + str(i) for i, c in enumerate(BAD_CASES)]
)
def test_bad_line_fail_names_file_and_line(tmp_path, tok_dir, kind, raw, reason, fragment):
    src = write_jsonl(tmp_path / "in.jsonl", [good_row(kind)] * 4, raw_lines={2: raw})
    out = tmp_path / "out"
    with pytest.raises(DataError) as info:
        prep(kind, [src], tok_dir, out, workers=1)
    err = info.value
    assert (err.path, err.line, err.reason) == (str(src), 3, reason)
    assert str(err).startswith(f"{src}:3: ") and fragment in str(err)
    assert not out.exists() and os.listdir(tmp_path) == ["in.jsonl"]  # nothing under the final name, no temp left


@pytest.mark.parametrize("workers", [1, 2])
def test_bad_lines_skip_counts_in_manifest(tmp_path, tok_dir, workers):
    raws = {
        1: b'{"text": ',
        3: b'{"text": ""}',
        5: b'\xff\xfe{"text": "x"}',
        6: b'{"nope": 1}',
        8: b'{"text": null}',
        9: b"",
        10: b"   ",
    }
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": f"doc {i}"} for i in range(6)], raw_lines=raws)
    m = prep("pretrain", [src], tok_dir, tmp_path / "out", workers=workers, on_bad_line="skip", block_bytes=32)
    assert m["num_docs"] == 6
    assert m["skipped_by_reason"] == {
        "malformed_json": 1,
        "empty_text": 1,
        "invalid_utf8": 1,
        "missing_field": 1,
        "bad_field_type": 1,
    }
    source = m["sources"][0]
    assert (
        source["lines_read"] == 13
        and source["blank_lines"] == 2
        and source["lines_skipped"] == 5
        and source["docs"] == 6
    )
    tok = load_tokenizer(tok_dir)
    assert [d["tokens"] for d in read_all(tmp_path / "out")] == [[1] + tok.encode(f"doc {i}") + [2] for i in range(6)]


def test_skip_prints_counts_via_cli(tmp_path, tok_dir):
    from typer.testing import CliRunner

    from llmcore.cli import app

    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "fine"}] * 3, raw_lines={0: b"{bad", 2: b'{"text": 1}'})
    res = CliRunner().invoke(
        app,
        [
            "prep",
            "pretrain",
            "-i",
            str(src),
            "-t",
            str(tok_dir),
            "-o",
            str(tmp_path / "o"),
            "--on-bad-line",
            "skip",
            "-w",
            "1",
        ],
    )
    assert res.exit_code == 0, res.output
    assert (
        "skipped 2 bad lines" in res.output and "malformed_json: 1" in res.output and "bad_field_type: 1" in res.output
    )


def test_token_id_overflow(tmp_path):
    """A vocab beyond uint16: ids >= 65536 cannot be stored; the line is reported (fail) or counted (skip)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    vocab.update({ch: 3 + i for i, ch in enumerate(sorted(alphabet))})
    vocab["zz"] = 70_000  # reachable only through the merge below
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=[("z", "z")]))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    big = tmp_path / "bigtok"
    big.mkdir()
    hf.save(str(big / "tokenizer.json"))
    (big / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"})
    )
    assert load_tokenizer(big).vocab_size > 65536

    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "abc"}, {"text": "a zz b"}, {"text": "cd"}])
    with pytest.raises(DataError, match=r"in.jsonl:2: token id 70000 does not fit uint16") as info:
        prep("pretrain", [src], big, tmp_path / "out", workers=1)
    assert info.value.reason == "token_id_overflow" and not (tmp_path / "out").exists()
    m = prep("pretrain", [src], big, tmp_path / "out", workers=1, on_bad_line="skip")
    assert m["skipped_by_reason"] == {"token_id_overflow": 1} and m["num_docs"] == 2
    tok = load_tokenizer(big)
    assert [d["tokens"] for d in read_all(tmp_path / "out")] == [
        [1] + tok.encode("abc") + [2],
        [1] + tok.encode("cd") + [2],
    ]


def test_missing_and_unreadable_files(tmp_path, tok_dir):
    with pytest.raises(DataError, match="missing.jsonl: cannot read input file"):
        prep("pretrain", [tmp_path / "missing.jsonl"], tok_dir, tmp_path / "out")
    (tmp_path / "adir.jsonl").mkdir()
    with pytest.raises(DataError, match="adir.jsonl: cannot read"):
        prep("pretrain", [tmp_path / "adir.jsonl"], tok_dir, tmp_path / "out")
    if os.geteuid() != 0:  # root reads anything
        locked = write_jsonl(tmp_path / "locked.jsonl", [{"text": "x"}])
        locked.chmod(0)
        with pytest.raises(DataError, match="locked.jsonl: cannot read input file"):
            prep("pretrain", [locked], tok_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_existing_output_dir(tmp_path, tok_dir):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "one"}])
    out = tmp_path / "out"
    out.mkdir()
    prep("pretrain", [src], tok_dir, out, workers=1)  # an empty dir is fine
    with pytest.raises(LLMCoreError, match="exists and is not empty.*--overwrite"):
        prep("pretrain", [src], tok_dir, out, workers=1)
    write_jsonl(src, [{"text": "one"}, {"text": "two"}])
    m = prep("pretrain", [src], tok_dir, out, workers=1, overwrite=True)
    assert m["num_docs"] == 2 and len(ShardReader(out)) == 2
    # a failing overwrite keeps the old output intact
    write_jsonl(src, [{"text": "x"}], raw_lines={1: b"{bad"})
    with pytest.raises(DataError):
        prep("pretrain", [src], tok_dir, out, workers=1, overwrite=True)
    assert len(ShardReader(out)) == 2


def test_all_lines_bad_is_an_error(tmp_path, tok_dir):
    src = write_jsonl(tmp_path / "in.jsonl", [], raw_lines={0: b"{bad"})
    with pytest.raises(DataError, match="no valid documents"):
        prep("pretrain", [src], tok_dir, tmp_path / "out", on_bad_line="skip", workers=1)
    assert not (tmp_path / "out").exists()


def test_reader_refuses_other_tokenizer(tmp_path, tok_dir):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in TEXTS])
    prep("pretrain", [src], tok_dir, tmp_path / "out", workers=1)
    reader = ShardReader(tmp_path / "out")
    reader.check_tokenizer(load_tokenizer(tok_dir))
    other = train_tokenizer([src], tmp_path / "other", vocab_size=300)
    with pytest.raises(LLMCoreError, match="shards were made with tokenizer"):
        reader.check_tokenizer(load_tokenizer(other))


def test_reader_errors(tmp_path, tok_dir):
    with pytest.raises(LLMCoreError, match="not a shard dir"):
        ShardReader(tmp_path)
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "a"}, {"text": "b"}])
    prep("pretrain", [src], tok_dir, tmp_path / "out", workers=1)
    reader = ShardReader(tmp_path / "out")
    assert reader.lengths().tolist() == [len(reader.doc(0)["tokens"]), len(reader.doc(1)["tokens"])]
    with pytest.raises(IndexError):
        reader.doc(2)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    manifest["format_version"] = 99
    (tmp_path / "out" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(LLMCoreError, match="re-run `llmcore prep`"):
        ShardReader(tmp_path / "out")


def test_bom_and_crlf_lines_are_accepted(tmp_path, tok_dir):
    src = tmp_path / "in.jsonl"
    src.write_bytes(b'\xef\xbb\xbf{"text": "first"}\r\n{"text": "second"}\r\n')
    m = prep("pretrain", [src], tok_dir, tmp_path / "out", workers=1)
    tok = load_tokenizer(tok_dir)
    assert m["num_docs"] == 2 and m["lines_skipped"] == 0
    assert [d["tokens"] for d in read_all(tmp_path / "out")] == [
        [1] + tok.encode("first") + [2],
        [1] + tok.encode("second") + [2],
    ]
