"""CLI commands of the data pipeline, stats, offline download, and the built-in demo corpus."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llmcore.cli import app
from llmcore.data_prep.stats import compute_stats, format_stats
from llmcore.errors import LLMCoreError

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def _write(path: Path, rows: list, raw: dict[int, bytes] | None = None) -> Path:
    lines = [json.dumps(r, ensure_ascii=False).encode() for r in rows]
    for pos, b in sorted((raw or {}).items()):
        lines.insert(pos, b)
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def _conv(q: str, a: str) -> list[dict]:
    return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


def invoke(*args: str):
    res = runner.invoke(app, [str(a) for a in args])
    return res


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("cli")
    src = _write(d / "c.jsonl", [{"text": f"第{i}行 hello world 你好 😀 {i * 3}"} for i in range(300)])
    res = invoke("tokenizer", "train", "--input", src, "--vocab-size", "400", "--out", d / "tok")
    assert res.exit_code == 0, res.output
    assert "vocab 400" in res.output
    return d / "tok"


def test_help_has_examples():
    for cmd in (
        ["tokenizer", "train"],
        ["prep", "stats"],
        ["prep", "download"],
        ["prep", "pretrain"],
        ["prep", "sft"],
        ["prep", "dpo"],
        ["prep", "inspect"],
    ):
        res = invoke(*cmd, "--help")
        assert res.exit_code == 0 and "Example: llmcore " + " ".join(cmd) in " ".join(res.output.split()), cmd


def test_prep_and_inspect_sft(tmp_path, tok):
    src = _write(
        tmp_path / "s.jsonl", [{"conversations": _conv("问题一", "回答一")}, {"conversations": _conv("q2", "a2")}]
    )
    res = invoke("prep", "sft", "--input", src, "--tokenizer", tok, "--out", tmp_path / "sh", "--workers", "1")
    assert res.exit_code == 0, res.output
    assert "2 documents" in res.output
    res = invoke("prep", "inspect", tmp_path / "sh", "--start", "1", "--count", "5", "--decode")
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in res.output.strip().splitlines()]
    assert len(rows) == 1 and rows[0]["index"] == 1 and set(rows[0]) >= {"tokens", "loss_mask", "text"}
    assert "user\nq2<|im_end|>\n<|im_start|>assistant\n[[<think>\n\n</think>\n\na2<|im_end|>]]\n" in rows[0]["text"]


def test_prep_dpo_inspect_marks_only_final_reply(tmp_path, tok):
    pair = {"chosen": _conv("q", "a") + _conv("q2", "good"), "rejected": _conv("q", "a") + _conv("q2", "bad")}
    _write(tmp_path / "d.jsonl", [pair])
    assert invoke("prep", "dpo", "-i", tmp_path / "d.jsonl", "-t", tok, "-o", tmp_path / "sh", "-w", "1").exit_code == 0
    row = json.loads(invoke("prep", "inspect", tmp_path / "sh", "--decode").output)
    assert row["chosen_text"].count("[[") == 1 and "[[<think>\n\n</think>\n\ngood<|im_end|>]]" in row["chosen_text"]
    assert "[[<think>\n\n</think>\n\nbad<|im_end|>]]" in row["rejected_text"]
    assert "assistant\n<think>\n\n</think>\n\na<|im_end|>" in row["rejected_text"]  # earlier turns not learned


def test_inspect_refuses_another_tokenizer_even_without_decode(tmp_path, tok, shared_data):
    src = _write(tmp_path / "s.jsonl", [{"conversations": _conv("q", "a")}])
    assert invoke("prep", "sft", "-i", src, "-t", tok, "-o", tmp_path / "sh", "-w", "1").exit_code == 0
    res = invoke("prep", "inspect", tmp_path / "sh", "--tokenizer", shared_data / "minimind_tokenizer")
    assert res.exit_code != 0 and isinstance(res.exception, LLMCoreError)
    assert "tokenizer" in str(res.exception)
    assert invoke("prep", "inspect", tmp_path / "sh", "--tokenizer", tok).exit_code == 0


def test_deepspeed_launcher_local_rank_is_dropped_before_parsing(monkeypatch):
    from llmcore.cli import without_launcher_local_rank

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert without_launcher_local_rank(["--local_rank=1", "train", "pretrain", "--seed", "3"]) == [
        "train",
        "pretrain",
        "--seed",
        "3",
    ]
    assert os.environ["LOCAL_RANK"] == "1"
    assert without_launcher_local_rank(["--local-rank", "0", "eval", "--help"]) == ["eval", "--help"]


def test_cli_errors_are_one_line(tmp_path, tok):
    src = _write(tmp_path / "p.jsonl", [{"text": "ok"}], raw={1: b"{not json"})
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "llmcore",
            "prep",
            "pretrain",
            "--input",
            str(src),
            "--tokenizer",
            str(tok),
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2
    err_lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(err_lines) == 1 and err_lines[0].startswith(f"error: {src}:2: malformed JSON: ")
    assert "Traceback" not in proc.stderr and not (tmp_path / "o").exists()

    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "llmcore",
            "prep",
            "pretrain",
            "-i",
            str(tmp_path / "p.jsonl"),
            "-t",
            str(tok),
            "-o",
            str(tmp_path / "full"),
            "--on-bad-line",
            "skip",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert (
        proc.returncode == 2
        and proc.stderr.strip().splitlines()[-1].startswith("error: ")
        and "--overwrite" in proc.stderr
    )
    assert "Traceback" not in proc.stderr


def test_stats(tmp_path, tok):
    rows = [{"text": "a" * n} for n in (10, 20, 30, 40, 100)]
    src = _write(tmp_path / "p.jsonl", rows, raw={2: b"{bad", 4: b'{"text": ""}'})
    s = compute_stats(src, tokenizer_dir=tok, plot=tmp_path / "plot.png")
    assert s["rows"] == 5 and s["kind"] == "pretrain"
    assert s["chars_per_row"]["min"] == 10 and s["chars_per_row"]["max"] == 100 and s["chars_per_row"]["mean"] == 40.0
    assert s["chars_per_row"]["p50"] == 30
    assert (
        s["bad_by_reason"] == {"malformed_json": 1, "empty_text": 1}
        and s["first_bad_line_by_reason"]["malformed_json"] == 3
    )
    assert s["tokens_per_row"]["min"] >= 3 and s["total_tokens"] > 0
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "bad lines   2" in format_stats(s)
    sft = _write(tmp_path / "s.jsonl", [{"conversations": _conv("abc", "de")}])
    s = compute_stats(sft)
    assert s["kind"] == "sft" and s["chars_per_row"]["max"] == len("abc\nde")
    res = invoke("prep", "stats", src, "--json")
    assert res.exit_code == 0 and json.loads(res.output)["rows"] == 5


def test_stats_on_shared_sample(shared_data):
    s = compute_stats(shared_data / "dpo_sample.jsonl")
    assert s["kind"] == "dpo" and s["rows"] == 600 and s["bad_lines"] == 0


def test_download_offline_fails_fast_and_leaves_nothing(tmp_path):
    pytest.importorskip("modelscope")
    out = tmp_path / "dl"
    t0 = time.monotonic()
    res = invoke(
        "prep",
        "download",
        "--dataset",
        "gongjy/minimind_dataset",
        "--file",
        "pretrain_hq.jsonl",
        "--out",
        out,
        "--timeout",
        "10",
    )
    elapsed = time.monotonic() - t0
    if res.exit_code == 0:
        pytest.skip("this machine can reach ModelScope; the offline path cannot be tested here")
    assert isinstance(res.exception, LLMCoreError) and "ModelScope" in str(res.exception)
    assert elapsed < 40
    assert not (out / "pretrain_hq.jsonl").exists()
    assert not out.exists() or not any(out.iterdir())


def test_download_stall_kills_child_and_cleans_up(tmp_path, monkeypatch):
    """Past the probe, a download that gets no data is killed after the timeout; no partial file remains."""
    pytest.importorskip("modelscope")
    from llmcore.data_prep import download as dl

    monkeypatch.setattr(dl, "probe_hub", lambda endpoint, timeout: None)
    t0 = time.monotonic()
    with pytest.raises(LLMCoreError, match="pretrain_hq.jsonl (stalled|failed)"):
        dl.download("gongjy/minimind_dataset", "pretrain_hq.jsonl", tmp_path, timeout=3)
    assert time.monotonic() - t0 < 60
    assert list(tmp_path.iterdir()) == []


def test_demo_corpus(tmp_path, tok):
    pytest.importorskip("hsk_sentences_audio")
    pytest.importorskip("chatterbot_corpus")
    from llmcore.data_prep.demo_data import build_demo_corpus

    paths = build_demo_corpus(tmp_path / "demo", pretrain_docs=400, sft_docs=300, dpo_docs=100)
    counts = {k: len(p.read_text(encoding="utf-8").splitlines()) for k, p in paths.items()}
    assert counts == {"pretrain": 400, "sft": 300, "dpo": 100}
    dpo = [json.loads(line) for line in paths["dpo"].read_text(encoding="utf-8").splitlines()]
    assert all(r["chosen"][:-1] == r["rejected"][:-1] and r["chosen"][-1] != r["rejected"][-1] for r in dpo)
    sft = [json.loads(line) for line in paths["sft"].read_text(encoding="utf-8").splitlines()]
    assert any(len(r["conversations"]) > 2 for r in sft)  # chatterbot's multi-turn dialogues
    # Same output on a second build: the corpus is deterministic.
    again = build_demo_corpus(tmp_path / "again", pretrain_docs=400, sft_docs=300, dpo_docs=100)
    assert all(again[k].read_bytes() == paths[k].read_bytes() for k in paths)
    # and every file preps without a bad line
    for kind in ("pretrain", "sft", "dpo"):
        res = invoke("prep", kind, "-i", paths[kind], "-t", tok, "-o", tmp_path / f"sh-{kind}", "-w", "1")
        assert res.exit_code == 0, res.output
        assert "skipped" not in res.output


def test_tokenizer_template_flag_and_prep_empty_think_flags(tmp_path):
    src = _write(tmp_path / "c.jsonl", [{"text": "hello world 你好 世界"}] * 30)
    res = invoke(
        "tokenizer", "train", "-i", src, "-o", tmp_path / "chatml", "--vocab-size", "300", "--template", "chatml"
    )
    assert res.exit_code == 0, res.output
    assert (
        "You are a helpful assistant"
        in json.loads((tmp_path / "chatml" / "tokenizer_config.json").read_text())["chat_template"]
    )
    res = invoke("tokenizer", "train", "-i", src, "-o", tmp_path / "q", "--template", "qwen")
    assert (
        isinstance(res.exception, LLMCoreError)
        and str(res.exception) == "--template 'qwen': expected one of minimind3, chatml"
    )
    res = invoke("tokenizer", "train", "-i", src, "-o", tmp_path / "m3", "--vocab-size", "300")
    assert res.exit_code == 0, res.output
    rows = [{"conversations": _conv(f"q{i}", f"a{i}")} for i in range(40)]
    sft = _write(tmp_path / "s.jsonl", rows)
    res = invoke(
        "prep",
        "sft",
        "-i",
        sft,
        "-t",
        tmp_path / "m3",
        "-o",
        tmp_path / "sh",
        "--drop-empty-think",
        "0.5",
        "--seed",
        "3",
    )
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "sh" / "manifest.json").read_text())["empty_think"] == {"drop": 0.5, "seed": 3}
    res = invoke("prep", "sft", "-i", sft, "-t", tmp_path / "m3", "-o", tmp_path / "sh2", "--drop-empty-think", "2")
    assert isinstance(res.exception, LLMCoreError) and str(res.exception).startswith(
        "--drop-empty-think must be between 0 and 1"
    )
    assert "--drop-empty-think" not in invoke("prep", "pretrain", "--help").output
