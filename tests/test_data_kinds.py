"""Shard kinds: one registry that prep, stats, the reader and the CLI ask; a new kind is one class;
reading shards stays free of the tokenizer and the writer."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from llmcore.data_prep import kinds
from llmcore.data_prep.jsonl import BadLine, check_messages
from llmcore.data_prep.kinds import KINDS, ShardKind, detect_kind, get_kind, marked_text, masked_chats
from llmcore.data_prep.prep import prep
from llmcore.data_prep.shards import ShardReader
from llmcore.data_prep.stats import compute_stats
from llmcore.data_prep.tokenizer import load_tokenizer, train_tokenizer
from llmcore.errors import LLMCoreError

CHAT = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！有什么可以帮你？"}]


def test_reading_shards_imports_neither_tokenizer_nor_writer():
    code = (
        "import sys, llmcore.data_prep.shards; "
        "print(sorted(m for m in ('llmcore.data_prep.prep', 'llmcore.data_prep.tokenizer', 'tokenizers', "
        "'multiprocessing.pool') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_kinds_module_is_cheap_to_import():
    code = "import sys, llmcore.data_prep.kinds; print(sorted(m for m in ('numpy', 'pyarrow', 'tokenizers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"  # the CLI builds its prep commands from the registry at import


def test_registry_names_detection_and_errors():
    assert list(KINDS) == ["pretrain", "sft", "dpo"]
    assert all(k.name == name and isinstance(k, ShardKind) for name, k in KINDS.items())
    assert get_kind("sft") is KINDS["sft"] and get_kind(KINDS["dpo"]) is KINDS["dpo"]
    with pytest.raises(LLMCoreError, match="unknown kind 'kto'; expected one of pretrain, sft, dpo"):
        get_kind("kto")
    assert detect_kind({"text": "x"}).name == "pretrain" and detect_kind({}).name == "pretrain"
    assert detect_kind({"conversations": []}).name == "sft"
    assert detect_kind({"chosen": [], "rejected": []}).name == "dpo"
    assert [k.name for k in KINDS.values() if k.text_field] == ["pretrain"]
    for k in KINDS.values():
        assert set(k.token_columns) <= set(k.columns) and k.schema().names == list(k.columns)
        assert k.help.strip() and "Example: llmcore prep " + k.name in k.help


def test_checks_come_from_the_kind():
    assert KINDS["pretrain"].check({"body": "x"}, "body") == "x"
    assert isinstance(KINDS["pretrain"].check({"text": ""}), BadLine)
    assert KINDS["sft"].check({"conversations": CHAT}) == CHAT
    bad = KINDS["dpo"].check({"chosen": CHAT, "rejected": CHAT[:1]})
    assert isinstance(bad, BadLine) and bad.reason == "no_assistant_turn"


def test_cli_prep_commands_are_built_from_the_registry():
    from llmcore.cli import app

    runner = CliRunner()
    for kind in KINDS.values():
        res = runner.invoke(app, ["prep", kind.name, "--help"], env={"COLUMNS": "200"})
        assert res.exit_code == 0, res.output
        assert kind.help.split("\n")[0][:40] in res.output
        assert ("--field" in res.output) == kind.text_field


class KTOKind(ShardKind):
    """KTO's unpaired preference rows, as a new kind would be added: one class plus one registry line."""

    name = "kto"
    help = """Tokenize {"conversations": [...], "label": true|false} lines.

    Example: llmcore prep kto --input kto.jsonl --tokenizer tok/ --out shards/kto
    """
    columns = {"tokens": "uint16", "loss_mask": "uint8", "label": "uint8"}
    token_columns = ("tokens",)

    def detect(self, obj):
        return "label" in obj and "conversations" in obj

    def check(self, obj, field="text"):
        if not isinstance(obj.get("label"), bool):
            return BadLine("bad_field_type", 'field "label" must be true or false')
        messages = check_messages(obj, "conversations", final_assistant=True)
        return messages if isinstance(messages, BadLine) else (messages, obj["label"])

    def encode(self, tok, payloads):
        cols = masked_chats(tok, [p[0] for p in payloads], True, "tokens", "loss_mask")
        cols["label"] = (np.array([p[1] for p in payloads], dtype=np.uint8), np.ones(len(payloads), dtype=np.int64))
        return cols

    def row_text(self, payload):
        return "\n".join(m["content"] for m in payload[0])

    def count_tokens(self, tok, payloads):
        return [len(tok.encode(tok.apply_chat_template(p[0]))) for p in payloads]

    def render(self, tok, doc):
        return {"text": marked_text(tok, doc["tokens"], doc["loss_mask"]), "desirable": bool(doc["label"][0])}


@pytest.mark.parametrize("workers", [1, 2])
def test_a_new_kind_is_one_class_and_one_registry_line(tmp_path, monkeypatch, workers):
    monkeypatch.setitem(kinds.KINDS, "kto", KTOKind())  # the registry line
    rows = [{"conversations": CHAT, "label": i % 3 != 0} for i in range(12)] + [{"conversations": CHAT, "label": "yes"}]
    src = tmp_path / "kto.jsonl"
    src.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(
        "".join(json.dumps({"text": m["content"] * 3}, ensure_ascii=False) + "\n" for m in CHAT * 20), encoding="utf-8"
    )
    tok_dir = train_tokenizer([corpus], tmp_path / "tok", vocab_size=300)
    tok = load_tokenizer(tok_dir)

    m = prep("kto", [src], tok_dir, tmp_path / "sh", workers=workers, on_bad_line="skip")
    assert m["kind"] == "kto" and m["num_docs"] == 12 and m["skipped_by_reason"] == {"bad_field_type": 1}
    assert m["columns"] == {"tokens": "list<uint16>", "loss_mask": "list<uint8>", "label": "list<uint8>"}
    reader = ShardReader(tmp_path / "sh")
    assert reader.kind == "kto" and len(reader) == 12
    doc = reader.doc(1)
    assert doc["label"].tolist() == [1] and doc["loss_mask"].sum() > 0
    assert reader.lengths().tolist() == [len(reader.doc(i)["tokens"]) for i in range(12)]
    rendered = KINDS["kto"].render(tok, {k: v.tolist() for k, v in reader.doc(0).items()})
    assert rendered["desirable"] is False and "[[" in rendered["text"]

    s = compute_stats(src, tokenizer_dir=tok_dir, kind="kto")
    assert s["kind"] == "kto" and s["rows"] == 12 and s["bad_lines"] == 1
    assert s["total_tokens"] == sum(len(reader.doc(i)["tokens"]) for i in range(12))
    assert detect_kind(rows[0]).name == "sft"  # detection asks the kinds in registry order
